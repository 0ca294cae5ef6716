"""`afloc merge`: shard files of one run -> one file equal to a single-machine run."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def merge_command(
    inputs: list[Path] = typer.Argument(..., help="Shard files from `afloc localize --shard K/N`."),
    out: Path = typer.Option(..., "--out", help="The merged HDF5 file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    allow_gaps: bool = typer.Option(False, "--allow-gaps", help="Merge even if some shards are missing."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Join shards; refuses files made with different checkpoints, prompts or settings."""
    from afloc_cli.heatmaps.store import merge

    result = merge(list(inputs), out, overwrite=overwrite, allow_gaps=allow_gaps)
    typer.echo(json.dumps({"out": str(result), "inputs": len(inputs)}) if as_json else f"merged into {result}")
