"""Where a finding's raw map peaks relative to its box: inside, beside, above or below, in box sizes.

The pointing game only says hit or miss; this says where the misses go. For
each box of one category in an MS-CXR-layout ground truth (a synthetic corpus
or MS-CXR itself), the raw grid of the box's phrase is read from a heat-map
file, its peak cell centre is mapped back to original pixels through the stored
letterbox, and its offset is printed as fractions of the box: 0 is the box's
top (left) edge, 1 its bottom (right) edge.

    .venv/bin/python benchmarks/peak_offsets.py --corpus /tmp/learning-final/corpus \
        --heatmaps /tmp/learning-final/bench/global-sent-word-seed1/contrast/heatmaps.h5 \
        --category "Pleural Effusion"

Results: benchmarks/RESULTS.md, "Where the full model's effusion maps peak".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from afloc_cli.heatmaps.store import HeatmapFile
from afloc_cli.image.data.transforms import Letterbox

GROUND_TRUTH = "MS_CXR_Local_Alignment_v1.1.0.csv"


def offsets(heatmaps: Path, corpus: Path, category: str) -> np.ndarray:
    """(n, 2) peak offsets (x, y) in box widths/heights from the box's left/top edge."""
    boxes = pl.read_csv(corpus / GROUND_TRUTH, glob=False).filter(pl.col("category_name") == category)
    out = []
    with HeatmapFile.open(heatmaps) as hf:
        rows = {str(Path(p).resolve()): i for i, p in enumerate(hf.paths)}
        columns = {p: j for j, p in enumerate(hf.prompts)}
        for box in boxes.iter_rows(named=True):
            i = rows.get(str((corpus / box["path"]).resolve()))
            if i is None or box["label_text"] not in columns:
                continue
            record = hf.record(i)
            if record.status != "ok":
                continue
            grid = hf.raw(i, columns[box["label_text"]])
            cy, cx = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
            lb = Letterbox(**record.letterbox)
            cell = lb.size / hf.grid
            x, y = lb.frame_to_original((cx + 0.5) * cell, (cy + 0.5) * cell)
            out.append(((x - box["x"]) / box["w"], (y - box["y"]) / box["h"]))
    return np.array(out).reshape(-1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help=f"a folder holding {GROUND_TRUTH}")
    ap.add_argument("--heatmaps", type=Path, required=True)
    ap.add_argument("--category", required=True)
    args = ap.parse_args()
    found = offsets(args.heatmaps, args.corpus, args.category)
    if not len(found):
        raise SystemExit(f"{args.heatmaps}: no map of a {args.category!r} box's phrase")
    q = (0.1, 0.25, 0.5, 0.75, 0.9)
    inside = np.mean((found >= 0).all(1) & (found <= 1).all(1))
    print(f"{args.category}: {len(found)} boxes, raw peak inside the box {inside:.2f}")
    print("quantiles " + " ".join(f"{v:>5}" for v in q))
    for axis, name in ((1, "y (0 top, 1 bottom)"), (0, "x (0 left, 1 right)")):
        print(f"{name:22} " + " ".join(f"{v:5.2f}" for v in np.quantile(found[:, axis], q)))


if __name__ == "__main__":
    main()
