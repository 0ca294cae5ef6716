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
from typing import Any, Literal

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


_HEAD_BYTES = 132  # enough for every signature below (DICOM's is at 128)
_OTHER_FORMATS = (  # (offset, signature, what the file is): files people pass by mistake
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file (afloc's heat maps are .h5)"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (128, b"DICM", "a DICOM file"),
)
CHECKPOINTS_HINT = ("afloc reads the checkpoints `afloc import-reference` and `afloc pretrain` write, "
                    "and the reference's Lightning .ckpt")


def read_head(path: Path) -> bytes:
    """The first bytes of `path`: enough to tell its format."""
    with open(path, "rb") as f:
        return f.read(_HEAD_BYTES)


def looks_like_safetensors(head: bytes) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then the header, a JSON object."""
    return len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2


def other_format(head: bytes) -> str | None:
    """What a file that is no checkpoint is (an HDF5 file, an image...), if its signature says so."""
    if not head:
        return "an empty file"
    for offset, signature, what in _OTHER_FORMATS:
        if head[offset : offset + len(signature)] == signature:
            return what
    return None


def _safetensors_damage(path: Path) -> str | None:
    """Why a file laid out as safetensors is incomplete or damaged, in words; None when its layout is whole.

    safetensors' own errors ("MetadataIncompleteBuffer") do not say that a file was cut short, the common case.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            return f"truncated safetensors file: its header alone needs {8 + length:,} bytes, the file has {size:,}"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return "damaged safetensors file: its header is not valid JSON"
    if not isinstance(header, dict):
        return "damaged safetensors file: its header is not a JSON object"
    try:
        end = max((int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        return "damaged safetensors file: a tensor in its header has no data offsets"
    if size < 8 + length + end:
        return f"truncated safetensors file: {size:,} of {8 + length + end:,} bytes"
    return None


def checkpoint_kind(path: Path) -> Literal["afloc", "reference"]:
    """Which reader `path` needs, decided by its bytes: "afloc" (header checked here) or "reference".

    A damaged or foreign safetensors file once fell through to the reference's pickle reader, which called it
    "not a readable PyTorch checkpoint (KeyError: 208)"; now its own problem is reported. Everything else goes to
    the reference reader, which names files that are no checkpoint at all (HDF5, images).
    """
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path, hint="pass --checkpoint PATH or set AFLOC_CHECKPOINT")
    if looks_like_safetensors(read_head(path)):
        read_header(path)
        return "afloc"
    return "reference"


def read_header(path: Path | str) -> CheckpointHeader:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path, hint="pass --checkpoint PATH or set AFLOC_CHECKPOINT")
    head = read_head(path)
    if not looks_like_safetensors(head):
        what = other_format(head)
        raise CheckpointError(
            f"not an afloc checkpoint: {what}" if what else "not an afloc checkpoint (not a safetensors file)",
            path=path,
            hint="reference Lightning checkpoints are converted with `afloc import-reference`",
        )
    damage = _safetensors_damage(path)
    if damage:
        raise CheckpointError(damage, path=path, hint="the file is incomplete or damaged: copy or write it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as exc:  # noqa: BLE001
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise CheckpointError(f"unreadable safetensors file ({reason})", path=path) from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError("a safetensors file, but not an afloc checkpoint (no afloc metadata)", path=path,
                              hint=CHECKPOINTS_HINT)
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
