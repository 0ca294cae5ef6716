"""Overlay PNGs for people: the radiograph, the heat map in colour, the prompt written on it."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from afloc_cli.atomic import write_atomic


def render_overlay(image_u8: np.ndarray, heat: np.ndarray, prompt: str, alpha: float = 0.45) -> np.ndarray:
    """image (H, W) uint8, heat (H, W) float (NaN allowed) -> BGR uint8 (H, W, 3)."""
    finite = np.isfinite(heat)
    norm = np.zeros_like(heat, dtype=np.float32)
    if finite.any():
        lo, hi = float(np.min(heat[finite])), float(np.max(heat[finite]))
        norm[finite] = (heat[finite] - lo) / (hi - lo) if hi > lo else 0.0
    colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    grey = cv2.cvtColor(image_u8, cv2.COLOR_GRAY2BGR)
    blended = np.where(finite[..., None], cv2.addWeighted(grey, 1 - alpha, colour, alpha, 0), grey)
    scale = max(image_u8.shape) / 1000.0
    thickness = max(1, int(round(2 * scale)))
    cv2.putText(blended, prompt[:80], (int(10 * scale) + 2, int(40 * scale) + 10), cv2.FONT_HERSHEY_SIMPLEX,
                max(0.4, scale), (255, 255, 255), thickness, cv2.LINE_AA)
    return blended


def overlay_name(image_path: str, index: int, prompt_index: int, prompt: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image_path).stem)[:60]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt.lower()).strip("-")[:40]
    return f"{index:06d}_{stem}__p{prompt_index:03d}_{slug}.png"


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode and write atomically, so an interrupted run never leaves a broken PNG."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_bytes(data.tobytes()))
