"""What does the fused map owe to the word level? Score a control map beside it on trained models.

The fused level (`--level fused`) adds the min-max'd deep map, upsampled to
the shallow grid, to the min-max'd shallow map (weights 0.25 and 0.75; the
runs recorded with this script had 0.5 each), and is then smoothed with
sigma = 1.5 *shallow* cells: half the blur, in pixels, of the deep level's
sigma = 1.5 deep cells. The control ("deep on the shallow grid") is the fused
pipeline with the shallow half left out: the deep map alone, upsampled to the
shallow grid the same way. If the control scores like the fused map, the gain
is the finer smoothing, not the word-level features.

    .venv/bin/python benchmarks/fused_control.py --corpus /tmp/learning-final/corpus \
        --runs /tmp/learning-final/runs --out /tmp/fused-control

Every `<losses>-seed<N>/model.safetensors` under --runs matching --pattern is
scored (test split, both readouts, 100 bootstrap resamples). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from afloc_cli.checkpoint.io import load_checkpoint
from afloc_cli.demo import evaluate_with, localizer
from afloc_cli.vlp.inference_engine import EngineOutput, LocalizationEngine
from kernels.dispatch import localization_maps


class DeepOnShallowGrid(LocalizationEngine):
    """The fused level without its shallow half: the normalised deep map on the shallow grid."""

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> EngineOutput:
        feats = self.features(frames)  # built with level="fused": shallow, deep and global
        deep, stats = localization_maps(feats.deep.float(), self.prompt_embeddings, self.cfg.heatmap.similarity,
                                        global_=feats.global_.float(), normalize=True)
        maps = F.interpolate(deep, size=feats.shallow.shape[-2:], mode="bilinear", align_corners=False)
        return EngineOutput(maps=maps.float().cpu(), scores=stats.scores.float().cpu())


def score(checkpoint: Path, corpus: Path, out: Path, level: str, n_boot: int = 100,
          fused_shallow_weight: float | None = None) -> dict[str, tuple[float, float]]:
    """{readout: (pointing, mIoU)}, macros over the seen kinds, for the fused map (at `fused_shallow_weight`,
    None: the config's) or its control."""
    holdout = json.loads((corpus / "synth.json").read_text())["held_out"]["category_name"]
    engine = DeepOnShallowGrid if level == "control" else LocalizationEngine
    localize = localizer(load_checkpoint(checkpoint), checkpoint, "fused", engine_class=engine,
                         fused_shallow_weight=fused_shallow_weight)
    results = {}
    for name, result in evaluate_with(localize, corpus, out, n_boot=n_boot).items():
        seen = result.per_category.filter(result.per_category["category"] != holdout)
        results[name] = (float(seen["pointing"].mean()), float(seen["iou"].mean()))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pattern", default="*sent*", help="run folders to score (default: those with a local loss)")
    args = ap.parse_args()
    print("| model | map | readout | pointing (seen kinds) | mIoU (seen kinds) |\n|---|---|---|---|---|")
    for run in sorted(p for p in args.runs.glob(args.pattern) if (p / "model.safetensors").is_file()):
        for level in ("fused", "control"):
            figures = score(run / "model.safetensors", args.corpus, args.out / run.name / level, level)
            for readout, (pointing, miou) in figures.items():
                name = "fused" if level == "fused" else "deep on the shallow grid (control)"
                print(f"| {run.name} | {name} | {readout} | {pointing:.3f} | {miou:.3f} |", flush=True)


if __name__ == "__main__":
    main()
