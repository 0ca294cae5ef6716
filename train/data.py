"""Pretraining data: the decoded-once frame cache and the training dataset.

The corpora (MIMIC-CXR-JPG with its reports, any CSV/Parquet manifest, the
synthetic corpus's manifest) are read by `train/corpus.py`. `prepare_cache`
decodes every usable row's image once with the project's one image reader and
letterbox, into a memory-mapped uint8 array, so training reads frames at memory
speed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from afloc_cli.atomic import write_atomic
from afloc_cli.errors import AflocError
from afloc_cli.image.inference_engine import prepare_image
from afloc_cli.text.data.sentences import PreparedText, sample_report, split_sentences
from train.corpus import CorpusRecord, read_corpus


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


RECORD_COLUMNS = ("image", "report", "split", "problem")
MIN_FRAME_SIZE = 16  # as `afloc compile --image-size`; the deep map is already 1x1 there, nothing to localize
REMAKE_HINT = "this cache cannot be trusted: delete the folder (or choose a new --out) and run `afloc prepare` again"


def _read_meta(path: Path) -> dict[str, Any]:
    """The cache's meta.json, checked: a damaged one is named on one line, not a JSON traceback."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise AflocError(f"unreadable cache description ({reason})", path=path, hint=REMAKE_HINT) from None
    if not isinstance(meta, dict) or not all(type(meta.get(k)) is int for k in ("n", "size")):
        raise AflocError("not a frame cache description (needs n and size)", path=path, hint=REMAKE_HINT)
    return meta


def _read_records(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path, glob=False)
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds for a missing or damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AflocError(f"unreadable cache table ({reason})", path=path, hint=REMAKE_HINT) from None


def _same_corpus(recorded: object, corpus: Path) -> bool:
    """Whether the corpus a cache recorded is `corpus`, however either is spelled (relative, `..`, a link).

    Caches record the resolved path; older ones recorded it as given, which resolves from where prepare runs.
    """
    return isinstance(recorded, str) and (recorded == str(corpus) or Path(recorded).resolve() == corpus.resolve())


def _same_images(before: list[str], now: list[str]) -> bool:
    """Whether two image lists name the same files in the same order; paths are resolved only where their
    spellings differ, so resuming a 200k-image cache does not stat every file."""
    return len(before) == len(now) and all(
        a == b or os.path.realpath(a) == os.path.realpath(b) for a, b in zip(before, now, strict=True)
    )


def _open_array(path: Path, shape: tuple[int, ...], mode: Literal["r", "r+"]) -> np.memmap:
    """A cache array, after checking that the file holds all of `shape` in uint8.

    numpy's r+ memmap silently zero-extends a truncated file (an incomplete copy, a full disk): its frames would
    read as black while done.npy still calls them decoded. Such a file is refused, never trained on.
    """
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise AflocError("missing from the cache", path=path, hint=REMAKE_HINT) from None
    except (OSError, ValueError, EOFError):  # a truncated header, or fewer bytes than the header says
        raise AflocError(f"damaged or truncated: {path.stat().st_size} bytes, expected uint8 {shape} "
                         f"({int(np.prod(shape))} bytes and a header)", path=path, hint=REMAKE_HINT) from None
    expected = array.offset + int(np.prod(shape))
    actual = path.stat().st_size
    if array.shape != shape or array.dtype != np.uint8 or actual != expected:
        raise AflocError(f"damaged or truncated: {actual} bytes holding {array.dtype} {array.shape}, expected "
                         f"uint8 {shape} in {expected} bytes", path=path, hint=REMAKE_HINT)
    return array if mode == "r" else np.load(path, mmap_mode=mode)


def _write_atomic(df: pl.DataFrame, path: Path) -> None:
    """A cache table is replaced whole or not at all, so a run killed while writing leaves the old one."""
    write_atomic(path, df.write_parquet if path.suffix == ".parquet" else df.write_csv)


def _records_frame(records: list[CorpusRecord]) -> pl.DataFrame:
    return pl.DataFrame({c: [getattr(r, c) for r in records] for c in RECORD_COLUMNS},
                        schema={c: pl.String for c in RECORD_COLUMNS})


def prepare_cache(
    corpus: Path,
    out: Path,
    size: int = 224,
    workers: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
    reports_root: Path | None = None,
) -> dict[str, Any]:
    """Decode every usable row's image of `corpus` once into `out/` (resumable: done items are never redone).

    Each run reads the corpus again: reports and splits edited or added since the cache was made replace the
    recorded ones (the image list must be the same), and images that failed before are tried again. Rows that
    cannot train are listed with their reason in `problems.csv`, images that cannot be read in `failures.csv`.
    """
    if size < MIN_FRAME_SIZE:  # 0 made an "all ready" cache of empty frames, a negative one a numpy traceback
        raise AflocError(f"frame size {size} is too small: frames need at least {MIN_FRAME_SIZE} pixels a side",
                         hint="pass --size (default 224, the model's input)")
    records = read_corpus(corpus, reports_root)
    if not records:
        raise AflocError("corpus is empty", path=corpus)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    n = len(records)
    meta = {"corpus": str(corpus.resolve()), "n": n, "size": size, "format": "afloc-frame-cache/1"}
    table = _records_frame(records)
    records_updated = False
    if meta_path.exists():
        old = _read_meta(meta_path)
        if not _same_corpus(old.get("corpus"), corpus) or (old["n"], old["size"]) != (n, size):
            raise AflocError("cache was made from another corpus or size", path=out, hint="use a new --out folder")
        before = _read_records(out / "records.parquet")
        images_before, images = before["image"].to_list(), table["image"].to_list()
        if not _same_images(images_before, images):
            raise AflocError("the corpus lists other images than when this cache was made", path=out,
                             hint="use a new --out folder")
        records_updated = not before.select("report", "split").equals(table.select("report", "split"))
        frames = _open_array(out / "frames.npy", (n, size, size), "r+")
        done = _open_array(out / "done.npy", (n,), "r+")
        # The same images spelled another way: record this run's spelling, the one that was just read.
        if records_updated or "problem" not in before.columns or images_before != images:
            _write_atomic(table, out / "records.parquet")
    else:
        frames = np.lib.format.open_memmap(out / "frames.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        done = np.lib.format.open_memmap(out / "done.npy", mode="w+", dtype=np.uint8, shape=(n,))
        _write_atomic(table, out / "records.parquet")
        # Last and whole: meta.json is what makes a folder a cache, so a run stopped before it starts afresh.
        write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8"))
    problems = [{"index": i, "image": r.image, "reason": r.problem} for i, r in enumerate(records) if r.problem]
    problems_path = out / "problems.csv"
    if problems:
        _write_atomic(pl.DataFrame(problems, schema={"index": pl.Int64, "image": pl.String, "reason": pl.String}),
                      problems_path)
    elif problems_path.exists():
        problems_path.unlink()
    # Rows that cannot train are not decoded; images that failed before are tried again (they are few).
    todo = [i for i in range(n) if not done[i] and not records[i].problem]
    failures: list[dict[str, Any]] = []
    failures_path = out / "failures.csv"
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
        if failures:
            _write_atomic(pl.DataFrame(failures, schema={"index": pl.Int64, "image": pl.String,
                                                         "reason": pl.String}), failures_path)
        seen += len(batch)
        if on_progress:
            on_progress(seen, n)
    if not failures and failures_path.exists():
        failures_path.unlink()  # every earlier failure has been read since
    return {"n": n, "done": int(np.asarray(done).sum()), "failed": len(failures), "problems": len(problems),
            "records_updated": records_updated, "out": str(out)}


# ---- training dataset ------------------------------------------------------------------------
class FrameCache:
    """The prepared cache, opened read-only (memory-mapped)."""

    def __init__(self, folder: Path) -> None:
        if not (folder / "meta.json").is_file():
            raise AflocError("not a prepared cache (no meta.json)", path=folder, hint="run `afloc prepare` first")
        self.folder = folder
        self.meta = _read_meta(folder / "meta.json")
        n, size = self.meta["n"], self.meta["size"]
        self.frames = _open_array(folder / "frames.npy", (n, size, size), "r")
        self.done = _open_array(folder / "done.npy", (n,), "r")
        self.records = _read_records(folder / "records.parquet")


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
            sentences = split_sentences(report or "")
            if not sentences:  # before the image: `prepare` does not decode the images of such rows
                empty += 1
                continue
            if not cache.done[i]:
                unreadable += 1
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
