"""One module per `afloc` command; each is a thin shell over the library."""

from __future__ import annotations

import os

from rich.console import Console

WORKERS_HELP = "Decode processes (default: min(4, CPU cores))."


def decode_workers(value: int | None, cap: int = 4) -> int:
    """The --workers default, resolved at run time so help text and docs do not depend on the machine."""
    return min(cap, os.cpu_count() or 1) if value is None else value


def stderr_console() -> Console:
    """Where a command talks to people. Markup and highlighting are off so that paths, prompts and reader errors
    print exactly as given (a folder called `scan[red]` stays that, and `[/b]` cannot crash the summary), and
    soft wrap keeps one message on one line in logs."""
    return Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
