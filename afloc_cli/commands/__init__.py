"""One module per `afloc` command; each is a thin shell over the library."""

from __future__ import annotations

import os

WORKERS_HELP = "Decode processes (default: min(4, CPU cores))."


def decode_workers(value: int | None, cap: int = 4) -> int:
    """The --workers default, resolved at run time so help text and docs do not depend on the machine."""
    return min(cap, os.cpu_count() or 1) if value is None else value
