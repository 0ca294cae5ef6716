"""The localization readout (SPEC.md, "Heatmap protocol"), from a patch grid to pixels.

1. similarity of each grid cell with a prompt's report embedding (dot, or cosine), computed by
   `kernels.dispatch.localization_maps`;
2. Gaussian smoothing (sigma 1.5) on the grid itself, with scipy.ndimage's default
   "reflect" borders (d c b a | a b c d), as the reference;
3. bilinear upsampling (align_corners=False) to the square model frame;
4. optional NaN margin, then min-max to [-1, 1] over non-NaN pixels for metrics;
5. the letterbox undone to reach original pixels (`Letterbox.frame_to_original_map`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from afloc_cli.errors import AflocError
from afloc_cli.image.data.transforms import Letterbox


@lru_cache(maxsize=32)
def _gaussian_plan(n: int, sigma: float, truncate: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Kernel weights and reflected source indices for one axis of length n (scipy's rule)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    weights /= weights.sum()
    idx = np.arange(-radius, n + radius)
    period = 2 * n
    idx = np.mod(idx, period)
    idx = np.where(idx >= n, period - 1 - idx, idx)
    return weights, idx


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian over the last two axes, matching scipy.ndimage.gaussian_filter(mode='reflect')."""
    if sigma <= 0:
        return maps
    out = maps
    for axis in (-1, -2):
        n = out.shape[axis]
        weights, idx = _gaussian_plan(n, float(sigma))
        padded = out.index_select(axis, torch.as_tensor(idx, device=out.device))
        w = torch.as_tensor(weights, dtype=out.dtype, device=out.device)
        k = w.numel()
        moved = padded.movedim(axis, -1)
        windows = moved.unfold(-1, k, 1)  # (..., n, k)
        out = (windows * w).sum(-1).movedim(-1, axis)
    return out


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(..., g, g) -> (..., size, size), bilinear, align_corners=False."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, size, size)


def frame_maps(grid_maps: torch.Tensor, frame_size: int, sigma: float = 1.5, nan_margin: int = 0) -> torch.Tensor:
    """Raw grid maps (..., g, g) -> smoothed maps in the model frame (..., S, S), float32."""
    return nan_border(upsample(gaussian_smooth(grid_maps.float(), sigma), frame_size), nan_margin)


def nan_border(maps: torch.Tensor, margin: int) -> torch.Tensor:
    """A copy of maps (..., S, S) with a `margin`-pixel border set to NaN (the reference's --margin); 0 keeps all."""
    if margin <= 0:
        return maps
    maps = maps.clone()
    maps[..., :margin, :] = math.nan
    maps[..., -margin:, :] = math.nan
    maps[..., :, :margin] = math.nan
    maps[..., :, -margin:] = math.nan
    return maps


def original_map(
    grid_map: torch.Tensor, letterbox: Letterbox, sigma: float = 1.5, nan_margin: int = 0
) -> torch.Tensor:
    """A raw grid map (g, g) -> the map over the original image (H, W), rows and columns as stored."""
    return letterbox.frame_to_original_map(frame_maps(grid_map, letterbox.size, sigma, nan_margin))


def minmax_signed(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """Min-max to [-1, 1] over the non-NaN pixels of each map (last two axes); NaN stays NaN."""
    a = np.asarray(maps, dtype=np.float32)
    lo = np.nanmin(a, axis=(-2, -1), keepdims=True)
    hi = np.nanmax(a, axis=(-2, -1), keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (a - lo) / span * 2.0 - 1.0


CONTRAST_MODES = ("mean", "softmax")


def contrast_maps(maps: torch.Tensor, mode: str = "mean", temperature: float = 1.0) -> torch.Tensor:
    """The contrast readout: each prompt's raw grid against the other prompts' grids of the same image.

    `maps` is (P, g, g) or (B, P, g, g), raw similarities before smoothing; the result has the same shape.
    Why: a single prompt's map (the reference readout) is dominated by what every prompt shares (anatomy,
    image contrast), which a small budget never trains away; subtracting what the other findings see keeps
    what is specific to this one. "mean" (the default) is map_p - mean over q != p of map_q: linear, so it
    commutes with the smoothing and upsampling that follow and the min-max after it makes it free of the
    similarity's scale. "softmax" takes prompt p's channel of a per-pixel softmax over prompts at
    `temperature`; it depends on that scale, which raw dot-product maps do not fix.
    """
    if maps.dim() not in (3, 4):
        raise ValueError(f"contrast_maps wants (P, g, g) or (B, P, g, g), not {tuple(maps.shape)}")
    n = maps.shape[-3]
    if n < 2:
        raise AflocError("the contrast readout needs two or more prompts per image (it compares each prompt's map "
                         f"with the others'); got {n}: add prompts or use --readout reference")
    if mode == "mean":
        total = maps.sum(dim=-3, keepdim=True)
        return maps - (total - maps) / (n - 1)
    if mode == "softmax":
        return torch.softmax(maps / temperature, dim=-3)
    raise ValueError(f"unknown contrast mode {mode!r}; choose one of {', '.join(CONTRAST_MODES)}")
