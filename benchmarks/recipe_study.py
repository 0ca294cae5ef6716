"""One variant of the demo recipe, trained on an existing corpus and cache, scored per map and readout.

The single-run studies in RESULTS.md ("Demo learning" run H, the learning
benchmark's "Twice the schedule") ran this: the demo's plan (`DemoPlan.full()`)
with the overrides given, on the corpus and cache an earlier `afloc demo` or
`benchmarks/learning.py` left behind, so the variant sees exactly their data.

    .venv/bin/python benchmarks/recipe_study.py --corpus /tmp/demo/corpus --cache /tmp/demo/cache \
        --out /tmp/exp/H --set freeze_text=false --set optim.text_lr=1e-4
    .venv/bin/python benchmarks/recipe_study.py --corpus /tmp/learning/corpus --cache /tmp/learning/cache \
        --out /tmp/exp/long-s1 --seed 1 --epochs 28 --set optim.step_gamma=0.949 --levels deep,fused,shallow
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from afloc_cli.demo import DemoPlan, evaluate, pretrain, training_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="the demo plan's epochs unless given")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a training override, KEY=VALUE")
    ap.add_argument("--levels", default="deep,fused")
    ap.add_argument("--bootstrap", type=int, default=100)
    args = ap.parse_args()
    plan = DemoPlan.full()
    plan = replace(plan, epochs=args.epochs or plan.epochs, overrides=(*plan.overrides, *args.overrides))
    cfg = training_config(plan, seed=args.seed, workers=0)
    holdout = json.loads((args.corpus / "synth.json").read_text())["held_out"]["category_name"]
    start = time.perf_counter()
    checkpoint, steps = pretrain(args.cache, args.out / "run", cfg, Console(stderr=True), show_progress=False)
    train_s = time.perf_counter() - start
    print(f"seed {args.seed}, {steps} steps, {train_s:.0f} s of training, overrides {list(plan.overrides)}")
    for level in args.levels.split(","):
        results = evaluate(checkpoint, args.corpus, args.out / f"bench-{level}", n_boot=args.bootstrap,
                           level=level)  # type: ignore[arg-type]
        for readout, result in results.items():
            rows = result.per_category.to_dicts()
            seen = [r for r in rows if r["category"] != holdout]
            held = [r for r in rows if r["category"] == holdout]
            auroc = None if result.auroc is None else result.auroc.filter(result.auroc["category"] == "macro")
            print(f"{level:8} {readout:9} seen kinds: pointing {sum(r['pointing'] for r in seen) / len(seen):.3f} "
                  f"mIoU {sum(r['iou'] for r in seen) / len(seen):.3f}"
                  + (f" | held out: pointing {held[0]['pointing']:.3f} mIoU {held[0]['iou']:.3f}" if held else "")
                  + ("" if auroc is None else f" | AUROC {auroc['auroc'][0]:.3f}"))


if __name__ == "__main__":
    main()
