"""`afloc benchmark` end to end on the synthetic corpus: oracle maps score high, inverted ones low; tables written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from afloc_cli.benchmark.datasets import fill_sizes, read_dataset
from afloc_cli.benchmark.runner import run_benchmark, select_items
from afloc_cli.checkpoint.io import save_checkpoint
from afloc_cli.cli import run
from afloc_cli.config import ImageConfig, PreprocessConfig, small_config
from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.store import HeatmapWriter, ImageRecord
from afloc_cli.image.data.io import read_image_size
from afloc_cli.image.data.transforms import Letterbox
from afloc_cli.vlp.model import build_model


def _oracle_file(corpus: Path, h5: Path, invert: bool = False) -> None:
    """Maps made from the truth itself: the geometry chain (reader -> letterbox -> frame) decides the score."""
    items, _ = read_dataset("synthetic", corpus, split="test")
    items = fill_sizes(select_items(items, "phrase", "Findings suggesting {category}.", None))
    positives = [it for it in items if it.positive]
    paths = list(dict.fromkeys(str(it.image_path) for it in positives))
    prompts = list(dict.fromkeys(it.prompt for it in positives))
    grid = 19
    maps = np.full((len(paths), len(prompts), grid, grid), np.nan, np.float32)
    records = []
    for i, path in enumerate(paths):
        h, w = read_image_size(path)
        lb = Letterbox.for_shape(h, w, 224)
        records.append(ImageRecord(path=path, height=h, width=w, letterbox=lb.to_dict(), reader={}))
        for it in positives:
            if str(it.image_path) == path:
                frame = torch.from_numpy(lb.original_mask_to_frame(it.truth_mask(h, w)).astype(np.float32))
                pooled = F.adaptive_avg_pool2d(frame[None, None], grid)[0, 0].numpy()
                maps[i, prompts.index(it.prompt)] = -pooled if invert else pooled
    writer = HeatmapWriter(h5, paths=paths, prompts=prompts, grid=grid,
                           attrs={"checkpoint_sha256": "oracle", "heatmap_config": json.dumps({"sigma": 1.5})})
    writer.write_batch(list(range(len(paths))), maps, np.zeros(maps.shape[:2], np.float32), records)
    writer.finalize()


def test_oracle_and_inverted_maps(corpus, tmp_path):
    _oracle_file(corpus, tmp_path / "oracle.h5")
    good = run_benchmark("synthetic", corpus, tmp_path / "good", heatmaps=tmp_path / "oracle.h5", split="test",
                         n_boot=50)
    s = {r["metric"]: r["value"] for r in good.summary.to_dicts()}
    assert s["pointing"] == 1.0
    assert s["iou"] > 0.4 and s["dice"] > 0.55 and s["cnr"] > 1.0
    _oracle_file(corpus, tmp_path / "inverted.h5", invert=True)
    bad = run_benchmark("synthetic", corpus, tmp_path / "bad", heatmaps=tmp_path / "inverted.h5", split="test",
                        n_boot=50)
    b = {r["metric"]: r["value"] for r in bad.summary.to_dicts()}
    assert b["pointing"] == 0.0 and b["cnr"] < 0 and b["iou"] < 0.1
    for name in ("per_item.parquet", "per_category.csv", "summary.csv", "protocol.json"):
        assert (tmp_path / "good" / name).is_file()
    protocol = json.loads((tmp_path / "good" / "protocol.json").read_text())
    assert protocol["protocol"] == "AFLoc" and protocol["checkpoint_sha256"] == "oracle"
    assert protocol["thresholds"] == [0.1, 0.2, 0.3, 0.4, 0.5] and protocol["cnr"] == "signed"
    assert any(name.endswith(".csv") for name in protocol["annotation_sha256"])


def test_benchmark_cli_with_checkpoint_and_auroc(corpus, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = small_config().replace(
        image=ImageConfig(arch="resnet18", hidden_sizes=(8, 16, 32, 64), embedding_size=8, internal_size=None),
        preprocess=PreprocessConfig(image_size=64),
    )
    ckpt = tmp_path / "tiny.safetensors"
    sha = save_checkpoint(build_model(cfg).eval(), ckpt)
    args = ["benchmark", "synthetic", "--root", str(corpus), "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"),
            "--split", "test", "--bootstrap", "20", "--workers", "0", "--format", "json"]
    assert run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"]["checkpoint_sha256"] == sha
    metrics = {r["metric"] for r in result["summary"]}
    assert {"iou", "dice", "cnr", "pointing"} <= metrics
    auroc = pl.read_csv(tmp_path / "b" / "auroc.csv")
    assert "macro" in auroc["category"].to_list()
    per_item = pl.read_parquet(tmp_path / "b" / "per_item.parquet")
    assert per_item.height == result["protocol"]["n_items_scored"] > 0
    # Interrupted or repeated: the heat-map file is reused (resume), the numbers are the same.
    assert run(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["summary"] == result["summary"]


def test_benchmark_usage_errors(corpus, tmp_path):
    assert run(["benchmark", "nope", "--root", str(corpus), "--heatmaps", "x.h5", "--out", str(tmp_path)]) == 2
    assert run(["benchmark", "ms-cxr", "--root", str(tmp_path / "missing"), "--heatmaps", "x.h5",
                "--out", str(tmp_path / "o")]) == 2


def _chexlocalize_image(root: Path) -> tuple[Path, np.ndarray, dict]:
    """One 40x30 CheXlocalize test image under root, a truth mask on it and that mask's COCO RLE."""
    from PIL import Image

    from afloc_cli.benchmark.datasets.rle import encode_coco

    image = root / "CheXpert/test/patient1/study1/view1_frontal.jpg"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.full((40, 30), 90, np.uint8)).save(image)
    truth = np.zeros((40, 30), bool)
    truth[5:25, 3:20] = True
    return image, truth, {"size": [40, 30], "counts": encode_coco(truth)}


def test_chexlocalize_human_benchmark_row(tmp_path):
    """hb_segmentations_test.json is scored with the same code: a human mask equal to the truth gives IoU 1."""
    image, truth, rle = _chexlocalize_image(tmp_path)
    h, w = truth.shape
    (tmp_path / "CheXlocalize").mkdir()
    for name in ("gt_segmentations_test.json", "hb_segmentations_test.json"):
        (tmp_path / "CheXlocalize" / name).write_text(json.dumps({"patient1_study1_view1_frontal":
                                                                  {"Cardiomegaly": rle}}))
    lb = Letterbox.for_shape(h, w, 224)
    frame = torch.from_numpy(lb.original_mask_to_frame(truth).astype(np.float32))
    grid = F.adaptive_avg_pool2d(frame[None, None], 19)[0, 0].numpy()
    prompt = "Findings suggesting cardiomegaly."
    writer = HeatmapWriter(tmp_path / "maps.h5", paths=[str(image)], prompts=[prompt], grid=19,
                           attrs={"checkpoint_sha256": "oracle"})
    writer.write_batch([0], grid[None, None], np.zeros((1, 1), np.float32),
                       [ImageRecord(path=str(image), height=h, width=w, letterbox=lb.to_dict(), reader={})])
    writer.finalize()
    result = run_benchmark("chexlocalize", tmp_path, tmp_path / "out", heatmaps=tmp_path / "maps.h5", split="test",
                           n_boot=10)
    assert result.human is not None
    human = {r["metric"]: r["value"] for r in result.human.to_dicts()}
    assert human["iou"] == pytest.approx(1.0) and human["pointing"] == 1.0
    assert (tmp_path / "out" / "human_summary.csv").is_file()
    model = {r["metric"]: r["value"] for r in result.summary.to_dicts()}
    assert model["pointing"] == 1.0 and model["iou"] < human["iou"]


def _scores_file(corpus: Path, h5: Path, negative_follows_positive: bool, offset_sd: float = 3.0) -> list[str]:
    """Every test image, every category's template and negative prompt; scores built from the labels.

    Each image's template scores share one per-image offset (what every prompt lights up) and the truth
    adds 0.5 to the categories present; the negative prompt either copies the template score (a text
    model that cannot tell "No x." from "x") or is its mirror image.
    """
    items, _ = read_dataset("synthetic", corpus, split="test")
    items = fill_sizes(select_items(items, "phrase", "Findings suggesting {category}.", None))
    categories = sorted({it.category for it in items})
    paths = list(dict.fromkeys(str(it.image_path) for it in items))
    prompts = [f"Findings suggesting {c}." for c in categories] + [f"No {c.lower()}." for c in categories]
    phrases = list(dict.fromkeys(it.prompt for it in items if it.positive and it.prompt not in prompts))
    rng = np.random.default_rng(0)
    offset = rng.normal(0, offset_sd, len(paths))
    k = len(categories)
    scores = np.zeros((len(paths), 2 * k + len(phrases)), np.float32)
    scores[:, :k] = offset[:, None]
    for it in items:
        if it.positive:
            scores[paths.index(str(it.image_path)), categories.index(it.category)] += 0.5
    scores[:, k:2 * k] = scores[:, :k] if negative_follows_positive else -scores[:, :k]
    grid = 19
    maps = rng.normal(size=(len(paths), scores.shape[1], grid, grid)).astype(np.float32)
    records = []
    for path in paths:
        h, w = read_image_size(path)
        records.append(ImageRecord(path=path, height=h, width=w,
                                   letterbox=Letterbox.for_shape(h, w, 224).to_dict(), reader={}))
    writer = HeatmapWriter(h5, paths=paths, prompts=prompts + phrases, grid=grid,
                           attrs={"checkpoint_sha256": "made-up", "heatmap_config": json.dumps({"sigma": 1.5})})
    writer.write_batch(list(range(len(paths))), maps, scores, records)
    writer.finalize()
    return categories


def test_zero_shot_score_follows_the_readout(corpus, tmp_path):
    """reference: the paper's two-way softmax against 'No {finding}.'; contrast: against the other findings."""
    categories = _scores_file(corpus, tmp_path / "blind.h5", negative_follows_positive=True)
    assert len(categories) >= 2
    ref = run_benchmark("synthetic", corpus, tmp_path / "ref", heatmaps=tmp_path / "blind.h5", split="test",
                        n_boot=20, readout="reference")
    con = run_benchmark("synthetic", corpus, tmp_path / "con", heatmaps=tmp_path / "blind.h5", split="test",
                        n_boot=20, readout="contrast")
    macro = {name: float(r.auroc.filter(pl.col("category") == "macro")["auroc"][0])
             for name, r in (("reference", ref), ("contrast", con))}
    # A negative prompt scored like the positive one: every softmax is 1/2, the reference readout is blind.
    assert macro["reference"] == pytest.approx(0.5)
    # The contrast score cancels the per-image offset and keeps the truth (ties only between two positives).
    assert macro["contrast"] > 0.95
    protocol = json.loads((tmp_path / "con" / "protocol.json").read_text())
    assert protocol["zero_shot"].startswith("global") and protocol["negative_template"] is None
    assert json.loads((tmp_path / "ref" / "protocol.json").read_text())["negative_template"] == "No {category}."
    # A text model that mirrors "No x." away from "x", no shared offset: the reference readout sees the truth.
    _scores_file(corpus, tmp_path / "mirror.h5", negative_follows_positive=False, offset_sd=0.0)
    mirror = run_benchmark("synthetic", corpus, tmp_path / "mirror", heatmaps=tmp_path / "mirror.h5", split="test",
                           n_boot=20, readout="reference")
    assert float(mirror.auroc.filter(pl.col("category") == "macro")["auroc"][0]) > 0.95


def test_contrast_readout_refused_before_localizing_a_one_category_dataset(tmp_path):
    """RSNA has one category: the contrast readout has nothing to compare with, and says so before localizing."""
    from dicom_factory import write_dicom  # tests/ is on sys.path under pytest

    for name in ("p1", "p2"):
        (tmp_path / "stage_2_train_images").mkdir(exist_ok=True)
        write_dicom(tmp_path / "stage_2_train_images" / f"{name}.dcm", np.full((32, 48), 100, np.uint16))
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,4.0,2.0,6.0,10.0,1\np2,,,,,0\n")
    calls = []
    with pytest.raises(AflocError, match="two or more prompts.*one category"):
        run_benchmark("rsna", tmp_path, tmp_path / "out", localize=lambda *a: calls.append(a), n_boot=0,
                      readout="contrast")
    assert calls == []


def test_peak_offsets_of_oracle_maps_lie_inside_their_boxes(corpus, tmp_path):
    """benchmarks/peak_offsets.py maps each peak back through the letterbox: truth-made maps peak in their box."""
    import subprocess
    import sys

    _oracle_file(corpus, tmp_path / "oracle.h5")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "peak_offsets.py"
    categories = sorted({it.category for it in read_dataset("synthetic", corpus, split="test")[0] if it.positive})
    for category in categories:
        done = subprocess.run([sys.executable, str(script), "--corpus", str(corpus), "--heatmaps",
                               str(tmp_path / "oracle.h5"), "--category", category],
                              capture_output=True, text=True, check=True)
        first = done.stdout.splitlines()[0]
        assert first.endswith("raw peak inside the box 1.00"), (category, done.stdout)


def test_framings_blank_and_frame_truth_as_described():
    """reference: the paper's whole frame (padding scored, a 14/224 NaN border, boxes mapped and floored);
    image: padding NaN, truth filled in original pixels."""
    from afloc_cli.benchmark.datasets.base import Box, Item
    from afloc_cli.benchmark.runner import _blank, frame_truth

    lb = Letterbox.for_shape(300, 500, 224)  # wide: padding above and below
    heat = torch.rand(224, 224)
    ref = _blank(heat, lb, "reference", 0)
    assert torch.isnan(ref[:14]).all() and torch.isnan(ref[:, -14:]).all()
    assert not torch.isnan(ref[14:-14, 14:-14]).any()
    assert lb.pad_top > 14 and not torch.isnan(ref[14 : lb.pad_top, 14:-14]).any()  # padding is scored
    img = _blank(heat, lb, "image", 0)
    assert torch.isnan(img[: lb.pad_top]).all() and torch.isnan(img[lb.pad_top + lb.resized_height :]).all()
    assert not torch.isnan(img[lb.pad_top : lb.pad_top + lb.resized_height]).any()
    assert torch.isnan(_blank(heat, lb, "image", 5)[lb.pad_top : lb.pad_top + 30, :5]).all()  # the file's margin

    item = Item("x", "x/0", "x", Path("x.png"), None, "Edema", "edema", True, 300, 500, (Box(100.7, 50.2, 81.9, 40.6),))
    np.testing.assert_array_equal(frame_truth(item, lb, "reference", "ms-cxr"),
                                  lb.boxes_to_frame_mask([(100.7, 50.2, 81.9, 40.6)]))
    np.testing.assert_array_equal(frame_truth(item, lb, "image", "ms-cxr"),
                                  lb.original_mask_to_frame(item.truth_mask()))
    dot = np.zeros((300, 500), dtype=bool)
    dot[150, 250] = True
    masked = Item("c", "c/0", "c", Path("c.png"), None, "Pneumonia", "p", True, 300, 500, mask=lambda: dot)
    assert frame_truth(masked, lb, "reference", "covid-rural").any()  # the reference keeps any coverage there
    assert not frame_truth(masked, lb, "reference", "siim").any()
    assert not frame_truth(masked, lb, "image", "covid-rural").any()


def test_framing_is_recorded_and_checked(corpus, tmp_path):
    _oracle_file(corpus, tmp_path / "oracle.h5")
    runs = {f: run_benchmark("synthetic", corpus, tmp_path / f, heatmaps=tmp_path / "oracle.h5", split="test",
                             n_boot=0, framing=f) for f in ("reference", "image")}
    for f, result in runs.items():
        protocol = json.loads((tmp_path / f / "protocol.json").read_text())
        assert protocol["framing"] == f and protocol["scoring_frame"].startswith("model frame")
        assert result.summary.filter(pl.col("metric") == "pointing")["value"][0] == 1.0
    # the same maps, two framings: the padding and the border change the min-max, so the figures differ
    iou = {f: r.summary.filter(pl.col("metric") == "iou")["value"][0] for f, r in runs.items()}
    assert iou["reference"] != iou["image"]
    with pytest.raises(AflocError, match="--framing"):
        run_benchmark("synthetic", corpus, tmp_path / "x", heatmaps=tmp_path / "oracle.h5", framing="paper")


def _frame_map_file(h5: Path, images: list[Path], prompt: str, frame: np.ndarray) -> None:
    """One prompt's map for each image, pooled from a 224 frame, recorded as `localize` records it: each image's
    own (header) size and letterbox."""
    grid = F.adaptive_avg_pool2d(torch.from_numpy(frame.astype(np.float32))[None, None], 19)[0, 0].numpy()
    records = []
    for path in images:
        h, w = read_image_size(path)
        records.append(ImageRecord(path=str(path), height=h, width=w,
                                   letterbox=Letterbox.for_shape(h, w, 224).to_dict(), reader={}))
    writer = HeatmapWriter(h5, paths=[str(p) for p in images], prompts=[prompt], grid=19,
                           attrs={"checkpoint_sha256": "oracle"})
    writer.write_batch(list(range(len(images))), np.broadcast_to(grid, (len(images), 1, 19, 19)).copy(),
                       np.zeros((len(images), 1), np.float32), records)
    writer.finalize()


def _metrics(result) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in result.summary.to_dicts()}


@pytest.mark.parametrize("framing", ["reference", "image"])
def test_ms_cxr_boxes_follow_a_resized_image(tmp_path, framing):
    """MS-CXR boxes are in the annotation's pixels (image_width x image_height): on a half-size copy of the
    MIMIC JPG a perfect map scores exactly as on the full-size file, and the run says it rescaled."""
    from PIL import Image

    rel = "files/p10/p10000032/s50414267/abc.jpg"
    full_h, full_w, box = 200, 160, (20, 40, 60, 60)  # x, y, w, h
    picture = np.zeros((full_h, full_w), np.uint8)
    picture[40:100, 20:80] = 220
    frame = Letterbox.for_shape(full_h, full_w, 224).boxes_to_frame_mask([box])
    results = {}
    for name, (h, w) in {"full": (full_h, full_w), "half": (full_h // 2, full_w // 2)}.items():
        root = tmp_path / name
        image = root / "mimic-cxr-jpg/2.0.0" / rel
        image.parent.mkdir(parents=True)
        Image.fromarray(picture).resize((w, h), Image.BILINEAR).save(image, quality=95)
        (root / "MS_CXR_Local_Alignment_v1.0.0.csv").write_text(
            "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height\n"
            f"abc,Pneumonia,left lower opacity,{rel},{','.join(map(str, box))},{full_w},{full_h}\n")
        _frame_map_file(root / "maps.h5", [image], "left lower opacity", frame)
        results[name] = run_benchmark("ms-cxr", root, root / "out", heatmaps=root / "maps.h5", n_boot=0,
                                      framing=framing)
    full, half = _metrics(results["full"]), _metrics(results["half"])
    assert full["pointing"] == 1.0 and half == full
    assert not any("rescaled" in n for n in results["full"].notes)
    assert any(n.startswith("truth rescaled for 1 items") for n in results["half"].notes)
    assert results["half"].problems == 0


@pytest.mark.parametrize("framing", ["reference", "image"])
def test_chexlocalize_mask_on_a_resized_image_and_a_wrong_aspect(tmp_path, framing, capsys):
    """An RLE at 40x30 on a 20x15 copy (CheXpert-v1.0-small style) scores as on the 40x30 original; on a 20x20
    image it cannot fit: a problem row naming the item and the reason, the run goes on."""
    from PIL import Image

    from afloc_cli.benchmark.datasets.rle import encode_coco

    truth = np.zeros((40, 30), bool)
    truth[8:24, 6:20] = True
    rle = {"size": [40, 30], "counts": encode_coco(truth)}
    frame = Letterbox.for_shape(40, 30, 224).original_mask_to_frame(truth)
    prompt = "Findings suggesting cardiomegaly."

    def tree(name: str, sizes: dict[str, tuple[int, int]]) -> Path:
        root = tmp_path / name
        images = []
        for patient, (h, w) in sizes.items():
            image = root / f"CheXpert/test/{patient}/study1/view1_frontal.jpg"
            image.parent.mkdir(parents=True)
            Image.fromarray(np.full((h, w), 90, np.uint8)).save(image)
            images.append(image)
        (root / "CheXlocalize").mkdir()
        (root / "CheXlocalize/gt_segmentations_test.json").write_text(
            json.dumps({f"{p}_study1_view1_frontal": {"Cardiomegaly": rle} for p in sizes}))
        _frame_map_file(root / "maps.h5", images, prompt, frame)
        return root

    results = {}
    for name, sizes in {"full": {"patient1": (40, 30)},
                        "small": {"patient1": (20, 15), "patient2": (20, 20)}}.items():
        root = tree(name, sizes)
        results[name] = run_benchmark("chexlocalize", root, root / "out", heatmaps=root / "maps.h5", split="test",
                                      n_boot=0, framing=framing)
    full, small = results["full"], results["small"]
    assert _metrics(full)["pointing"] == 1.0 and _metrics(small) == _metrics(full)
    assert any(n.startswith("truth rescaled for 1 items") for n in small.notes)
    assert small.problems == 1 and small.protocol["n_problems"] == 1 and small.protocol["n_items_scored"] == 1
    problem = pl.read_csv(tmp_path / "small/out/problems.csv").to_dicts()
    assert len(problem) == 1 and problem[0]["file"].endswith("patient2/study1/view1_frontal.jpg")
    assert problem[0]["reason"].startswith("patient2_study1_view1_frontal/Cardiomegaly: the annotation is 40x30")
    assert "20x20" in problem[0]["reason"] and "aspect ratio" in problem[0]["reason"]
    # Through the CLI: exit 0 and the problem counted, no traceback.
    root = tmp_path / "small"
    assert run(["benchmark", "chexlocalize", "--root", str(root), "--heatmaps", str(root / "maps.h5"), "--split",
                "test", "--out", str(tmp_path / "cli"), "--bootstrap", "0", "--framing", framing,
                "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"]["n_problems"] == 1
    # Nothing left to score: a one-line error naming the problem, exit 2; --out is left as it was.
    bad = tree("bad", {"patient2": (20, 20)})
    with pytest.raises(AflocError, match="no item of chexlocalize could be scored.*1 rows or items could not be "
                                         "used, e.g. .*another aspect ratio"):
        run_benchmark("chexlocalize", bad, bad / "out", heatmaps=bad / "maps.h5", n_boot=0, framing=framing)


def test_truth_letterbox_scales_only_the_same_aspect():
    """A resized copy (aspect kept to rounding) takes the annotation's own letterbox; another aspect is refused."""
    from afloc_cli.benchmark.datasets.base import Box, Item
    from afloc_cli.benchmark.runner import truth_letterbox

    def item(h: int | None, w: int | None) -> Item:
        return Item("ms-cxr", "a/0", "a", Path("a.jpg"), None, "Edema", "edema", True, h, w, (Box(1, 2, 3, 4),))

    lb = Letterbox.for_shape(500, 401, 224)
    assert truth_letterbox(item(500, 401), lb) is lb and truth_letterbox(item(None, None), lb) is lb
    assert truth_letterbox(item(1000, 800), lb) == Letterbox.for_shape(1000, 800, 224)  # 0.25% apart: a copy
    with pytest.raises(AflocError, match="1000x780 pixels but the image is 500x401, another aspect ratio"):
        truth_letterbox(item(1000, 780), lb)  # 2.8% apart


def test_reader_problems_are_listed_and_the_run_goes_on(corpus, tmp_path):
    """A broken annotation row is a problems.csv line, not a crash of the whole run (Problem has no __dict__)."""
    import shutil

    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    phrases = copy / "MS_CXR_Local_Alignment_v1.1.0.csv"
    first = phrases.read_text().splitlines()[1].split(",")
    first[4] = "abc"  # x
    with phrases.open("a") as f:
        f.write(",".join(first) + "\n")
    _oracle_file(copy, tmp_path / "oracle.h5")
    result = run_benchmark("synthetic", copy, tmp_path / "out", heatmaps=tmp_path / "oracle.h5", split="test",
                           n_boot=0)
    assert result.problems == 1
    listed = pl.read_csv(tmp_path / "out" / "problems.csv")
    assert listed["row"].to_list() == [len(phrases.read_text().splitlines())] and "number" in listed["reason"][0]


def test_nih_boxes_are_in_the_published_1024_pixels(tmp_path):
    """A downsampled ChestX-ray14 copy (256x256) scores a perfect map as the 1024x1024 original does."""
    from PIL import Image

    box = (300, 400, 200, 160)
    frame = Letterbox.for_shape(1024, 1024, 224).boxes_to_frame_mask([box])
    results = {}
    for side in (1024, 256):
        root = tmp_path / str(side)
        image = root / "images_001/images/00000001_000.png"
        image.parent.mkdir(parents=True)
        Image.fromarray(np.full((side, side), 90, np.uint8)).save(image)
        (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                                 f"00000001_000.png,Mass,{','.join(map(str, box))},,,\n")
        _frame_map_file(root / "maps.h5", [image], "Findings suggesting mass.", frame)
        results[side] = run_benchmark("nih-bbox", root, root / "out", heatmaps=root / "maps.h5", n_boot=0)
    assert _metrics(results[256]) == _metrics(results[1024]) and _metrics(results[1024])["pointing"] == 1.0
    assert any(n.startswith("truth rescaled for 1 items") for n in results[256].notes)


def _vindr_with_a_garbage_image(root: Path) -> None:
    """Two VinDr images with a finding each; i2.dicom is not an image at all."""
    from dicom_factory import write_dicom  # tests/ is on sys.path under pytest

    (root / "train").mkdir(parents=True)
    write_dicom(root / "train/i1.dicom", np.full((32, 48), 100, np.uint16))
    (root / "train/i2.dicom").write_bytes(b"not an image at all" * 10)
    (root / "annotations").mkdir()
    (root / "annotations/annotations_train.csv").write_text(
        "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"
        "i1,R1,Aortic enlargement,5,2,15,10\ni2,R1,Aortic enlargement,5,2,15,10\n")


def test_an_unreadable_image_is_a_problem_row_and_the_run_goes_on(tiny_checkpoint, tmp_path):
    """VinDr states no image size, so the header is read before localizing: a bad file must not stop the run."""
    _vindr_with_a_garbage_image(tmp_path / "vindr")
    out = tmp_path / "out"
    assert run(["benchmark", "vindr", "--root", str(tmp_path / "vindr"), "--checkpoint", str(tiny_checkpoint),
                "--out", str(out), "--bootstrap", "0", "--workers", "0"]) == 0
    assert pl.read_parquet(out / "per_item.parquet")["item_id"].to_list() == ["i1/Aortic enlargement"]
    listed = pl.read_csv(out / "problems.csv")
    assert listed["file"].to_list() == [str(tmp_path / "vindr/train/i2.dicom")]
    assert "not read" in listed["reason"][0]


def test_an_image_localize_cannot_decode_is_listed_in_problems_csv(tiny_checkpoint, tmp_path):
    """RSNA states its size (1024), so a bad DICOM first fails in localize: problems.csv must still list it."""
    from dicom_factory import write_dicom  # tests/ is on sys.path under pytest

    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    write_dicom(root / "stage_2_train_images/p1.dcm", np.full((32, 32), 100, np.uint16))
    (root / "stage_2_train_images/p2.dcm").write_bytes(b"not an image at all" * 10)
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,40,20,60,100,1\np2,40,20,60,100,1\n")
    out = tmp_path / "out"
    assert run(["benchmark", "rsna", "--root", str(root), "--checkpoint", str(tiny_checkpoint),
                "--out", str(out), "--bootstrap", "0", "--workers", "0"]) == 0
    assert pl.read_parquet(out / "per_item.parquet")["item_id"].to_list() == ["p1"]
    listed = pl.read_csv(out / "problems.csv")
    assert listed["file"].to_list() == [str(root / "stage_2_train_images/p2.dcm")]
    assert "not read" in listed["reason"][0]
    assert json.loads((out / "protocol.json").read_text())["n_problems"] == 1


def test_a_run_leaves_only_its_own_tables_and_a_refused_rerun_none(corpus, tmp_path):
    """problems.csv, auroc.csv and human_summary.csv of an earlier run go when this run writes none (D4); a
    rerun refused after reading the dataset writes nothing, so the folder never mixes two runs (D3)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    phrases = broken / "MS_CXR_Local_Alignment_v1.1.0.csv"
    first = phrases.read_text().splitlines()[1].split(",")
    first[4] = "abc"
    with phrases.open("a") as f:
        f.write(",".join(first) + "\n")
    _oracle_file(corpus, tmp_path / "oracle.h5")
    _oracle_file(broken, tmp_path / "broken.h5")
    out = tmp_path / "out"
    run_benchmark("synthetic", broken, out, heatmaps=tmp_path / "broken.h5", split="test", n_boot=0)
    before = (out / "problems.csv").read_text()
    with phrases.open("a") as f:  # the refused rerun reads one more bad row
        f.write(",".join(first) + "\n")
    with pytest.raises(AflocError, match="--prompt-source"):  # refused once the dataset is read
        run_benchmark("synthetic", broken, out, heatmaps=tmp_path / "oracle.h5", split="test", n_boot=0,
                      prompt_source="other")
    assert (out / "problems.csv").read_text() == before
    for stale in ("auroc.csv", "human_summary.csv"):  # as an earlier run with negatives or a human file left them
        (out / stale).write_text("category,auroc\nx,0.5\n")
    result = run_benchmark("synthetic", corpus, out, heatmaps=tmp_path / "oracle.h5", split="test", n_boot=0)
    assert result.problems == 0 and result.auroc is None and result.human is None
    for stale in ("problems.csv", "auroc.csv", "human_summary.csv"):
        assert not (out / stale).exists(), stale


def test_a_rerun_with_other_settings_says_what_differs_and_overwrite_replaces_it(corpus, tiny_checkpoint, tmp_path,
                                                                                  capsys):
    """The refusal names the benchmark options behind the difference and an option the command has."""
    out = tmp_path / "out"
    base = ["benchmark", "synthetic", "--root", str(corpus), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            "--split", "test", "--bootstrap", "0", "--workers", "0", "--format", "csv"]
    assert run(base) == 0
    capsys.readouterr()
    assert run([*base, "--limit", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the input paths differ from those of the earlier run in this --out" in err
    assert "another --root, --split or --limit" in err and "add --overwrite" in err and "interrupted" not in err
    assert run([*base, "--limit", "1", "--overwrite"]) == 0
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["limit"] == 1
    assert run([*base, "--limit", "1"]) == 0  # the replaced file now serves the same settings


def test_out_that_is_a_file_is_a_one_line_error(corpus, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    args = ["benchmark", "synthetic", "--root", str(corpus), "--heatmaps", str(tmp_path / "x.h5"), "--split", "test"]
    assert run([*args, "--out", str(afile)]) == 2
    assert "--out must be a folder" in capsys.readouterr().err and afile.read_text() == "keep me"
    assert run([*args, "--out", str(afile / "sub")]) == 2
    assert "cannot create the --out folder" in capsys.readouterr().err


def test_a_malformed_human_benchmark_stops_before_localizing_and_bad_entries_are_problems(tmp_path):
    """hb_segmentations_test.json that is not an object: one-line error before any localization; a human RLE
    that cannot be decoded: a problem row, not silently dropped."""
    image, truth, rle = _chexlocalize_image(tmp_path)
    h, w = truth.shape
    seg = tmp_path / "CheXlocalize"
    seg.mkdir()
    (seg / "gt_segmentations_test.json").write_text(json.dumps({"patient1_study1_view1_frontal":
                                                                {"Cardiomegaly": rle}}))
    (seg / "hb_segmentations_test.json").write_text("[]")
    calls = []
    with pytest.raises(AflocError, match="hb_segmentations_test.json: expected an object"):
        run_benchmark("chexlocalize", tmp_path, tmp_path / "out", localize=lambda *a: calls.append(a), n_boot=0,
                      split="test")
    assert calls == []
    (seg / "hb_segmentations_test.json").write_text(json.dumps({"patient1_study1_view1_frontal": {
        "Cardiomegaly": rle, "Edema": {"size": [h, w], "counts": [1.5, "a"]}}}))
    frame = Letterbox.for_shape(h, w, 224).original_mask_to_frame(truth)
    _frame_map_file(tmp_path / "maps.h5", [image], "Findings suggesting cardiomegaly.", frame)
    result = run_benchmark("chexlocalize", tmp_path, tmp_path / "out", heatmaps=tmp_path / "maps.h5", n_boot=0,
                           split="test")
    assert result.human is not None and result.problems == 1
    listed = pl.read_csv(tmp_path / "out/problems.csv")
    assert listed["file"][0].endswith("hb_segmentations_test.json") and "Edema" in listed["reason"][0]


def test_heatmaps_match_images_by_resolved_path(tmp_path, monkeypatch):
    """A file localized with relative paths scores a benchmark whose --root is absolute, and the reverse."""
    from PIL import Image

    box = (300, 400, 200, 160)
    frame = Letterbox.for_shape(1024, 1024, 224).boxes_to_frame_mask([box])
    root = tmp_path / "nih"
    image = root / "images/00000001_000.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(image)
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                             f"00000001_000.png,Mass,{','.join(map(str, box))},,,\n")
    monkeypatch.chdir(tmp_path)
    _frame_map_file(tmp_path / "rel.h5", [Path("nih/images/00000001_000.png")], "Findings suggesting mass.", frame)
    absolute = run_benchmark("nih-bbox", root, tmp_path / "a", heatmaps=tmp_path / "rel.h5", n_boot=0)
    assert _metrics(absolute)["pointing"] == 1.0
    _frame_map_file(tmp_path / "abs.h5", [image], "Findings suggesting mass.", frame)
    relative = run_benchmark("nih-bbox", Path("nih"), tmp_path / "b", heatmaps=tmp_path / "abs.h5", n_boot=0)
    assert _metrics(relative) == _metrics(absolute)


@pytest.mark.parametrize("readout", ["reference", "contrast"])
def test_one_prompt_per_finding_in_the_heatmap_file(tmp_path, readout):
    """The readers' prompts and the zero-shot / contrast template prompts are spelt alike: one finding, one prompt.

    Readers lower-case the finding ('Findings suggesting cardiomegaly.'); the template prompts kept CheXlocalize's
    case, so every category was localized twice and `export --chexlocalize` refused the benchmark's own file.
    """
    _, _, rle = _chexlocalize_image(tmp_path)
    (tmp_path / "CheXlocalize").mkdir()
    (tmp_path / "CheXlocalize/gt_segmentations_test.json").write_text(json.dumps(
        {"patient1_study1_view1_frontal": {"Cardiomegaly": rle}}))
    calls = []

    def localize(paths, prompts, wanted, h5):
        calls.append(list(prompts))
        raise AflocError("stop after the prompts are chosen")

    with pytest.raises(AflocError, match="stop after"):
        run_benchmark("chexlocalize", tmp_path, tmp_path / "out", localize=localize, n_boot=0, split="test",
                      readout=readout)
    (prompts,) = calls
    assert "Findings suggesting cardiomegaly." in prompts
    assert len({p.lower() for p in prompts}) == len(prompts)


def test_nothing_to_score_says_why(tmp_path):
    """Every row a problem: the stop names one of them (problems.csv is written only by a run that succeeds)."""
    from dicom_factory import write_dicom  # tests/ is on sys.path under pytest

    (tmp_path / "stage_2_train_images").mkdir()
    write_dicom(tmp_path / "stage_2_train_images" / "p1.dcm", np.full((32, 32), 100, np.uint16))
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\np9,1,2,3,4,1\n")
    with pytest.raises(AflocError, match="no items to score") as caught:
        run_benchmark("rsna", tmp_path, tmp_path / "out", localize=lambda *a: None, n_boot=0)
    assert "image not found" in str(caught.value.hint)


def test_class_prompts_on_a_dataset_without_negatives_are_reported_unused(tmp_path, capsys):
    """MS-CXR has no negatives, so no zero-shot AUROC: --class-prompts cannot be used, and the run says so."""
    from PIL import Image

    rel = "files/p10/p10000032/s50414267/abc.jpg"
    image = tmp_path / "mimic-cxr-jpg/2.0.0" / rel
    image.parent.mkdir(parents=True)
    Image.fromarray(np.full((200, 160), 90, np.uint8)).save(image)
    (tmp_path / "MS_CXR_Local_Alignment_v1.0.0.csv").write_text(
        "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height\n"
        f"abc,Pneumonia,left lower opacity,{rel},20,40,60,60,160,200\n")
    frame = Letterbox.for_shape(200, 160, 224).boxes_to_frame_mask([(20, 40, 60, 60)])
    _frame_map_file(tmp_path / "maps.h5", [image], "left lower opacity", frame)
    prompts = tmp_path / "cp.json"
    prompts.write_text(json.dumps({"pneumonia": ["There is pneumonia."]}))
    capsys.readouterr()
    assert run(["benchmark", "ms-cxr", "--root", str(tmp_path), "--heatmaps", str(tmp_path / "maps.h5"),
                "--out", str(tmp_path / "out"), "--bootstrap", "0", "--class-prompts", str(prompts)]) == 0
    err = capsys.readouterr().err
    assert "note: --class-prompts not used: the ms-cxr items scored include no image without a finding" in err
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["class_prompts"] is None
    assert any(n.startswith("--class-prompts not used") for n in protocol["notes"])
    # An unknown category is still an error, as on datasets with negatives.
    prompts.write_text(json.dumps({"Nodule": ["There is a nodule."]}))
    assert run(["benchmark", "ms-cxr", "--root", str(tmp_path), "--heatmaps", str(tmp_path / "maps.h5"),
                "--out", str(tmp_path / "out"), "--bootstrap", "0", "--class-prompts", str(prompts)]) == 2


def test_the_readmes_rsna_command_runs_on_rsna_as_downloaded(tiny_checkpoint, tmp_path):
    """README: 'pointing --root at the folder as downloaded'. Kaggle's RSNA has no MedKLIP test list, so a
    README command with --split test failed on it; every `afloc benchmark rsna` line there must run."""
    import shlex

    from dicom_factory import write_dicom  # tests/ is on sys.path under pytest

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines() if line.startswith("afloc benchmark rsna ")]
    assert commands
    root = tmp_path / "rsna"
    for name in ("p1", "p2", "p3"):
        (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
        write_dicom(root / "stage_2_train_images" / f"{name}.dcm", np.full((64, 64), 100, np.uint16))
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,100,200,300,400,1\np2,500,300,200,200,1\np3,,,,,0\n")
    for line in commands:
        args = shlex.split(line.replace("/data/rsna", str(root)).replace("afloc_ref.safetensors", str(tiny_checkpoint))
                           .replace("results/rsna", str(tmp_path / "out")))[1:]
        assert run([*args, "--bootstrap", "0", "--workers", "0", "--overwrite"]) == 0, line
