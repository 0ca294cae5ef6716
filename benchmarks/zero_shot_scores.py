"""Which image-level score tells present from absent? AUROC per rule, from one heat-map file of a synthetic test split.

The heat-map file keeps every image's global-embedding cosine with every prompt
(`scores`), so the rules compare without re-running the model:
- reference: two-way softmax (x10) of "Findings suggesting X." against "No x." (the paper's);
- positive only: the cosine with "Findings suggesting X." alone;
- negative only: the cosine with "No x." (high AUROC here means the negation is not seen);
- contrast: X's cosine minus its mean over the other findings' prompts (`--readout contrast`).

    .venv/bin/python benchmarks/zero_shot_scores.py --corpus /tmp/demo/corpus \
        --heatmaps /tmp/demo/benchmark/contrast/heatmaps.h5 [--checkpoint /tmp/demo/run/model.safetensors]

With --checkpoint it also prints, per kind, how close the text model puts the
finding's prompt to its own negation and to the other findings' prompts.

The file must hold both templates of every kind (an `afloc benchmark synthetic
... --readout contrast` run's heatmaps.h5 does). Results: benchmarks/RESULTS.md, "Zero-shot scores".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from afloc_cli.benchmark.class_prompts import presence_scores
from afloc_cli.benchmark.metrics import auroc
from afloc_cli.benchmark.runner import NEGATIVE_TEMPLATE
from afloc_cli.heatmaps.store import HeatmapFile

TEMPLATE = "Findings suggesting {category}."


def rule_scores(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    """(images, prompts) cosines -> (images, kinds) per rule; pos/neg index each kind's two prompts."""
    own, negative = scores[:, pos].astype(np.float64), scores[:, neg].astype(np.float64)
    return {"reference (vs 'No x.')": presence_scores(own, negative, "reference"), "positive only": own,
            "negative only": negative, "contrast (vs other findings)": presence_scores(own, None, "contrast")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help="an `afloc synth` corpus (labels.csv, synth.json)")
    ap.add_argument("--heatmaps", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=None, help="also print the prompts' text-side cosines")
    args = ap.parse_args()
    labels = pl.read_csv(args.corpus / "labels.csv", glob=False)
    held_out = json.loads((args.corpus / "synth.json").read_text())["held_out"]["category_name"]
    kinds = [k["category_name"] for k in json.loads((args.corpus / "synth.json").read_text())["kinds"]]
    with HeatmapFile.open(args.heatmaps) as hf:
        prompt_index = {p: j for j, p in enumerate(hf.prompts)}
        paths = [Path(p) for p in hf.paths]
        ok = np.array([hf.record(i).status == "ok" for i in range(hf.n_images)])
        scores = hf.scores()
    missing = [t for c in kinds for t in (TEMPLATE.format(category=c), NEGATIVE_TEMPLATE.format(category=c.lower()))
               if t not in prompt_index]
    if missing:
        raise SystemExit(f"{args.heatmaps}: lacks {len(missing)} template prompts, e.g. {missing[0]!r}")
    by_path = {str((args.corpus / p).resolve()): i for i, p in enumerate(labels["path"])}
    rows = [by_path[str(p.resolve())] for p in paths]
    truth = labels[rows].select(kinds).to_numpy().astype(bool)[ok]
    pos = np.array([prompt_index[TEMPLATE.format(category=c)] for c in kinds])
    neg = np.array([prompt_index[NEGATIVE_TEMPLATE.format(category=c.lower())] for c in kinds])
    print(f"{int(ok.sum())} images; held-out kind: {held_out}")
    print(f"{'rule':30} {'macro':>6} {'seen':>6} " + " ".join(f"{c[:11]:>11}" for c in kinds))
    for rule, values in rule_scores(scores[ok], pos, neg).items():
        per_kind = [auroc(values[:, j], truth[:, j]) for j in range(len(kinds))]
        seen = [a for c, a in zip(kinds, per_kind, strict=True) if c != held_out]
        print(f"{rule:30} {np.mean(per_kind):6.3f} {np.mean(seen):6.3f} "
              + " ".join(f"{a:11.3f}" for a in per_kind))
    if args.checkpoint is not None:
        text_cosines(args.checkpoint, kinds)


def text_cosines(checkpoint: Path, kinds: list[str]) -> None:
    """Report embeddings of the prompts (what the scores compare the image with), cosine to each other."""
    import torch
    import torch.nn.functional as F

    from afloc_cli.checkpoint.io import load_checkpoint

    model = load_checkpoint(checkpoint).eval()
    own = F.normalize(model.encode_prompts([TEMPLATE.format(category=c) for c in kinds]), dim=1)
    negated = F.normalize(model.encode_prompts([NEGATIVE_TEMPLATE.format(category=c.lower()) for c in kinds]), dim=1)
    pairs = own @ own.T
    others = pairs[~torch.eye(len(kinds), dtype=torch.bool)].view(len(kinds), -1).mean(1)
    print(f"{'kind':18} {'cos(X, No x)':>13} {'mean cos(X, other findings)':>28}")
    for c, a, b in zip(kinds, (own * negated).sum(1), others, strict=True):
        print(f"{c:18} {float(a):13.3f} {float(b):28.3f}")


if __name__ == "__main__":
    main()
