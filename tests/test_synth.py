"""The synthetic corpus: determinism, file layout, truth that matches the pixels, reports that match the truth."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import typer
from typer.testing import CliRunner

from afloc_cli.benchmark.datasets.synthetic import SyntheticReader
from afloc_cli.cli import run
from afloc_cli.commands.synth import synth_command
from afloc_cli.errors import AflocError
from afloc_cli.synth import KINDS, SynthConfig, generate_case, generate_corpus
from afloc_cli.synth import corpus as corpus_module
from afloc_cli.synth.corpus import (
    GROUND_TRUTH_COLUMNS,
    GROUND_TRUTH_CSV,
    INCOMPLETE_MARKER,
    LABELS_CSV,
    MANIFEST_CSV,
    SYNTH_JSON,
    TABLES,
    assign_splits,
)
from afloc_cli.synth.kinds import KIND_BY_KEY
from afloc_cli.synth.sample import MIN_BOX_FRACTION
from afloc_cli.synth.writers import to_uint
from train.corpus import read_corpus

N = 48
CONFIG = SynthConfig(n=N, seed=3)
KIND_BY_CATEGORY = {k.category: k for k in KINDS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate_corpus(out, CONFIG, workers=1)
    return out


@pytest.fixture(scope="module")
def gt_rows(corpus: Path) -> list[dict[str, str]]:
    with (corpus / "MS_CXR_Local_Alignment_v1.1.0.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def labels(corpus: Path) -> list[dict[str, str]]:
    with (corpus / LABELS_CSV).open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def manifest(corpus: Path) -> list[dict[str, str]]:
    with (corpus / MANIFEST_CSV).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _stored_display(path: Path) -> tuple[np.ndarray, int]:
    """The file's pixels as displayed (MONOCHROME1 inverted back), with their bit depth."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.int64)
        bits = int(ds.BitsStored)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = (1 << bits) - 1 - arr
        return arr, bits
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.ndim == 2
    return arr.astype(np.int64), 16 if arr.dtype == np.uint16 else 8


def test_same_seed_gives_identical_bytes_whatever_the_workers(corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    generate_corpus(again, CONFIG, workers=2)
    first, second = _hashes(corpus), _hashes(again)
    assert len(first) == N + 5  # images, three CSVs, synth.json, class_prompts.json
    assert first == second


def test_another_seed_gives_another_image() -> None:
    a = generate_case(SynthConfig(n=2, seed=0), 0).image
    b = generate_case(SynthConfig(n=2, seed=1), 0).image
    assert a is not None and b is not None
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_csv_layouts_and_paths(corpus: Path, gt_rows: list[dict[str, str]], labels, manifest) -> None:
    with (corpus / "MS_CXR_Local_Alignment_v1.1.0.csv").open() as fh:
        assert fh.readline().strip() == ",".join(GROUND_TRUTH_COLUMNS)
    assert GROUND_TRUTH_COLUMNS == (
        "dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height", "split",
    )  # fmt: skip
    assert list(labels[0]) == ["dicom_id", "path", "split"] + [k.category for k in KINDS]
    assert list(manifest[0])[:3] == ["image_path", "report", "split"]
    assert len(labels) == len(manifest) == N
    assert [r["path"] for r in labels] == [r["image_path"] for r in manifest]
    assert all(r["report"].strip() for r in manifest)
    assert {r["split"] for r in labels} == {"train", "val", "test"}
    for row in labels:
        assert re.fullmatch(r"files/p\d\d/p\d+/s\d+/[\w-]+\.(png|dcm)", row["path"])
        assert (corpus / row["path"]).is_file()
        assert all(row[k.category] in ("0", "1") for k in KINDS)
    # the ground truth agrees with the labels: positives only, one row per box
    positives = {(r["dicom_id"], c) for r in labels for c in KIND_BY_CATEGORY if r[c] == "1"}
    assert {(r["dicom_id"], r["category_name"]) for r in gt_rows} == positives
    split_of = {r["dicom_id"]: r["split"] for r in labels}
    assert all(r["split"] == split_of[r["dicom_id"]] for r in gt_rows)

    info = json.loads((corpus / SYNTH_JSON).read_text())
    assert info["seed"] == 3 and info["n"] == N
    assert info["held_out"]["key"] == CONFIG.holdout
    assert [k["key"] for k in info["kinds"]] == [k.key for k in KINDS]
    assert sum(info["counts"]["images"].values()) == N
    assert sum(info["counts"]["boxes"].values()) == len(gt_rows)


def test_boxes_lie_inside_images_and_are_localizable(corpus: Path, gt_rows: list[dict[str, str]]) -> None:
    assert gt_rows
    for row in gt_rows:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
        width, height = int(row["image_width"]), int(row["image_height"])
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert min(w, h) >= MIN_BOX_FRACTION * max(width, height) - 1  # ~2 cells of the 19x19 grid at 224 px
        stored, _ = _stored_display(corpus / row["path"])
        assert stored.shape == (height, width)
        assert min(height, width) >= 256 and max(height, width) <= 640


def test_kinds_splits_and_held_out(labels, gt_rows, manifest) -> None:
    categories = {r["category_name"] for r in gt_rows}
    assert len(categories) >= 5
    held = KIND_BY_KEY[CONFIG.holdout]
    train = [r for r in labels if r["split"] == "train"]
    assert all(r[held.category] == "0" for r in train)
    assert not [r for r in gt_rows if r["split"] == "train" and r["category_name"] == held.category]
    for split in ("val", "test"):
        assert any(r[held.category] == "1" for r in labels if r["split"] == split)
    for row in manifest:  # not even denied in train ("no consolidation"): the word is unseen there
        if row["split"] == "train":
            assert not any(word in row["report"].lower() for word in held.keywords)
    assert any(all(r[k.category] == "0" for k in KINDS) for r in labels)  # some normal images
    assert any(sum(int(r[k.category]) for k in KINDS) == 2 for r in labels)  # some with two findings
    splits = assign_splits(SynthConfig(n=1000, seed=0))
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (700, 100, 200)


def test_every_storage_format_shows_the_same_radiograph(corpus: Path, labels) -> None:
    seen: dict[str, int] = {}
    for index, row in enumerate(labels):
        path = corpus / row["path"]
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            fmt = ds.PhotometricInterpretation
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "DX" and ds.PatientID and ds.StudyInstanceUID and ds.StudyDate.startswith("21")
            assert ds.PresentationLUTShape == ("INVERSE" if fmt == "MONOCHROME1" else "IDENTITY")
        else:
            fmt = f"png{_stored_display(path)[1]}"
        seen[fmt] = seen.get(fmt, 0) + 1
        if seen[fmt] <= 2:  # regenerating is cheap but not free: two of each
            stored, bits = _stored_display(path)
            image = generate_case(CONFIG, index).image
            assert image is not None
            np.testing.assert_array_equal(stored, to_uint(image, bits))
    assert set(seen) == {"png8", "png16", "MONOCHROME1", "MONOCHROME2"}


def test_reports_and_phrases_name_kind_and_side(gt_rows, manifest, labels) -> None:
    report_of = {r["dicom_id"]: r["report"] for r in manifest}
    for row in gt_rows:
        kind = KIND_BY_CATEGORY[row["category_name"]]
        sentences = [s.lower() for s in re.split(r"(?<=\.)\s+", report_of[row["dicom_id"]])]
        phrase = row["label_text"].lower()
        assert len(phrase.split()) >= 2
        assert any(w in phrase for w in kind.keywords) or kind.key == "cardiomegaly" and "heart" in phrase
        mentions = [s for s in sentences if any(w in s for w in kind.keywords)]
        assert mentions, (row["category_name"], report_of[row["dicom_id"]])
        if kind.sided:
            # the patient's right is on the image's left: the box tells the side
            centre = int(row["x"]) + int(row["w"]) / 2
            side = "right" if centre < int(row["image_width"]) / 2 else "left"
            assert any(side in s for s in mentions), (side, mentions)
            assert side in phrase
    for row in labels:
        if all(row[k.category] == "0" for k in KINDS):
            for sentence in re.split(r"(?<=\.)\s+", report_of[row["dicom_id"]].lower()):
                if any(w in sentence for k in KINDS for w in k.keywords):
                    assert "no " in sentence, sentence


def test_box_holds_the_drawn_finding() -> None:
    checked = 0
    for index in range(N):
        case = generate_case(CONFIG, index)
        if not case.findings:
            continue
        plain = generate_case(CONFIG, index, with_findings=False)
        assert case.image is not None and plain.image is not None
        diff = np.abs(case.image - plain.image)
        inside = np.zeros(diff.shape, dtype=bool)
        for box in case.boxes:
            inside[box.y : box.y + box.h, box.x : box.x + box.w] = True
        outside_mean = float(diff[~inside].mean())
        for box in case.boxes:
            region = diff[box.y : box.y + box.h, box.x : box.x + box.w]
            assert region.mean() > 0.005
            assert region.mean() > 8 * outside_mean + 1e-6, (case.findings, region.mean(), outside_mean)
        assert diff[inside].sum() >= 0.9 * diff.sum()
        checked += 1
        if checked == 10:
            break
    assert checked == 10
    normal = next(i for i in range(N) if not generate_case(CONFIG, i).findings)
    a, b = generate_case(CONFIG, normal).image, generate_case(CONFIG, normal, with_findings=False).image
    assert a is not None and b is not None and np.array_equal(a, b)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("synth")(synth_command)

    @app.command("other")
    def _other() -> None:  # a second command keeps "synth" a subcommand, as in the real CLI
        pass

    return app


def test_cli_writes_refuses_and_overwrites(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "corpus"
    result = runner.invoke(_app(), ["synth", str(out), "--n", "6", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "6 images" in result.output and "MS_CXR_Local_Alignment_v1.1.0.csv" in result.output
    first = _hashes(out)

    result = runner.invoke(_app(), ["synth", str(out), "--n", "6"])
    assert isinstance(result.exception, AflocError)
    assert "not empty" in str(result.exception) and "--overwrite" in str(result.exception)

    result = runner.invoke(_app(), ["synth", str(out), "--n", "4", "--seed", "1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "files").rglob("*.*"))) == 4  # the old images went with the old corpus
    assert _hashes(out) != first

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(_app(), ["synth", str(blocker / "sub"), "--n", "2"])
    assert isinstance(result.exception, AflocError)
    assert result.exception.path == str(blocker / "sub") and result.exception.hint

    result = runner.invoke(_app(), ["synth", str(tmp_path / "x"), "--n", "2", "--holdout", "fracture"])
    assert isinstance(result.exception, AflocError) and "unknown kind" in str(result.exception)
    assert str(result.exception).count("pneumothorax") == 1  # the kinds are listed once


def test_project_reader_sees_the_same_pixels(corpus: Path, labels) -> None:
    io = pytest.importorskip("afloc_cli.image.data.io")
    for index, row in enumerate(labels[:5]):
        image = generate_case(CONFIG, index).image
        assert image is not None
        pixels = np.asarray(io.read_image(corpus / row["path"]).pixels, dtype=np.float32)
        assert pixels.shape == image.shape
        # any linear scaling is the reader's business; an inverted or garbled image is not
        corr = float(np.corrcoef(pixels.ravel(), image.ravel())[0, 1])
        assert corr > 0.999, (row["path"], corr)


def test_class_prompts_name_each_kind_in_its_reports_words(corpus: Path, labels) -> None:
    """class_prompts.json: one list per labels.csv column, each prompt in that kind's own vocabulary only."""
    prompts = json.loads((corpus / "class_prompts.json").read_text())
    assert list(prompts) == [k for k in labels[0] if k not in ("dicom_id", "path", "split")]
    for kind in KINDS:
        listed = prompts[kind.category]
        assert listed and len(set(listed)) == len(listed)
        for prompt in listed:
            text = prompt.lower()
            assert any(w in text for w in kind.keywords) or kind.key == "cardiomegaly", prompt
            others = [k for k in KINDS if k.key != kind.key and not (set(k.keywords) & set(kind.keywords))]
            assert not any(w in text for k in others for w in k.keywords), prompt
            assert "left" not in text and "right" not in text  # presence, not place


def test_interrupted_overwrite_leaves_no_truth_for_other_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A killed `synth --overwrite` must not leave the old tables describing the new images of the same names."""
    out, fresh = tmp_path / "corpus", tmp_path / "fresh"
    generate_corpus(out, SynthConfig(n=6, seed=5))
    bigger = SynthConfig(n=9, seed=5)
    generate_corpus(fresh, bigger)
    real_write, written = corpus_module.write_image, []

    def write_then_stop(*args: object) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # a kill between images: the new synth5-000000 is on disk
        real_write(*args)  # type: ignore[arg-type]
        written.append(args[0])

    monkeypatch.setattr(corpus_module, "write_image", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(out, bigger, overwrite=True)
    monkeypatch.undo()
    assert len(written) == 2 and len(list((out / "files").rglob("*.*"))) == 2
    assert [name for name in TABLES if (out / name).exists()] == []
    assert (out / INCOMPLETE_MARKER).is_file()

    # Every reader refuses the half-made folder on one line instead of scoring against wrong truth.
    with pytest.raises(AflocError, match="interrupted `afloc synth`") as caught:
        read_corpus(out)
    assert caught.value.path == str(out) and "--overwrite" in str(caught.value.hint)
    assert run(["prepare", str(out), "--out", str(tmp_path / "cache"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "interrupted `afloc synth`" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(AflocError, match=GROUND_TRUTH_CSV):
        SyntheticReader().read(out)
    with pytest.raises(AflocError, match="not empty") as caught:
        generate_corpus(out, bigger)
    assert "interrupted" in str(caught.value.hint)

    # Running it again makes exactly what an uninterrupted run makes.
    generate_corpus(out, bigger, overwrite=True)
    assert _hashes(out) == _hashes(fresh)
    assert len(read_corpus(out)) == 9


def test_tables_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills while a table is written leaves no half table (and the folder marked incomplete)."""

    class FullDisk:
        def __init__(self, fh: object, **_: object) -> None:
            self.fh = fh

        def writerow(self, row: object) -> None:
            self.fh.write("dicom_id,category_name\n")  # type: ignore[attr-defined]

        def writerows(self, rows: object) -> None:
            self.fh.write("synth5-000000,Pneumo")  # type: ignore[attr-defined]
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpus_module.csv, "writer", FullDisk)
    out = tmp_path / "corpus"
    with pytest.raises(OSError, match="No space"):
        generate_corpus(out, SynthConfig(n=3, seed=5))
    assert sorted(p.name for p in out.iterdir()) == sorted([INCOMPLETE_MARKER, "files"])
