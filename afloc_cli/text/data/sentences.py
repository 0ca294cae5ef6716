"""Report text -> sentences -> word units, exactly as the reference prepares it.

The reference (after GLoRIA) replaces newlines, splits on enumerations (`1.`)
and on ".", lower-cases, keeps `\\w+` tokens (ASCII only), and drops sentences
of one token or fewer. In training the kept sentences are joined by ". ", so
"." becomes a word unit of its own and marks sentence boundaries; at inference
a prompt's sentences are joined by " ". A prompt whose every sentence would be
dropped (a one-word prompt such as "Pneumothorax") is kept whole instead of
turning into an empty text; `PreparedText.kept_short` records that.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_ENUMERATION = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")
_UNDERSCORE = re.compile(r"_|[^_]+")
PERIOD = "."


def split_sentences(text: str, *, keep_short_if_empty: bool = False) -> list[list[str]]:
    """Sentences of lower-case ASCII `\\w+` tokens; sentences of <= 1 token are dropped.

    With `keep_short_if_empty`, a text whose sentences are all dropped keeps its
    tokens as one sentence rather than vanishing.
    """
    text = text.replace("\n", " ")
    pieces = [s for point in _ENUMERATION.split(text) for s in point.split(".")]
    sentences: list[list[str]] = []
    short: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        piece = piece.replace("\ufffd\ufffd", " ")
        tokens = _WORD.findall(piece.lower())
        ascii_tokens = [t.encode("ascii", "ignore").decode("ascii") for t in tokens]
        # BERT's pre-tokenizer splits "_" off as punctuation and the reference, grouping only "##"
        # pieces, keeps each part a word unit ("right_upper" -> right, _, upper; MIMIC's "___" -> 3).
        ascii_tokens = [part for t in ascii_tokens for part in _UNDERSCORE.findall(t)]
        if len(tokens) <= 1:
            short.extend(ascii_tokens)
            continue
        if ascii_tokens:
            sentences.append(ascii_tokens)
    if not sentences and keep_short_if_empty and short:
        sentences = [short]
    return sentences


@dataclass(frozen=True)
class PreparedText:
    """Words as fed to the tokenizer, and the sentence each word belongs to (-1 for ".")."""

    words: tuple[str, ...]
    sentence_of_word: tuple[int, ...]
    n_sentences: int
    kept_short: bool = False

    @property
    def text(self) -> str:
        return " ".join(self.words)


def join_sentences(sentences: list[list[str]], *, periods: bool, kept_short: bool = False) -> PreparedText:
    words: list[str] = []
    owner: list[int] = []
    for i, sentence in enumerate(sentences):
        if periods and i > 0:
            words.append(PERIOD)
            owner.append(-1)
        words.extend(sentence)
        owner.extend([i] * len(sentence))
    return PreparedText(tuple(words), tuple(owner), len(sentences), kept_short)


def prepare_report(text: str) -> PreparedText:
    """A report for training or scoring: sentences joined by ". " as in the reference's training."""
    return join_sentences(split_sentences(text), periods=True)


def prepare_prompt(text: str) -> PreparedText:
    """A prompt for localization: sentences joined by " " as in the reference's inference.

    One-word prompts are kept (`kept_short`), never silently emptied.
    """
    sentences = split_sentences(text)
    kept_short = False
    if not sentences:
        sentences = split_sentences(text, keep_short_if_empty=True)
        kept_short = bool(sentences)
    return join_sentences(sentences, periods=False, kept_short=kept_short)


REPORT_SAMPLING = ("subset", "all")


def sample_report(sentences: list[list[str]], rng: random.Random, mode: str = "subset") -> PreparedText:
    """Training-time sampling: a random subset of 1..n-1 sentences (all when n = 1), shuffled.

    "subset" matches the reference's `random_combine_mode 1` with `random_num`: numpy's
    randint(1, n) draws 1..n-1 sentences, chosen without replacement in random order.
    "all" keeps every sentence in the report's order: no pair loses the sentence that
    names its finding, which matters on a small corpus and budget, and each report's
    text is then fixed, so a frozen text encoder's features are computed once
    (benchmarks/RESULTS.md, "Demo learning").
    """
    n = len(sentences)
    if mode == "all":
        return join_sentences(sentences, periods=True)
    if mode != "subset":
        raise ValueError(f"report sampling must be one of {', '.join(REPORT_SAMPLING)}, not {mode!r}")
    if n <= 1:
        return join_sentences(sentences, periods=True)
    k = rng.randint(1, n - 1)
    chosen = rng.sample(range(n), k)
    return join_sentences([sentences[i] for i in chosen], periods=True)
