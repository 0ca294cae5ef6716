"""One way for every command to get a model from `--checkpoint`: ours, or the reference's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from afloc_cli.checkpoint.io import checkpoint_kind, load_checkpoint, sha256_file
from afloc_cli.errors import CheckpointError
from afloc_cli.vlp.model import AflocModel

CHECKPOINT_ENV = "AFLOC_CHECKPOINT"


@dataclass
class LoadedCheckpoint:
    model: AflocModel
    path: Path
    sha256: str
    kind: str  # "afloc" | "reference"
    notes: list[str]


def checkpoint_path(option: Path | None) -> Path:
    if option is not None:
        return option
    env = os.environ.get(CHECKPOINT_ENV)
    if env:
        return Path(env)
    raise CheckpointError("no checkpoint given", hint=f"pass --checkpoint PATH or set {CHECKPOINT_ENV}")


def load_any(path: Path, text_model: str | None = None) -> LoadedCheckpoint:
    """Load an afloc checkpoint, or import a reference Lightning checkpoint on the fly.

    The reference file has no tokenizer inside, so its text model (Bio_ClinicalBERT)
    must be on this machine: `text_model` names a local folder or a cached id.
    """
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path, hint=f"pass --checkpoint PATH or set {CHECKPOINT_ENV}")
    sha = sha256_file(path)
    if checkpoint_kind(path) == "afloc":
        return LoadedCheckpoint(load_checkpoint(path), path, sha, "afloc", [])
    from afloc_cli.checkpoint.reference import read_reference_checkpoint, to_model
    from afloc_cli.text.model.loading import resolve_text_model

    ref = read_reference_checkpoint(path)
    name = text_model or ref.text_model_name()
    if not name:
        raise CheckpointError("reference checkpoint does not name its text model", path=path,
                              hint="pass --text-model with the BERT folder it was trained with")
    model, notes = to_model(ref, resolve_text_model(name))
    return LoadedCheckpoint(model.eval(), path, sha, "reference", notes)
