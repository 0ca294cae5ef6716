"""Prompt lists as users write them, checked before any image is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from afloc_cli.errors import AflocError
from afloc_cli.text.data.sentences import prepare_prompt


@dataclass
class PromptList:
    prompts: list[str]
    notes: list[str] = field(default_factory=list)  # duplicates removed, truncations, one-word prompts


def parse_prompts(lines: list[str], source: str, *, comments: bool = True) -> PromptList:
    """One prompt per line; blank lines ignored; duplicates removed with a note.

    With `comments` (prompt files) a line starting with `#` is a comment; prompts given on the command line
    are taken as given, since `#2 rib fracture` is a finding, not a comment.
    """
    prompts: list[str] = []
    notes: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or (comments and text.startswith("#")):
            continue
        if text in seen:
            notes.append(f"{source}:{number}: duplicate of line {seen[text]} removed: {text!r}")
            continue
        seen[text] = number
        prompts.append(text)
    return PromptList(prompts, notes)


def read_prompts_file(path: Path) -> PromptList:
    try:
        content = path.read_bytes()
    except FileNotFoundError as exc:
        raise AflocError("prompts file not found", path=path) from exc
    except OSError as exc:
        raise AflocError(f"cannot read prompts file: {exc.strerror}", path=path) from exc
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AflocError(f"prompts file is not UTF-8 (byte {exc.start})", path=path) from exc
    return parse_prompts(_lines(text), str(path))


def _lines(text: str) -> list[str]:
    """Split on \\n, \\r\\n and \\r only: str.splitlines() also splits on form feed, U+0085 (a mis-decoded
    Windows-1252 ellipsis) and U+2028, which would turn one prompt into two."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def check_prompts(prompts: PromptList, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PromptList:
    """Add notes for prompts the model will truncate or that reduce to nothing."""
    notes = list(prompts.notes)
    for prompt in prompts.prompts:
        prepared = prepare_prompt(prompt)
        if not prepared.words:
            notes.append(f"prompt {prompt!r} has no words the model can read; its map will be uninformative")
            continue
        if prepared.kept_short:
            notes.append(f"prompt {prompt!r} is a single word: kept as is (the reference would drop it)")
        n_tokens = len(tokenizer(list(prepared.words), is_split_into_words=True)["input_ids"])
        if n_tokens > max_length:
            notes.append(f"prompt {prompt[:40]!r}... has {n_tokens} tokens: truncated to {max_length}")
    return PromptList(list(prompts.prompts), notes)
