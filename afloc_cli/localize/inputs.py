"""Which files a batch run covers, in a fixed order, and which part of them this shard takes."""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from afloc_cli.errors import AflocError
from afloc_cli.image.data.io import is_dicom

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
LIST_SUFFIXES = {".csv", ".txt", ".lst"}
# A CSV list's path column, whatever its capitals; without any of these the list must have no header row.
PATH_COLUMNS = ("path", "image_path", "image", "file", "filename", "file_path")
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # the DICOMDIR of a DICOM media export: an index, no pixels


@dataclass
class Inputs:
    """The radiographs a run covers, and notes on what the folder walks left out on purpose."""

    paths: list[Path]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Walk:
    """State of one folder walk: what it must not enter and what it left out, so the run can say so once."""

    exclude: frozenset[str]  # real paths of this run's own outputs (file, journal, overlays folder)
    visited: set[str] = field(default_factory=set)  # real paths of folders entered: a symlink loop stops here
    dicomdirs: int = 0
    own_outputs: list[Path] = field(default_factory=list)


def _is_regular_file(path: Path) -> bool:
    """Opening a FIFO or device found in a tree would block or read forever; only plain files are sniffed."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _is_media_directory(path: Path) -> bool:
    """True for a DICOMDIR under another name: its meta group names the Media Storage Directory class."""
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)  # the group 0002 elements only, never the whole file
    except Exception:  # a malformed header: the reader reports it as a failed row with its reason
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_DIRECTORY_SOP_CLASS


def _walk(folder: Path, state: _Walk) -> Iterator[Path]:
    """Every radiograph under `folder`, sorted so every machine sees the same order.

    Symlinked folders are followed (a cohort is often assembled from links); each real folder is entered once,
    so a link back up the tree cannot loop. A folder that cannot be listed is an error, not a silent gap.
    A file is taken by its image suffix, or, whatever its name (PACS exports name files by SOP Instance UID,
    `1.2.840...123`, whose `.123` is no extension), by the DICOM magic in its first 132 bytes. A DICOMDIR is an
    index of a media export, not a radiograph: it is counted, not taken. This run's own outputs are left out.
    """

    def unreadable(exc: OSError) -> None:
        raise AflocError(f"cannot read the folder ({exc.strerror or exc})", path=exc.filename or folder)

    state.visited.add(os.path.realpath(folder))
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        keep = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if name.startswith(".") or real in state.visited:
                continue
            if real in state.exclude:
                state.own_outputs.append(Path(root) / name)
                continue
            state.visited.add(real)
            keep.append(name)
        dirs[:] = keep
        real_root = os.path.realpath(root)  # once per folder, not per file: trees hold tens of thousands
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if os.path.join(real_root, name) in state.exclude:
                state.own_outputs.append(path)
                continue
            if name.upper() == "DICOMDIR":
                state.dicomdirs += 1
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield path
            elif _is_regular_file(path) and is_dicom(path):
                if _is_media_directory(path):
                    state.dicomdirs += 1
                else:
                    yield path


def _read_list(list_file: Path) -> list[Path]:
    """A CSV (a path column, or the first column when there is no header) or a text file of paths, relative to
    the list's folder."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AflocError(f"cannot read the list of inputs: {exc}", path=list_file) from exc
    base = list_file.parent
    entries: list[str] = []
    if list_file.suffix.lower() == ".csv":
        rows = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
        if not rows:
            return []
        column, body = _path_column(rows, list_file)
        entries = [row[column].strip() for row in body if len(row) > column and row[column].strip()]
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [p if p.is_absolute() else base / p for p in map(Path, entries)]


def _path_column(rows: list[list[str]], list_file: Path) -> tuple[int, list[list[str]]]:
    """Which column holds the paths, and the rows after the header if there is one.

    A header is recognised by a column named as in PATH_COLUMNS (any capitals). A first row without one is data
    only if its first cell looks like a path (an existing file, a folder separator or an image suffix); anything
    else is a header we cannot read, refused before any work rather than taken for an image.
    """
    header = [cell.strip().lower() for cell in rows[0]]
    for name in PATH_COLUMNS:
        if name in header:
            return header.index(name), rows[1:]
    first = rows[0][0].strip()
    if _looks_like_path(first, list_file.parent):
        return 0, rows
    raise AflocError(f"no path column in the header ({', '.join(rows[0])})", path=list_file,
                     hint=f"name the column of image paths one of {', '.join(PATH_COLUMNS)}, or list the paths "
                          "in the first column with no header row")


def _looks_like_path(text: str, base: Path) -> bool:
    if not text:
        return False
    if "/" in text or "\\" in text or os.path.splitext(text)[1].lower() in IMAGE_SUFFIXES:
        return True
    path = Path(text)
    return (path if path.is_absolute() else base / path).exists()


def collect_inputs(arguments: list[Path], exclude: Iterable[Path] = ()) -> Inputs:
    """Files as given, folders walked recursively (sorted), list files expanded; duplicates dropped.

    `exclude` names this run's own outputs: a walk never takes them as inputs (overlay PNGs written into an input
    folder would otherwise become radiographs on the next run and make a resume refuse). A path that does not
    exist is a usage error, reported before any work starts.
    """
    seen: set[Path] = set()
    out: list[Path] = []
    excluded = frozenset(os.path.realpath(p) for p in exclude)
    dicomdirs = 0
    own_outputs: list[Path] = []

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(path)

    for arg in arguments:
        if arg.is_dir():
            state = _Walk(exclude=excluded)
            for path in _walk(arg, state):
                add(path)
            dicomdirs += state.dicomdirs
            own_outputs += [p for p in state.own_outputs if p not in own_outputs]
        elif arg.is_file():
            if arg.suffix.lower() in LIST_SUFFIXES and not is_dicom(arg):
                for path in _read_list(arg):
                    add(path)
            else:
                add(arg)
        else:
            raise AflocError("no such file or folder", path=arg)
    notes = []
    if dicomdirs:
        notes.append(f"left out {dicomdirs} DICOMDIR file(s): the index of a DICOM media export, not a radiograph")
    if own_outputs:
        shown = ", ".join(str(p) for p in own_outputs)
        notes.append(f"left out this run's own outputs found in the input folders: {shown}")
    return Inputs(out, notes)


def parse_shard(spec: str | None, env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """`K/N` (0-based K), or `auto` from torchrun (RANK/WORLD_SIZE) or a Slurm array; None for no sharding."""
    if spec is None:
        return None
    env = dict(os.environ if env is None else env)
    if spec == "auto":
        if "RANK" in env and "WORLD_SIZE" in env:
            k, n = int(env["RANK"]), int(env["WORLD_SIZE"])
        elif "SLURM_ARRAY_TASK_ID" in env:
            k = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            n = int(env.get("SLURM_ARRAY_TASK_COUNT", "0"))
            if n <= 0:
                raise AflocError("--shard auto: SLURM_ARRAY_TASK_COUNT is not set")
        else:
            raise AflocError("--shard auto needs RANK/WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID (Slurm array)")
    else:
        try:
            k_text, n_text = spec.split("/")
            k, n = int(k_text), int(n_text)
        except ValueError as exc:
            raise AflocError(f"--shard expects K/N (e.g. 0/4) or auto, got {spec!r}") from exc
    if not (n >= 1 and 0 <= k < n):
        raise AflocError(f"--shard {k}/{n}: K must be in 0..N-1")
    return k, n


RANK_PLACEHOLDER = "{rank}"


def shard_output(out: Path, spec: str | None, shard: tuple[int, int] | None,
                 env: dict[str, str] | None = None) -> Path:
    """This process's `--out`: `{rank}` filled with the shard's K.

    torchrun gives every rank the same command line, so without the placeholder every rank would write one
    file: refused on every rank before any work, rather than a clash and a file holding one shard only.
    """
    text = str(out)
    if RANK_PLACEHOLDER in text:
        if shard is None:
            raise AflocError(f"--out {out}: {RANK_PLACEHOLDER} is filled only when sharding",
                             hint="add --shard auto (torchrun, Slurm array) or --shard K/N, or drop it")
        return Path(text.replace(RANK_PLACEHOLDER, str(shard[0])))
    env = dict(os.environ if env is None else env)
    if spec == "auto" and shard is not None and shard[1] > 1 and "RANK" in env and "WORLD_SIZE" in env:
        raise AflocError(f"--shard auto under torchrun ({shard[1]} ranks): every rank gets the same --out {out}",
                         hint=f"put {RANK_PLACEHOLDER} in it (e.g. --out part-{RANK_PLACEHOLDER}.h5) so each rank "
                              "writes its own file, then afloc merge them")
    return out


def shard_indices(n_items: int, shard: tuple[int, int] | None) -> list[int]:
    """Round-robin: item i goes to shard i mod N, so shards stay balanced whatever the folder order."""
    if shard is None:
        return list(range(n_items))
    k, n = shard
    return list(range(k, n_items, n))
