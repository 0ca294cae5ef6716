"""`afloc demo`: the whole method on synthetic data, offline, on this CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from afloc_cli.commands import stderr_console


def demo_command(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Where every demo output goes."),
    quick: bool = typer.Option(False, "--quick", help="A one-minute smoke run (tiny corpus, a few steps)."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", min=0),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Synthesize radiographs, pretrain without boxes, localize held-out images, benchmark them."""
    from afloc_cli.demo import DemoPlan, run_demo, unmet

    console = stderr_console()
    report = run_demo(out, DemoPlan.quick() if quick else DemoPlan.full(), console, workers=workers)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    grid = f"{report['grid']}x{report['grid']}"
    table = Table(title=f"demo: synthetic test split, AFLoc protocol (image framing), {grid} deep grid")
    for col in ("model", "readout", "mIoU", "Dice", "CNR", "pointing", "AUROC"):
        table.add_column(col)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for model, key in (("trained (deep map)", "readouts"), ("trained, fused map", "fused"), ("untrained", "untrained")):
        for name, values in report[key].items():
            table.add_row(model, name, *(fmt(values[k]) for k in ("miou", "dice", "cnr", "pointing", "auroc")))
    console.print(table)
    console.print("maps: the deep (sentence-level) map, the paper's, unless 'fused map' (deep + shallow word-level "
                  "map, an extension). readouts: reference = each phrase's own map, and AUROC from the finding's "
                  "class prompts against 'No finding.' (the paper's); contrast = maps and AUROC against the other "
                  "findings' prompts. CNR is signed; AUROC is zero-shot presence from the global embedding, each "
                  "finding's class prompts (corpus/class_prompts.json) averaged as the reference does.")
    labels = {"readouts": "trained (deep map)", "fused": "trained, fused map"}
    console.print("targets: AUROC >= 0.8, pointing >= 0.4, mIoU >= 0.2, pointing >= untrained's + 0.15 "
                  f"(macros over every kind); judged on: {labels[report['judged'][0]]}, {report['judged'][1]}")
    for row, readouts in report["targets"].items():
        for readout, checks in readouts.items():
            missed = unmet(checks)
            judged = " (judged)" if [row, readout] == report["judged"] else ""
            verdict = "met" if not missed else "not met: " + ", ".join(missed)
            console.print(f"  {labels[row]}, {readout}{judged}: {verdict}", style="red" if missed else "green")
    for key in ("checkpoint", "heatmaps", "benchmark"):
        console.print(f"{key}: {report[key]}")
    console.print(f"timings (s): {report['timings_s']}")
