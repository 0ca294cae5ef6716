"""`afloc benchmark`: public datasets in their native layout -> metric tables with their protocol."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from afloc_cli.commands import WORKERS_HELP, decode_workers, stderr_console
from afloc_cli.errors import AflocError

if TYPE_CHECKING:
    import polars as pl

    from afloc_cli.benchmark.runner import BenchmarkResult

DATASETS = "ms-cxr, rsna, chexlocalize, covid-rural, siim, nih-bbox, vindr, synthetic"
# Which benchmark options change what the heat-map store compares when a rerun would reuse OUT/heatmaps.h5.
BECAUSE = {
    "input paths": "another --root, --split or --limit",
    "prompts": "another --prompt-template, --prompt-source, --class-prompts or --readout, or a folder benchmarked "
    "by an afloc before 2026-12-03, which spelt the template prompts with the finding's capitals (its heat maps "
    "still score with --heatmaps)",
    "checkpoint (checkpoint_sha256)": "another --checkpoint",
}


def _value(summary: pl.DataFrame, metric: str) -> tuple[float, float, float]:
    import polars as pl


    row = summary.filter(pl.col("metric") == metric)
    if not row.height:
        return (float("nan"),) * 3
    return tuple(float(row[c][0]) for c in ("value", "ci_low", "ci_high"))  # type: ignore[return-value]


def _print(result: BenchmarkResult, dataset: str, console: Console) -> None:
    import polars as pl

    from afloc_cli.benchmark.runner import PAPER

    readout = result.protocol.get("readout", "reference")
    framing = result.protocol.get("framing", "reference")
    table = Table(title=f"{dataset}: AFLoc protocol (IoU/Dice over thresholds, CNR signed), {readout} readout, "
                        f"{framing} framing, 95% bootstrap CI")
    for col in ("model", "mIoU", "Dice", "CNR (signed)", "pointing game"):
        table.add_column(col)
    cells = []
    for metric in ("iou", "dice", "cnr", "pointing"):
        v, lo, hi = _value(result.summary, metric)
        cells.append(f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
    table.add_row("this run", *cells)
    if result.human is not None:
        human = []
        for metric in ("iou", "dice", "cnr", "pointing"):
            v, lo, hi = _value(result.human, metric)
            human.append(f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
        table.add_row("human benchmark", *human)
    for name, (iou, dice, cnr) in PAPER.get(dataset, {}).items():
        table.add_row(f"paper: {name}", f"{iou:.3f}", f"{dice:.3f}", f"{cnr:.2f}", "")
    console.print(table)
    if result.auroc is not None:
        macro = result.auroc.filter(pl.col("category") == "macro")
        console.print(f"zero-shot AUROC (macro): {float(macro['auroc'][0]):.3f} "
                      f"[{float(macro['ci_low'][0]):.3f}, {float(macro['ci_high'][0]):.3f}]")


def benchmark_command(
    dataset: str = typer.Argument(..., help=f"One of: {DATASETS}."),
    root: Path = typer.Option(..., "--root", help="The dataset's folder exactly as downloaded."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Localize first with this checkpoint."),
    heatmaps: Path | None = typer.Option(None, "--heatmaps", help="Score an existing heat-map file instead."),
    out: Path = typer.Option(..., "--out", help="Folder for per_item.parquet, summary.csv, protocol.json, ..."),
    split: str | None = typer.Option(None, "--split", help="Dataset split (train/val/test) where it has one."),
    prompt_template: str = typer.Option("Findings suggesting {category}.", "--prompt-template"),
    prompt_source: str = typer.Option("phrase", "--prompt-source", help="phrase (the dataset's own) or template."),
    thresholds: str = typer.Option("0.1,0.2,0.3,0.4,0.5", "--thresholds"),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for the 95% CIs."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score only the first N images."),
    mimic_root: Path | None = typer.Option(None, "--mimic-root", help="MS-CXR: the MIMIC-CXR-JPG 2.0.0 root."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    workers: int | None = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    text_model: str | None = typer.Option(None, "--text-model", help="Text model folder for a reference .ckpt."),
    output_format: str = typer.Option("table", "--format", help="table, json or csv (the summary on stdout)."),
    readout: str = typer.Option("reference", "--readout", help="reference (the paper's: each prompt's own map; "
                                "AUROC from the prompt against 'No {finding}.') or contrast (maps and AUROC "
                                "scores against the other categories' prompts; needs two or more)."),
    class_prompts: Path | None = typer.Option(None, "--class-prompts", help="JSON {category: \\[prompt, ...]}: "
                                              "the zero-shot score's positive prompts per category, their "
                                              "embeddings averaged as the reference does (default: the template "
                                              "alone). `afloc synth` writes one as class_prompts.json."),
    framing: str = typer.Option("reference", "--framing", help="reference (the paper's: the whole model frame, "
                                "letterbox padding included, a 14/224 NaN border, boxes mapped as its "
                                "box_mapping) or image (the image only: padding NaN, truth filled in original "
                                "pixels)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the heat maps and tables an earlier run "
                                   "left in --out (needed when the checkpoint, prompts, images or readout "
                                   "differ); without it a rerun resumes or reuses OUT/heatmaps.h5."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout (--format json)."),
) -> None:
    """Score localization (and zero-shot AUROC where negatives exist) against a dataset's own truth."""
    import numpy as np

    from afloc_cli.benchmark.class_prompts import load_class_prompts
    from afloc_cli.benchmark.runner import run_benchmark
    from afloc_cli.checkpoint.loader import checkpoint_path, load_any
    from afloc_cli.heatmaps.store import ResumeMismatch
    from afloc_cli.localize.runner import run_localize
    from afloc_cli.vlp.inference_engine import LocalizationEngine, resolve_device

    if (checkpoint is None) == (heatmaps is None) and not os.environ.get("AFLOC_CHECKPOINT"):
        raise AflocError("give --checkpoint (localize first) or --heatmaps FILE (score an existing file)")
    if output_format not in ("table", "json", "csv"):
        raise AflocError(f"--format must be table, json or csv, not {output_format!r}")
    if as_json:  # every command's --json; --format json is the same output
        if output_format == "csv":
            raise AflocError("--json and --format csv contradict each other")
        output_format = "json"
    try:
        sweep = tuple(float(t) for t in thresholds.split(","))
    except ValueError as exc:
        raise AflocError(f"--thresholds must be a comma list of numbers, not {thresholds!r}") from exc
    ensembles = load_class_prompts(class_prompts) if class_prompts is not None else None
    console = stderr_console()

    def localize(paths: list[Path], prompts: list[str], wanted: np.ndarray, h5: Path) -> tuple[Path, str]:
        loaded = load_any(checkpoint_path(checkpoint), text_model)
        engine = LocalizationEngine(loaded.model, prompts, device=resolve_device(device))
        console.print(f"localizing {len(paths)} images x {len(prompts)} prompts into {h5} (resumable)")
        try:
            summary = run_localize(engine, paths=paths, indices=list(range(len(paths))), prompts=prompts, out=h5,
                                   checkpoint_sha256=loaded.sha256, batch_size=batch_size,
                                   workers=decode_workers(workers), resume=not overwrite, overwrite=overwrite,
                                   wanted=wanted)
        except ResumeMismatch as e:  # the store's hint is localize's; say which benchmark options lead there
            raise AflocError(f"the {e.what} differ from those of the earlier run in this --out "
                             f"({BECAUSE.get(e.what, 'other settings')})", path=h5,
                             hint="add --overwrite to replace its heat maps and tables, or choose another --out"
                             ) from None
        if summary.failed:
            console.print(f"{summary.failed} images could not be read; they are not scored", style="yellow")
        return h5, loaded.sha256

    options = {"mimic_root": mimic_root} if mimic_root is not None else {}
    result = run_benchmark(dataset, root, out, heatmaps=heatmaps, localize=localize if heatmaps is None else None,
                           split=split, prompt_template=prompt_template, prompt_source=prompt_source,
                           thresholds=sweep, n_boot=bootstrap, limit=limit, options=options, readout=readout,
                           class_prompts=ensembles, framing=framing)
    for note in result.notes:  # also in protocol.json; stderr keeps --format json/csv output clean
        console.print(f"note: {note}", style="yellow")
    if output_format == "json":
        typer.echo(json.dumps({"summary": result.summary.to_dicts(),
                               "auroc": None if result.auroc is None else result.auroc.to_dicts(),
                               "protocol": result.protocol}, default=str))
    elif output_format == "csv":
        sys.stdout.write(result.summary.write_csv())
    else:
        _print(result, dataset, console)
        console.print(f"tables and protocol.json in {out}"
                      + (f"; {result.problems} annotation rows or items could not be used (problems.csv)"
                         if result.problems else ""))
