"""How should the fused map weigh its two levels? Score it at several shallow weights on trained models.

The fused level (`--level fused`) is w x the min-max'd shallow (word-level) map plus (1 - w) x the min-max'd deep
map; `heatmap.fused_shallow_weight` sets w (0.75 since 0c88349; 0.5 before). This scores every
`<losses>-seed<N>/model.safetensors` under --runs matching --pattern (links to runs kept elsewhere will do) at
each weight, on the test split with the contrast readout (the learning benchmark's judged readout), and prints
the seen kinds' macro pointing game and mIoU per model, then their mean and sd over the models of each loss set.

    .venv/bin/python benchmarks/fused_weights.py --corpus /tmp/s18/learning/corpus \
        --runs /tmp/s18/learning/runs --out /tmp/fw --weights 0.5,0.75

Results: benchmarks/RESULTS.md ("Fused-map weights").
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_control import score  # noqa: E402  (the same scoring: seen kinds' macros, both readouts)


def _group(run: Path) -> str:
    """The loss set of a learning-benchmark run folder (`global-sent-word-seed9` -> `global-sent-word`)."""
    return re.sub(r"-seed\d+$", "", run.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--runs", type=Path, required=True, help="a folder of <losses>-seed<N> run folders")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", default="0.5,0.6,0.67,0.75,0.85", help="the fused map's shallow weights")
    ap.add_argument("--pattern", default="*sent*", help="run folders to score (default: those with a local loss)")
    ap.add_argument("--bootstrap", type=int, default=5, help="resamples (the means do not depend on them)")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    figures: dict[tuple[str, float], list[tuple[float, float]]] = {}
    print("| model | shallow weight | pointing (seen kinds) | mIoU (seen kinds) |\n|---|---|---|---|")
    for run in sorted(p for p in args.runs.glob(args.pattern) if (p / "model.safetensors").is_file()):
        for w in weights:
            pointing, miou = score(run / "model.safetensors", args.corpus, args.out / run.name / f"w{w}", "fused",
                                   args.bootstrap, w)["contrast"]
            figures.setdefault((_group(run), w), []).append((pointing, miou))
            print(f"| {run.name} | {w} | {pointing:.3f} | {miou:.3f} |", flush=True)
    print("\n| loss set | shallow weight | models | pointing | mIoU |\n|---|---|---|---|---|")
    for (group, w), values in figures.items():
        cells = []
        for k in (0, 1):
            xs = [v[k] for v in values]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.fmean(xs):.3f} ± {sd:.3f}")
        print(f"| {group} | {w} | {len(values)} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
