"""The one way afloc replaces a finished output file: readers see the old file or the new one, never half of one.

The heat-map store's journal keeps its own writer (fsync of file and folder, under the journal's lock); every
other finished file (tables, exported maps, overlays, checkpoints, the training cache's tables) goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(target: Path, write: Callable[[Path], None], *, fsync: bool = False) -> None:
    """Write `target` through a temporary file of its own in the same folder, then rename it into place.

    The temporary name is unique, so two runs writing one folder never share it; a write that fails (a full disk,
    an interrupt) removes it, so nothing stray is left beside the real file. `fsync` flushes the data to disk
    before the rename, for files whose loss after a power cut would cost hours (checkpoints).
    """
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
