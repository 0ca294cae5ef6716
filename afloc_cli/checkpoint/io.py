"""afloc's own checkpoint: one self-contained safetensors file.

The tensors hold every weight; the safetensors header metadata holds the model
config, the text model's Hugging Face config and its tokenizer files, so a
checkpoint loads on a machine that has never seen the text model. Written to a
temporary name and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from afloc_cli import __version__
from afloc_cli.atomic import write_atomic
from afloc_cli.config import ModelConfig
from afloc_cli.errors import CheckpointError
from afloc_cli.image.model.encoder import ImageEncoder
from afloc_cli.text.model.encoder import TextEncoder
from afloc_cli.vlp.model import AflocModel

FORMAT = "afloc-checkpoint"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tokenizer_files(text: TextEncoder) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        text.tokenizer.save_pretrained(tmp)
        files = {}
        for p in sorted(Path(tmp).iterdir()):
            if p.is_file():
                files[p.name] = p.read_text(encoding="utf-8")
        return files


def _sort_header_metadata(path: Path) -> None:
    """Rewrite a just-written safetensors header with its `__metadata__` keys in sorted order, in place.

    safetensors serialises the metadata from a Rust HashMap whose order changes with every process, so the same
    weights and metadata gave a different file (and sha256) each time, and outputs made with two copies of one
    checkpoint would not merge. Only the order changes: the header keeps its length (the JSON is re-serialised the
    way safetensors writes it, padding included) and the tensor bytes and offsets are untouched; readers never
    depended on the order, so checkpoints written before still load.
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(canonical) > length:  # safetensors escaped the JSON differently: keep nothing half-done
            raise CheckpointError("internal error: cannot sort the safetensors header in place", path=path)
        f.seek(8)
        f.write(canonical.ljust(length, b" "))


def _write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """safetensors' writer, then the header made byte-reproducible (see `_sort_header_metadata`)."""
    save_file(tensors, str(path), metadata=metadata)
    _sort_header_metadata(path)


def save_checkpoint(model: AflocModel, path: Path | str, provenance: dict[str, Any] | None = None) -> str:
    """Write `model` to `path` atomically; returns the file's sha256, the same for the same weights and metadata."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "afloc_version": __version__,
        "model_config": model.cfg.to_json(),
        "text_model_config": model.text_encoder.model.config.to_json_string(use_diff=False),
        "tokenizer_files": json.dumps(_tokenizer_files(model.text_encoder), sort_keys=True),
        "provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: _write_safetensors(tensors, metadata, tmp), fsync=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write here: {exc.strerror}", path=path.parent) from exc
    return sha256_file(path)


@dataclass
class CheckpointHeader:
    config: ModelConfig
    text_model_config: dict[str, Any]
    tokenizer_files: dict[str, str]
    provenance: dict[str, Any]
    afloc_version: str
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def is_afloc_checkpoint(path: Path | str) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is simply "not ours"
        return False


def read_header(path: Path | str) -> CheckpointHeader:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path, hint="pass --checkpoint PATH or set AFLOC_CHECKPOINT")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            "not an afloc checkpoint (unreadable safetensors)",
            path=path,
            hint="reference Lightning checkpoints are converted with `afloc import-reference`",
        ) from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError("safetensors file without afloc metadata", path=path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format version {meta.get('format_version')}", path=path)
    try:
        return CheckpointHeader(
            config=ModelConfig.from_json(meta["model_config"]),
            text_model_config=json.loads(meta["text_model_config"]),
            tokenizer_files=json.loads(meta["tokenizer_files"]),
            provenance=json.loads(meta.get("provenance", "{}")),
            afloc_version=meta.get("afloc_version", "?"),
            tensor_shapes=shapes,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"malformed checkpoint metadata: {exc}", path=path) from exc


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> AflocModel:
    """Rebuild the model from the file alone (no text model folder, no network)."""
    path = Path(path)
    header = read_header(path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(header.text_model_config), encoding="utf-8")
        for name, content in header.tokenizer_files.items():
            (folder / Path(name).name).write_text(content, encoding="utf-8")
        text = TextEncoder.from_folder(header.config.text, folder, pretrained=False)
    image = ImageEncoder(header.config.image, text.hidden_size)
    model = AflocModel(header.config, image, text)
    try:
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read tensors: {exc}", path=path) from exc
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"weights do not match the config: {len(result.missing_keys)} missing "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})",
            path=path,
        )
    return model.to(device).eval()
