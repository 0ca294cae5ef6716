"""A whole synthetic corpus: cases, splits, image files and the CSVs that describe them.

Each case is a pure function of (config, index): its own random streams are
seeded from (seed, index), so cases can be made in any order, in any number of
processes, and the files come out byte-identical.

Layout under OUT (OUT plays the role of MIMIC-CXR-JPG's `2.0.0/` root):
  files/p10/p<subject>/s<study>/<dicom_id>.png|.dcm   the radiographs
  MS_CXR_Local_Alignment_v1.1.0.csv                  one row per box (MS-CXR layout)
  labels.csv                                         one row per image, 0/1 per kind
  manifest.csv                                       image_path, report, split, dicom_id
  synth.json                                         seed, kinds, held-out kind, counts
  class_prompts.json                                 each kind's positive prompts (`afloc benchmark --class-prompts`)
  .afloc-synth-incomplete                            only while images are written (or after an interrupted run)

The tables are written last, each atomically, and the marker goes only after them: a folder either has all its
tables, describing its images, or is marked incomplete.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from afloc_cli.atomic import write_atomic
from afloc_cli.errors import AflocError
from afloc_cli.synth.kinds import DEFAULT_HOLDOUT, KIND_BY_KEY, KIND_KEYS, KINDS, SPLITS, resolve_kind
from afloc_cli.synth.render import (
    Anatomy,
    Box,
    Finding,
    compose,
    finding_alpha,
    finding_box,
    render,
    render_anatomy,
    with_heart,
)
from afloc_cli.synth.reports import class_prompts, compose_report, finding_phrase, wording
from afloc_cli.synth.sample import (
    MIN_BOX_FRACTION,
    assign_places,
    cardiomegaly,
    sample_anatomy,
    sample_finding,
    sample_size,
)
from afloc_cli.synth.writers import EXTENSIONS, FORMATS, DicomIdentity, write_image

GENERATOR_VERSION = "1.0"
GROUND_TRUTH_CSV = "MS_CXR_Local_Alignment_v1.1.0.csv"
LABELS_CSV = "labels.csv"
MANIFEST_CSV = "manifest.csv"
SYNTH_JSON = "synth.json"
CLASS_PROMPTS_JSON = "class_prompts.json"
INCOMPLETE_MARKER = ".afloc-synth-incomplete"  # from before the first image until after the last table
TABLES = (GROUND_TRUTH_CSV, LABELS_CSV, MANIFEST_CSV, CLASS_PROMPTS_JSON, SYNTH_JSON)
GROUND_TRUTH_COLUMNS = (
    "dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height", "split",
)  # fmt: skip
MANIFEST_COLUMNS = ("image_path", "report", "split", "dicom_id")
LABEL_ID_COLUMNS = ("dicom_id", "path", "split")
# Storage formats by index, so every format shows up even in a handful of images.
FORMAT_CYCLE = ("png8", "dcm-mono2", "png16", "png8", "dcm-mono1")
_IMAGE_STREAM, _TEXT_STREAM = 1, 2


@dataclass(frozen=True)
class SynthConfig:
    n: int = 200
    seed: int = 0
    holdout: str = DEFAULT_HOLDOUT  # kind key never drawn (nor named) in train
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train, val, test
    p_normal: float = 0.3
    p_two: float = 0.2  # of all images; the rest have one finding
    min_side: int = 256
    max_side: int = 640

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        try:
            key = resolve_kind(self.holdout).key
        except KeyError:
            raise ValueError(f"unknown kind {self.holdout!r}; choose one of {', '.join(KIND_KEYS)}") from None
        object.__setattr__(self, "holdout", key)
        if len(self.fractions) != 3 or min(self.fractions) < 0 or sum(self.fractions) <= 0:
            raise ValueError("fractions must be three non-negative numbers")
        if self.p_normal < 0 or self.p_two < 0 or self.p_normal + self.p_two > 1:
            raise ValueError("p_normal + p_two must lie in [0, 1]")
        if not 64 <= self.min_side <= self.max_side:
            raise ValueError("need 64 <= min_side <= max_side")


@dataclass
class SynthCase:
    """One generated image with its truth; `image` is float32 [0, 1] in display orientation."""

    index: int
    dicom_id: str
    split: str
    fmt: str
    path: str  # relative to OUT
    height: int
    width: int
    anatomy: Anatomy
    findings: list[Finding]
    boxes: list[Box]
    phrases: list[str]
    report: str
    identity: DicomIdentity
    image: np.ndarray | None = field(default=None, repr=False)


@dataclass
class CorpusSummary:
    out: Path
    config: SynthConfig
    images: dict[str, int]  # per split
    normal: dict[str, int]
    boxes: dict[str, int]
    kinds: dict[str, dict[str, int]]  # split -> category -> images with it
    formats: dict[str, int]

    def to_json(self) -> dict[str, object]:
        cfg = self.config
        return {
            "generator": "afloc synth",
            "version": GENERATOR_VERSION,
            "seed": cfg.seed,
            "n": cfg.n,
            "kinds": [
                {"key": k.key, "category_name": k.category, "sided": k.sided, "zones": list(k.zones)} for k in KINDS
            ],
            "held_out": {
                "key": cfg.holdout,
                "category_name": KIND_BY_KEY[cfg.holdout].category,
                "rule": "never drawn in, nor named by the reports of, train images; present in val and test",
            },
            "split_fractions": dict(zip(SPLITS, cfg.fractions, strict=True)),
            "p_normal": cfg.p_normal,
            "p_two_findings": cfg.p_two,
            "image_sides": [cfg.min_side, cfg.max_side],
            "min_box_fraction_of_long_side": MIN_BOX_FRACTION,
            "orientation": "radiological: the patient's right is on the image's left",
            "boxes": "x, y = top-left pixel, w, h = size in pixels of the original image",
            "files": {
                "images": "files/",
                "ground_truth": GROUND_TRUTH_CSV,
                "labels": LABELS_CSV,
                "manifest": MANIFEST_CSV,
            },
            "counts": {
                "images": self.images,
                "normal": self.normal,
                "boxes": self.boxes,
                "kinds": self.kinds,
                "formats": self.formats,
            },
        }


def assign_splits(config: SynthConfig) -> list[str]:
    """Split per index from a seeded permutation; every split gets at least one image when n >= 3."""
    n = config.n
    total = sum(config.fractions)
    n_val = round(n * config.fractions[1] / total)
    n_test = round(n * config.fractions[2] / total)
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    order = np.random.default_rng([config.seed, 0]).permutation(n)
    splits = ["train"] * n
    for rank, idx in enumerate(order):
        if rank < n_val:
            splits[int(idx)] = "val"
        elif rank < n_val + n_test:
            splits[int(idx)] = "test"
    return splits


def forced_holdout(splits: list[str]) -> set[int]:
    """The first val and first test image always show the held-out kind, so it is never missing."""
    forced: set[int] = set()
    for split in ("val", "test"):
        if split in splits:
            forced.add(splits.index(split))
    return forced


def _choose_kinds(rng: np.random.Generator, config: SynthConfig, split: str, forced: bool) -> list[str]:
    allowed = [k for k in KIND_KEYS if split != "train" or k != config.holdout]
    r = rng.random()
    count = 0 if r < config.p_normal else 2 if r < config.p_normal + config.p_two else 1
    if forced:
        count = max(count, 1)
    picks = [allowed[int(i)] for i in rng.permutation(len(allowed))[:count]]
    if forced and config.holdout not in picks:
        picks[0] = config.holdout
    return picks


def case_identity(config: SynthConfig, index: int, rng: np.random.Generator) -> DicomIdentity:
    return DicomIdentity(
        seed=config.seed,
        index=index,
        dicom_id=f"synth{config.seed}-{index:06d}",
        subject_id=10_000_000 + index,
        study_id=50_000_000 + index,
        sex="F" if rng.random() < 0.5 else "M",
        view="AP" if rng.random() < 0.2 else "PA",
    )


def build_case(
    config: SynthConfig, index: int, split: str, forced: bool = False, with_findings: bool = True
) -> SynthCase:
    """Case `index` with its image. `with_findings=False` draws the same chest without its findings."""
    rng = np.random.default_rng([config.seed, index, _IMAGE_STREAM])
    height, width = sample_size(rng, config.min_side, config.max_side)
    anatomy = sample_anatomy(rng, height, width)
    kinds = _choose_kinds(rng, config, split, forced)
    places = assign_places(rng, kinds)
    if places is None:  # pragma: no cover - two findings always fit in two lungs
        kinds = kinds[:1]
        places = assign_places(rng, kinds)
    findings: list[Finding] = []
    alphas: list[np.ndarray] = []
    boxes: list[Box] = []
    if "cardiomegaly" in kinds:
        findings.append(cardiomegaly(rng))
    scene = render_anatomy(with_heart(anatomy, findings))
    if findings:
        alphas.append(finding_alpha(findings[0], scene))
        heart_box = finding_box(alphas[0])
        assert heart_box is not None
        boxes.append(heart_box)
    for kind, (side, zone) in zip(kinds, places or [], strict=True):
        if kind == "cardiomegaly":
            continue
        assert side is not None and zone is not None
        f, alpha, box = sample_finding(rng, kind, side, zone, scene)
        findings.append(f)
        alphas.append(alpha)
        boxes.append(box)
    if with_findings:
        image = compose(scene, findings, alphas)
    else:
        image = render(anatomy, findings, with_findings=False).image

    text_rng = np.random.default_rng([config.seed, index, _TEXT_STREAM])
    wordings = [wording(text_rng, f) for f in findings]
    phrases = [finding_phrase(text_rng, f, wd) for f, wd in zip(findings, wordings, strict=True)]
    hidden = config.holdout if split == "train" else None
    report = compose_report(text_rng, findings, wordings, hidden)
    ident = case_identity(config, index, text_rng)
    fmt = FORMAT_CYCLE[index % len(FORMAT_CYCLE)]
    subject = str(ident.subject_id)
    path = f"files/p{subject[:2]}/p{subject}/s{ident.study_id}/{ident.dicom_id}.{EXTENSIONS[fmt]}"
    return SynthCase(
        index, ident.dicom_id, split, fmt, path, height, width, anatomy, findings, boxes, phrases, report, ident, image
    )


def generate_case(config: SynthConfig, index: int, with_findings: bool = True) -> SynthCase:
    """Case `index` exactly as `generate_corpus` makes it (for tests and inspection)."""
    if not 0 <= index < config.n:
        raise IndexError(index)
    splits = assign_splits(config)
    return build_case(config, index, splits[index], index in forced_holdout(splits), with_findings)


def _make_and_write(task: tuple[SynthConfig, int, str, bool, str]) -> SynthCase:
    config, index, split, forced, out = task
    case = build_case(config, index, split, forced)
    assert case.image is not None
    write_image(Path(out) / case.path, case.image, case.fmt, case.identity)
    case.image = None  # don't ship pixels back to the parent
    return case


def _init_worker() -> None:
    cv2.setNumThreads(1)


def prepare_output(out: Path, overwrite: bool) -> None:
    """Make OUT ready: refuse a non-empty one unless `overwrite`; then mark it incomplete and clear an old corpus.

    The marker goes in before anything is removed, and the old tables go before the old images: a run stopped at
    any point leaves no table that describes an image it did not write, and the marker tells readers why.
    """
    if out.exists() and not out.is_dir():
        raise AflocError("exists and is not a folder", path=out, hint="choose a folder for the corpus")
    ours = False
    if out.is_dir() and any(out.iterdir()):
        interrupted = (out / INCOMPLETE_MARKER).exists()
        if not overwrite:
            hint = ("an interrupted `afloc synth`: pass --overwrite to make it again" if interrupted
                    else "pass --overwrite or choose another folder")
            raise AflocError("output folder is not empty", path=out, hint=hint)
        ours = interrupted or ((out / SYNTH_JSON).is_file() and (out / "files").is_dir())
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / INCOMPLETE_MARKER).write_text(
            "afloc synth is writing this corpus, or was stopped before its tables were written: "
            "run it again with --overwrite\n", encoding="utf-8")
        if ours:  # a previous corpus: its tables would describe the new images, its stale images outlive them
            for name in TABLES:
                (out / name).unlink(missing_ok=True)
            if (out / "files").is_dir():
                shutil.rmtree(out / "files")
    except OSError as exc:
        raise AflocError(
            f"cannot write here ({exc.strerror or exc})", path=out, hint="choose a folder you can write to"
        ) from None


def _write_csv(path: Path, header: tuple[str, ...] | list[str], rows: list[list[object]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    write_atomic(path, write)


def _write_json(path: Path, value: object) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8"))


def write_tables(out: Path, config: SynthConfig, cases: list[SynthCase]) -> CorpusSummary:
    """The ground truth, labels, manifest and synth.json for `cases` (in index order)."""
    gt_rows: list[list[object]] = []
    label_rows: list[list[object]] = []
    manifest_rows: list[list[object]] = []
    images = dict.fromkeys(SPLITS, 0)
    normal = dict.fromkeys(SPLITS, 0)
    boxes = dict.fromkeys(SPLITS, 0)
    kinds = {s: {k.category: 0 for k in KINDS} for s in SPLITS}
    formats = dict.fromkeys(FORMATS, 0)
    for case in cases:
        present = {f.kind for f in case.findings}
        for f, box, phrase in zip(case.findings, case.boxes, case.phrases, strict=True):
            category = KIND_BY_KEY[f.kind].category
            gt_rows.append(
                [case.dicom_id, category, phrase, case.path, box.x, box.y, box.w, box.h, case.width, case.height,
                 case.split]
            )  # fmt: skip
        label_rows.append([case.dicom_id, case.path, case.split] + [int(k in present) for k in KIND_KEYS])
        manifest_rows.append([case.path, case.report, case.split, case.dicom_id])
        images[case.split] += 1
        normal[case.split] += int(not case.findings)
        boxes[case.split] += len(case.boxes)
        formats[case.fmt] += 1
        for key in present:
            kinds[case.split][KIND_BY_KEY[key].category] += 1
    _write_csv(out / GROUND_TRUTH_CSV, GROUND_TRUTH_COLUMNS, gt_rows)
    _write_csv(out / LABELS_CSV, list(LABEL_ID_COLUMNS) + [k.category for k in KINDS], label_rows)
    _write_csv(out / MANIFEST_CSV, MANIFEST_COLUMNS, manifest_rows)
    summary = CorpusSummary(out, config, images, normal, boxes, kinds, formats)
    _write_json(out / CLASS_PROMPTS_JSON, class_prompts())
    _write_json(out / SYNTH_JSON, summary.to_json())
    return summary


def generate_corpus(
    out: Path,
    config: SynthConfig,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> CorpusSummary:
    """Write the corpus of `config` under `out`; `progress(k)` is called as images are done."""
    out = Path(out)
    prepare_output(out, overwrite)
    splits = assign_splits(config)
    forced = forced_holdout(splits)
    tasks = [(config, i, splits[i], i in forced, str(out)) for i in range(config.n)]
    cases: list[SynthCase] = []
    workers = max(1, min(workers, config.n))
    try:
        if workers == 1:
            for task in tasks:
                cases.append(_make_and_write(task))
                if progress:
                    progress(len(cases))
        else:
            # spawn, not fork: the parent may hold threads (OpenCV, torch) that fork would break
            ctx = multiprocessing.get_context("spawn")
            chunk = max(1, min(16, config.n // (workers * 8)))
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                for case in pool.imap(_make_and_write, tasks, chunksize=chunk):
                    cases.append(case)
                    if progress:
                        progress(len(cases))
    except OSError as exc:
        raise AflocError(f"cannot write an image ({exc.strerror or exc})", path=exc.filename or out) from None
    summary = write_tables(out, config, cases)
    (out / INCOMPLETE_MARKER).unlink()  # only now do the tables describe every image
    return summary
