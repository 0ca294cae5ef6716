"""Continue a learning-benchmark training run for more epochs, then score it per map and readout.

Asks whether the learning benchmark's models are still short of steps: the run
folder is copied (the original stays as recorded), training resumes from its
last checkpoint with the same recipe and seed, the per-epoch learning-rate decay
carrying on, up to --epochs, and the result is scored like the benchmark's rows.

    .venv/bin/python benchmarks/continue_run.py --run /tmp/learning-6/runs/global-sent-word-seed1 \
        --bench /tmp/learning-6 --out /tmp/ext/seed1 --seed 1 --epochs 56

Results are recorded in benchmarks/RESULTS.md ("Twice the steps, continued").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import budget, rows_of  # noqa: E402  (the benchmark's own recipe, so the continuation trains alike)

from afloc_cli.demo import evaluate, training_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run folder benchmarks/learning.py trained")
    ap.add_argument("--bench", type=Path, required=True, help="that benchmark's --out (its corpus and cache)")
    ap.add_argument("--out", type=Path, required=True, help="where the continued run goes")
    ap.add_argument("--seed", type=int, required=True, help="the run's seed")
    ap.add_argument("--epochs", type=int, required=True, help="total epochs after continuing")
    ap.add_argument("--losses", default="global,sent,word")
    ap.add_argument("--bootstrap", type=int, default=50)
    args = ap.parse_args()

    from train.data import FrameCache
    from train.main import train

    if not (args.out / "checkpoints").exists():
        shutil.copytree(args.run, args.out, dirs_exist_ok=True)
    cfg = training_config(budget(False, args.epochs).plan, seed=args.seed, losses=args.losses, workers=0)
    start = time.perf_counter()
    state = train(cfg, FrameCache(args.bench / "cache"), args.out, device="cpu", resume=True,
                  console=Console(stderr=True), show_progress=False)
    print(f"seed {args.seed}: step {state.step}, {time.perf_counter() - start:.0f} s", flush=True)
    holdout = json.loads((args.bench / "corpus" / "synth.json").read_text())["held_out"]["category_name"]
    for level in ("fused", "deep"):
        results = evaluate(args.out / "model.safetensors", args.bench / "corpus", args.out / f"bench-{level}",
                           n_boot=args.bootstrap, level=level)  # type: ignore[arg-type]
        for readout, result in results.items():  # the benchmark's own rows: per kind, then the seen macro
            *kinds, macro = rows_of(result, level, readout, args.seed, holdout)
            print(json.dumps({
                "seed": args.seed, "level": level, "readout": readout, "pointing": macro["pointing"],
                "miou": macro["miou"],
                "per_kind": {r["kind"]: round(r["pointing"], 2) for r in kinds if not r["held_out"]},
            }), flush=True)


if __name__ == "__main__":
    main()
