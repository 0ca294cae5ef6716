"""`afloc synth OUT`: a synthetic corpus with known truth (images, reports, boxes, labels)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from afloc_cli.errors import AflocError
from afloc_cli.synth.corpus import (
    GROUND_TRUTH_CSV,
    LABELS_CSV,
    MANIFEST_CSV,
    SYNTH_JSON,
    CorpusSummary,
    SynthConfig,
    generate_corpus,
)
from afloc_cli.synth.kinds import DEFAULT_HOLDOUT, KIND_BY_KEY, KIND_KEYS, SPLITS

PROGRESS_FROM = 100  # below this many images a bar is only noise
PARALLEL_FROM = 64  # below this, starting worker processes costs more than it saves


def _default_workers(n: int) -> int:
    if n < PARALLEL_FROM:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _config(n: int, seed: int, holdout: str) -> SynthConfig:
    try:
        return SynthConfig(n=n, seed=seed, holdout=holdout)
    except ValueError as exc:  # the message already lists the kinds when the holdout is the problem
        raise AflocError(str(exc)) from None


def _print_summary(console: Console, summary: CorpusSummary, seconds: float) -> None:
    cfg = summary.config
    images = ", ".join(f"{summary.images[s]} {s}" for s in SPLITS)
    console.print(Text.assemble(("afloc synth", "bold"), f": {cfg.n} images ({images}) in {seconds:.1f} s, "
                                f"seed {cfg.seed}"))
    console.print(f"  normal images: {sum(summary.normal.values())}; boxes: {sum(summary.boxes.values())}")
    per_kind = []
    for kind, n in ((k, sum(summary.kinds[s][KIND_BY_KEY[k].category] for s in SPLITS)) for k in KIND_KEYS):
        per_kind.append(f"{KIND_BY_KEY[kind].category} {n}")
    console.print(f"  findings (images): {', '.join(per_kind)}")
    held = KIND_BY_KEY[cfg.holdout].category
    console.print(
        f"  held out of train: {held} (val {summary.kinds['val'][held]}, test {summary.kinds['test'][held]} images)"
    )
    console.print(f"  formats: {', '.join(f'{k} {v}' for k, v in summary.formats.items())}")
    out = summary.out
    console.print(f"  images:       {out / 'files'}")
    console.print(f"  boxes:        {out / GROUND_TRUTH_CSV}")
    console.print(f"  labels:       {out / LABELS_CSV}")
    console.print(f"  manifest:     {out / MANIFEST_CSV}")
    console.print(f"  description:  {out / SYNTH_JSON}")


def _summary_json(summary: CorpusSummary, seconds: float) -> dict[str, object]:
    """What the printed summary says, for scripts: counts per split and where each file is."""
    cfg, out = summary.config, summary.out
    return {
        "out": str(out),
        "n": cfg.n,
        "seed": cfg.seed,
        "holdout": KIND_BY_KEY[cfg.holdout].category,
        "images": summary.images,
        "normal": summary.normal,
        "boxes": summary.boxes,
        "kinds": summary.kinds,
        "formats": summary.formats,
        "files": {"images": str(out / "files"), "boxes": str(out / GROUND_TRUTH_CSV), "labels": str(out / LABELS_CSV),
                  "manifest": str(out / MANIFEST_CSV), "description": str(out / SYNTH_JSON)},
        "seconds": round(seconds, 3),
    }


def synth_command(
    out: Path = typer.Argument(..., help="Folder to write the corpus into (created if missing)."),
    n: int = typer.Option(200, "--n", min=1, help="Number of images."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed; the same seed gives byte-identical files."),
    holdout: str = typer.Option(
        DEFAULT_HOLDOUT, "--holdout", help=f"Finding kind never shown in train ({', '.join(KIND_KEYS)})."
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Worker processes (default: up to 4 from 64 images); output is the same."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into a non-empty folder (an earlier corpus's images there are replaced)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Generate synthetic chest radiographs with reports, MS-CXR-style boxes and labels."""
    config = _config(n, seed, holdout)
    console = Console(soft_wrap=True, highlight=False, markup=False)  # paths print as they are
    n_workers = workers if workers is not None else _default_workers(n)
    start = time.perf_counter()
    if n >= PROGRESS_FROM and not as_json:
        columns = (
            TextColumn("synth"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("synth", total=n)
            summary = generate_corpus(
                out, config, workers=n_workers, overwrite=overwrite, progress=lambda k: bar.update(task, completed=k)
            )
    else:
        summary = generate_corpus(out, config, workers=n_workers, overwrite=overwrite)
    seconds = time.perf_counter() - start
    if as_json:
        typer.echo(json.dumps(_summary_json(summary, seconds), sort_keys=True))
    else:
        _print_summary(console, summary, seconds)
