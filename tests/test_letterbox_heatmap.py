"""Letterbox geometry and the heatmap readout (smoothing as scipy, upsampling, undoing the letterbox)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from afloc_cli.image.data.transforms import Letterbox, normalize
from afloc_cli.vlp.heatmap import frame_maps, gaussian_smooth, minmax_signed, original_map
from kernels.dispatch import localization_maps


def _reference_resize(img: np.ndarray, scale: int) -> np.ndarray:
    """The reference's letterbox, re-derived from its description (truncate, INTER_AREA, floor/ceil pad)."""
    h, w = img.shape
    if h >= w:
        size = (scale, int(float(w) * (scale / float(h))))
    else:
        size = (int(float(h) * (scale / float(w))), scale)
    resized = cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA)
    if h >= w:
        pad = scale - resized.shape[1]
        return np.pad(resized, [(0, 0), (pad // 2, pad - pad // 2)])
    pad = scale - resized.shape[0]
    return np.pad(resized, [(pad // 2, pad - pad // 2), (0, 0)])


@given(h=st.integers(20, 700), w=st.integers(20, 700))
@settings(max_examples=40, deadline=None)
def test_letterbox_matches_reference(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    img = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    lb = Letterbox.for_shape(h, w, 224)
    np.testing.assert_array_equal(lb.apply(img), _reference_resize(img, 224))


@given(h=st.integers(10, 2000), w=st.integers(10, 2000), fx=st.floats(0, 1), fy=st.floats(0, 1))
@settings(max_examples=80, deadline=None)
def test_point_mapping_roundtrip(h, w, fx, fy):
    lb = Letterbox.for_shape(h, w, 224)
    x, y = fx * w, fy * h
    fxm, fym = lb.original_to_frame(x, y)
    assert -1e-6 <= fxm - lb.pad_left <= lb.resized_width + 1e-6
    assert -1e-6 <= fym - lb.pad_top <= lb.resized_height + 1e-6
    bx, by = lb.frame_to_original(fxm, fym)
    assert bx == pytest.approx(x, abs=1e-6) and by == pytest.approx(y, abs=1e-6)


def test_normalize_to_minus_one_one_three_channels():
    frame = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    x = normalize(frame)
    assert x.shape == (3, 2, 2)
    assert x.min() == -1 and x.max() == 1
    torch.testing.assert_close(x[0], x[2])


@pytest.mark.parametrize("n", [3, 7, 14, 19, 38])
def test_gaussian_smoothing_equals_scipy(n):
    rng = np.random.default_rng(n)
    grid = rng.normal(size=(2, 3, n, n))
    ours = gaussian_smooth(torch.as_tensor(grid), 1.5).numpy()
    for b in range(2):
        for p in range(3):
            np.testing.assert_allclose(ours[b, p], gaussian_filter(grid[b, p], sigma=1.5), atol=1e-10)


def test_similarity_dot_and_cosine():
    grid = torch.randn(2, 8, 5, 5)
    prompts = torch.randn(3, 8)
    dot, _ = localization_maps(grid, prompts, "dot")
    assert dot.shape == (2, 3, 5, 5)
    torch.testing.assert_close(dot[1, 2, 4, 0], (grid[1, :, 4, 0] * prompts[2]).sum())
    cos, _ = localization_maps(grid, prompts, "cosine")
    assert cos.abs().max() <= 1 + 1e-6


def test_nan_margin_and_minmax():
    maps = frame_maps(torch.randn(1, 19, 19), 224, nan_margin=14)
    assert torch.isnan(maps[0, :14]).all() and torch.isnan(maps[0, :, -14:]).all()
    assert not torch.isnan(maps[0, 14:-14, 14:-14]).any()
    norm = minmax_signed(maps)
    assert np.nanmin(norm) == pytest.approx(-1) and np.nanmax(norm) == pytest.approx(1)


def test_original_map_orientation_non_square():
    """A peak in the frame lands at the right original (row, col) of a wide image; never transposed."""
    h, w = 300, 600
    lb = Letterbox.for_shape(h, w, 224)
    # Put a single hot cell in a 19x19 grid, at the frame position of original pixel (row 75, col 450).
    fx, fy = lb.original_to_frame(450.0, 75.0)
    cell = 224 / 19
    grid = torch.zeros(19, 19)
    grid[int(fy // cell), int(fx // cell)] = 1.0
    out = original_map(grid, lb)
    assert out.shape == (h, w)
    r, c = np.unravel_index(int(torch.argmax(out)), out.shape)
    assert abs(r - 75) <= 32 and abs(c - 450) <= 32


def _reference_box_mask(box: tuple[float, float, float, float], h: int, w: int, size: int) -> np.ndarray:
    """The reference's box_mapping + box2mask, written out: every value times size / long side, the
    centred padding (floor before) added to the corner, then floored; the box filled from its corner."""
    pct = size / float(max(h, w))
    if h >= w:
        top, left = 0, (size - int(w * pct)) // 2
    else:
        top, left = (size - int(h * pct)) // 2, 0
    x, y, bw, bh = (v * pct for v in box)
    x0, y0 = int(np.floor(x + left)), int(np.floor(y + top))
    out = np.zeros((size, size), dtype=bool)
    out[y0 : y0 + int(np.floor(bh)), x0 : x0 + int(np.floor(bw))] = True
    return out


@settings(max_examples=200, deadline=None)
@given(st.integers(40, 3000), st.integers(40, 3000), st.floats(0, 0.95), st.floats(0, 0.95),
       st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.sampled_from([160, 224]))
def test_boxes_enter_the_frame_as_the_reference_maps_them(h, w, fx, fy, fw, fh, size):
    x, y = fx * w, fy * h
    box = (x, y, fw * (w - x), fh * (h - y))
    lb = Letterbox.for_shape(h, w, size)
    np.testing.assert_array_equal(lb.boxes_to_frame_mask([box]), _reference_box_mask(box, h, w, size))


def test_any_coverage_keeps_what_half_coverage_drops():
    lb = Letterbox.for_shape(1000, 800, 224)
    mask = np.zeros((1000, 800), dtype=bool)
    mask[500, 400] = True  # one original pixel: about 0.05 of a frame pixel
    assert not lb.original_mask_to_frame(mask).any()
    assert lb.original_mask_to_frame(mask, any_coverage=True).sum() >= 1
