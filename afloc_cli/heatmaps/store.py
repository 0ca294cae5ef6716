"""The heat-map store: the one place that knows the HDF5 schema of `afloc localize`.

A run over tens of thousands of images can be killed at any moment, and an HDF5
file whose writer dies mid-write may be unreadable. So nothing is appended to
the final file during a run: each batch goes into a journal folder next to it
(`OUT.h5.partial/`) as its own small file, made visible by an atomic rename after
an fsync. `finalize` then builds the whole `.h5` in one go in a temporary file
and renames it onto the output. A killed run leaves only whole batches behind,
and `--resume` skips them. Rows are always written in input order, so a
resumed run, a sharded-then-merged run and an uninterrupted run give the same
file but for `created` and the rounding of values computed in other batches
(docs/heatmaps.md gives the bounds).

The schema is described in docs/heatmaps.md; keep the two in step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from afloc_cli.errors import AflocError

try:  # advisory lock so two runs never write one journal; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
JOURNAL_SUFFIX = ".partial"

AttrValue = str | int | float

# Attributes the store itself sets; callers pass everything else in `attrs`.
_STORE_ATTRS = ("schema_version", "grid", "n_images", "n_prompts", "created")
# Attributes that describe one file rather than the run, so a merge or a resume may differ in them.
_PER_FILE_ATTRS = ("created", "n_images")
# Attributes afloc began to write later: compared only when both files have them.
_OPTIONAL_ATTRS = frozenset({"inputs_sha256", "n_inputs"})
# Per-image integer columns, in file order; `lb_*` hold the letterbox geometry.
_LB_KEYS = ("size", "resized_height", "resized_width", "pad_top", "pad_left")
_INT_COLUMNS = ("index", "height", "width", *(f"lb_{k}" for k in _LB_KEYS))
_STR_COLUMNS = ("path", "reader", "status", "error")
_BATCH_NAME = re.compile(r"^(\d{8})\.npz$")
_EMBEDDINGS_NAME = "prompt_embeddings.npy"  # in the journal; /prompt_embeddings in the final file
_GZIP_LEVEL = 4
# Attributes whose difference is named in words rather than by key.
_WHAT_DIFFERS = {"checkpoint_sha256": "checkpoint (checkpoint_sha256)",
                 "inputs_sha256": "input list (inputs_sha256: files were added or removed between the runs)",
                 "n_inputs": "number of inputs (n_inputs: files were added or removed between the runs)"}


def encode_text(value: str) -> bytes:
    """The bytes a string is stored as: UTF-8, except that a file name that is not UTF-8 keeps its own bytes.

    Python gives such names (say Latin-1 `M\\xfcller.png` on Linux) as surrogate escapes, which strict UTF-8
    cannot encode; storing their bytes keeps the path exact, and `decode_text` gives the same `str` back.
    """
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file system produces: keep a readable form, not a crash
        return value.encode("utf-8", "backslashreplace")


def decode_text(column: h5py.Dataset, rows: slice = slice(None)) -> list[str]:
    """A string column read back as `encode_text` stored it (surrogate escapes where it was not UTF-8)."""
    return list(column.asstr(errors="surrogateescape")[rows])


def printable(value: str) -> str:
    """A stored string as valid UTF-8 text for tables: bytes that are not UTF-8 shown as `\\xNN`."""
    return encode_text(value).decode("utf-8", "backslashreplace")


def _text_array(values: Sequence[str]) -> np.ndarray:
    return np.array([encode_text(v) for v in values], dtype=object)


def inputs_sha256(paths: Iterable[str | Path]) -> str:
    """Identity of a run's full (unsharded) input list: shards of one run must agree on it to be merged."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(encode_text(str(path)) + b"\0")
    return digest.hexdigest()


def utc_now() -> str:
    """ISO-8601 UTC time to the second: the default `created` attribute."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class ImageRecord:
    """What the file says about one input image besides its maps."""

    path: str
    height: int
    width: int
    letterbox: dict[str, int]
    reader: dict[str, Any]
    status: str = "ok"
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "height": int(self.height),
            "width": int(self.width),
            "letterbox": {k: int(v) for k, v in self.letterbox.items()},
            "reader": self.reader,
            "status": self.status,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# What must match between a journal and a resumed run, or between merged shards
# ---------------------------------------------------------------------------------------------
def _normalize_attrs(attrs: dict[str, Any]) -> dict[str, AttrValue]:
    """Plain str/int/float values, with anything structured as sorted JSON, so HDF5 and JSON agree."""
    out: dict[str, AttrValue] = {}
    for key, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or value is None or isinstance(value, dict | list | tuple):
            out[key] = json.dumps(value, sort_keys=True)
        elif isinstance(value, str | int | float):
            out[key] = value
        else:
            raise TypeError(f"attribute {key!r} has unsupported type {type(value).__name__}")
    return out


@dataclass
class _Header:
    """The identity of a run: a resume or a merge is only allowed between equal headers."""

    paths: list[str]
    indices: list[int]
    prompts: list[str]
    grid: int
    attrs: dict[str, AttrValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"paths": self.paths, "indices": self.indices, "prompts": self.prompts,
                "grid": self.grid, "attrs": self.attrs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Header:
        return cls(paths=list(data["paths"]), indices=[int(i) for i in data["indices"]],
                   prompts=list(data["prompts"]), grid=int(data["grid"]), attrs=dict(data["attrs"]))

    def run_mismatch(self, other: _Header) -> str | None:
        """Name the first difference that makes two files results of different runs (inputs aside)."""
        if self.prompts != other.prompts:
            return "prompts"
        if self.grid != other.grid:
            return "grid"
        mine = {k: v for k, v in self.attrs.items() if k not in _PER_FILE_ATTRS}
        theirs = {k: v for k, v in other.attrs.items() if k not in _PER_FILE_ATTRS}
        keys = sorted(set(mine) | set(theirs), key=lambda k: (k != "checkpoint_sha256", k))
        for key in keys:
            if key in _OPTIONAL_ATTRS and (key not in mine or key not in theirs):
                continue  # written by newer afloc only: a run begun before it still resumes and merges
            if key not in mine or key not in theirs or not _same_value(mine[key], theirs[key]):
                return _WHAT_DIFFERS.get(key, f"attribute {key!r}")
        return None

    def mismatch(self, other: _Header) -> str | None:
        if self.paths != other.paths:
            return "input paths"
        if self.indices != other.indices:
            return "input indices (--shard)"
        return self.run_mismatch(other)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return bool(a == b) and type(a) is type(b)


# ---------------------------------------------------------------------------------------------
# Small durable-file helpers
# ---------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; some platforms cannot open folders, which is fine."""
    with contextlib.suppress(OSError):
        _fsync_path(path)


def _write_atomic(target: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary name in the same folder, fsync, then rename: readers see all or nothing."""
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _remove_tree(folder: Path) -> None:
    """Remove a folder so that a kill half-way never leaves a half-deleted journal under its real name."""
    if not folder.exists():
        return
    trash = folder.with_name(folder.name + ".trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    _fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _journal_in_use(journal: Path) -> bool:
    """True while a live process holds the journal's lock, so a refusal can say the run is still going.

    Only chooses the message: the probe's lock is dropped at once and never decides who writes.
    """
    if fcntl is None:
        return False
    try:
        fd = os.open(journal / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held; any other failure (no locking on this file system) says nothing
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _clear_journal(journal: Path) -> None:
    """Empty a journal whose lock we hold, keeping the lock; the manifest goes first, so a kill half-way
    leaves a journal that reads as fresh."""
    (journal / "manifest.json").unlink(missing_ok=True)
    _fsync_dir(journal)
    for entry in journal.iterdir():
        if entry.name == "lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_output_file(out: Path) -> None:
    """Refuse, before any work, an output file that could never be written: a folder, or in a missing or
    read-only folder."""
    if out.is_dir():
        raise AflocError("is a folder, not a file", path=out, hint="name the output file, e.g. results.h5")
    folder = out.parent
    if not folder.is_dir():
        raise AflocError("output folder does not exist", path=folder)
    if not os.access(folder, os.W_OK):
        raise AflocError("output folder is not writable", path=folder)


def _os_error(exc: OSError, doing: str, path: Path, hint: str | None = None) -> AflocError:
    """An OS error while writing, as the one-line error the CLI prints (the file it names, if any)."""
    where = exc.filename if exc.filename is not None else path
    return AflocError(f"cannot write {doing}: {exc.strerror or exc}", path=where, hint=hint)


def _final_tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _remove_stale_tmp(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + JOURNAL_SUFFIX + ".trash"), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Building the final file (shared by finalize and merge)
# ---------------------------------------------------------------------------------------------
Row = tuple[int, ImageRecord, np.ndarray, np.ndarray]  # global index, record, scores (P,), maps (P, g, g)


def _root_attrs(header: _Header, n_images: int, created: str) -> dict[str, AttrValue]:
    attrs: dict[str, AttrValue] = dict(header.attrs)
    attrs.update(schema_version=SCHEMA_VERSION, grid=header.grid, n_images=n_images,
                 n_prompts=len(header.prompts), created=created)
    return dict(sorted(attrs.items()))


def _write_h5(target: Path, header: _Header, n_images: int, created: str, rows: Iterable[Row],
              prompt_embeddings: np.ndarray | None = None) -> None:
    """Write the complete file in one pass, rows in output order; a fixed order keeps the bytes reproducible."""
    n_prompts, grid = len(header.prompts), header.grid
    text = h5py.string_dtype("utf-8")
    ints = {name: np.zeros(n_images, dtype=np.int64) for name in _INT_COLUMNS}
    strs: dict[str, list[str]] = {name: [] for name in _STR_COLUMNS}
    scores = np.full((n_images, n_prompts), np.nan, dtype=np.float32)
    with h5py.File(target, "w") as f:
        for key, value in _root_attrs(header, n_images, created).items():
            f.attrs[key] = value
        f.create_dataset("prompts", data=_text_array(header.prompts), dtype=text, track_times=False)
        if prompt_embeddings is not None:
            f.create_dataset("prompt_embeddings", data=prompt_embeddings, track_times=False)
        chunked = n_images > 0
        maps = f.create_dataset(
            "heatmaps",
            shape=(n_images, n_prompts, grid, grid),
            dtype=np.float16,
            chunks=(1, n_prompts, grid, grid) if chunked else None,
            compression="gzip" if chunked else None,
            compression_opts=_GZIP_LEVEL if chunked else None,
            shuffle=chunked,
            track_times=False,
        )
        count = 0
        for i, (global_index, record, score_row, map_row) in enumerate(rows):
            if i >= n_images:
                raise RuntimeError("more rows than images")  # a bug in the caller, not a user error
            maps[i] = map_row
            scores[i] = score_row
            lb = record.letterbox
            values = {"index": global_index, "height": record.height, "width": record.width,
                      **{f"lb_{k}": lb.get(k, 0) for k in _LB_KEYS}}
            for name, value in values.items():
                ints[name][i] = int(value)
            strs["path"].append(record.path)
            strs["reader"].append(json.dumps(record.reader, sort_keys=True, separators=(",", ":")))
            strs["status"].append(record.status)
            strs["error"].append(record.error)
            count = i + 1
        if count != n_images:
            raise RuntimeError(f"{count} rows for {n_images} images")
        f.create_dataset("scores", data=scores, track_times=False)
        for name in _INT_COLUMNS:
            f.create_dataset(name, data=ints[name], track_times=False)
        for name in _STR_COLUMNS:
            f.create_dataset(name, data=_text_array(strs[name]), dtype=text, track_times=False)


def _publish(tmp: Path, out: Path) -> None:
    """fsync the finished temporary file and rename it onto the output."""
    _fsync_path(tmp)
    os.replace(tmp, out)
    _fsync_dir(out.parent)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------
class ResumeMismatch(AflocError):
    """A resume refused because this run's inputs or settings differ; `what` names the first difference, so a
    command that resumes on the user's behalf (benchmark) can say which of its own options caused it."""

    def __init__(self, what: str, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        super().__init__(message, path=path, hint=hint)
        self.what = what


class HeatmapWriter:
    """Collects results for a known, ordered list of N inputs and P prompts, journalled so a kill loses one batch.

    `indices` are the positions of `paths` in the full (unsharded) input list; they
    are stored as `/index` so `merge` can restore that order. All other methods take
    local positions 0..N-1 into `paths`.
    """

    def __init__(
        self,
        out: Path,
        *,
        paths: Sequence[str],
        prompts: Sequence[str],
        grid: int,
        attrs: dict[str, Any],
        resume: bool = False,
        overwrite: bool = False,
        indices: Sequence[int] | None = None,
        created: str | None = None,
        prompt_embeddings: np.ndarray | None = None,
    ) -> None:
        if resume and overwrite:
            raise AflocError("--resume and --overwrite contradict each other")
        self.out = Path(out)
        self.journal = self.out.with_name(self.out.name + JOURNAL_SUFFIX)
        attrs = dict(attrs)
        attr_created = attrs.pop("created", None)
        if "grid" in attrs and int(attrs.pop("grid")) != int(grid):
            raise ValueError("attrs['grid'] differs from grid")
        reserved = sorted(set(attrs) & set(_STORE_ATTRS))
        if reserved:
            raise ValueError(f"attributes set by the store itself: {reserved}")
        if not prompts:
            raise ValueError("at least one prompt is needed")
        index_list = list(range(len(paths))) if indices is None else [int(i) for i in indices]
        if len(index_list) != len(paths):
            raise ValueError(f"{len(index_list)} indices for {len(paths)} paths")
        if len(set(index_list)) != len(index_list):
            raise ValueError("indices repeat")
        if prompt_embeddings is not None:
            prompt_embeddings = np.ascontiguousarray(prompt_embeddings, dtype=np.float32)
            if prompt_embeddings.ndim != 2 or prompt_embeddings.shape[0] != len(prompts):
                raise ValueError(f"prompt_embeddings shape {prompt_embeddings.shape}, expected ({len(prompts)}, D)")
        # The text-side vectors the maps were computed against. Not part of the run's identity (the
        # checkpoint sha256 is): recomputed on another thread count they may differ in the last bits.
        self.prompt_embeddings = prompt_embeddings
        self.header = _Header(paths=[str(p) for p in paths], indices=index_list, prompts=list(prompts),
                              grid=int(grid), attrs=_normalize_attrs(attrs))
        self.n_images = len(paths)
        self.n_prompts = len(prompts)
        self.grid = int(grid)
        self.created: str = created or (str(attr_created) if attr_created else "") or utc_now()
        self._entries: dict[int, str] = {}  # local index -> journal file holding its latest result
        self._seq = 0
        self._lock_fd: int | None = None
        self._finalized = False
        self._already_complete = False  # resumed onto a finished file: nothing left to do
        try:
            self._open(resume=resume, overwrite=overwrite, explicit_created=bool(created or attr_created))
        except BaseException:
            self._unlock()  # a refused resume must not keep the journal locked
            raise

    # ---- setup ----------------------------------------------------------------------------
    def _open(self, *, resume: bool, overwrite: bool, explicit_created: bool) -> None:
        manifest = self.journal / "manifest.json"
        if overwrite:
            pass  # a fresh journal below; its lock refuses to trample a run that is still writing
        elif manifest.exists():
            if not resume:
                if _journal_in_use(self.journal):  # not interrupted: still running (a torchrun rank with this --out)
                    raise self._busy()
                raise AflocError("an interrupted run left its journal here", path=self.journal,
                                 hint="use --resume to complete it or --overwrite to start over")
            self._lock()
            saved = json.loads(manifest.read_text())
            self._refuse_mismatch(_Header.from_json(saved["header"]), self.journal)
            if not explicit_created:  # a resumed run keeps the time the run started
                self.created = str(saved.get("created", self.created))
            self._keep_embeddings()
            self._scan()
            _remove_stale_tmp(self.out)
            return
        elif self.out.exists():
            if not resume:
                raise AflocError("exists", path=self.out, hint="use --overwrite or --resume")
            with HeatmapFile.open(self.out) as done:
                self._refuse_mismatch(done._header(), self.out)
            self._already_complete = True
            return
        # A fresh journal. Lock it before touching anything in it: a journal without a manifest may be
        # another run's that has just started (or one cut short before any batch: nothing to keep).
        self.journal.mkdir(parents=True, exist_ok=True)
        self._lock()
        if manifest.exists() and not overwrite:  # another run left its journal since the check above
            raise AflocError("an interrupted run left its journal here", path=self.journal,
                             hint="use --resume to complete it or --overwrite to start over")
        _clear_journal(self.journal)
        _remove_stale_tmp(self.out)
        payload = {"kind": "afloc-heatmap-journal", "schema_version": SCHEMA_VERSION,
                   "created": self.created, "header": self.header.to_json()}
        try:
            _write_atomic(manifest, lambda fh: fh.write(json.dumps(payload, sort_keys=True).encode()))
            self._keep_embeddings()
        except OSError as exc:
            raise _os_error(exc, "the journal", self.journal) from None

    def _keep_embeddings(self) -> None:
        """The journal's prompt embeddings win over this run's: the batches already written used them."""
        saved = self.journal / _EMBEDDINGS_NAME
        if saved.exists():
            try:
                self.prompt_embeddings = np.load(saved, allow_pickle=False)
                return
            except Exception:  # noqa: BLE001 - torn or damaged: write this run's instead
                saved.unlink(missing_ok=True)
        if self.prompt_embeddings is not None:
            vectors = self.prompt_embeddings
            _write_atomic(saved, lambda fh: np.save(fh, vectors, allow_pickle=False))

    def _refuse_mismatch(self, previous: _Header, where: Path) -> None:
        what = self.header.mismatch(previous)
        if what is not None:
            run = "the interrupted run" if where == self.journal else "the finished run in this file"
            raise ResumeMismatch(what, f"cannot resume: the {what} differ from those of {run}", path=where,
                                 hint="resume with the same inputs, prompts, checkpoint and options, "
                                      "or use --overwrite to start over")

    def _scan(self) -> None:
        """Index the journal's batches; an unreadable one (never renamed into place whole) is dropped."""
        for tmp in self.journal.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        names = sorted(p.name for p in self.journal.iterdir() if _BATCH_NAME.match(p.name))
        for name in names:
            self._seq = max(self._seq, int(_BATCH_NAME.match(name).group(1)))  # type: ignore[union-attr]
            try:
                with np.load(self.journal / name, allow_pickle=False) as batch:
                    local = [int(i) for i in batch["indices"]]
            except Exception:  # noqa: BLE001 - any damage means "not done"; those images are redone
                (self.journal / name).unlink(missing_ok=True)
                continue
            if any(not 0 <= i < self.n_images for i in local):
                (self.journal / name).unlink(missing_ok=True)
                continue
            for i in local:
                self._entries[i] = name

    def _lock(self) -> None:
        """Own the journal, or refuse. The lock counts only while its file is still the journal's own: a run
        that finished (or was replaced) in the meantime has moved the journal away."""
        if fcntl is None or self._lock_fd is not None:
            return
        busy = self._busy()
        lock = self.journal / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise busy from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.stat(lock)):
                raise OSError("the journal was replaced")
        except OSError:
            os.close(fd)
            raise busy from None
        self._lock_fd = fd

    def _busy(self) -> AflocError:
        return AflocError("another afloc run is writing this output", path=self.out,
                          hint="wait for it to finish, or stop it first")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- the run ----------------------------------------------------------------------------
    def done_indices(self) -> set[int]:
        """Local indices already journalled (or all of them when the output is complete): skip these."""
        if self._already_complete or self._finalized:
            return set(range(self.n_images))
        return set(self._entries)

    def write_batch(self, indices: Sequence[int], heatmaps: np.ndarray, scores: np.ndarray,
                    records: Sequence[ImageRecord]) -> None:
        """Journal one batch atomically: after this returns, a kill does not lose it."""
        local = [int(i) for i in indices]
        b = len(local)
        maps = np.asarray(heatmaps).astype(np.float16, copy=False)
        score_arr = np.asarray(scores).astype(np.float32, copy=False)
        if maps.shape != (b, self.n_prompts, self.grid, self.grid):
            raise ValueError(f"heatmaps shape {maps.shape}, expected {(b, self.n_prompts, self.grid, self.grid)}")
        if score_arr.shape != (b, self.n_prompts):
            raise ValueError(f"scores shape {score_arr.shape}, expected {(b, self.n_prompts)}")
        if len(records) != b:
            raise ValueError(f"{len(records)} records for {b} images")
        self._commit(local, maps, score_arr, list(records))

    def write_failure(self, index: int, record: ImageRecord) -> None:
        """Journal an image that could not be processed: NaN maps and scores, status "failed"."""
        record = replace(record, status="failed", error=record.error or "failed")
        nan_maps = np.full((1, self.n_prompts, self.grid, self.grid), np.nan, dtype=np.float16)
        nan_scores = np.full((1, self.n_prompts), np.nan, dtype=np.float32)
        self._commit([int(index)], nan_maps, nan_scores, [record])

    def _commit(self, local: list[int], maps: np.ndarray, scores: np.ndarray, records: list[ImageRecord]) -> None:
        if self._finalized or self._already_complete:
            raise RuntimeError("the heat-map file is already complete")
        for i, record in zip(local, records, strict=True):
            if not 0 <= i < self.n_images:
                raise ValueError(f"index {i} out of range for {self.n_images} images")
            if record.path != self.header.paths[i]:
                raise ValueError(f"record for index {i} names {record.path!r}, expected {self.header.paths[i]!r}")
            if record.status not in ("ok", "failed"):
                raise ValueError(f"status must be 'ok' or 'failed', not {record.status!r}")
        self._seq += 1
        name = f"{self._seq:08d}.npz"
        meta = json.dumps([r.to_json() for r in records], sort_keys=True)

        def write(fh: Any) -> None:
            np.savez(fh, indices=np.asarray(local, dtype=np.int64), heatmaps=maps, scores=scores,
                     records=np.array(meta))

        try:
            _write_atomic(self.journal / name, write)
        except OSError as exc:
            raise _os_error(exc, "the journal", self.journal, "the batches already written are kept: fix it and "
                            "run again with --resume") from None
        for i in local:
            self._entries[i] = name

    # ---- the end ----------------------------------------------------------------------------
    def finalize(self) -> Path:
        """Build the final file from the journal, rename it onto `out`, drop the journal. Safe to repeat."""
        if self._finalized or self._already_complete:
            self._finalized = True
            self._unlock()
            return self.out
        missing = self.n_images - len(self._entries)
        if missing:
            raise AflocError(f"{missing} of {self.n_images} images have no result yet", path=self.out,
                             hint="run again with --resume to complete them")
        tmp = _final_tmp_name(self.out)
        try:
            _write_h5(tmp, self.header, self.n_images, self.created, self._rows(), self.prompt_embeddings)
            _publish(tmp, self.out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _os_error(exc, "the output", self.out, "the journal is kept: fix it and run again with "
                            "--resume") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _remove_tree(self.journal)  # still locked: no other run may take the journal while it goes
        self._unlock()
        self._finalized = True
        return self.out

    def _rows(self) -> Iterator[Row]:
        cache: OrderedDict[str, tuple[dict[int, int], np.ndarray, np.ndarray, list[ImageRecord]]] = OrderedDict()
        for i in range(self.n_images):
            name = self._entries[i]
            if name not in cache:
                with np.load(self.journal / name, allow_pickle=False) as batch:
                    where = {int(j): k for k, j in enumerate(batch["indices"])}
                    records = [ImageRecord.from_json(r) for r in json.loads(str(batch["records"]))]
                    cache[name] = (where, batch["heatmaps"], batch["scores"], records)
                if len(cache) > 8:  # batches arrive nearly in order; a few suffice
                    cache.popitem(last=False)
            where, maps, scores, records = cache[name]
            k = where[i]
            yield self.header.indices[i], records[k], scores[k], maps[k]

    def close(self) -> None:
        """Release the journal without finalizing (the run stopped early; --resume continues it)."""
        self._unlock()

    def __enter__(self) -> HeatmapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHeatmapWriter:
    """Runs a HeatmapWriter's journal writes in a background thread so inference never waits on disk.

    The queue is bounded (`max_pending` batches) so a slow disk slows the run down
    instead of filling memory. An error in the thread is raised in the caller at
    its next call, at `flush`/`finalize`, or when the `with` block ends.
    """

    def __init__(self, writer: HeatmapWriter, max_pending: int = 8) -> None:
        self.writer = writer
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="afloc-heatmap-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after an error keep draining so the caller never blocks on put
                    fn, args = job
                    fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._raise_pending()
        if self._stopped:
            raise RuntimeError("the heat-map writer is closed")
        self._queue.put((fn, args))

    def done_indices(self) -> set[int]:
        self.flush()
        return self.writer.done_indices()

    def write_batch(self, indices: Sequence[int], heatmaps: np.ndarray, scores: np.ndarray,
                    records: Sequence[ImageRecord]) -> None:
        # Own copies: the caller may reuse its buffers; float16 also halves what waits in the queue.
        maps = np.array(heatmaps, dtype=np.float16, copy=True)
        score_arr = np.array(scores, dtype=np.float32, copy=True)
        self._submit(self.writer.write_batch, list(indices), maps, score_arr, list(records))

    def write_failure(self, index: int, record: ImageRecord) -> None:
        self._submit(self.writer.write_failure, int(index), record)

    def flush(self) -> None:
        """Wait until every submitted batch is journalled."""
        self._queue.join()
        self._raise_pending()

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
            self._thread.join()

    def finalize(self) -> Path:
        self._stop()
        self._raise_pending()
        return self.writer.finalize()

    def close(self) -> None:
        """Write what is queued (it is finished work) and release the journal."""
        self._stop()
        self.writer.close()

    def __enter__(self) -> AsyncHeatmapWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        if exc_type is None:
            self._raise_pending()


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------
# What every finished file holds; a file without one of them cannot be read as afloc's.
_REQUIRED_DATASETS = ("prompts", "heatmaps", "scores", *_INT_COLUMNS, *_STR_COLUMNS)
_DAMAGED_HINT = "the file is damaged: localize again, or copy it again from where it was made"


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line: h5py's own messages can hold newlines."""
    return " ".join(str(exc).split())


class HeatmapFile:
    """Read access to a finished heat-map file: raw grids, scores and the geometry to map them back.

    Every read names the file on failure: h5py's message for a damaged chunk names neither file nor dataset.
    """

    def __init__(self, handle: h5py.File, path: Path) -> None:
        self._f = handle
        self.path = path
        self.attrs: dict[str, AttrValue] = {k: _plain(v) for k, v in handle.attrs.items()}
        self.prompts: list[str] = decode_text(handle["prompts"])
        self.paths: list[str] = decode_text(handle["path"])
        self.indices: np.ndarray = handle["index"][()]
        self.n_images = len(self.paths)
        self.n_prompts = len(self.prompts)
        self.grid = int(self.attrs["grid"])

    @classmethod
    def open(cls, path: str | Path) -> HeatmapFile:
        path = Path(path)
        if not path.exists():
            journal = path.with_name(path.name + JOURNAL_SUFFIX)
            if journal.is_dir():  # the output's run is still going, or was interrupted
                raise AflocError(f"heat-map file not found: its run has not finished ({journal} holds its journal)",
                                 path=path, hint="wait for it, or if it was stopped, finish it by running the same "
                                                 "afloc localize command with --resume")
            raise AflocError("heat-map file not found", path=path)
        if path.is_dir():
            raise AflocError("is a folder, not a heat-map file", path=path,
                             hint="name the .h5 file that afloc localize wrote")
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise AflocError(f"not a readable HDF5 file ({_one_line(exc)})", path=path) from None
        try:
            version = handle.attrs.get("schema_version")
            if version is None or "heatmaps" not in handle:
                raise AflocError("not an afloc heat-map file", path=path)
            if int(version) > SCHEMA_VERSION:
                raise AflocError(f"schema version {int(version)} is newer than this afloc reads ({SCHEMA_VERSION})",
                                 path=path, hint="upgrade afloc")
            missing = [f"/{name}" for name in _REQUIRED_DATASETS if name not in handle]
            if missing:
                raise AflocError(f"not a complete afloc heat-map file: no {', '.join(missing)}", path=path,
                                 hint=_DAMAGED_HINT)
            if "grid" not in handle.attrs:
                raise AflocError("not a complete afloc heat-map file: no grid attribute", path=path,
                                 hint=_DAMAGED_HINT)
            try:
                return cls(handle, path)
            except OSError as exc:
                raise AflocError(f"cannot read it: {_one_line(exc)}", path=path, hint=_DAMAGED_HINT) from None
        except BaseException:
            handle.close()
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> HeatmapFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, i: int, p: int | None = None) -> None:
        if not 0 <= i < self.n_images:
            raise IndexError(f"image {i} out of range 0..{self.n_images - 1}")
        if p is not None and not 0 <= p < self.n_prompts:
            raise IndexError(f"prompt {p} out of range 0..{self.n_prompts - 1}")

    def _read(self, name: str, rows: Any = ()) -> Any:
        """`/name[rows]`, or a one-line error naming the file and the dataset (a damaged chunk, a bad copy)."""
        try:
            return self._f[name][rows]
        except OSError as exc:
            at = rows if isinstance(rows, tuple) else (rows,)
            where = f"[{', '.join(map(str, at))}]" if at else ""
            raise AflocError(f"cannot read /{name}{where}: {_one_line(exc)}", path=self.path,
                             hint=_DAMAGED_HINT) from None

    def raw(self, i: int, p: int) -> np.ndarray:
        """The (g, g) similarity grid of image i and prompt p, unsmoothed, as the model produced it."""
        self._check(i, p)
        return self._read("heatmaps", (i, p)).astype(np.float32)

    def maps(self, i: int) -> np.ndarray:
        """All prompts' grids of image i, (P, g, g) float32: one chunk read."""
        self._check(i)
        return self._read("heatmaps", i).astype(np.float32)

    def stored_maps(self, i: int) -> np.ndarray:
        """Image i's grids as stored (float16): what a merge copies, bit for bit."""
        self._check(i)
        return self._read("heatmaps", i)  # type: ignore[no-any-return]

    def scores(self) -> np.ndarray:
        return self._read("scores").astype(np.float32)

    def prompt_embeddings(self) -> np.ndarray | None:
        """(P, D) float32: each prompt's text-side vector the maps were computed against; None in older files."""
        if "prompt_embeddings" not in self._f:
            return None
        return self._read("prompt_embeddings").astype(np.float32)

    def record(self, i: int) -> ImageRecord:
        self._check(i)
        return self._records(slice(i, i + 1))[0]

    def records(self) -> list[ImageRecord]:
        """Every image's record, read column by column (fast for tens of thousands of rows)."""
        return self._records(slice(None))

    def failures(self) -> list[ImageRecord]:
        return [r for r in self.records() if r.status == "failed"]

    def _records(self, rows: slice) -> list[ImageRecord]:
        f = self._f
        try:
            ints = {name: f[name][rows].tolist() for name in _INT_COLUMNS}
            strs = {name: decode_text(f[name], rows) for name in _STR_COLUMNS}
        except OSError as exc:
            raise AflocError(f"cannot read the image records: {_one_line(exc)}", path=self.path,
                             hint=_DAMAGED_HINT) from None
        out = []
        for k in range(len(strs["path"])):
            letterbox = (
                {"height": ints["height"][k], "width": ints["width"][k],
                 **{key: ints[f"lb_{key}"][k] for key in _LB_KEYS}}
                if ints["lb_size"][k] > 0 else {}
            )
            out.append(ImageRecord(path=strs["path"][k], height=ints["height"][k], width=ints["width"][k],
                                   letterbox=letterbox, reader=json.loads(strs["reader"][k]),
                                   status=strs["status"][k], error=strs["error"][k]))
        return out

    def find(self, path: str | Path) -> int:
        """The row of an input path (as it was given to the run)."""
        try:
            return self.paths.index(str(path))
        except ValueError:
            raise AflocError("image not in this heat-map file", path=path) from None

    def _header(self) -> _Header:
        attrs = {k: v for k, v in self.attrs.items() if k not in _STORE_ATTRS}
        return _Header(paths=list(self.paths), indices=[int(i) for i in self.indices], prompts=list(self.prompts),
                       grid=self.grid, attrs=attrs)


def _plain(value: Any) -> AttrValue:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()  # type: ignore[no-any-return]
    return value  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# Merge shards
# ---------------------------------------------------------------------------------------------
def merge(inputs: Sequence[str | Path], out: str | Path, overwrite: bool = False, *,
          allow_gaps: bool = False) -> Path:
    """Join `--shard K/N` files into one file ordered by the images' positions in the full input list.

    The result equals the file of a single unsharded run (`created` aside). Files
    from different runs (checkpoint, prompts, grid, config) are refused, as are
    overlapping shards and, unless `allow_gaps`, a missing shard: anywhere when the
    files record the run's input count (`n_inputs`), before the highest index present
    in older files.
    """
    out = Path(out)
    files = [Path(p) for p in inputs]
    if not files:
        raise AflocError("nothing to merge", hint="name the shard files")
    if out.exists() and not overwrite:
        raise AflocError("exists", path=out, hint="use --overwrite")
    check_output_file(out)
    if any(f.resolve() == out.resolve() for f in files if f.exists()):
        raise AflocError("the output is also an input", path=out, hint="write the merged file elsewhere")
    opened: list[HeatmapFile] = []
    try:
        for f in files:
            opened.append(HeatmapFile.open(f))
        first = opened[0]
        reference = first._header()
        optional: dict[str, tuple[AttrValue, Path]] = {}  # a newer attribute: its value and the first file with it
        owner: dict[int, tuple[int, int]] = {}
        for k, hf in enumerate(opened):
            header = hf._header()
            what = reference.run_mismatch(header)
            if what is not None:
                raise AflocError(f"made with a different {what} than {first.path}", path=hf.path,
                                 hint="merge only the shards of one run")
            for key in sorted(_OPTIONAL_ATTRS & header.attrs.keys()):
                # The first file may predate `key`: compare it among the files that have it.
                value, source = optional.setdefault(key, (header.attrs[key], hf.path))
                if not _same_value(value, header.attrs[key]):
                    raise AflocError(f"made with a different {_WHAT_DIFFERS.get(key, key)} than {source}",
                                     path=hf.path, hint="merge only the shards of one run")
            for row, g in enumerate(hf.indices.tolist()):
                if g in owner:
                    other = opened[owner[g][0]].path
                    raise AflocError(f"image index {g} ({hf.paths[row]}) is also in {other}", path=hf.path,
                                     hint="merge each shard once")
                owner[g] = (k, row)
        order = sorted(owner)
        seen: dict[str, int] = {}
        for g in order:  # shards of one input list never repeat a path; older files lack inputs_sha256
            k, row = owner[g]
            path = opened[k].paths[row]
            if path in seen:
                other = opened[owner[seen[path]][0]].path
                raise AflocError(f"image {path} is also in {other} at another index: the shards were made over "
                                 "different input lists", path=opened[k].path, hint="merge only the shards of one run")
            seen[path] = g
        # A file that records the run's input count shows a missing last shard too; older files, inner gaps only.
        n_inputs = optional.get("n_inputs")
        total = int(n_inputs[0]) if n_inputs is not None else (order[-1] + 1 if order else 0)
        missing = sorted(set(range(total)) - owner.keys())
        if missing and not allow_gaps:
            raise AflocError(f"the shards do not cover the inputs: image index {missing[0]} is missing "
                             f"({len(missing)} of the run's {total} images are in none of the files)",
                             hint="merge every shard of the run (--allow-gaps to merge a subset)")
        created = min(str(hf.attrs.get("created", "")) for hf in opened) or utc_now()
        attrs = {**{key: value for key, (value, _) in optional.items()}, **reference.attrs}
        header = _Header(paths=[opened[owner[g][0]].paths[owner[g][1]] for g in order], indices=order,
                         prompts=reference.prompts, grid=reference.grid, attrs=attrs)

        records = [hf.records() for hf in opened]
        scores = [hf.scores() for hf in opened]
        embeddings = _merged_embeddings(opened)

        def rows() -> Iterator[Row]:
            for g in order:
                k, row = owner[g]
                yield g, records[k][row], scores[k][row], opened[k].stored_maps(row)

        tmp = _final_tmp_name(out)
        try:
            _write_h5(tmp, header, len(order), created, rows(), embeddings)
            _publish(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _os_error(exc, "the merged file", out) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        for hf in opened:
            hf.close()
    return out


def _merged_embeddings(opened: Sequence[HeatmapFile]) -> np.ndarray | None:
    """The first shard's prompt embeddings when every shard has them; shards of one checkpoint agree to rounding."""
    found = [hf.prompt_embeddings() for hf in opened]
    if any(e is None for e in found):
        return None
    first = found[0]
    for hf, e in zip(opened[1:], found[1:], strict=True):
        if e.shape != first.shape or not np.allclose(e, first, rtol=1e-4, atol=1e-5):  # type: ignore[union-attr]
            raise AflocError(f"its prompt embeddings differ from those of {opened[0].path}", path=hf.path,
                             hint="merge only the shards of one run")
    return first


# ---------------------------------------------------------------------------------------------
# Comparing files
# ---------------------------------------------------------------------------------------------
def content_differences(a: str | Path, b: str | Path, ignore_attrs: Sequence[str] = ("created",)) -> list[str]:
    """Every difference in datasets, shapes, dtypes, values (NaN equals NaN) and attributes, for messages."""
    diffs: list[str] = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        _compare_attrs("/", fa.attrs, fb.attrs, set(ignore_attrs), diffs)
        objects_a, objects_b = _objects(fa), _objects(fb)
        for name in sorted(set(objects_a) | set(objects_b)):
            if name not in objects_a or name not in objects_b:
                diffs.append(f"/{name}: only in {'b' if name not in objects_a else 'a'}")
                continue
            oa, ob = fa[name], fb[name]
            if type(oa) is not type(ob):
                diffs.append(f"/{name}: a {type(oa).__name__} vs a {type(ob).__name__}")
                continue
            _compare_attrs(f"/{name}", oa.attrs, ob.attrs, set(ignore_attrs), diffs)
            if isinstance(oa, h5py.Dataset):
                _compare_dataset(name, oa, ob, diffs)
    return diffs


def equal_contents(a: str | Path, b: str | Path, ignore_attrs: Sequence[str] = ("created",)) -> bool:
    """True when the two files hold the same datasets, values and attributes (bar `ignore_attrs`)."""
    return not content_differences(a, b, ignore_attrs)


def _objects(f: h5py.File) -> dict[str, str]:
    found: dict[str, str] = {}
    f.visititems(lambda name, obj: found.__setitem__(name, type(obj).__name__))
    return found


def _compare_attrs(where: str, a: h5py.AttributeManager, b: h5py.AttributeManager, ignore: set[str],
                   diffs: list[str]) -> None:
    for key in sorted((set(a) | set(b)) - ignore):
        if key not in a or key not in b:
            diffs.append(f"{where} attribute {key!r}: only in {'b' if key not in a else 'a'}")
            continue
        va, vb = a[key], b[key]
        if isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            same = np.shape(va) == np.shape(vb) and _arrays_equal(np.asarray(va), np.asarray(vb))
        else:
            same = _same_value(_plain(va), _plain(vb))
        if not same:
            diffs.append(f"{where} attribute {key!r}: {va!r} != {vb!r}")


def _arrays_equal(x: np.ndarray, y: np.ndarray) -> bool:
    if x.dtype.kind in "fc" and y.dtype.kind in "fc":
        return bool(np.array_equal(x, y, equal_nan=True))
    return bool(np.array_equal(x, y))


def _compare_dataset(name: str, a: h5py.Dataset, b: h5py.Dataset, diffs: list[str]) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        diffs.append(f"/{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
        return
    text = h5py.check_string_dtype(a.dtype) is not None
    if a.shape == () or len(a.shape) == 0:
        x, y = a[()], b[()]  # stored bytes: equal bytes, equal text
        if not _arrays_equal(np.asarray(x), np.asarray(y)):
            diffs.append(f"/{name}: values differ")
        return
    step = 1024  # compare in slabs: a real run's maps do not fit comfortably in memory twice
    for start in range(0, a.shape[0], step):
        sl = slice(start, start + step)
        x, y = (decode_text(a, sl), decode_text(b, sl)) if text else (a[sl], b[sl])
        if not _arrays_equal(np.asarray(x), np.asarray(y)):
            diffs.append(f"/{name}: values differ in rows {start}..{min(start + step, a.shape[0]) - 1}")
            return
