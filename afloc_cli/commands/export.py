"""`afloc export`: heat maps at original size, as PNG, NumPy, or cheXlocalize's pickles."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from afloc_cli.errors import AflocError


def export_command(
    heatmaps: Path = typer.Argument(..., help="An HDF5 file written by afloc localize."),
    png: Path | None = typer.Option(None, "--png", help="16-bit grey PNGs of the [-1, 1] maps."),
    npy: Path | None = typer.Option(None, "--npy", help="float32 .npy raw maps, NaN outside the image."),
    chexlocalize: Path | None = typer.Option(
        None, "--chexlocalize",
        help="Pickles for cheXlocalize's evaluator: one per image and task, for prompts that name a task "
             "('Cardiomegaly' or 'Findings suggesting cardiomegaly.'; Lung Opacity is its Airspace Opacity).",
    ),
    readout: str | None = typer.Option(None, "--readout", help="reference or contrast (default: the readout the "
                                       "file was localized with)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Write every (image, prompt) map at the image's original size."""
    from afloc_cli.heatmaps.readout import export_chexlocalize, export_npy, export_png, open_heatmaps

    targets = [t for t in (png, npy, chexlocalize) if t is not None]
    if len(targets) != 1:
        raise AflocError("give exactly one of --png DIR, --npy DIR, --chexlocalize DIR")
    with open_heatmaps(heatmaps) as hf:
        if png is not None:
            n = export_png(hf, png, readout)
        elif npy is not None:
            n = export_npy(hf, npy, readout)
        else:
            n = export_chexlocalize(hf, chexlocalize, readout=readout)  # type: ignore[arg-type]
    summary = {"out": str(targets[0]), "maps": n}
    typer.echo(json.dumps(summary) if as_json else f"wrote {n} maps to {targets[0]}")
