"""The demo's recipe over several seeds: on how many does `make demo` meet its own targets?

`make demo` trains one seed in bf16, and the CPU that runs it changes the
training trajectory about as much as the seed does (RESULTS.md, "Demo (make
demo) on another CPU"). So one run says little about what a new user will see.
This trains the demo's plan (`DemoPlan.full()`, with any overrides given) for
--seeds N seeds from --first-seed (1..N by default) on the demo's corpus,
scores every row of the demo's table (`afloc_cli.demo.score_table`), judges
each against the demo's targets (`afloc_cli.demo.DEMO_TARGETS`), and counts the
seeds on which each row meets them all.

    .venv/bin/python benchmarks/demo_seeds.py --out /tmp/demo-seeds --seeds 5 --jobs 2
    .venv/bin/python benchmarks/demo_seeds.py --out /tmp/demo-seeds-ww --seeds 5 --jobs 2 \\
        --corpus /tmp/demo-seeds/corpus --cache /tmp/demo-seeds/cache --set optim.word_warmup=400
    .venv/bin/python benchmarks/demo_seeds.py --out /tmp/ds --quick      # a smoke run of the whole chain
    .venv/bin/python benchmarks/demo_seeds.py --out /tmp/ds6 --seeds 4 --first-seed 6 --jobs 2  # seeds 6..9
    .venv/bin/python benchmarks/demo_seeds.py --out /tmp/ds-raw --reuse-runs --weights optimised ...  # the
        # same runs, scored on their optimised weights rather than their weight average (optim.ema_decay)
    .venv/bin/python benchmarks/demo_seeds.py --compare /tmp/ds-raw/demo_seeds.json /tmp/ds6/demo_seeds.json

Results are recorded in benchmarks/RESULTS.md ("The demo over five seeds").
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from afloc_cli.demo import (
    DEMO_TARGETS,
    JUDGED_ROW,
    DemoPlan,
    judge_table,
    pretrain,
    score_table,
    training_config,
    unmet,
    untrained_checkpoint,
)
from afloc_cli.errors import AflocError
from afloc_cli.synth import SynthConfig, generate_corpus
from train.loop import MACHINE_SETTINGS, last_checkpoint, require_same_settings

ROWS = {("readouts", "reference"): "deep map, reference", ("readouts", "contrast"): "deep map, contrast",
        ("fused", "reference"): "fused map, reference", ("fused", "contrast"): "fused map, contrast"}


@dataclass(frozen=True)
class Context:
    plan: DemoPlan
    out: Path
    corpus: Path
    cache: Path
    n_boot: int
    reuse_runs: bool
    weights: str = "model"


def check_reused_runs(seeds: list[int], plan: DemoPlan, out: Path, weights: str) -> None:
    """--reuse-runs, before any work: every run found must have trained under this plan, or one line names it
    and what differs. The average never feeds back, so for --weights optimised optim.ema_decay may differ."""
    ignore = MACHINE_SETTINGS | ({"optim.ema_decay"} if weights == "optimised" else set())
    for seed in seeds:
        run_dir = out / "runs" / f"seed{seed}"
        if (run_dir / "model.safetensors").is_file():
            try:
                require_same_settings(run_dir, training_config(plan, seed=seed, workers=0), frozenset(ignore))
            except AflocError as exc:
                raise SystemExit(f"--reuse-runs: {exc}") from None


def run_seed(seed: int, ctx: Context) -> dict:
    """Train (or reuse) one seed of the demo's plan and score the demo's table. Runs in a worker process."""
    cfg = training_config(ctx.plan, seed=seed, workers=0)
    run_dir = ctx.out / "runs" / f"seed{seed}"
    start = time.perf_counter()
    if ctx.reuse_runs and (run_dir / "model.safetensors").is_file():  # checked by check_reused_runs
        checkpoint, steps, train_s = run_dir / "model.safetensors", None, None
    else:
        checkpoint, steps = pretrain(ctx.cache, run_dir, cfg, Console(stderr=True), show_progress=False)
        train_s = round(time.perf_counter() - start, 1)
    if ctx.weights == "optimised":  # the run's model.safetensors holds the average under optim.ema_decay
        last = last_checkpoint(run_dir)
        if last is None:
            raise SystemExit(f"{run_dir}: no checkpoint to take the optimised weights from")
        checkpoint = last / "model.safetensors"
    untrained = untrained_checkpoint(cfg, ctx.out / "runs" / f"untrained-seed{seed}.safetensors")
    table = score_table(checkpoint, untrained, ctx.corpus, ctx.out / "bench" / f"seed{seed}", ctx.n_boot)
    return {"seed": seed, "steps": steps, "train_s": train_s, "threads": torch.get_num_threads(),
            "checkpoint": str(checkpoint), "table": table, "targets": judge_table(table)}


def closest_call(checks: dict[str, dict]) -> tuple[float, str]:
    """A row's margin to the demo's targets: its smallest value - threshold (negative: a miss), and which."""
    margins = {name: -math.inf if c["value"] is None else c["value"] - c["threshold"] for name, c in checks.items()}
    name = min(margins, key=lambda k: margins[k])
    return margins[name], name


def compare(a: Path, b: Path) -> str:
    """Markdown: the judged row of two demo_seeds.json runs, seed by seed, with each seed's closest call."""
    runs = [{r["seed"]: r for r in json.loads(p.read_text())["seeds"]} for p in (a, b)]
    seeds = sorted(set(runs[0]) & set(runs[1]))
    if not seeds:
        raise SystemExit(f"{a} and {b} share no seed")
    lines = ["| seed | A: pointing / mIoU / AUROC | A: closest call | B: pointing / mIoU / AUROC | B: closest call |",
             "|---|---|---|---|---|"]
    wins, met = 0, [0, 0]
    for seed in seeds:
        cells: list[str] = []
        margins: list[float] = []
        for i, run in enumerate(runs):
            r = run[seed]
            v, checks = r["table"][JUDGED_ROW[0]][JUDGED_ROW[1]], r["targets"][JUDGED_ROW[0]][JUDGED_ROW[1]]
            margin, which = closest_call(checks)
            margins.append(margin)
            met[i] += not unmet(checks)
            cells += [f"{v['pointing']:.3f} / {v['miou']:.3f} / {v['auroc']:.3f}", f"{margin:+.3f} ({which})"]
        wins += margins[1] > margins[0]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", f"A = {a}, B = {b}. Judged row ({', '.join(JUDGED_ROW)}); closest call = the smallest value - "
              f"target over {DEMO_TARGETS} (negative: a miss).",
              f"B's closest call is larger on {wins} of {len(seeds)} seeds; every target met on {met[0]} (A) and "
              f"{met[1]} (B) of {len(seeds)}."]
    return "\n".join(lines)


def summarize(results: list[dict]) -> str:
    """Markdown: per row, each seed's pointing / mIoU / AUROC and whether it met every target."""
    seeds = [r["seed"] for r in results]
    lines = ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " | seeds meeting every target |",
             "|---|" + "---|" * len(seeds) + "---|"]
    for (row, readout), label in ROWS.items():
        cells, met = [], 0
        for r in results:
            v, checks = r["table"][row][readout], r["targets"][row][readout]
            ok = not unmet(checks)
            met += ok
            cells.append(f"{v['pointing']:.3f} / {v['miou']:.3f} / {v['auroc']:.3f} {'met' if ok else 'not met'}")
        judged = " (judged)" if (row, readout) == JUDGED_ROW else ""
        lines.append(f"| {label}{judged} | " + " | ".join(cells) + f" | {met} of {len(results)} |")
    for readout in ("reference", "contrast"):
        lines.append(f"| untrained, {readout} | " + " | ".join(
            f"{r['table']['untrained'][readout]['pointing']:.3f} / {r['table']['untrained'][readout]['miou']:.3f} / "
            f"{r['table']['untrained'][readout]['auroc']:.3f}" for r in results) + " | |")
    lines.append("")
    lines.append("Cells: pointing / mIoU / AUROC, macros over every kind (the held-out one included), as the demo "
                 f"prints them. Targets: {DEMO_TARGETS}.")
    misses = [f"seed {r['seed']}: {', '.join(unmet(r['targets'][JUDGED_ROW[0]][JUDGED_ROW[1]]))}"
              for r in results if unmet(r["targets"][JUDGED_ROW[0]][JUDGED_ROW[1]])]
    lines.append("Judged row misses: " + ("; ".join(misses) if misses else "none") + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=False)
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"),
                    help="compare the judged row of two runs' demo_seeds.json, seed by seed, and stop")
    ap.add_argument("--seeds", type=int, default=5, help="how many seeds to train")
    ap.add_argument("--first-seed", type=int, default=1,
                    help="the first of them (a fresh set for a test decided after looking at seeds 1..N)")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick plan: checks the chain only")
    ap.add_argument("--corpus", type=Path, default=None, help="an existing demo corpus (default: synthesize it)")
    ap.add_argument("--cache", type=Path, default=None, help="its training cache (with --corpus)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a training override on top of the demo's plan, KEY=VALUE (e.g. optim.word_warmup=400)")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once, in worker processes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: all cores, split evenly between --jobs workers)")
    ap.add_argument("--workers", type=int, default=2, help="processes that synthesize and cache the corpus")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="re-score the seeds already trained under --out (a run trained under other settings is "
                         "refused)")
    ap.add_argument("--weights", choices=("model", "optimised"), default="model",
                    help="score each run's model.safetensors (the weight average under optim.ema_decay), or its "
                         "last checkpoint's optimised weights")
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    if (args.corpus is None) != (args.cache is None):
        ap.error("--corpus and --cache go together")
    if args.out is None:
        ap.error("--out is required (unless --compare)")
    console = Console(stderr=True)
    plan = DemoPlan.quick() if args.quick else DemoPlan.full()
    plan = replace(plan, overrides=(*plan.overrides, *args.overrides))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.reuse_runs:
        check_reused_runs(seeds, plan, out, args.weights)
    corpus, cache = args.corpus, args.cache
    if corpus is None:
        from train.data import prepare_cache

        corpus, cache = out / "corpus", out / "cache"
        generate_corpus(corpus, SynthConfig(n=plan.n_images, seed=0), workers=args.workers, overwrite=True)
        prepare_cache(corpus / "manifest.csv", cache, size=plan.image_size, workers=args.workers)
    ctx = Context(plan, out, corpus, cache, 20 if args.quick else args.bootstrap, args.reuse_runs, args.weights)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.jobs > 1:
        console.print(f"{len(seeds)} seeds on {args.jobs} worker processes of {threads} thread(s) each")
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(threads,)) as pool:
            results = list(pool.map(run_seed, seeds, [ctx] * len(seeds)))
    else:
        torch.set_num_threads(threads)
        results = [run_seed(seed, ctx) for seed in seeds]
    for r in results:
        console.print(f"seed {r['seed']}: {r['steps']} steps"
                      + ("" if r["train_s"] is None else f" in {r['train_s']:.0f} s"))
    text = summarize(results)
    meta = {"plan": {**plan.__dict__, "overrides": list(plan.overrides)}, "corpus": str(corpus),
            "weights": args.weights, "wall_min": round((time.perf_counter() - started) / 60, 1),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "seeds": results}
    (out / "demo_seeds.json").write_text(json.dumps(meta, indent=2))
    (out / "demo_seeds.md").write_text(text + "\n")
    print(text)
    console.print(f"{meta['wall_min']} min; tables in {out / 'demo_seeds.md'}, every figure in "
                  f"{out / 'demo_seeds.json'}")


if __name__ == "__main__":
    main()
