"""The one way afloc replaces a finished output file: readers see the old file or the new one, never half of one.

The heat-map store's journal keeps its own writer (fsync of file and folder, under the journal's lock); every
other finished file (tables, exported maps, overlays, checkpoints, the training cache's tables) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

_NAME_TRIES = 100


def _create_temporary(target: Path) -> tuple[Path, int]:
    """Create an empty, unique temporary beside `target`; returns it and the mode a new file gets here.

    `os.open(..., 0o666)` lets the kernel apply the umask, as for any new file; tempfile.mkstemp would make it
    0600, and that mode survived the rename, so tables and checkpoints were unreadable to the rest of a group
    sharing the folder while the .h5 next to them was not.
    """
    for _ in range(_NAME_TRIES):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"no free temporary name beside {target}")


def write_atomic(target: Path, write: Callable[[Path], None], *, fsync: bool = False) -> None:
    """Write `target` through a temporary file of its own in the same folder, then rename it into place.

    The temporary name is unique, so two runs writing one folder never share it; a write that fails (a full disk,
    an interrupt) removes it, so nothing stray is left beside the real file. `fsync` flushes the data to disk
    before the rename, for files whose loss after a power cut would cost hours (checkpoints).

    A new file gets the mode of any new file (0666 less the umask). A file that is replaced keeps its permission
    bits, as it would if it were rewritten in place (`open(path, "w")`, h5py): someone who shared or restricted a
    result with chmod should not see --overwrite quietly undo that.
    """
    tmp, mode = _create_temporary(target)
    try:
        write(tmp)
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(target).st_mode) & 0o777
        os.chmod(tmp, mode)  # also when `write` replaced the temporary with a file of its own (safetensors: 0600)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
