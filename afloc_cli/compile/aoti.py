"""AOTInductor: an ExportedProgram -> a self-contained `.pt2` package (C++/OpenMP on the CPU, Triton on CUDA).

The package embeds the weights and runs without Python model code, but it is
bound to the torch build that compiled it, which is why the engine metadata
records the torch version and `load_engine` refuses another.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from afloc_cli.errors import AflocError

SUFFIX = ".pt2"


def first_line(exc: BaseException) -> str:
    """The head of an exception's message, short enough for a one-line error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def compile_package(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Compile and package `program` at `path`; the device is the one the program was exported on."""
    from torch._inductor import aoti_compile_and_package

    try:
        written = aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # noqa: BLE001 - a C++ toolchain problem is the usual cause
        raise AflocError(
            f"AOTInductor could not compile the model: {first_line(exc)}",
            hint="a C++ compiler (g++) must be on PATH; rerun with --debug for the full trace",
        ) from exc
    return Path(written)


def load_package(path: Path, device: torch.device) -> Callable[..., Any]:
    """A callable taking the exported inputs positionally and returning the flat list of outputs."""
    from torch._inductor import aoti_load_package

    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        return aoti_load_package(str(path), device_index=index)
    except Exception as exc:  # noqa: BLE001
        raise AflocError(
            f"cannot load the AOTInductor package: {first_line(exc)}",
            path=path,
            hint="rebuild it with `afloc compile` on this machine's torch",
        ) from exc
