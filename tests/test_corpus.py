"""Pretraining corpora as downloaded: MIMIC-CXR-JPG with its reports in either place, and manifests."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from afloc_cli.cli import run
from afloc_cli.errors import AflocError
from train.corpus import read_corpus, read_manifest, report_sections, section_kind
from train.data import FrameCache, prepare_cache


def _report(*sections: str) -> str:
    """A MIMIC-CXR report as the files hold it: a banner, then lines that start with one space."""
    body = "\n".join(" " + line for section in sections for line in section.split("\n"))
    return "                                 FINAL REPORT\n" + body + "\n"


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("FINDINGS", "findings"), ("IMPRESSION", "impression"), ("CONCLUSION", "impression"),
        ("IMPRESSIONS", "impression"), ("FINDINGS AND IMPRESSION", "impression"),
        ("FINDINGS/IMPRESSION", "impression"), ("IMPRESSON", "impression"), ("IMPPRESSION", "impression"),
        ("FINIDNGS", "findings"), ("FINDNGS", "findings"), ("FINDING", "findings"),
        ("PA AND LATERAL VIEWS OF THE CHEST", "findings"), ("CHEST, TWO VIEWS", "findings"),
        ("PORTABLE UPRIGHT CHEST RADIOGRAPH", "findings"),
        ("INDICATION", None), ("EXAMINATION", None), ("REASON FOR EXAMINATION", None), ("COMPARISON", None),
        ("TECHNIQUE", None), ("CLINICAL HISTORY", None), ("NOTIFICATION", None), ("WET READ", None),
        ("RECOMMENDATION(S)", None), ("ADDENDUM", None), ("HISTORY", None),
    ],
)
def test_section_kind_knows_the_headers_mimic_reports_use(header: str, kind: str | None) -> None:
    assert section_kind(header) == kind


def test_report_sections_on_real_report_shapes() -> None:
    standard = _report("EXAMINATION:  CHEST (PA AND LAT)", "INDICATION:  ___ with cough",
                       "FINDINGS: ", "Small left effusion.", "", "IMPRESSION: ", "Effusion.",
                       "RECOMMENDATION(S):  none")
    assert report_sections(standard) == "Small left effusion. Effusion."
    assert report_sections(_report("CONCLUSION:  No acute process.")) == "No acute process."
    # A FINDINGS section without a final period stays its own sentence.
    assert report_sections(_report("FINDINGS:  Lungs are clear", "IMPRESSION:  No acute process.")) == (
        "Lungs are clear. No acute process.")
    # An all-caps line with a clock time is text, not a header: the IMPRESSION keeps its last sentence.
    shouting = _report("IMPRESSION:  LARGE RIGHT PNEUMOTHORAX. RESULTS WERE COMMUNICATED",
                       "TO ___ AT 3:15 P.M. ON ___. CHEST TUBE IS RECOMMENDED.")
    assert report_sections(shouting).endswith("CHEST TUBE IS RECOMMENDED.")
    # A view-named header holds the findings; a comma does not hide it.
    assert report_sections(_report("INDICATION:  pain", "CHEST, PA AND LATERAL:  No acute process.")) == (
        "No acute process.")
    wet = _report("WET READ: ___ ___ 10:30 PM  no ptx", "FINDINGS:  No pneumothorax.")
    assert report_sections(wet) == "No pneumothorax."
    assert report_sections("no headers at all") == ""
    assert report_sections(_report("INDICATION:  cough", "COMPARISON:  None.")) == ""


# ---- MIMIC-CXR-JPG 2.0.0 -------------------------------------------------------------------------

STUDIES = [  # (subject, study, dicom, view, split, report or None for no report file)
    ("10000032", "50414267", "d1", "PA", "train", _report("FINDINGS:  Left effusion.", "IMPRESSION:  Effusion.")),
    ("10000032", "53189527", "d2", "AP", "validate", _report("CONCLUSION:  No acute process.")),
    ("10000033", "50000001", "d3", "PA", "train", None),
    ("10000033", "50000002", "d4", "PA", "test", _report("INDICATION:  cough", "COMPARISON:  None.")),
    ("10000034", "50000003", "d5", "LATERAL", "train", _report("FINDINGS:  Clear.")),
]


def _mimic(base: Path, reports_beside: bool) -> Path:
    """physionet.org/files/mimic-cxr-jpg/2.0.0, with the reports in it or in mimic-cxr/2.0.0 beside it."""
    root = base / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.0.0"
    reports = base / "physionet.org" / "files" / "mimic-cxr" / "2.0.0" if reports_beside else root
    split = ["dicom_id,study_id,subject_id,split"]
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
            "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
            "PatientOrientationCodeSequence_CodeMeaning"]
    for subject, study, dicom, view, which, report in STUDIES:
        folder = f"files/p{subject[:2]}/p{subject}"
        image = root / folder / f"s{study}" / f"{dicom}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 30), 100, np.uint8)).save(image)
        if report is not None:
            (reports / folder).mkdir(parents=True, exist_ok=True)
            (reports / folder / f"s{study}.txt").write_text(report)
        split.append(f"{dicom},{study},{subject},{which}")
        meta.append(f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},40,30,21800506,213014.531,"
                    "Chest,postero-anterior,Erect")
    for name, lines in (("mimic-cxr-2.0.0-split.csv.gz", split), ("mimic-cxr-2.0.0-metadata.csv.gz", meta)):
        with gzip.open(root / name, "wt") as f:
            f.write("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("reports_beside", [False, True])
def test_mimic_reads_reports_in_the_jpg_tree_or_beside_it(tmp_path: Path, reports_beside: bool) -> None:
    root = _mimic(tmp_path, reports_beside)
    records = read_corpus(root)
    assert [Path(r.image).name for r in records] == ["d1.jpg", "d2.jpg", "d3.jpg", "d4.jpg"]  # frontal only
    by_name = {Path(r.image).stem: r for r in records}
    assert by_name["d1"].report == "Left effusion. Effusion." and by_name["d1"].problem == ""
    assert by_name["d2"].report == "No acute process." and by_name["d2"].split == "val"
    assert by_name["d3"].report == "" and by_name["d3"].problem.startswith("no report file")
    assert "no FINDINGS or IMPRESSION section" in by_name["d4"].problem and by_name["d4"].split == "test"


def test_mimic_reports_elsewhere_need_reports_root(tmp_path: Path) -> None:
    root = _mimic(tmp_path / "jpg", reports_beside=False)
    elsewhere = tmp_path / "unzipped"
    (root / "files").rename(tmp_path / "moved")  # the JPG tree keeps only the images: rebuild it without reports
    for path in (tmp_path / "moved").rglob("*"):
        target = (root / "files" if path.suffix == ".jpg" else elsewhere / "files") / path.relative_to(
            tmp_path / "moved")
        if path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    with pytest.raises(AflocError, match="no MIMIC-CXR report file found") as caught:
        read_corpus(root)
    assert "--reports-root" in str(caught.value.hint)
    records = read_corpus(root, reports_root=elsewhere)
    assert [r.report for r in records][:2] == ["Left effusion. Effusion.", "No acute process."]


def test_prepare_lists_problem_rows_takes_up_new_reports_and_retries_failed_images(tmp_path: Path) -> None:
    root = _mimic(tmp_path, reports_beside=False)
    missing_image = root / "files/p10/p10000032/s53189527/d2.jpg"
    saved = missing_image.read_bytes()
    missing_image.unlink()
    out = tmp_path / "cache"
    first = prepare_cache(root, out, size=32, workers=0)
    assert (first["n"], first["done"], first["failed"], first["problems"]) == (4, 1, 1, 2)
    problems = pl.read_csv(out / "problems.csv")
    assert problems["index"].to_list() == [2, 3] and "no report file" in problems["reason"][0]
    # The report arrives and the image is restored: the next run takes both up.
    (root / "files/p10/p10000033/s50000001.txt").write_text(_report("IMPRESSION:  Right nodule."))
    missing_image.write_bytes(saved)
    second = prepare_cache(root, out, size=32, workers=0)
    assert second["records_updated"] and (second["done"], second["failed"], second["problems"]) == (3, 0, 1)
    assert not (out / "failures.csv").exists()
    records = pl.read_parquet(out / "records.parquet")
    assert records["report"][2] == "Right nodule."
    # The same number of images, in another order: refused, since cache rows would no longer match images.
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("dicom_id,study_id,subject_id,split\nd2,53189527,10000032,train\nd1,50414267,10000032,train\n"
                "d3,50000001,10000033,train\nd4,50000002,10000033,train\n")
    with pytest.raises(AflocError, match="other images"):
        prepare_cache(root, out, size=32, workers=0)


# ---- manifests -----------------------------------------------------------------------------------


def test_manifest_rows_that_cannot_train_say_why(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    lines = [
        "image_path,report,split",
        "a.png,Left effusion.,TRAIN",
        "a.png,Right nodule.,validate",
        "a.png,Clear.,Valid",
        "a.png,Clear.,",
        "a.png,Clear.,holdout",
        ",Clear.,train",
        "a.png,  ,test",
    ]
    path = tmp_path / "manifest.csv"
    # One Latin-1 byte in one report (an export from an old system) must not reject the corpus.
    path.write_bytes(("\n".join(lines) + "\n").encode().replace(b"Right nodule.", b"Right nodul\xe9."))
    records = read_manifest(path)
    assert [r.split for r in records] == ["train", "val", "val", "", "", "train", "test"]
    assert records[1].report == "Right nodul\ufffd." and records[1].problem == ""
    assert [r.problem for r in records[3:]] == [
        "row 5: split '' is not train, val or test",
        "row 6: split 'holdout' is not train, val or test",
        "row 7: empty image path",
        "row 8: empty report",
    ]
    summary = prepare_cache(path, tmp_path / "cache", size=16, workers=0)
    assert (summary["done"], summary["failed"], summary["problems"]) == (3, 0, 4)


# ---- the frame cache -----------------------------------------------------------------------------


def _pngs(folder: Path, n: int = 4, broken: int = 0) -> Path:
    """`n` small PNGs (the last `broken` of them not PNGs at all) and a manifest that lists them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image_path,report,split"]
    for i in range(n):
        name = f"img{i}.png"
        if i >= n - broken:
            (folder / name).write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((20, 12), 40 + 40 * i, np.uint8)).save(folder / name)
        rows.append(f"{name},Left effusion.,train")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


@pytest.mark.parametrize(("name", "keep"), [("frames.npy", 600), ("frames.npy", 50), ("done.npy", 130)])
def test_a_truncated_cache_array_is_refused_never_zero_filled(tmp_path: Path, name: str, keep: int) -> None:
    """An incomplete copy of the cache must not come back as 'all ready' with black frames."""
    manifest = _pngs(tmp_path / "corpus")
    out = tmp_path / "cache"
    prepare_cache(manifest, out, size=16, workers=0)
    with (out / name).open("r+b") as f:
        f.truncate(keep)
    with pytest.raises(AflocError, match="truncated") as caught:
        prepare_cache(manifest, out, size=16, workers=0)
    assert caught.value.path == str(out / name) and "afloc prepare" in str(caught.value.hint)
    assert (out / name).stat().st_size == keep  # not extended with zeros
    with pytest.raises(AflocError, match="truncated"):
        FrameCache(out)


@pytest.mark.parametrize("text", ['{"corpus": "x", "n": 2', "", "[]", '{"n": "4", "size": 16}'])
def test_a_damaged_meta_json_is_one_line_naming_it(tmp_path: Path, text: str, capsys: pytest.CaptureFixture) -> None:
    manifest = _pngs(tmp_path / "corpus")
    out = tmp_path / "cache"
    prepare_cache(manifest, out, size=16, workers=0)
    (out / "meta.json").write_text(text)
    with pytest.raises(AflocError, match="cache description") as caught:
        prepare_cache(manifest, out, size=16, workers=0)
    assert caught.value.path == str(out / "meta.json") and "afloc prepare" in str(caught.value.hint)
    with pytest.raises(AflocError, match="cache description"):
        FrameCache(out)
    assert run(["prepare", str(manifest), "--out", str(out), "--size", "16", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert str(out / "meta.json") in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_while_meta_json_is_written_leaves_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.json marks a finished start; a half-written one would block every later run."""
    manifest = _pngs(tmp_path / "corpus")
    out = tmp_path / "cache"
    real_write_text = Path.write_text

    def half_then_full(self: Path, data: str, *args: object, **kwargs: object) -> int:
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # type: ignore[arg-type]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError, match="No space"):
        prepare_cache(manifest, out, size=16, workers=0)
    monkeypatch.undo()
    assert not (out / "meta.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert prepare_cache(manifest, out, size=16, workers=0)["done"] == 4


@pytest.mark.parametrize("size", ["0", "-5", "15"])
def test_a_frame_size_below_the_minimum_is_refused(tmp_path: Path, size: str, capsys: pytest.CaptureFixture) -> None:
    manifest = _pngs(tmp_path / "corpus")
    out = tmp_path / "cache"
    assert run(["prepare", str(manifest), "--out", str(out), "--size", size, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert f"frame size {size} is too small" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert prepare_cache(manifest, out, size=16, workers=0)["done"] == 4


def test_resuming_with_the_corpus_spelled_another_way_is_the_same_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative or absolute, through `..` or a link: one corpus, one cache, nothing decoded twice."""
    _pngs(tmp_path / "corpus", n=4, broken=1)
    (tmp_path / "link").symlink_to(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cache"
    assert prepare_cache(Path("corpus"), out, size=16, workers=0)["done"] == 3
    frames_before = (out / "frames.npy").read_bytes()
    for spelling in (tmp_path / "corpus", tmp_path / "corpus" / ".." / "corpus", Path("link"), Path("./corpus/")):
        summary = prepare_cache(spelling, out, size=16, workers=0)
        assert (summary["done"], summary["failed"], summary["records_updated"]) == (3, 1, False), spelling
    assert (out / "frames.npy").read_bytes() == frames_before
    # A cache from before paths were resolved recorded the corpus as given; it is still taken up.
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta | {"corpus": "corpus"}))
    assert prepare_cache(tmp_path / "corpus", out, size=16, workers=0)["done"] == 3
    # Another corpus with the same file names is still another corpus.
    shutil.copytree(tmp_path / "corpus", tmp_path / "copy")
    with pytest.raises(AflocError, match="another corpus"):
        prepare_cache(tmp_path / "copy", out, size=16, workers=0)


def test_prepare_exits_3_when_some_images_could_not_be_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """README: exit 3 is a batch in which some images could not be read; the rest of the cache is still made."""
    good, bad = _pngs(tmp_path / "good"), _pngs(tmp_path / "bad", broken=1)
    assert run(["prepare", str(good), "--out", str(tmp_path / "c1"), "--size", "16", "--workers", "0"]) == 0
    assert run(["prepare", str(bad), "--out", str(tmp_path / "c2"), "--size", "16", "--workers", "0", "--json"]) == 3
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["done"], summary["failed"]) == (3, 1) and (tmp_path / "c2" / "failures.csv").is_file()
