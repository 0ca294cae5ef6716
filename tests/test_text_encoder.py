"""The text side against SPEC.md: sentence rules, word units, sentence units, report pooling."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afloc_cli.text.data.sentences import (
    PERIOD,
    prepare_prompt,
    prepare_report,
    sample_report,
    split_sentences,
)


def test_split_sentences_reference_rules():
    text = "FINDINGS: 1. Heart size is normal.\n2. Small left effusion. Clear. No pneumothorax"
    # "FINDINGS:" and "Clear" are one-token sentences: dropped, as the reference does.
    assert split_sentences(text) == [
        ["heart", "size", "is", "normal"],
        ["small", "left", "effusion"],
        ["no", "pneumothorax"],
    ]


def test_short_sentences_dropped_but_one_word_prompt_kept():
    assert split_sentences("Pneumothorax.") == []
    prepared = prepare_prompt("Pneumothorax")
    assert prepared.words == ("pneumothorax",)
    assert prepared.kept_short
    assert not prepare_prompt("Left pleural effusion").kept_short


def test_non_ascii_tokens_are_stripped():
    assert split_sentences("Opacité du poumon gauche.") == [["opacit", "du", "poumon", "gauche"]]


def test_report_joins_with_period_units_prompt_without():
    report = prepare_report("Heart is normal. Left effusion is seen.")
    assert report.words == ("heart", "is", "normal", PERIOD, "left", "effusion", "is", "seen")
    assert report.sentence_of_word == (0, 0, 0, -1, 1, 1, 1, 1)
    prompt = prepare_prompt("Heart is normal. Left effusion is seen.")
    assert PERIOD not in prompt.words


@given(n=st.integers(1, 8), seed=st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_sample_report_takes_1_to_n_minus_1_sentences(n, seed):
    sentences = [[f"w{i}", f"x{i}"] for i in range(n)]
    sampled = sample_report(sentences, random.Random(seed))
    k = sampled.n_sentences
    if n == 1:
        assert k == 1
    else:
        assert 1 <= k <= n - 1
    kept = [w for w in sampled.words if w != PERIOD]
    assert len(set(kept)) == len(kept) == 2 * k


def _reference_word_units(model, text: str) -> torch.Tensor:
    """Independent re-derivation: '##' pieces summed into words as the reference does."""
    tok = model.text_encoder.tokenizer
    enc = tok(text, padding="max_length", truncation=True, max_length=97, return_tensors="pt")
    with torch.no_grad():
        out = model.text_encoder.model(**enc, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states[-4:]).sum(0)[0]
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    units: list[torch.Tensor] = []
    bank: list[torch.Tensor] = []
    for vec, piece in zip(hidden, pieces, strict=True):
        if piece == "[SEP]":
            units.append(torch.stack(bank).sum(0))
            units.append(vec)
            break
        if piece.startswith("##"):
            bank.append(vec)
        else:
            if bank:
                units.append(torch.stack(bank).sum(0))
            bank = [vec]
    return torch.stack(units)


@given(n=st.integers(1, 8), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_sample_report_all_keeps_every_sentence(n, seed):
    sentences = [[f"w{i}", f"x{i}"] for i in range(n)]
    sampled = sample_report(sentences, random.Random(seed), "all")
    assert sampled.n_sentences == n
    assert [w for w in sampled.words if w != PERIOD] == [w for s in sentences for w in s]
    with pytest.raises(ValueError):
        sample_report(sentences, random.Random(seed), "most")


def test_word_units_match_reference_aggregation(small_model):
    # "___" (MIMIC's de-identification) and "right_sided": BERT splits "_" off, and so do the reference's units.
    text = "Mild bibasilar atelectasis. Cardiomegaly is unchanged. Pneumothorax absent. Dr. ___ saw a right_sided line"
    prepared = prepare_report(text)
    with torch.no_grad():
        feats = small_model.encode_texts([prepared])
    expected = _reference_word_units(small_model, prepared.text)
    n = expected.shape[0]
    assert n == len(prepared.words) + 2
    torch.testing.assert_close(feats.words[0, :n], expected, atol=1e-4, rtol=1e-4)
    # Loss units: [CLS] + words, not [SEP].
    assert int(feats.word_mask[0].sum()) == n - 1
    # Reference report pooling: mean over 97 slots, zeros included.
    torch.testing.assert_close(feats.report[0], expected.sum(0) / 97, atol=1e-4, rtol=1e-4)
    # Sentences: CLS, mean of each sentence's words, SEP.
    owners = prepared.sentence_of_word
    for s in range(prepared.n_sentences):
        idx = [1 + w for w, o in enumerate(owners) if o == s]
        torch.testing.assert_close(feats.sentences[0, 1 + s], expected[idx].mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats.sentences[0, 0], expected[0])
    torch.testing.assert_close(feats.sentences[0, prepared.n_sentences + 1], expected[-1])
    assert int(feats.sentence_mask[0].sum()) == prepared.n_sentences + 1


def test_batch_padding_does_not_change_units(small_model):
    long = prepare_report("The heart is normal in size. There is a large right pleural effusion. No pneumothorax")
    short = prepare_prompt("left effusion")
    with torch.no_grad():
        both = small_model.encode_texts([long, short])
        alone = small_model.encode_texts([short])
    n = alone.words.shape[1]
    torch.testing.assert_close(both.words[1, :n], alone.words[0], atol=1e-4, rtol=1e-4)
    assert both.words[1, n:].abs().max() == 0
    torch.testing.assert_close(both.report[1], alone.report[0], atol=1e-4, rtol=1e-4)


def test_padding_to_longest_equals_reference_padding(small_model):
    """Training and prompts pad to the batch's longest text; the reference pads to 97: same features."""
    texts = [prepare_report("The heart is normal in size. There is a large right pleural effusion. No pneumothorax"),
             prepare_prompt("left effusion"), prepare_prompt("")]
    enc = small_model.text_encoder
    short, full = enc.tokenize(texts), enc.tokenize(texts, pad_to_max_length=True)
    assert short.input_ids.shape[1] < full.input_ids.shape[1] == 97
    with torch.no_grad():
        a, b = enc(short), enc(full)
    for name in ("words", "word_mask", "sentences", "sentence_mask", "report"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)


def test_masked_mean_pooling_option(text_folder):
    from afloc_cli.config import small_config
    from afloc_cli.vlp.model import build_model

    cfg = small_config()
    cfg = cfg.replace(text=type(cfg.text)(model=cfg.text.model, report_pooling="masked_mean"))
    model = build_model(cfg, text_folder=text_folder).eval()
    prepared = prepare_prompt("small left pleural effusion")
    with torch.no_grad():
        feats = model.encode_texts([prepared])
    n = len(prepared.words) + 2
    torch.testing.assert_close(feats.report[0], feats.words[0, :n].mean(0), atol=1e-5, rtol=1e-5)


def test_truncation_at_97_tokens(small_model):
    text = ". ".join(f"finding number {i} is present" for i in range(60))
    prepared = prepare_report(text)
    with torch.no_grad():
        feats = small_model.encode_texts([prepared])
    assert feats.words.shape[1] <= 97
    assert torch.isfinite(feats.report).all()


def test_encode_prompts_shape(small_model):
    emb = small_model.encode_prompts(["Findings suggesting pneumonia.", "Pneumothorax", "cardiomegaly"])
    assert emb.shape == (3, small_model.embed_dim)
    assert torch.isfinite(emb).all()


@pytest.mark.parametrize("text", ["", "   ", "..."])
def test_empty_prompt_gives_cls_sep_only(small_model, text):
    prepared = prepare_prompt(text)
    assert prepared.words == ()
    with torch.no_grad():
        feats = small_model.encode_texts([prepared])
    assert int(feats.word_mask[0].sum()) == 1  # [CLS] only
