"""User-facing errors: one line naming the thing and what to do, never a traceback."""

from __future__ import annotations

from pathlib import Path


class AflocError(Exception):
    """An error the user can act on. The CLI prints it on one line and exits with `exit_code`."""

    exit_code: int = 2

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        parts = [f"{self.path}: {message}" if self.path else message]
        if hint:
            parts.append(hint)
        super().__init__(" — ".join(parts))


class ImageReadError(AflocError):
    """A radiograph that cannot be decoded. Batch commands record it and go on."""


class CheckpointError(AflocError):
    """A checkpoint that is missing, malformed or incompatible."""


class TextModelError(AflocError):
    """A text model that cannot be found locally (nothing is ever downloaded)."""
