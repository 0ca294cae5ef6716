"""One entry point per kernel: Triton on CUDA, the fastest torch path on the CPU, the reference on request.

The choice is, in order: the `backend` argument, the environment variable
AFLOC_KERNELS (auto | triton | torch | reference), then "auto". "auto" picks
Triton for CUDA tensors when Triton is installed, else the torch fast path.
"reference" is the plain composition, for checking the others.
"triton" on CPU tensors is allowed only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from kernels import local_alignment as la
from kernels import localization as loc
from kernels.localization import MapStats, Mode

Backend = Literal["auto", "triton", "torch", "reference"]
ENV_VAR = "AFLOC_KERNELS"
BACKENDS = ("auto", "triton", "torch", "reference")


def resolve_backend(tensor: Tensor, backend: str | None = None) -> str:
    """The backend that will run for `tensor`'s device: "triton", "torch" or "reference"."""
    choice = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r} (from {ENV_VAR} or the argument); expected {BACKENDS}")
    on_cuda = tensor.device.type == "cuda"
    if choice == "auto":
        return "triton" if on_cuda and la.triton_available() else "torch"
    if choice == "triton":
        if not la.triton_available():
            raise RuntimeError("backend 'triton' asked for, but Triton is not installed")
        if not on_cuda and not la.interpreting():
            raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return choice


def localization_maps(
    grid: Tensor,
    prompts: Tensor,
    mode: Mode = "dot",
    *,
    scale: float = 1.0,
    global_: Tensor | None = None,
    normalize: bool = False,
    backend: Backend | None = None,
) -> tuple[Tensor, MapStats]:
    """grid (B, C, g, g) × prompts (P, C) -> float32 maps (B, P, g, g) and their MapStats.

    mode: "dot" (the reference) or "cosine". scale multiplies the maps. global_
    (B, C), when given, adds the image-level scores cos(global_b, prompt_p).
    normalize=True returns the maps min–max scaled to [-1, 1] per map (stats stay raw).
    """
    which = resolve_backend(grid, backend)
    fn = {
        "triton": loc.triton_localization,
        "torch": loc.torch_localization,
        "reference": loc.reference_localization,
    }[which]
    return fn(grid, prompts, mode, scale=scale, global_=global_, normalize=normalize)


def local_similarity(
    regions: Tensor,
    units: Tensor,
    unit_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    chunk_size: int | None = None,
    *,
    backend: Backend | None = None,
    matmul_dtype: torch.dtype | None = None,
    projection: Tensor | None = None,
) -> Tensor:
    """GLoRIA local scores R (B_img, B_txt); differentiable in regions and units.

    regions (B_img, d, M) or (B_img, d, h, w); units (B_txt, T, d); unit_mask (B_txt, T),
    at least one real unit per text. chunk_size: images per chunk for the torch and
    Triton paths (None: from a memory budget); the reference materialises everything.
    matmul_dtype: the torch path's context product in that dtype (bf16 training on the CPU);
    the Triton kernel keeps its own precision and the reference ignores it.
    projection (d, c): regions are (B_img, c, ...) features whose embedding is projection @ regions
    (the image encoder's local embedders); the torch path then works in c dimensions where c < d.
    """
    which = resolve_backend(regions, backend)
    if which == "reference":
        return la.reference_local_similarity(regions, units, unit_mask, temp1, temp2, projection)
    if which == "triton" and 0 < temp1 <= la.MAX_TEMP1:
        return la.triton_local_similarity(regions, units, unit_mask, temp1, temp2, chunk_size, projection)
    return la.torch_local_similarity(regions, units, unit_mask, temp1, temp2, chunk_size, matmul_dtype, projection)


__all__ = ["BACKENDS", "ENV_VAR", "Backend", "MapStats", "local_similarity", "localization_maps", "resolve_backend"]
