"""Localization maps: deep-local grid (B, C, g, g) × prompts (P, C) -> maps (B, P, g, g) plus per-map stats.

The maps are the raw similarities of SPEC.md's heatmap protocol, step 3 (dot
product as the reference, cosine as the option), times `scale`. Fused with
them: each map's min and max over its grid (so min–max to [-1, 1] needs no
second reduction; `normalize=True` applies it in place) and, when the pooled
global embedding is given, the image-level score cos(global_b, prompt_p), the
similarity the global loss trains.

Three implementations with the same contract:
- `reference_localization`: the plain composition (normalize, einsum, amin/amax);
- `torch_localization`: the CPU path: one batched GEMM over the grid as it lies in
  memory (NCHW or channels-last, no copy; bf16 grids stay bf16), the channel norms
  for cosine from the same grid (contiguous rows when channels-last), one
  `aminmax`, in-place epilogue;
- `triton_localization`: one program per (image, prompt block) reads each feature
  once, accumulates the dot products and the squared channel norms together,
  writes the maps and keeps the running min/max; a second sweep over its own
  (small) output normalises when asked.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional: only the CUDA path (and the interpreter tests) need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

Mode = Literal["dot", "cosine"]
NORM_EPS = 1e-12  # as F.normalize
SPAN_EPS = 1e-12  # min–max span floor, as the localization engine


class MapStats(NamedTuple):
    """Per-map statistics of the raw (scaled) maps, float32."""

    lo: Tensor  # (B, P) min over the grid
    hi: Tensor  # (B, P) max over the grid
    scores: Tensor | None  # (B, P) cos(global, prompt), when the global embedding was given


def _check(grid: Tensor, prompts: Tensor, mode: str, global_: Tensor | None) -> None:
    if grid.dim() != 4:
        raise ValueError(f"grid must be (B, C, g, g), got {tuple(grid.shape)}")
    if prompts.dim() != 2 or prompts.shape[1] != grid.shape[1]:
        raise ValueError(f"prompts must be (P, {grid.shape[1]}), got {tuple(prompts.shape)}")
    if mode not in ("dot", "cosine"):
        raise ValueError(f"unknown similarity {mode!r}; expected 'dot' or 'cosine'")
    if global_ is not None and global_.shape != (grid.shape[0], grid.shape[1]):
        raise ValueError(f"global embedding must be {(grid.shape[0], grid.shape[1])}, got {tuple(global_.shape)}")


def minmax_signed(maps: Tensor, stats: MapStats) -> Tensor:
    """Raw maps (B, P, g, g) -> [-1, 1] per map, from the fused statistics."""
    lo = stats.lo[..., None, None]
    span = (stats.hi - stats.lo).clamp_min(SPAN_EPS)[..., None, None]
    return (maps - lo) / span * 2 - 1


def _scores(global_: Tensor | None, prompts: Tensor) -> Tensor | None:
    if global_ is None:
        return None
    dtype = torch.promote_types(global_.dtype, torch.float32)
    return F.normalize(global_.to(dtype), dim=1, eps=NORM_EPS) @ F.normalize(prompts.to(dtype), dim=1, eps=NORM_EPS).T


def reference_localization(
    grid: Tensor,
    prompts: Tensor,
    mode: Mode = "dot",
    *,
    scale: float = 1.0,
    global_: Tensor | None = None,
    normalize: bool = False,
) -> tuple[Tensor, MapStats]:
    """The naive composition, in float32 (or float64 for float64 inputs): what the fused paths must equal."""
    _check(grid, prompts, mode, global_)
    dtype = torch.promote_types(grid.dtype, torch.float32)
    g = grid.to(dtype)
    p = prompts.to(dtype)
    if mode == "cosine":
        g = F.normalize(g, dim=1, eps=NORM_EPS)
        p = F.normalize(p, dim=1, eps=NORM_EPS)
    maps = torch.einsum("bchw,pc->bphw", g, p) * scale
    flat = maps.flatten(2)
    stats = MapStats(flat.amin(-1), flat.amax(-1), _scores(global_, prompts))
    return (minmax_signed(maps, stats) if normalize else maps), stats


def torch_localization(
    grid: Tensor,
    prompts: Tensor,
    mode: Mode = "dot",
    *,
    scale: float = 1.0,
    global_: Tensor | None = None,
    normalize: bool = False,
) -> tuple[Tensor, MapStats]:
    """The CPU path: one product over the grid as it lies, no normalised copy, one min/max pass, in-place epilogue.

    Channels-last grids (what the CPU encoder produces) go through a 1x1 convolution: oneDNN's kernel
    streams the cells' contiguous channels with the few prompts as outputs, 1.4x faster here than the
    batched GEMM, which handles an 8-column product poorly (benchmarks/RESULTS.md, issue 6).
    """
    _check(grid, prompts, mode, global_)
    b, c, h, w = grid.shape
    x = grid.flatten(2)  # (B, C, N): a view for NCHW and channels-last grids alike
    p = F.normalize(prompts.float(), dim=1, eps=NORM_EPS) if mode == "cosine" else prompts
    if grid.device.type == "cpu" and not grid.is_contiguous() and grid.is_contiguous(
            memory_format=torch.channels_last):
        weight = p.to(grid.dtype).reshape(p.shape[0], c, 1, 1)
        maps = F.conv2d(grid, weight).float().contiguous().view(b, p.shape[0], h * w)  # (B, P, N), NCHW copy
    else:
        maps = torch.matmul(p.to(x.dtype), x).float()  # (B, P, N), batched GEMM reading the grid once
    if mode == "cosine":
        rows = grid.permute(0, 2, 3, 1)
        if rows.is_contiguous():  # channels-last: each cell's channels are contiguous
            norms = torch.linalg.vector_norm(rows.reshape(b, h * w, c), dim=2, dtype=torch.float32)
        else:
            norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
        maps.div_(norms.clamp_min_(NORM_EPS).unsqueeze(1))
    if scale != 1.0:
        maps.mul_(scale)
    lo, hi = torch.aminmax(maps, dim=-1)
    stats = MapStats(lo, hi, _scores(global_, prompts))
    if normalize:
        span = (hi - lo).clamp_min_(SPAN_EPS)
        maps.sub_(lo.unsqueeze(-1)).mul_((2.0 / span).unsqueeze(-1)).sub_(1.0)
    return maps.view(b, -1, h, w), stats


def _loc_kernel(
    f_ptr, p_ptr, g_ptr, maps_ptr, lo_ptr, hi_ptr, score_ptr,
    P, C, N, scale,
    sf_b, sf_c, sf_n, sp_p, sp_c, sg_b, sg_c,
    BP: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    COSINE: tl.constexpr, HAS_GLOBAL: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (image, prompt block): dot products and channel norms in one read of the features."""
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BP + tl.arange(0, BP)
    p_ok = offs_p < P
    lo = tl.full([BP], float("inf"), tl.float32)
    hi = tl.full([BP], float("-inf"), tl.float32)
    out_rows = maps_ptr + b * P * N + offs_p[:, None] * N
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < N
        acc = tl.zeros([BP, BN], tl.float32)
        sq = tl.zeros([BN], tl.float32)
        for c0 in range(0, C, BC):
            offs_c = c0 + tl.arange(0, BC)
            c_ok = offs_c < C
            f = tl.load(
                f_ptr + b * sf_b + offs_c[:, None] * sf_c + offs_n[None, :] * sf_n,
                mask=c_ok[:, None] & n_ok[None, :], other=0.0,
            )  # fmt: skip
            p = tl.load(
                p_ptr + offs_p[:, None] * sp_p + offs_c[None, :] * sp_c,
                mask=p_ok[:, None] & c_ok[None, :], other=0.0,
            )  # fmt: skip
            acc += tl.dot(p, f, input_precision=PREC)
            if COSINE:
                f32 = f.to(tl.float32)
                sq += tl.sum(f32 * f32, axis=0)
        if COSINE:
            acc = acc / tl.maximum(tl.sqrt(sq), 1e-12)[None, :]
        acc = acc * scale
        ok = p_ok[:, None] & n_ok[None, :]
        tl.store(out_rows + offs_n[None, :], acc, mask=ok)
        lo = tl.minimum(lo, tl.min(tl.where(ok, acc, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(ok, acc, float("-inf")), axis=1))
    tl.store(lo_ptr + b * P + offs_p, lo, mask=p_ok)
    tl.store(hi_ptr + b * P + offs_p, hi, mask=p_ok)
    if NORMALIZE:
        factor = 2.0 / tl.maximum(hi - lo, 1e-12)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            ok = p_ok[:, None] & (offs_n < N)[None, :]
            raw = tl.load(out_rows + offs_n[None, :], mask=ok, other=0.0)
            tl.store(out_rows + offs_n[None, :], (raw - lo[:, None]) * factor[:, None] - 1.0, mask=ok)
    if HAS_GLOBAL:
        gp = tl.zeros([BP], tl.float32)
        pp = tl.zeros([BP], tl.float32)
        gg = tl.zeros([BC], tl.float32)
        for c0 in range(0, C, BC):
            offs_c = c0 + tl.arange(0, BC)
            c_ok = offs_c < C
            g = tl.load(g_ptr + b * sg_b + offs_c * sg_c, mask=c_ok, other=0.0).to(tl.float32)
            p = tl.load(
                p_ptr + offs_p[:, None] * sp_p + offs_c[None, :] * sp_c,
                mask=p_ok[:, None] & c_ok[None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            gp += tl.sum(p * g[None, :], axis=1)
            pp += tl.sum(p * p, axis=1)
            gg += g * g
        g_norm = tl.maximum(tl.sqrt(tl.sum(gg, axis=0)), 1e-12)
        score = gp / (g_norm * tl.maximum(tl.sqrt(pp), 1e-12))
        tl.store(score_ptr + b * P + offs_p, score, mask=p_ok)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _jit(interpret: bool) -> Any:
    # triton.jit reads TRITON_INTERPRET when it wraps the function: one kernel object per mode.
    del interpret
    return triton.jit(_loc_kernel)


def triton_localization(
    grid: Tensor,
    prompts: Tensor,
    mode: Mode = "dot",
    *,
    scale: float = 1.0,
    global_: Tensor | None = None,
    normalize: bool = False,
) -> tuple[Tensor, MapStats]:
    """The fused kernel (CUDA, or the CPU interpreter). Maps are float32."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use the torch path (AFLOC_KERNELS=torch)")
    _check(grid, prompts, mode, global_)
    b, c, h, w = grid.shape
    n = h * w
    x = grid.flatten(2)  # a view for contiguous and channels-last grids; the kernel takes any strides
    p = prompts.float()
    if mode == "cosine":
        p = F.normalize(p, dim=1, eps=NORM_EPS)
    p = p.to(x.dtype).contiguous()
    n_prompts = p.shape[0]
    maps = torch.empty(b, n_prompts, n, device=grid.device, dtype=torch.float32)
    lo = torch.empty(b, n_prompts, device=grid.device, dtype=torch.float32)
    hi = torch.empty_like(lo)
    scores = torch.empty_like(lo) if global_ is not None else None
    g = global_ if global_ is not None else lo
    bp = max(16, min(64, triton.next_power_of_2(n_prompts)))
    bn = 64 if n_prompts <= 16 else 32
    bc = 64
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _jit(interpreting())[(b, triton.cdiv(n_prompts, bp))](
        x, p, g, maps, lo, hi, scores if scores is not None else lo,
        n_prompts, c, n, float(scale),
        x.stride(0), x.stride(1), x.stride(2), p.stride(0), p.stride(1), g.stride(0), g.stride(-1),
        BP=bp, BN=bn, BC=bc, COSINE=mode == "cosine", HAS_GLOBAL=global_ is not None,
        NORMALIZE=normalize, PREC=prec, num_warps=4,
    )  # fmt: skip
    return maps.view(b, n_prompts, h, w), MapStats(lo, hi, scores)


__all__ = [
    "MapStats",
    "Mode",
    "minmax_signed",
    "reference_localization",
    "torch_localization",
    "triton_localization",
]
