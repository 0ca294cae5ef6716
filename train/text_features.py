"""Features of a frozen text encoder, computed once per distinct text and reused.

With `freeze_text` the text side is a fixed function of the words (the encoder
runs in eval mode, so without dropout), and a report's sampled sentence subsets
repeat from epoch to epoch: on the demo corpus most of the text encoder's cost
is saved. The batch assembled from cached rows has exactly the shapes and masks
of `TextEncoder.forward` on that batch, whose per-text values do not depend on
the batch (padding is masked out).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afloc_cli.text.data.sentences import PreparedText
from afloc_cli.text.model.encoder import TextEncoder, TextFeatures


@dataclass(frozen=True)
class _Row:
    words: torch.Tensor  # (n_units, d): CLS, words, SEP
    sentences: torch.Tensor  # (n_sentence_units, d): CLS, sentences, SEP
    report: torch.Tensor  # (d,)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.sentences, self.report))


class FrozenTextFeatures:
    """An LRU of per-text features, bounded in bytes; misses are encoded together in one batch."""

    def __init__(self, encoder: TextEncoder, device: torch.device, max_bytes: int = 1 << 30) -> None:
        self.encoder = encoder
        self.device = device
        self.max_bytes = max_bytes
        self.rows: OrderedDict[PreparedText, _Row] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @torch.no_grad()
    def _encode(self, texts: list[PreparedText]) -> list[_Row]:
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            feats = self.encoder(self.encoder.tokenize(texts).to(self.device))
        finally:
            self.encoder.train(was_training)
        n_units = feats.word_mask.sum(1) + 1  # the loss units are CLS + words; SEP follows them
        n_sent = feats.sentence_mask.sum(1) + 1
        return [
            _Row(feats.words[b, : int(n_units[b])].clone(), feats.sentences[b, : int(n_sent[b])].clone(),
                 feats.report[b].clone())
            for b in range(len(texts))
        ]

    def _store(self, text: PreparedText, row: _Row) -> None:
        if self.max_bytes <= 0:
            return
        self.rows[text] = row
        self.bytes += row.nbytes
        while self.bytes > self.max_bytes and self.rows:
            _, old = self.rows.popitem(last=False)
            self.bytes -= old.nbytes

    def __call__(self, texts: Sequence[PreparedText]) -> TextFeatures:
        found: dict[PreparedText, _Row] = {}
        missing: list[PreparedText] = []
        for text in texts:
            row = self.rows.get(text)
            if row is not None:
                self.rows.move_to_end(text)
                found[text] = row
                self.hits += 1
            elif text not in found and text not in missing:
                missing.append(text)
                self.misses += 1
            else:
                self.hits += 1
        if missing:
            for text, row in zip(missing, self._encode(missing), strict=True):
                found[text] = row
                self._store(text, row)
        return assemble([found[t] for t in texts])

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def assemble(rows: Sequence[_Row]) -> TextFeatures:
    """Pad per-text rows into the batch layout of TextEncoder.forward."""
    B = len(rows)
    d = rows[0].report.shape[0]
    U = max(r.words.shape[0] for r in rows)
    S = max(r.sentences.shape[0] for r in rows)
    ref = rows[0].report
    words = ref.new_zeros(B, U, d)
    sentences = ref.new_zeros(B, S, d)
    n_units = torch.tensor([r.words.shape[0] for r in rows], device=ref.device)
    n_sent = torch.tensor([r.sentences.shape[0] for r in rows], device=ref.device)
    for b, r in enumerate(rows):
        words[b, : r.words.shape[0]] = r.words
        sentences[b, : r.sentences.shape[0]] = r.sentences
    word_mask = torch.arange(U, device=ref.device).unsqueeze(0) < (n_units - 1).unsqueeze(1)
    sentence_mask = torch.arange(S, device=ref.device).unsqueeze(0) < (n_sent - 1).unsqueeze(1)
    return TextFeatures(words, word_mask, sentences, sentence_mask, torch.stack([r.report for r in rows]))
