"""Pretraining corpora as users download them: MIMIC-CXR-JPG with its reports, or any CSV/Parquet manifest.

Every row becomes a `CorpusRecord`. A row that cannot train (no report file, no
FINDINGS or IMPRESSION section, an empty report, a split that is not train/val/
test, no image path) keeps its place with the reason in `problem`, so
`prepare` can list it instead of dropping it silently.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import polars as pl

from afloc_cli.errors import AflocError
from afloc_cli.synth.corpus import INCOMPLETE_MARKER


@dataclass(frozen=True)
class CorpusRecord:
    image: str
    report: str
    split: str
    problem: str = ""  # why this row cannot train, as far as its text, split and path tell; "" when they can


# ---- MIMIC-CXR report sections --------------------------------------------------------------
# A header is an upper-case name at the start of a line, then a colon. No digits or "_": an all-caps report line
# such as " TO ___ AT 3:15 P.M." is text, not a header. Commas are allowed ("CHEST, PA AND LATERAL:").
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:", re.MULTILINE)
# Headers that name another section even when they mention the chest or a view ("REASON FOR EXAMINATION").
_OTHER_SECTIONS = ("indication", "history", "comparison", "technique", "exam", "reason", "procedure", "clinical",
                   "date", "addendum", "notification", "recommendation", "wet read", "comment", "note")
# Headers that describe the whole study stand for its findings ("PA AND LATERAL VIEWS OF THE CHEST:",
# "CHEST, TWO VIEWS:"), as MIT-LCP's section parser for MIMIC-CXR counts them.
_STUDY_WORDS = frozenset({"chest", "portable", "view", "views", "frontal", "lateral", "upright", "supine",
                          "semi-upright", "ribs", "radiograph", "radiographs"})


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance (insertions, deletions, substitutions, adjacent swaps)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


@lru_cache(maxsize=8192)  # MIMIC's 227k reports share a few thousand header spellings
def section_kind(header: str) -> str | None:
    """"findings", "impression" or None (another section) for a MIMIC-CXR header, misspellings included."""
    name = " ".join(header.lower().replace("/", " / ").replace(",", " , ").split())
    if "impression" in name or "conclusion" in name:
        return "impression"
    if "finding" in name:
        return "findings"
    for word in name.split():
        if len(word) >= 6 and _edits(word, "impression") <= 2:
            return "impression"
        if len(word) >= 6 and _edits(word, "findings") <= 2:
            return "findings"
    if any(other in name for other in _OTHER_SECTIONS):
        return None
    return "findings" if _STUDY_WORDS.intersection(name.replace("(", " ").replace(")", " ").split()) else None


def report_sections(text: str) -> str:
    """The FINDINGS and IMPRESSION text of a MIMIC-CXR report, in report order; "" when it has neither.

    Each section ends with a period, so a FINDINGS section without one is not fused with the IMPRESSION's first
    sentence. Reports without either section are not used (the spec trains on these two sections only).
    """
    headers = list(_HEADER.finditer(text))
    parts: list[str] = []
    for i, header in enumerate(headers):
        if section_kind(header.group(1)) is None:
            continue
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = " ".join(text[header.end() : end].split())
        if body:
            parts.append(body if body.endswith(".") else body + ".")
    return " ".join(parts)


def _report_problem(text: str) -> str:
    if not any(section_kind(h.group(1)) for h in _HEADER.finditer(text)):
        return "report has no FINDINGS or IMPRESSION section"
    return "the report's FINDINGS and IMPRESSION sections are empty"


# ---- tables ---------------------------------------------------------------------------------
def read_table(path: Path) -> pl.DataFrame:
    """A CSV or Parquet table, every CSV column as text, headers and text fields stripped."""
    try:
        if path.suffix == ".parquet":
            df = pl.read_parquet(path, glob=False)  # a path is a path: `scan[1]/` is no pattern
        else:
            # A stray Latin-1 byte in one report must not reject the corpus: it becomes U+FFFD, as in MIMIC reports.
            df = pl.read_csv(path, infer_schema_length=0, glob=False, encoding="utf8-lossy")
    except Exception as exc:  # noqa: BLE001
        raise AflocError(f"cannot read table: {exc}", path=path) from exc
    return _stripped(df)


def _stripped(df: pl.DataFrame) -> pl.DataFrame:
    """Headers and text fields without the spaces around them (DATASETS.md: strip every header and field)."""
    df = df.rename({c: c.strip() for c in df.columns})
    return df.with_columns(pl.col(c).str.strip_chars() for c, t in df.schema.items() if t == pl.String)


SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
               "validation": "val", "test": "test", "testing": "test"}


def read_manifest(path: Path) -> list[CorpusRecord]:
    """CSV/Parquet with an image path column and a report column; paths relative to the manifest.

    Without a split column every row trains. With one, MIMIC's own names (`validate`) and their usual variants
    map to train/val/test in any case; any other value, an empty one included, is a problem row.
    """
    df = read_table(path)
    image_col = next((c for c in ("image_path", "path", "image") if c in df.columns), None)
    report_col = next((c for c in ("report", "text", "report_text") if c in df.columns), None)
    if image_col is None or report_col is None:
        raise AflocError(f"manifest needs an image_path and a report column; has {df.columns}", path=path)
    split_col = "split" if "split" in df.columns else None
    first_row = 1 if path.suffix == ".parquet" else 2  # what a user sees: the CSV's line, the Parquet's row
    records = []
    for k, row in enumerate(df.iter_rows(named=True)):
        where = f"row {k + first_row}"
        given = (row[image_col] or "").strip()
        report = row[report_col] or ""
        raw_split = (row[split_col] or "") if split_col else "train"
        split = SPLIT_NAMES.get(raw_split.strip().lower(), "")
        image = Path(given) if given else Path()
        if given and not image.is_absolute():
            image = path.parent / image
        if not given:
            problem = f"{where}: empty image path"
        elif not split:
            problem = f"{where}: split {raw_split!r} is not train, val or test"
        elif not report.strip():
            problem = f"{where}: empty report"
        else:
            problem = ""
        records.append(CorpusRecord(str(image) if given else "", report, split, problem))
    return records


# ---- MIMIC-CXR-JPG --------------------------------------------------------------------------
def _reports_root(root: Path, explicit: Path | None, sample: list[str]) -> Path:
    """Where the report .txt files are: the JPG tree itself, or mimic-cxr-reports.zip unpacked elsewhere.

    PhysioNet serves the reports with MIMIC-CXR (physionet.org/files/mimic-cxr/2.0.0/mimic-cxr-reports.zip,
    unpacking to files/pNN/...), not with the JPGs, so beside the JPG root is where they usually land.
    """
    if explicit is not None:
        candidates = [explicit]
    else:
        candidates = [root, root.parent.parent / "mimic-cxr" / root.name, root / "mimic-cxr-reports",
                      root.parent / "mimic-cxr-reports", root.parent.parent / "mimic-cxr-reports"]
    for candidate in candidates:
        if any((candidate / rel).is_file() for rel in sample):
            return candidate
    looked = explicit if explicit is not None else ", ".join(str(c) for c in candidates)
    raise AflocError(
        f"no MIMIC-CXR report file found for the first {len(sample)} studies (e.g. {sample[0]}) under {looked}",
        path=root,
        hint="unpack mimic-cxr-reports.zip (PhysioNet's MIMIC-CXR) and pass the folder holding its files/ "
        "as --reports-root",
    )


def read_mimic(root: Path, reports_root: Path | None = None) -> list[CorpusRecord]:
    """MIMIC-CXR-JPG 2.0.0 as downloaded: frontal views (PA/AP), FINDINGS + IMPRESSION of each study's report."""
    split_file = root / "mimic-cxr-2.0.0-split.csv.gz"
    meta_file = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    for f in (split_file, meta_file):
        if not f.is_file():
            raise AflocError(f"expected {f.name}", path=root, hint="MIMIC-CXR-JPG 2.0.0 from PhysioNet")
    splits = _read_table_gz(split_file)
    meta = _read_table_gz(meta_file).select("dicom_id", "ViewPosition")
    df = splits.join(meta, on="dicom_id", how="left").filter(pl.col("ViewPosition").is_in(["PA", "AP"]))
    if df.is_empty():
        raise AflocError("no PA or AP image in the split and metadata files", path=root)
    rows = list(df.iter_rows(named=True))

    def folder(row: dict) -> str:
        return f"files/p{row['subject_id'][:2]}/p{row['subject_id']}"

    sample = [f"{folder(r)}/s{r['study_id']}.txt" for r in rows[:50]]
    reports = _reports_root(root, reports_root, sample)
    records = []
    for row in rows:
        image = root / folder(row) / f"s{row['study_id']}" / f"{row['dicom_id']}.jpg"
        report_file = reports / folder(row) / f"s{row['study_id']}.txt"
        split = SPLIT_NAMES.get((row["split"] or "").lower(), "")
        try:
            raw = report_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text, problem = "", f"no report file {report_file}"
        else:
            text = report_sections(raw)
            problem = "" if text else f"{report_file}: {_report_problem(raw)}"
        if not split and not problem:
            problem = f"{row['dicom_id']}: split {row['split']!r} is not train, validate or test"
        records.append(CorpusRecord(str(image), text, split, problem))
    return records


def _read_table_gz(path: Path) -> pl.DataFrame:
    with gzip.open(path, "rb") as f:
        return _stripped(pl.read_csv(f.read(), infer_schema_length=0))


def read_corpus(path: Path, reports_root: Path | None = None) -> list[CorpusRecord]:
    """Pick the reader from what `path` is: a manifest file, a MIMIC root, or a folder with manifest.csv."""
    folder = path.parent if path.is_file() else path
    if (folder / INCOMPLETE_MARKER).exists():  # its tables may be gone, or not yet describe its images
        raise AflocError("an interrupted `afloc synth`: this corpus is incomplete", path=folder,
                         hint="run `afloc synth` on it again with --overwrite")
    if path.is_file():
        return read_manifest(path)
    if (path / "mimic-cxr-2.0.0-split.csv.gz").is_file():
        return read_mimic(path, reports_root)
    for name in ("manifest.csv", "manifest.parquet"):
        if (path / name).is_file():
            return read_manifest(path / name)
    raise AflocError(
        "not a corpus: expected a manifest CSV/Parquet, a folder with manifest.csv, or a MIMIC-CXR-JPG root",
        path=path,
    )
