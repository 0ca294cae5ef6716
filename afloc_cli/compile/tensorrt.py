"""TensorRT through torch-tensorrt's dynamo path: a thin call of its public API.

The program handed in is the shared ExportedProgram of `export.py`, exported on
CUDA with its weights already cast to the target precision. Then, following the
torch-tensorrt guides "Compiling Exported Programs", "Dynamic shapes" and
"Saving models compiled with Torch-TensorRT":

1. ``torch_tensorrt.dynamo.compile(program, arg_inputs=[Input(min_shape, opt_shape,
   max_shape, dtype), ...])``: one `Input` per graph input, its batch dimension
   spanning the engine's profile (min/opt/max), the other dimensions static.
2. Precision. The graph is explicitly typed (fp16/bf16 weights, casts inside the
   wrapper), which TensorRT >= 10 builds as written. torch-tensorrt's precision
   switch changed across releases, so we pass what the installed one has:
   ``use_explicit_typing=True`` where that argument exists (it then requires
   `enabled_precisions` to stay {fp32}); ``enabled_precisions={dtype}`` on older
   releases with only weak typing; nothing on releases that are strongly typed
   only (neither argument exists).
3. ``torch_tensorrt.save(trt_gm, path, output_format="exported_program",
   arg_inputs=<the same Inputs>)``: the serialized ExportedProgram, the documented
   default form; the dynamic batch range is inferred from the Inputs.
4. Loading: ``torch_tensorrt.load(path).module()``.

torch_tensorrt is imported only here and only when asked for, so nothing else
in afloc needs it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from afloc_cli.compile.aoti import first_line
from afloc_cli.compile.export import BatchProfile
from afloc_cli.errors import AflocError

SUFFIX = ".ep"
OUTPUT_FORMAT = "exported_program"
INSTALL_MESSAGE = "--backend tensorrt needs an NVIDIA GPU with torch-tensorrt installed (pip install afloc[tensorrt])"


def require_tensorrt() -> ModuleType:
    """torch_tensorrt, or the one-line refusal where it cannot run (no CUDA, or not installed)."""
    if not torch.cuda.is_available():
        raise AflocError(INSTALL_MESSAGE)
    try:
        import torch_tensorrt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA/TensorRT library underneath
        raise AflocError(INSTALL_MESSAGE) from exc
    return torch_tensorrt


def versions() -> dict[str, str | None]:
    """Versions of torch-tensorrt and TensorRT, None where not importable (never raises)."""
    found: dict[str, str | None] = {"torch_tensorrt": None, "tensorrt": None}
    for name in found:
        try:
            module = __import__(name)
            found[name] = str(getattr(module, "__version__", "unknown"))
        except Exception:  # noqa: BLE001
            pass
    return found


def input_specs(
    trt: ModuleType, inputs: Sequence[tuple[tuple[int, ...], torch.dtype]], profile: BatchProfile
) -> list[Any]:
    """One torch_tensorrt.Input per graph input: batch over the profile, the rest static."""
    specs = []
    for shape, dtype in inputs:
        if profile.static:
            specs.append(trt.Input(shape=(profile.min, *shape), dtype=dtype))
        else:
            specs.append(
                trt.Input(
                    min_shape=(profile.min, *shape),
                    opt_shape=(profile.opt, *shape),
                    max_shape=(profile.max, *shape),
                    dtype=dtype,
                )
            )
    return specs


def precision_kwargs(compile_fn: Callable[..., Any], dtype: torch.dtype) -> dict[str, Any]:
    """The precision arguments the installed torch-tensorrt understands (see the module docstring)."""
    params = inspect.signature(compile_fn).parameters
    if "use_explicit_typing" in params:
        return {"use_explicit_typing": True}
    if "enabled_precisions" in params:
        return {"enabled_precisions": {dtype}}
    return {}


def build(
    program: torch.export.ExportedProgram,
    inputs: Sequence[tuple[tuple[int, ...], torch.dtype]],
    profile: BatchProfile,
    dtype: torch.dtype,
    path: Path,
) -> Path:
    """Compile `program` to TensorRT engines and save the result at `path`."""
    trt = require_tensorrt()
    specs = input_specs(trt, inputs, profile)
    try:
        compiled = trt.dynamo.compile(program, arg_inputs=specs, **precision_kwargs(trt.dynamo.compile, dtype))
    except AflocError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise AflocError(f"torch-tensorrt could not compile the model: {first_line(exc)}",
                         hint="rerun with --debug for the full trace") from exc
    trt.save(compiled, str(path), output_format=OUTPUT_FORMAT, arg_inputs=specs)
    return path


def load(path: Path, device: torch.device) -> Callable[..., Any]:
    """The saved program as a callable module; its TensorRT engines live on the GPU they were built for."""
    trt = require_tensorrt()
    try:
        module = trt.load(str(path)).module()
    except Exception as exc:  # noqa: BLE001
        raise AflocError(f"cannot load the TensorRT program: {first_line(exc)}", path=path,
                         hint="rebuild it with `afloc compile --backend tensorrt` on this machine") from exc
    return module
