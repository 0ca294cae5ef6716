"""The text encoder: BERT hidden states -> word, sentence and report embeddings.

Follows the reference (SPEC.md, "Text encoder"):
- hidden states are the sum of the last 4 layers;
- word pieces are summed back into words; `[CLS]` is unit 0, `[SEP]` follows the words;
- a sentence is the mean of its words; the sentence sequence is `[CLS], s0..sK, [SEP]`;
- the report embedding is the mean over all `max_length` word slots, zero padding
  included ("reference"), or over the real units only ("masked_mean");
- the units a local loss aligns are `[CLS]` and the words (or sentences), not `[SEP]`.
No projection head on the text side: the image side projects into this space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from afloc_cli.config import TextConfig
from afloc_cli.errors import TextModelError
from afloc_cli.text.data.sentences import PreparedText


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    token_type_ids: torch.Tensor | None
    unit_of_token: torch.Tensor  # (B, L) word-unit slot of each token; U (a dump slot) for padding
    n_units: torch.Tensor  # (B,) CLS + words + SEP
    sentence_of_unit: torch.Tensor  # (B, U) sentence slot of each unit; S (dump) for "." and padding
    n_sentence_units: torch.Tensor  # (B,) CLS + sentences + SEP

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.token_type_ids is None else self.token_type_ids.to(device),
            self.unit_of_token.to(device),
            self.n_units.to(device),
            self.sentence_of_unit.to(device),
            self.n_sentence_units.to(device),
        )


@dataclass
class TextFeatures:
    words: torch.Tensor  # (B, U, d): CLS, words, SEP, zeros
    word_mask: torch.Tensor  # (B, U) bool: the units the word-level loss aligns (CLS + words)
    sentences: torch.Tensor  # (B, S, d): CLS, sentences, SEP, zeros
    sentence_mask: torch.Tensor  # (B, S) bool: CLS + sentences
    report: torch.Tensor  # (B, d)


def _quiet_transformers() -> None:
    """Load reports and progress bars of transformers are noise on our command line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(folder: Path | str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise TextModelError(f"cannot load a tokenizer: {exc}", path=folder) from exc
    if not tokenizer.is_fast:
        raise TextModelError("afloc needs a fast (Rust) tokenizer for word alignment", path=folder)
    return tokenizer


@contextlib.contextmanager
def settings_kept(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Give the Rust tokenizer back its truncation and padding settings after a call.

    A call sets them on the tokenizer and leaves them there, and save_pretrained writes them into tokenizer.json:
    a checkpoint's embedded tokenizer (so its sha256) would otherwise depend on whether, and how, the encoder
    had tokenized anything in that process before the checkpoint was written.
    """
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    try:
        yield
    finally:
        if backend.truncation != truncation:
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
        if backend.padding != padding:
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, cfg: TextConfig, folder: Path | str, *, pretrained: bool = True) -> TextEncoder:
        """Build from a local Hugging Face folder; `pretrained=False` builds the shape only."""
        _quiet_transformers()
        try:
            if pretrained:
                model = AutoModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
            else:
                config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
                model = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            # Models without a pooler do not take `add_pooling_layer`.
            if pretrained:
                model = AutoModel.from_pretrained(str(folder), local_files_only=True)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        except Exception as exc:  # noqa: BLE001
            raise TextModelError(f"cannot load the text model: {exc}", path=folder) from exc
        return cls(cfg, model, load_tokenizer(folder))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    # ---- tokenization ------------------------------------------------------------------
    def tokenize(self, texts: Sequence[PreparedText], *, pad_to_max_length: bool = False) -> TextBatch:
        """Tokenize prepared texts (truncated to max_length as the reference), with unit maps.

        Padding only to the batch's longest text gives the same features as the
        reference's padding to max_length (padding is masked out of attention and
        dropped from every unit; the report pooling divides by max_length either
        way) at a fraction of the cost; compiled text engines, traced at
        max_length, ask for the full padding.
        """
        with settings_kept(self.tokenizer):
            enc = self.tokenizer(
                [list(t.words) for t in texts],
                is_split_into_words=True,
                padding="max_length" if pad_to_max_length else "longest",
                truncation=True,
                max_length=self.cfg.max_length,
                return_tensors="pt",
            )
        L = int(enc["input_ids"].shape[1])
        B = len(texts)
        unit_of_token = torch.full((B, L), L, dtype=torch.long)
        sentence_of_unit = torch.full((B, L), L, dtype=torch.long)
        n_units = torch.zeros(B, dtype=torch.long)
        n_sentence_units = torch.zeros(B, dtype=torch.long)
        special = set(self.tokenizer.all_special_ids)
        for b, text in enumerate(texts):
            word_ids = enc.word_ids(b)
            ids = enc["input_ids"][b].tolist()
            mask = enc["attention_mask"][b].tolist()
            real = [i for i in range(L) if mask[i]]
            n_kept = max((w for w in word_ids if w is not None), default=-1) + 1
            for i in real:
                w = word_ids[i]
                if w is not None:
                    unit_of_token[b, i] = 1 + w
                elif i == real[0] and ids[i] in special:
                    unit_of_token[b, i] = 0  # [CLS]
                else:
                    unit_of_token[b, i] = 1 + n_kept  # [SEP] (and any trailing special token)
            n_units[b] = n_kept + 2
            # Sentence slots: CLS -> 0; sentence s (renumbered over the surviving ones) -> 1+s; SEP last.
            sentence_of_unit[b, 0] = 0
            renumber: dict[int, int] = {}
            for w in range(n_kept):
                owner = text.sentence_of_word[w]
                if owner < 0:
                    continue
                slot = renumber.setdefault(owner, 1 + len(renumber))
                sentence_of_unit[b, 1 + w] = slot
            sentence_of_unit[b, 1 + n_kept] = 1 + len(renumber)
            n_sentence_units[b] = len(renumber) + 2
        token_type_ids = enc.get("token_type_ids")
        return TextBatch(
            enc["input_ids"], enc["attention_mask"], token_type_ids, unit_of_token, n_units,
            sentence_of_unit, n_sentence_units,
        )

    # ---- forward -----------------------------------------------------------------------
    def forward(self, batch: TextBatch) -> TextFeatures:
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.token_type_ids is not None:
            kwargs["token_type_ids"] = batch.token_type_ids
        out = self.model(**kwargs, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[-self.cfg.last_n_layers :]).sum(0)  # (B, L, d)
        B, L, d = hidden.shape

        U = int(batch.n_units.max())
        # Sum word pieces into word slots; slot L collects padding and is cut off.
        words = hidden.new_zeros(B, L + 1, d)
        words.scatter_add_(1, batch.unit_of_token.unsqueeze(-1).expand(B, L, d), hidden)
        words = words[:, :U]
        slots = torch.arange(U, device=hidden.device)
        real_unit = slots.unsqueeze(0) < batch.n_units.unsqueeze(1)
        words = words * real_unit.unsqueeze(-1)
        word_mask = slots.unsqueeze(0) < (batch.n_units - 1).unsqueeze(1)  # CLS + words, no SEP

        if self.cfg.report_pooling == "reference":
            report = words.sum(1) / float(self.cfg.max_length)
        else:
            report = words.sum(1) / batch.n_units.unsqueeze(1).to(words.dtype)

        S = int(batch.n_sentence_units.max())
        sent_index = batch.sentence_of_unit[:, :U].clamp(max=S)
        sent_index = torch.where(real_unit, sent_index, torch.full_like(sent_index, S))
        sums = words.new_zeros(B, S + 1, d)
        sums.scatter_add_(1, sent_index.unsqueeze(-1).expand(B, U, d), words)
        counts = words.new_zeros(B, S + 1)
        counts.scatter_add_(1, sent_index, torch.ones_like(sent_index, dtype=words.dtype))
        sentences = (sums / counts.clamp(min=1).unsqueeze(-1))[:, :S]
        sslots = torch.arange(S, device=hidden.device)
        sentences = sentences * (sslots.unsqueeze(0) < batch.n_sentence_units.unsqueeze(1)).unsqueeze(-1)
        sentence_mask = sslots.unsqueeze(0) < (batch.n_sentence_units - 1).unsqueeze(1)
        return TextFeatures(words, word_mask, sentences, sentence_mask, report)
