"""Pretraining data: corpus readers, the decoded-once frame cache, and the training dataset.

Corpora: MIMIC-CXR-JPG with its reports in their native layout, any CSV/Parquet
manifest (image path + report text + optional split), and the synthetic corpus
(`afloc synth` writes a manifest). `prepare_cache` decodes every image once with
the project's one image reader and letterbox, into a memory-mapped uint8 array,
so training reads frames at memory speed.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from afloc_cli.errors import AflocError
from afloc_cli.image.inference_engine import prepare_image
from afloc_cli.text.data.sentences import PreparedText, sample_report, split_sentences


@dataclass(frozen=True)
class CorpusRecord:
    image: str
    report: str
    split: str


# ---- corpus readers ------------------------------------------------------------------------
_SECTION = re.compile(r"^\s*([A-Z][A-Z0-9 /&()_-]+):", re.MULTILINE)


def report_sections(text: str, keep: tuple[str, ...] = ("FINDINGS", "IMPRESSION")) -> str:
    """FINDINGS and IMPRESSION of a MIMIC-CXR report (the whole text when neither header exists)."""
    matches = list(_SECTION.finditer(text))
    parts: list[str] = []
    for i, match in enumerate(matches):
        name = match.group(1).strip()
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        if name in keep:
            parts.append(text[match.end() : end].strip())
    if not matches or not any(m.group(1).strip() in keep for m in matches):
        return ""
    return " ".join(p for p in parts if p)


def _read_table(path: Path) -> pl.DataFrame:
    try:
        if path.suffix == ".parquet":
            df = pl.read_parquet(path, glob=False)  # a path is a path: `scan[1]/` is no pattern
        else:
            df = pl.read_csv(path, infer_schema_length=0, glob=False)  # every column as text
    except Exception as exc:  # noqa: BLE001
        raise AflocError(f"cannot read table: {exc}", path=path) from exc
    df = df.rename({c: c.strip() for c in df.columns})
    return df.with_columns(pl.col(c).str.strip_chars() for c, t in df.schema.items() if t == pl.String)


def read_manifest(path: Path) -> list[CorpusRecord]:
    """CSV/Parquet with an image path column and a report column; paths relative to the manifest."""
    df = _read_table(path)
    image_col = next((c for c in ("image_path", "path", "image") if c in df.columns), None)
    report_col = next((c for c in ("report", "text", "report_text") if c in df.columns), None)
    if image_col is None or report_col is None:
        raise AflocError(f"manifest needs an image_path and a report column; has {df.columns}", path=path)
    split_col = "split" if "split" in df.columns else None
    records = []
    for row in df.iter_rows(named=True):
        image = Path(row[image_col] or "")
        if not image.is_absolute():
            image = path.parent / image
        split = (row[split_col] if split_col else "train") or ""
        records.append(CorpusRecord(str(image), row[report_col] or "", split))
    return records


def read_mimic(root: Path, reports_root: Path | None = None) -> list[CorpusRecord]:
    """MIMIC-CXR-JPG 2.0.0 as downloaded: frontal views (PA/AP), FINDINGS + IMPRESSION."""
    split_file = root / "mimic-cxr-2.0.0-split.csv.gz"
    meta_file = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    for f in (split_file, meta_file):
        if not f.is_file():
            raise AflocError(f"expected {f.name}", path=root, hint="MIMIC-CXR-JPG 2.0.0 from PhysioNet")
    splits = _read_table_gz(split_file)
    meta = _read_table_gz(meta_file).select("dicom_id", "ViewPosition")
    df = splits.join(meta, on="dicom_id", how="left").filter(pl.col("ViewPosition").is_in(["PA", "AP"]))
    reports_root = reports_root or root
    records = []
    for row in df.iter_rows(named=True):
        subject, study = row["subject_id"], row["study_id"]
        folder = f"files/p{subject[:2]}/p{subject}"
        image = root / folder / f"s{study}" / f"{row['dicom_id']}.jpg"
        report_file = reports_root / folder / f"s{study}.txt"
        try:
            text = report_sections(report_file.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            text = ""
        split = {"validate": "val"}.get(row["split"], row["split"])
        records.append(CorpusRecord(str(image), text, split))
    return records


def _read_table_gz(path: Path) -> pl.DataFrame:
    with gzip.open(path, "rb") as f:
        df = pl.read_csv(f.read(), infer_schema_length=0)
    df = df.rename({c: c.strip() for c in df.columns})
    return df.with_columns(pl.col(c).str.strip_chars() for c in df.columns)


def read_corpus(path: Path) -> list[CorpusRecord]:
    """Pick the reader from what `path` is: a manifest file, a MIMIC root, or a folder with manifest.csv."""
    if path.is_file():
        return read_manifest(path)
    if (path / "mimic-cxr-2.0.0-split.csv.gz").is_file():
        return read_mimic(path)
    for name in ("manifest.csv", "manifest.parquet"):
        if (path / name).is_file():
            return read_manifest(path / name)
    raise AflocError(
        "not a corpus: expected a manifest CSV/Parquet, a folder with manifest.csv, or a MIMIC-CXR-JPG root",
        path=path,
    )


# ---- the frame cache -----------------------------------------------------------------------
class _Decode(Dataset):
    def __init__(self, records: list[CorpusRecord], indices: list[int], size: int) -> None:
        self.records, self.indices, self.size = records, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        index = self.indices[i]
        try:
            return index, prepare_image(self.records[index].image, self.size).frame, ""
        except AflocError as exc:
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop a 200k-image preparation
            return index, None, f"{self.records[index].image}: {type(exc).__name__}: {exc}"


def prepare_cache(
    corpus: Path,
    out: Path,
    size: int = 224,
    workers: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Decode every image of `corpus` once into `out/` (resumable: done items are never redone)."""
    records = read_corpus(corpus)
    if not records:
        raise AflocError("corpus is empty", path=corpus)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    n = len(records)
    meta = {"corpus": str(corpus), "n": n, "size": size, "format": "afloc-frame-cache/1"}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in ("corpus", "n", "size")} != {k: meta[k] for k in ("corpus", "n", "size")}:
            raise AflocError("cache was made from another corpus or size", path=out, hint="use a new --out folder")
        frames = np.load(out / "frames.npy", mmap_mode="r+")
        done = np.load(out / "done.npy", mmap_mode="r+")
    else:
        frames = np.lib.format.open_memmap(out / "frames.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        done = np.lib.format.open_memmap(out / "done.npy", mode="w+", dtype=np.uint8, shape=(n,))
        pl.DataFrame(
            {"image": [r.image for r in records], "report": [r.report for r in records],
             "split": [r.split for r in records]}
        ).write_parquet(out / "records.parquet")
        meta_path.write_text(json.dumps(meta, indent=2))
    failures_path = out / "failures.csv"
    failures = pl.read_csv(failures_path, glob=False).to_dicts() if failures_path.exists() else []
    failed = {int(f["index"]) for f in failures}
    todo = [i for i in range(n) if not done[i] and i not in failed]
    loader = DataLoader(_Decode(records, todo, size), batch_size=32, num_workers=workers, collate_fn=list)
    seen = n - len(todo)
    if on_progress:
        on_progress(seen, n)
    for batch in loader:
        for index, frame, error in batch:
            if frame is None:
                failures.append({"index": index, "image": records[index].image, "reason": error})
            else:
                frames[index] = frame
        frames.flush()
        for index, frame, _ in batch:
            if frame is not None:
                done[index] = 1
        done.flush()
        pl.DataFrame(failures, schema={"index": pl.Int64, "image": pl.String, "reason": pl.String}).write_csv(
            failures_path
        )
        seen += len(batch)
        if on_progress:
            on_progress(seen, n)
    return {"n": n, "done": int(np.asarray(done).sum()), "failed": len(failures), "out": str(out)}


# ---- training dataset ------------------------------------------------------------------------
class FrameCache:
    """The prepared cache, opened read-only (memory-mapped)."""

    def __init__(self, folder: Path) -> None:
        if not (folder / "meta.json").is_file():
            raise AflocError("not a prepared cache (no meta.json)", path=folder, hint="run `afloc prepare` first")
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.frames = np.load(folder / "frames.npy", mmap_mode="r")
        self.done = np.load(folder / "done.npy", mmap_mode="r")
        self.records = pl.read_parquet(folder / "records.parquet", glob=False)


@dataclass
class SplitStats:
    usable: int
    skipped_empty_report: int
    skipped_unreadable: int


class PretrainDataset(Dataset):
    """(frame, sampled report) pairs of one split; items whose report or image is unusable are skipped."""

    def __init__(self, cache: FrameCache, split: str, seed: int, report_sampling: str = "subset") -> None:
        self.cache = cache
        self.seed = seed
        self.report_sampling = report_sampling
        self.epoch = 0
        records = cache.records
        self.indices: list[int] = []
        self.sentences: list[list[list[str]]] = []
        empty = unreadable = 0
        for i, (report, item_split) in enumerate(zip(records["report"], records["split"], strict=True)):
            if item_split != split:
                continue
            if not cache.done[i]:
                unreadable += 1
                continue
            sentences = split_sentences(report or "")
            if not sentences:
                empty += 1
                continue
            self.indices.append(i)
            self.sentences.append(sentences)
        self.stats = SplitStats(len(self.indices), empty, unreadable)

    def __len__(self) -> int:
        return len(self.indices)

    def text_for(self, i: int, epoch: int) -> PreparedText:
        """Deterministic in (seed, epoch, item): a resumed run samples exactly the same texts."""
        rng = random.Random(f"{self.seed}:{epoch}:{self.indices[i]}")
        return sample_report(self.sentences[i], rng, self.report_sampling)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, PreparedText]:
        i, epoch = key
        frame = torch.from_numpy(np.array(self.cache.frames[self.indices[i]]))
        return frame, self.text_for(i, epoch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_for_rank(
    n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0
) -> list[list[int]]:
    """Global batches of one epoch (last partial one dropped), this rank's slice, from batch `start` on."""
    if batch_size % world:
        raise AflocError(f"batch size {batch_size} is not divisible by {world} ranks")
    order = epoch_order(n, seed, epoch)
    per_rank = batch_size // world
    out = []
    for b in range(start, n // batch_size):
        global_batch = order[b * batch_size : (b + 1) * batch_size]
        out.append(global_batch[rank * per_rank : (rank + 1) * per_rank])
    return out
