"""Drawing synthetic frontal chest radiographs and their findings.

Conventions used throughout:
- intensities are display values in [0, 1], bright = dense (as MONOCHROME2 shows it);
- radiological orientation: the patient's right lung is on the image's left;
- anatomy is placed in normalised coordinates (u across, v down, both in [0, 1])
  so it scales with the detector; findings are sized in pixels so round things
  stay round whatever the aspect ratio.
Everything is vectorised numpy/OpenCV on float32 so a 640-px image takes a few
milliseconds. All randomness comes from the generators passed in, never from
global state, so an image is a pure function of its seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from afloc_cli.synth.kinds import SIDES

F32 = np.float32
BOX_THRESHOLD = 0.25  # a pixel belongs to a finding's box where its alpha is >= this fraction of the peak


@dataclass(frozen=True)
class Anatomy:
    """The normal chest of one image: every number the renderer needs, nothing random left."""

    height: int
    width: int
    lung_dx: float  # lung centre offset from the midline (fraction of width)
    lung_ax: float  # lung half-width (fraction of width)
    lung_ay: float  # lung half-height (fraction of height)
    lung_cy: float
    p_top: float  # superellipse exponents: rounded apex, squarer base
    p_bottom: float
    dome_right: float  # top of each hemidiaphragm (v)
    dome_left: float
    dome_drop: float  # how much lower the costophrenic angle sits than the dome top
    body_half: float
    heart_cx: float
    heart_cy: float
    heart_ax: float
    heart_ay: float
    heart_sx: float = 1.0  # enlargement factors; > 1 is cardiomegaly
    heart_sy: float = 1.0
    tissue: float = 0.42
    abdomen: float = 0.6
    lung_depth: float = 0.27
    mediastinum: float = 0.7
    rib_amp: float = 0.07
    rib_spacing: float = 0.065
    rib_slope: float = 0.1
    rib_curve: float = 0.35
    vessel_amp: float = 0.08
    gastric_bubble: bool = True
    gamma: float = 1.0
    noise_sigma: float = 0.012
    texture_seed: int = 0  # lung markings, soft-tissue mottling
    noise_seed: int = 0  # quantum noise and exposure variation


@dataclass(frozen=True)
class Finding:
    """One drawn abnormality. Geometry is in pixels; its meaning depends on the kind.

    opacity/consolidation/nodule/atelectasis: an ellipse (cx, cy, rx, ry, angle);
    pleural_effusion: cy = fluid level at the medial side, ry = meniscus rise laterally;
    pneumothorax: depth = rim thickness as a fraction of the lung radius, cy = lowest extent;
    cardiomegaly: rx, ry = horizontal and vertical heart enlargement factors.
    """

    kind: str
    side: str | None
    zone: str | None
    severity: str  # "small"/"moderate"/"large" or "mild"/"moderate"/"severe"; "" where size is not graded
    cx: float = 0.0
    cy: float = 0.0
    rx: float = 0.0
    ry: float = 0.0
    angle: float = 0.0
    amount: float = 0.0  # strength of the density change
    depth: float = 0.0
    seed: int = 0  # texture of this finding


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    @property
    def min_side(self) -> int:
        return min(self.w, self.h)


@dataclass
class Scene:
    """The normal chest before findings and noise, with the masks findings are drawn into."""

    anatomy: Anatomy
    image: np.ndarray  # float32 HxW
    lung: dict[str, np.ndarray]  # per side: lung field without mediastinum or heart (soft mask)
    lung_raw: dict[str, np.ndarray]  # per side: lung outline before mediastinum/heart are cut out
    heart: np.ndarray  # soft mask of the visible heart
    vessels: np.ndarray  # the lung-marking layer already added to `image`
    lung_box: dict[str, Box]  # per side: bounding box of the visible lung field


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: float) -> np.ndarray:
    """Band-limited noise, roughly unit variance, with `cells` blobs along the longer side."""
    long_side = max(height, width)
    gh = max(2, round(cells * height / long_side) + 2)
    gw = max(2, round(cells * width / long_side) + 2)
    grid = rng.standard_normal((gh, gw), dtype=F32)
    out = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return out


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    u = ((np.arange(width, dtype=F32) + 0.5) / width)[None, :]
    v = ((np.arange(height, dtype=F32) + 0.5) / height)[:, None]
    return u, v


def _mask_box(mask: np.ndarray, threshold: float) -> Box | None:
    rows = np.flatnonzero((mask >= threshold).any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero((mask[rows[0] : rows[-1] + 1] >= threshold).any(axis=0))
    return Box(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


def _lung_center(anat: Anatomy, side: str) -> float:
    return 0.5 - anat.lung_dx if side == "right" else 0.5 + anat.lung_dx


def _superellipse(anat: Anatomy, side: str, u: np.ndarray, v: np.ndarray, grow: float = 1.0) -> np.ndarray:
    """The lung's superellipse field f: < 1 inside. Rounded at the apex, squarer at the base."""
    cx = _lung_center(anat, side)
    p = np.where(v < anat.lung_cy, F32(anat.p_top), F32(anat.p_bottom)).astype(F32)
    fx = np.abs((u - cx) / (anat.lung_ax * grow)) ** p
    fy = np.abs((v - anat.lung_cy) / (anat.lung_ay * grow)) ** p
    return fx + fy


def _dome(anat: Anatomy, u: np.ndarray) -> np.ndarray:
    """The diaphragm line (v) as a function of u: two domes, lower at the costophrenic angles."""
    right = anat.dome_right + anat.dome_drop * ((u - (0.5 - anat.lung_dx * 0.9)) / anat.lung_ax) ** 2
    left = anat.dome_left + anat.dome_drop * ((u - (0.5 + anat.lung_dx * 0.9)) / anat.lung_ax) ** 2
    return np.where(u < 0.5, right, left).astype(F32)


def render_anatomy(anat: Anatomy) -> Scene:
    """The normal chest of `anat` (with the heart scaled by heart_sx/heart_sy).

    Drawn at half resolution and upsampled: the anatomy is smooth, this is four
    times cheaper, and grain comes from the full-resolution noise added later.
    """
    full_h, full_w = anat.height, anat.width
    h, w = max(2, (full_h + 1) // 2), max(2, (full_w + 1) // 2)
    u, v = _grid(h, w)
    trng = np.random.default_rng(anat.texture_seed)
    du = abs(u - 0.5)

    # Body and soft tissue; thicker tissue laterally and towards the abdomen.
    neck = 0.11
    half = neck + (anat.body_half - neck) * smoothstep((v + 0.03) / 0.1)
    body = np.clip((half - du) / 0.02, 0.0, 1.0)
    tissue = anat.tissue + 0.12 * (du / anat.body_half) ** 4 + 0.05 * v
    tissue = tissue + 0.025 * smooth_noise(trng, h, w, 5)
    img = 0.03 + body * (tissue - 0.03)

    # Abdomen below the hemidiaphragms.
    dome = _dome(anat, u)
    abdomen = np.clip((v - dome) / 0.012, 0.0, 1.0) * body
    img += abdomen * (anat.abdomen - img)

    # Lungs, cut by the diaphragm.
    below_dome = np.clip((dome - v) / 0.01, 0.0, 1.0)
    lung_raw: dict[str, np.ndarray] = {}
    for side in SIDES:
        f = _superellipse(anat, side, u, v)
        lung_raw[side] = np.clip((1.0 - f) / 0.12, 0.0, 1.0) * below_dome
    lungs = lung_raw["right"] + lung_raw["left"]
    lung_tex = 0.85 + 0.15 * smooth_noise(trng, h, w, 4)
    img -= anat.lung_depth * lungs * lung_tex

    # Gastric bubble under the left hemidiaphragm.
    if anat.gastric_bubble:
        gx, gy = 0.5 + anat.lung_dx * 1.05, anat.dome_left + 0.05
        g = ((u - gx) / 0.055) ** 2 + ((v - gy) / 0.03) ** 2
        img -= 0.2 * np.clip((1.0 - g) / 0.3, 0.0, 1.0) * abdomen

    # Mediastinum, aortic knob and heart, drawn over the medial lungs.
    mw = 0.045 + 0.03 * smoothstep((v - 0.15) / 0.3)
    medi = np.clip((mw - du) / 0.01, 0.0, 1.0) * np.clip((0.86 - v) / 0.02, 0.0, 1.0)
    knob = ((u - (0.5 + 0.055)) / 0.035) ** 2 + ((v - 0.3) / 0.03) ** 2
    medi = np.maximum(medi, np.clip((1.0 - knob) / 0.25, 0.0, 1.0))
    ax, ay = anat.heart_ax * anat.heart_sx, anat.heart_ay * anat.heart_sy
    hcx = anat.heart_cx + (anat.heart_sx - 1.0) * 0.25 * anat.heart_ax  # an enlarged heart grows to the left
    e = ((u - hcx) / ax) ** 2 + ((v - anat.heart_cy) / ay) ** 2
    heart = np.clip((1.0 - e) / 0.06, 0.0, 1.0) * np.clip((dome + 0.01 - v) / 0.012, 0.0, 1.0)
    cover = np.maximum(medi, heart)
    img += 0.92 * cover * (anat.mediastinum - img)

    # Spine and trachea, seen through the mediastinum.
    spine = np.clip((0.035 - du) / 0.008, 0.0, 1.0) * body
    img += spine * (0.04 + 0.02 * np.cos(2 * math.pi * v / 0.045))
    trachea = np.clip((0.016 - du) / 0.006, 0.0, 1.0) * np.clip((0.33 - v) / 0.03, 0.0, 1.0)
    img -= 0.12 * trachea

    # Ribs (posterior, then fainter anterior) over the thorax.
    thorax = np.zeros((h, w), dtype=F32)
    for side in SIDES:
        thorax += np.clip((1.0 - _superellipse(anat, side, u, v, grow=1.12)) / 0.15, 0.0, 1.0)
    post = (v + anat.rib_slope * du - anat.rib_curve * du * du) / anat.rib_spacing
    ribs = np.clip((np.cos(2 * math.pi * post) - 0.3) / 0.45, 0.0, 1.0)
    ant = (v - 0.45 * du + 0.4 * du * du) / (anat.rib_spacing * 1.5)
    ribs += 0.4 * np.clip((np.cos(2 * math.pi * ant) - 0.5) / 0.4, 0.0, 1.0)
    img += anat.rib_amp * ribs * np.clip(thorax, 0.0, 1.0)

    # Clavicles.
    clav = np.zeros((h, w), dtype=F32)
    thick = max(1, round(0.022 * h))
    for sign in (-1, 1):
        p0 = (round(w * (0.5 + sign * 0.05)), round(h * 0.14))
        p1 = (round(w * (0.5 + sign * 0.38)), round(h * 0.075))
        cv2.line(clav, p0, p1, 1.0, thick, lineType=cv2.LINE_AA)
    clav = cv2.GaussianBlur(clav, (0, 0), max(1.0, thick / 3))
    img += 0.16 * clav * body

    # Visible lung fields and their markings (vessels fan out from the hila).
    lung: dict[str, np.ndarray] = {}
    for side in SIDES:
        lung[side] = lung_raw[side] * (1.0 - cover)
    vessels = np.zeros((h, w), dtype=F32)
    for side in SIDES:
        vessels += _markings(anat, side, u, v, trng) * lung[side]
    vessels *= anat.vessel_amp
    img += vessels

    def up(a: np.ndarray) -> np.ndarray:
        return cv2.resize(np.ascontiguousarray(a, dtype=F32), (full_w, full_h), interpolation=cv2.INTER_LINEAR)

    lung = {side: up(m) for side, m in lung.items()}
    lung_raw = {side: up(m) for side, m in lung_raw.items()}
    boxes: dict[str, Box] = {}
    for side in SIDES:
        box = _mask_box(lung[side], 0.5)
        if box is None:  # pragma: no cover - the sampled anatomy always has lungs
            raise ValueError("anatomy without a visible lung")
        boxes[side] = box
    return Scene(anat, up(img), lung, lung_raw, up(heart), up(vessels), boxes)


def _markings(anat: Anatomy, side: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vessel-like lines radiating from the hilum, thinning and fading towards the periphery.

    Noise is laid out in (angle, radius) around the hilum: many cells across the
    angle, few along the radius, so its zero crossings run outwards like vessels.
    """
    h, w = anat.height, anat.width
    hx = 0.5 - anat.lung_dx * 0.5 if side == "right" else 0.5 + anat.lung_dx * 0.5
    hy = anat.lung_cy - 0.02
    dx = (u - hx) * (w / max(h, w))
    dy = (v - hy) * (h / max(h, w))
    radius = np.sqrt(dx * dx + dy * dy).astype(F32)
    theta = np.arctan2(dy, dx).astype(F32)
    n_ang, n_rad = 72, 6
    core = rng.standard_normal((n_rad, n_ang), dtype=F32)
    grid = np.concatenate([core[:, -2:], core, core[:, :3]], axis=1)  # wraps around the circle
    map_x = ((theta + math.pi) / (2 * math.pi) * n_ang + 2.0).astype(F32)
    map_y = np.clip(radius / 0.45 * (n_rad - 1), 0, n_rad - 1).astype(F32)
    noise = cv2.remap(grid, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    width = 0.1 + 0.12 * np.exp(-radius / 0.12)  # thicker near the hilum
    ridges = np.exp(-((noise / width) ** 2))
    fade = smoothstep(radius / 0.08)  # no lines in the hilum itself, where they would crowd into specks
    return (ridges * fade * (0.3 + 0.7 * np.exp(-radius / 0.2))).astype(F32)


# ---------------------------------------------------------------- findings


def _window(cx: float, cy: float, radius: float, h: int, w: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """A square window around a centre, with pixel-centre coordinates, so findings cost little."""
    x0, x1 = max(0, math.floor(cx - radius)), min(w, math.ceil(cx + radius) + 1)
    y0, y1 = max(0, math.floor(cy - radius)), min(h, math.ceil(cy + radius) + 1)
    xs = np.arange(x0, x1, dtype=F32)[None, :] + 0.5
    ys = np.arange(y0, y1, dtype=F32)[:, None] + 0.5
    return slice(y0, y1), slice(x0, x1), xs, ys


def _ellipse_radius(f: Finding, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised radius of the finding's rotated ellipse, and the rotated coordinates."""
    c, s = math.cos(math.radians(f.angle)), math.sin(math.radians(f.angle))
    dx, dy = xs - f.cx, ys - f.cy
    xr = (dx * c + dy * s) / f.rx
    yr = (-dx * s + dy * c) / f.ry
    return np.sqrt(xr * xr + yr * yr), xr, yr


def _blob_alpha(f: Finding, scene: Scene, roughness: float, softness: float, patchiness: float) -> np.ndarray:
    h, w = scene.anatomy.height, scene.anatomy.width
    rng = np.random.default_rng(f.seed)
    sy, sx, xs, ys = _window(f.cx, f.cy, max(f.rx, f.ry) * 1.35, h, w)
    wh, ww = ys.shape[0], xs.shape[1]
    r, _, _ = _ellipse_radius(f, xs, ys)
    r = r * (1.0 + roughness * smooth_noise(rng, wh, ww, 5))
    a = smoothstep((1.0 - r) / softness)
    if patchiness > 0:
        a *= 1.0 - patchiness + patchiness * np.clip(0.5 + 0.5 * smooth_noise(rng, wh, ww, 9), 0.0, 1.0)
    alpha = np.zeros((h, w), dtype=F32)
    alpha[sy, sx] = a * np.clip(scene.lung[f.side][sy, sx] * 1.5, 0.0, 1.0)  # type: ignore[index]
    return alpha


def _effusion_alpha(f: Finding, scene: Scene) -> np.ndarray:
    h, w = scene.anatomy.height, scene.anatomy.width
    lb = scene.lung_box[f.side]  # type: ignore[index]
    y0 = max(0, math.floor(f.cy - f.ry) - 8)
    sy, sx = slice(y0, lb.y + lb.h), slice(lb.x, lb.x + lb.w)
    xs = np.arange(lb.x, lb.x + lb.w, dtype=F32)[None, :] + 0.5
    ys = np.arange(y0, lb.y + lb.h, dtype=F32)[:, None] + 0.5
    if f.side == "right":  # medial edge is on the image's right for the patient's right lung
        lateral = np.clip((lb.x + lb.w - xs) / lb.w, 0.0, 1.0)
    else:
        lateral = np.clip((xs - lb.x) / lb.w, 0.0, 1.0)
    level = f.cy - f.ry * lateral * lateral
    edge = max(3.0, 0.012 * h)
    a = smoothstep((ys - level) / edge) * (0.8 + 0.2 * smoothstep((ys - level) / (0.12 * h)))
    alpha = np.zeros((h, w), dtype=F32)
    alpha[sy, sx] = a * np.clip(scene.lung[f.side][sy, sx] * 1.5, 0.0, 1.0)  # type: ignore[index]
    return alpha


def _pneumothorax_fields(f: Finding, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The air rim between chest wall and collapsed lung, and the visceral pleural line."""
    anat = scene.anatomy
    h, w = anat.height, anat.width
    u, v = _grid(h, w)
    side = f.side or "right"
    fld = _superellipse(anat, side, u, v)
    p = np.where(v < anat.lung_cy, F32(anat.p_top), F32(anat.p_bottom)).astype(F32)
    rn = np.power(np.maximum(fld, 1e-6), 1.0 / p)  # ~ fraction of the way from centre to wall
    inner = 1.0 - f.depth
    lower = smoothstep((f.cy / h - v) / 0.03)
    lung = np.clip(scene.lung[side] * 1.5, 0.0, 1.0) * lower
    rim = smoothstep((rn - inner) / 0.02) * lung
    line = np.exp(-(((rn - inner) / 0.006) ** 2)) * lung
    return rim.astype(F32), line.astype(F32)


def finding_alpha(f: Finding, scene: Scene) -> np.ndarray:
    """Where the finding is, as a soft mask over the whole image (its box comes from this)."""
    if f.kind == "lung_opacity":
        return _blob_alpha(f, scene, roughness=0.22, softness=0.4, patchiness=0.45)
    if f.kind == "consolidation":
        return _blob_alpha(f, scene, roughness=0.15, softness=0.18, patchiness=0.12)
    if f.kind == "nodule":
        edge = max(2.5, 0.08 * f.rx)
        return _blob_alpha(f, scene, roughness=0.05, softness=edge / f.rx, patchiness=0.0)
    if f.kind == "atelectasis":
        return _blob_alpha(f, scene, roughness=0.12, softness=0.3, patchiness=0.0)
    if f.kind == "pleural_effusion":
        return _effusion_alpha(f, scene)
    if f.kind == "pneumothorax":
        return _pneumothorax_fields(f, scene)[0]
    if f.kind == "cardiomegaly":
        return scene.heart
    raise ValueError(f"unknown finding kind {f.kind!r}")


def finding_box(alpha: np.ndarray) -> Box | None:
    peak = float(alpha.max())
    if peak <= 0.05:
        return None
    return _mask_box(alpha, BOX_THRESHOLD * peak)


def _toward(img: np.ndarray, alpha: np.ndarray, amount: float, target: float) -> None:
    """Add density: move intensities toward a soft-tissue level, never darker."""
    img += amount * alpha * np.maximum(target - img, 0.0)


def apply_finding(img: np.ndarray, f: Finding, alpha: np.ndarray, scene: Scene) -> None:
    """Draw `f` into `img` (in place). Cardiomegaly is already in the anatomy."""
    if f.kind == "lung_opacity":
        _toward(img, alpha, f.amount, 0.6)
    elif f.kind == "consolidation":
        _toward(img, alpha, f.amount, 0.66)
        img -= 0.1 * alpha * _bronchograms(f, scene)
    elif f.kind == "nodule":
        _toward(img, alpha, f.amount, 0.7)
    elif f.kind == "atelectasis":
        _, xr, yr = _ellipse_radius(f, *_grid_px(img))
        streaks = (0.85 + 0.15 * np.cos(2 * math.pi * yr * 2.2)).astype(F32)
        _toward(img, alpha * streaks, f.amount, 0.6)
    elif f.kind == "pleural_effusion":
        _toward(img, alpha, f.amount, 0.6)
    elif f.kind == "pneumothorax":
        rim, line = _pneumothorax_fields(f, scene)
        img -= rim * (scene.vessels + f.amount)
        img += 0.12 * line * (1.0 - 0.5 * rim)
    elif f.kind != "cardiomegaly":
        raise ValueError(f"unknown finding kind {f.kind!r}")


def _grid_px(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape
    return np.arange(w, dtype=F32)[None, :] + 0.5, np.arange(h, dtype=F32)[:, None] + 0.5


def _bronchograms(f: Finding, scene: Scene) -> np.ndarray:
    """Dark branching air-filled bronchi inside a consolidation."""
    h, w = scene.anatomy.height, scene.anatomy.width
    rng = np.random.default_rng([f.seed, 1])
    canvas = np.zeros((h, w), dtype=F32)
    thick = max(1, round(0.008 * max(h, w)))
    toward_hilum = 1.0 if f.side == "right" else -1.0
    for _ in range(3):
        x, y = f.cx + rng.uniform(-0.3, 0.3) * f.rx, f.cy + rng.uniform(-0.3, 0.3) * f.ry
        ang = math.atan2(rng.uniform(-0.5, 0.5), toward_hilum)
        pts = [(x, y)]
        for _ in range(3):
            step = rng.uniform(0.25, 0.4) * f.rx
            ang += rng.uniform(-0.5, 0.5)
            x, y = x - step * math.cos(ang), y - step * math.sin(ang)
            pts.append((x, y))
        cv2.polylines(canvas, [np.round(np.array(pts)).astype(np.int32)], False, 1.0, thick, cv2.LINE_AA)
    return cv2.GaussianBlur(canvas, (0, 0), 0.8)


def finish(img: np.ndarray, anat: Anatomy) -> np.ndarray:
    """Exposure, contrast and quantum noise; the same for an image with or without findings."""
    rng = np.random.default_rng(anat.noise_seed)
    h, w = img.shape
    exposure = 1.0 + 0.05 * smooth_noise(rng, h, w, 3)
    out = np.clip(img, 0.0, 1.0) ** F32(anat.gamma) * exposure
    out += anat.noise_sigma * rng.standard_normal((h, w), dtype=F32)
    return np.clip(out, 0.0, 1.0).astype(F32)


@dataclass
class Rendered:
    image: np.ndarray  # float32 HxW in [0, 1]
    boxes: list[Box]  # one per finding, same order
    scene: Scene


def compose(scene: Scene, findings: list[Finding], alphas: list[np.ndarray]) -> np.ndarray:
    """Draw the findings (with their precomputed alphas) into the scene and finish the image."""
    img = scene.image.copy()
    for f, alpha in zip(findings, alphas, strict=True):
        apply_finding(img, f, alpha, scene)
    return finish(img, scene.anatomy)


def with_heart(anat: Anatomy, findings: tuple[Finding, ...] | list[Finding]) -> Anatomy:
    """The anatomy as drawn: cardiomegaly is an enlarged heart, not an overlay."""
    for f in findings:
        if f.kind == "cardiomegaly":
            return replace(anat, heart_sx=f.rx, heart_sy=f.ry)
    return anat


def render(anat: Anatomy, findings: tuple[Finding, ...] | list[Finding], with_findings: bool = True) -> Rendered:
    """The radiograph with (or, for checking the truth, without) its findings."""
    drawn = list(findings) if with_findings else []
    scene = render_anatomy(with_heart(anat, drawn))
    alphas = [finding_alpha(f, scene) for f in drawn]
    boxes: list[Box] = []
    for f, alpha in zip(drawn, alphas, strict=True):
        box = finding_box(alpha)
        if box is None:
            raise ValueError(f"finding {f.kind} drew nothing")
        boxes.append(box)
    return Rendered(compose(scene, drawn, alphas), boxes, scene)
