"""Random choices for one synthetic case: image size, anatomy, findings and where they go.

Findings are sized so their box is at least MIN_BOX_FRACTION of the image's long
side: after letterboxing to 224 px that is about two cells of the 19x19 grid the
model localizes on; anything smaller could not be found by construction.
"""

from __future__ import annotations

import numpy as np

from afloc_cli.synth.kinds import KIND_BY_KEY, SIDES
from afloc_cli.synth.render import Anatomy, Box, Finding, Scene, finding_alpha, finding_box

MIN_BOX_FRACTION = 0.11
MAX_ATTEMPTS = 12
ZONE_INDEX = {"upper": 0, "middle": 1, "lower": 2}


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**63 - 1))


def sample_size(rng: np.random.Generator, min_side: int = 256, max_side: int = 640) -> tuple[int, int]:
    """(height, width): mostly portrait, some landscape, aspect within 0.8-1 short/long."""
    long_side = int(rng.integers(max(min_side, 320), max_side + 1))
    short_side = max(min_side, round(long_side * _u(rng, 0.8, 1.0)))
    return (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)


def sample_anatomy(rng: np.random.Generator, height: int, width: int) -> Anatomy:
    dome_right = _u(rng, 0.64, 0.69)
    dome_left = dome_right + _u(rng, 0.0, 0.035)
    return Anatomy(
        height=height,
        width=width,
        lung_dx=_u(rng, 0.195, 0.225),
        lung_ax=_u(rng, 0.16, 0.185),
        lung_ay=_u(rng, 0.30, 0.335),
        lung_cy=_u(rng, 0.44, 0.475),
        p_top=_u(rng, 1.8, 2.3),
        p_bottom=_u(rng, 3.0, 4.0),
        dome_right=dome_right,
        dome_left=dome_left,
        dome_drop=_u(rng, 0.07, 0.1),
        body_half=_u(rng, 0.42, 0.49),
        heart_cx=0.5 + _u(rng, 0.025, 0.05),
        heart_cy=dome_left - _u(rng, 0.0, 0.03),
        heart_ax=_u(rng, 0.12, 0.14),
        heart_ay=_u(rng, 0.12, 0.15),
        tissue=_u(rng, 0.36, 0.46),
        abdomen=_u(rng, 0.55, 0.66),
        lung_depth=_u(rng, 0.22, 0.3),
        mediastinum=_u(rng, 0.64, 0.76),
        rib_amp=_u(rng, 0.05, 0.09),
        rib_spacing=_u(rng, 0.058, 0.072),
        rib_slope=_u(rng, 0.15, 0.3),
        rib_curve=_u(rng, 0.9, 1.3),
        vessel_amp=_u(rng, 0.06, 0.1),
        gastric_bubble=bool(rng.random() < 0.7),
        gamma=_u(rng, 0.8, 1.25),
        noise_sigma=_u(rng, 0.006, 0.02),
        texture_seed=_seed(rng),
        noise_seed=_seed(rng),
    )


def assign_places(rng: np.random.Generator, kinds: list[str]) -> list[tuple[str | None, str | None]] | None:
    """A (side, zone) per kind with no two findings in the same lung zone; None if impossible."""
    for _ in range(20):
        used: set[tuple[str, str]] = set()
        places: list[tuple[str | None, str | None]] = []
        for key in kinds:
            kind = KIND_BY_KEY[key]
            if not kind.sided:
                places.append((None, None))
                continue
            side = SIDES[int(rng.integers(2))]
            zone = kind.zones[int(rng.integers(len(kind.zones)))]
            if (side, zone) in used:
                break
            used.add((side, zone))
            places.append((side, zone))
        else:
            return places
    return None


def cardiomegaly(rng: np.random.Generator) -> Finding:
    severity = ("mild", "moderate", "severe")[int(rng.integers(3))]
    lo, hi = {"mild": (1.22, 1.32), "moderate": (1.32, 1.45), "severe": (1.45, 1.6)}[severity]
    sx = _u(rng, lo, hi)
    return Finding("cardiomegaly", None, None, severity, rx=sx, ry=1.0 + (sx - 1.0) * _u(rng, 0.3, 0.5))


def _candidate(rng: np.random.Generator, kind: str, side: str, zone: str, scene: Scene, grow: float) -> Finding:
    anat = scene.anatomy
    h, w = anat.height, anat.width
    long_side = max(h, w)
    lb = scene.lung_box[side]
    band = lb.h / 3.0
    zone_top = lb.y + ZONE_INDEX[zone] * band
    cy = zone_top + _u(rng, 0.4, 0.6) * band
    seed = _seed(rng)
    if kind in ("lung_opacity", "consolidation"):
        lo, hi = (0.09, 0.13) if kind == "lung_opacity" else (0.1, 0.14)
        rx = _u(rng, lo, hi) * long_side * grow
        amount = _u(rng, 0.55, 0.85) if kind == "lung_opacity" else _u(rng, 0.75, 0.92)
        return Finding(
            kind, side, zone, "", lb.x + _u(rng, 0.35, 0.65) * lb.w, cy, rx, rx * _u(rng, 0.8, 1.2),
            _u(rng, 0.0, 180.0), amount, seed=seed,
        )  # fmt: skip
    if kind == "nodule":
        r = _u(rng, 0.068, 0.085) * long_side * grow
        margin = min(r * 1.1, lb.w / 2)
        cx = _u(rng, lb.x + margin, lb.x + lb.w - margin)
        return Finding(kind, side, zone, "", cx, cy, r, r * _u(rng, 0.92, 1.08), 0.0, _u(rng, 0.45, 0.7), seed=seed)
    if kind == "atelectasis":
        tilt = _u(rng, 20.0, 40.0)
        angle = tilt if side == "left" else 180.0 - tilt
        rx = _u(rng, 0.11, 0.14) * long_side * grow
        ry = _u(rng, 0.045, 0.06) * long_side * grow
        cx = lb.x + _u(rng, 0.4, 0.6) * lb.w
        return Finding(kind, side, zone, "", cx, cy, rx, ry, angle, _u(rng, 0.55, 0.8), seed=seed)
    if kind == "pleural_effusion":
        severity = ("small", "moderate", "large")[int(rng.integers(3))]
        lo, hi = {"small": (0.22, 0.28), "moderate": (0.32, 0.42), "large": (0.45, 0.58)}[severity]
        frac = min(0.75, _u(rng, lo, hi) * grow)
        level = lb.y + lb.h * (1.0 - frac)
        return Finding(kind, side, zone, severity, 0.0, level, 0.0, _u(rng, 0.04, 0.08) * h, amount=_u(rng, 0.85, 0.95))
    if kind == "pneumothorax":
        severity = ("small", "moderate", "large")[int(rng.integers(3))]
        lo, hi = {"small": (0.12, 0.16), "moderate": (0.18, 0.24), "large": (0.26, 0.34)}[severity]
        depth = min(0.45, _u(rng, lo, hi) * grow)
        lowest = lb.y + lb.h * min(0.85, _u(rng, 0.35, 0.6) * grow)
        return Finding(kind, side, zone, severity, cy=lowest, amount=_u(rng, 0.06, 0.1), depth=depth, seed=seed)
    raise ValueError(f"unknown sided kind {kind!r}")


def _side_ok(box: Box, side: str, width: int) -> bool:
    centre = box.x + box.w / 2
    return centre < width / 2 if side == "right" else centre > width / 2


def sample_finding(
    rng: np.random.Generator, kind: str, side: str, zone: str, scene: Scene
) -> tuple[Finding, np.ndarray, Box]:
    """A finding of `kind` at (side, zone) whose drawn box is big enough; grows it until it is."""
    anat = scene.anatomy
    min_px = MIN_BOX_FRACTION * max(anat.height, anat.width)
    best: tuple[Finding, np.ndarray, Box] | None = None
    for attempt in range(MAX_ATTEMPTS):
        f = _candidate(rng, kind, side, zone, scene, grow=1.0 + 0.1 * attempt)
        alpha = finding_alpha(f, scene)
        box = finding_box(alpha)
        if box is None or not _side_ok(box, side, anat.width):
            continue
        if box.min_side >= min_px:
            return f, alpha, box
        if best is None or box.min_side > best[2].min_side:
            best = (f, alpha, box)
    if best is None:  # pragma: no cover - never seen with the sampled anatomy
        raise RuntimeError(f"could not place {kind} at {side} {zone}")
    return best
