"""`afloc inspect PATH`: what a checkpoint holds, ours or the reference's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from afloc_cli.errors import CheckpointError

if TYPE_CHECKING:
    from afloc_cli.config import ImageConfig

_GLOBAL_PROJECTION = "image_encoder.global_embedder.weight"


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    total = 0
    for key, shape in shapes.items():
        if key.startswith(prefix) and not key.endswith(("num_batches_tracked", "running_mean", "running_var")):
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def _levels(image: ImageConfig, image_size: int, dim: int) -> dict[str, str]:
    from afloc_cli.image.model.encoder import grid_sizes

    g = grid_sizes(image, image_size)
    return {
        "shallow (layer2 -> words)": f"{g['shallow']}x{g['shallow']} x {dim}",
        "deep (layer3 -> sentences)": f"{g['deep']}x{g['deep']} x {dim}",
        "global (layer4 -> report)": f"{dim}",
    }


def _embed_dim(shapes: dict[str, tuple[int, ...]], path: Path) -> int:
    """The joint embedding's size, from the global projection; a file without it gets a one-line error."""
    shape = shapes.get(_GLOBAL_PROJECTION)
    if not shape:
        raise CheckpointError(f"the checkpoint has no {_GLOBAL_PROJECTION}: not a complete AFLoc model", path=path)
    return int(shape[0])


def describe(path: Path) -> dict[str, Any]:
    """A JSON-able description of the checkpoint at `path`."""
    from afloc_cli.checkpoint.io import checkpoint_kind, read_header, sha256_file

    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path)
    if checkpoint_kind(path) == "afloc":
        header = read_header(path)
        shapes = header.tensor_shapes
        cfg = header.config
        dim = _embed_dim(shapes, path)
        return {
            "path": str(path),
            "kind": "afloc",
            "sha256": sha256_file(path),
            "afloc_version": header.afloc_version,
            "text_model": cfg.text.model,
            "text_model_type": header.text_model_config.get("model_type"),
            "embed_dim": dim,
            "levels": _levels(cfg.image, cfg.preprocess.image_size, dim),
            "parameters": {
                "image_backbone": _count(shapes, "image_encoder.backbone."),
                "image_projections": _count(shapes, "image_encoder.") - _count(shapes, "image_encoder.backbone."),
                "text_encoder": _count(shapes, "text_encoder."),
            },
            "config": cfg.to_dict(),
            "provenance": header.provenance,
        }
    from afloc_cli.checkpoint.reference import read_reference_checkpoint

    ref = read_reference_checkpoint(path)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict.items()}
    image = ref.image_config()
    dim = _embed_dim(shapes, path)
    return {
        "path": str(path),
        "kind": "reference (PyTorch Lightning)",
        "sha256": sha256_file(path),
        "text_model": ref.text_model_name(),
        "embed_dim": dim,
        "levels": _levels(image, 224, dim),
        "parameters": {
            "image_backbone": _count(shapes, "image_encoder.backbone."),
            "image_projections": _count(shapes, "image_encoder.") - _count(shapes, "image_encoder.backbone."),
            "text_encoder": _count(shapes, "text_encoder."),
        },
        "image_config": {"arch": image.arch, "internal_size": image.internal_size},
        "unmatched_keys": [f"{k}: {why}" for k, why in ref.unmatched],
        "meta": ref.meta,
    }


def inspect_command(
    path: Path = typer.Argument(..., help="An afloc .safetensors checkpoint or the reference Pretrained_CXR.ckpt."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Show what a checkpoint holds: config, levels, parameter counts, text model, sha256."""
    info = describe(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True, default=str))
        return
    table = Table(title=f"{path}", show_header=False)
    for key in ("kind", "sha256", "text_model", "embed_dim"):
        table.add_row(key, str(info.get(key)))
    for level, shape in info["levels"].items():
        table.add_row(f"level {level}", shape)
    for part, n in info["parameters"].items():
        table.add_row(f"parameters {part}", f"{n:,}")
    for line in info.get("unmatched_keys", []):
        table.add_row("unmatched", line)
    # As wide as the longest row: cut to an 80-column terminal or a pipe, the sha256 (which users copy from here)
    # and the key names lost their ends.
    console = Console()
    unbounded = console.options.update_width(1_000_000)
    console.width = max(console.width, console.measure(table, options=unbounded).maximum)
    console.print(table)
