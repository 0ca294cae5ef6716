"""`afloc scores`: a heat-map file -> one table row per image x prompt, for cohort scripts."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from afloc_cli.atomic import write_atomic
from afloc_cli.errors import AflocError


def scores_command(
    heatmaps: Path = typer.Argument(..., help="An HDF5 file written by afloc localize."),
    out: Path = typer.Option(..., "--out", help="Table to write: .parquet or .csv."),
    threshold: float = typer.Option(0.5, "--threshold", help="Area counts pixels whose [-1, 1] map exceeds this."),
    readout: str | None = typer.Option(None, "--readout", help="reference or contrast (default: the readout the "
                                       "file was localized with)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Score, peak location (original pixels) and area above a threshold, per image x prompt."""
    from afloc_cli.heatmaps.readout import open_heatmaps, output_folder, score_table

    suffix = out.suffix.lower()  # results.CSV is a CSV table too
    if suffix not in (".parquet", ".csv"):
        raise AflocError("--out must end in .parquet or .csv", path=out)
    if out.is_dir():
        raise AflocError("is a folder, not a file", path=out, hint="name the table file")
    output_folder(out.parent)  # before the table is computed, which takes minutes on a cohort
    with open_heatmaps(heatmaps) as hf:
        table = score_table(hf, threshold, readout)
    try:
        write_atomic(out, (lambda tmp: table.write_parquet(tmp, statistics=False)) if suffix == ".parquet"
                     else table.write_csv)
    except OSError as exc:
        raise AflocError(f"cannot write the table: {exc.strerror or exc}", path=out) from None
    # A failed image has one row per prompt: count its index once, as localize counts it.
    failed_images = table.filter(table["status"] != "ok")["index"].n_unique()
    summary = {"out": str(out), "rows": table.height, "failed_images": failed_images}
    typer.echo(json.dumps(summary) if as_json else f"wrote {table.height} rows to {out}")
