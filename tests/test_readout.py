"""The contrast readout: exact values on a hand-made case, its errors, and the oracle still points right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afloc_cli.benchmark.datasets import fill_sizes, read_dataset
from afloc_cli.benchmark.runner import run_benchmark, select_items
from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.readout import score_table
from afloc_cli.heatmaps.store import HeatmapFile, HeatmapWriter, ImageRecord
from afloc_cli.image.data.io import read_image_size
from afloc_cli.image.data.transforms import Letterbox
from afloc_cli.vlp.heatmap import contrast_maps, frame_maps

TEMPLATE = "Findings suggesting {category}."


def test_contrast_mean_exact_values():
    maps = torch.tensor([
        [[1.0, 0.0], [0.0, 0.0]],
        [[0.0, 2.0], [0.0, 0.0]],
        [[0.0, 0.0], [3.0, 0.0]],
    ])
    out = contrast_maps(maps)
    expected = torch.tensor([
        [[1.0, -1.0], [-1.5, 0.0]],
        [[-0.5, 2.0], [-1.5, 0.0]],
        [[-0.5, -1.0], [3.0, 0.0]],
    ])
    assert torch.equal(out, expected)
    # Batched input gives the same per image; a map shared by every prompt cancels out.
    assert torch.equal(contrast_maps(maps[None])[0], expected)
    shared = maps + torch.tensor([[5.0, 7.0], [11.0, 13.0]])
    assert torch.allclose(contrast_maps(shared), expected)


def test_contrast_softmax_and_linearity():
    maps = torch.tensor([[[0.0]], [[np.log(3.0)]]], dtype=torch.float32)
    assert torch.allclose(contrast_maps(maps, mode="softmax"), torch.tensor([[[0.25]], [[0.75]]]))
    # "mean" is linear: contrasting before or after the smoothing + upsampling gives the same maps.
    g = torch.randn(4, 7, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(frame_maps(contrast_maps(g), 32), contrast_maps(frame_maps(g, 32)), atol=1e-5)


def test_contrast_needs_two_prompts():
    with pytest.raises(AflocError, match="two or more prompts"):
        contrast_maps(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError):
        contrast_maps(torch.zeros(2, 3, 3), mode="nope")


def _oracle_with_templates(corpus: Path, h5: Path, templates: bool = True) -> None:
    """Oracle maps for the phrases plus every category's template (its truth on the image, else zero)."""
    items, _ = read_dataset("synthetic", corpus, split="test")
    items = fill_sizes(select_items(items, "phrase", TEMPLATE, None))
    positives = [it for it in items if it.positive]
    categories = sorted({it.category for it in items})
    paths = list(dict.fromkeys(str(it.image_path) for it in positives))
    prompts = list(dict.fromkeys(it.prompt for it in positives))
    if templates:
        prompts += [t for t in (TEMPLATE.format(category=c) for c in categories) if t not in prompts]
    grid = 19
    maps = np.zeros((len(paths), len(prompts), grid, grid), np.float32)
    records = []
    for i, path in enumerate(paths):
        h, w = read_image_size(path)
        lb = Letterbox.for_shape(h, w, 224)
        records.append(ImageRecord(path=path, height=h, width=w, letterbox=lb.to_dict(), reader={}))
        for it in positives:
            if str(it.image_path) == path:
                frame = torch.from_numpy(lb.original_mask_to_frame(it.truth_mask(h, w)).astype(np.float32))
                pooled = F.adaptive_avg_pool2d(frame[None, None], grid)[0, 0].numpy()
                maps[i, prompts.index(it.prompt)] = pooled
                if templates:
                    maps[i, prompts.index(TEMPLATE.format(category=it.category))] += pooled
    writer = HeatmapWriter(h5, paths=paths, prompts=prompts, grid=grid,
                           attrs={"checkpoint_sha256": "oracle", "heatmap_config": json.dumps({"sigma": 1.5})})
    writer.write_batch(list(range(len(paths))), maps, np.zeros(maps.shape[:2], np.float32), records)
    writer.finalize()


def test_benchmark_oracle_with_contrast_readout(corpus, tmp_path):
    _oracle_with_templates(corpus, tmp_path / "oracle.h5")
    result = run_benchmark("synthetic", corpus, tmp_path / "contrast", heatmaps=tmp_path / "oracle.h5",
                           split="test", n_boot=20, readout="contrast")
    s = {r["metric"]: r["value"] for r in result.summary.to_dicts()}
    assert s["pointing"] == 1.0 and s["iou"] > 0.4
    # The file holds the positive images only: no AUROC, and a note that says why (not an error).
    assert result.auroc is None and any("images without a finding" in n for n in result.notes)
    protocol = json.loads((tmp_path / "contrast" / "protocol.json").read_text())
    assert protocol["readout"] == "contrast" and "template" in protocol["contrast"]
    with pytest.raises(AflocError, match="readout"):
        run_benchmark("synthetic", corpus, tmp_path / "x", heatmaps=tmp_path / "oracle.h5", split="test",
                      readout="nope")
    with HeatmapFile.open(tmp_path / "oracle.h5") as hf:
        ref, con = score_table(hf), score_table(hf, readout="contrast")
    assert ref.height == con.height and ref["score"].to_list() == con["score"].to_list()


def test_benchmark_contrast_without_template_maps(corpus, tmp_path):
    """A file with only the phrases' maps cannot be read by contrast: a clear error, not a silent number."""
    _oracle_with_templates(corpus, tmp_path / "phrases.h5", templates=False)
    with pytest.raises(AflocError, match="template"):
        run_benchmark("synthetic", corpus, tmp_path / "c", heatmaps=tmp_path / "phrases.h5", split="test",
                      n_boot=0, readout="contrast")


def test_score_table_shows_a_path_that_is_not_utf8(tmp_path):
    """A table column must be UTF-8: such a path is shown with \\x escapes instead of crashing polars."""
    import os

    name = os.fsdecode(b"scans/M\xfcller.png")
    w = HeatmapWriter(tmp_path / "x.h5", paths=[name], prompts=["a"], grid=3, attrs={"checkpoint_sha256": "0"})
    w.write_failure(0, ImageRecord(path=name, height=0, width=0, letterbox={}, reader={}, error="unreadable"))
    with HeatmapFile.open(w.finalize()) as hf:
        table = score_table(hf)
    assert table["path"].to_list() == ["scans/M\\xfcller.png"] and table["status"].to_list() == ["failed"]


def test_chexlocalize_id_keeps_a_sop_uid_name_whole():
    from afloc_cli.heatmaps.readout import chexlocalize_id

    assert chexlocalize_id("data/patient1/study2/view1_frontal.jpg") == "patient1_study2_view1_frontal"
    assert chexlocalize_id("cx/uid/1.2.840.1.101") == "cx_uid_1.2.840.1.101"  # not 1.2.840.1
    assert chexlocalize_id("cx/uid/1.2.840.1.102") != chexlocalize_id("cx/uid/1.2.840.1.101")
