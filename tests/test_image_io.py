"""The one image reader: DICOM display pipeline, compressed syntaxes, other formats, orientation, errors."""

from __future__ import annotations

import json
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_factory import Lut, build_dataset, write_dicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmread, uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing, get_decoder

from afloc_cli.errors import ImageReadError
from afloc_cli.image.data.io import Radiograph, ReadInfo, is_dicom, read_image, read_image_size

ROWS, COLS = 40, 64  # JPEG 2000's default 6 resolutions need >= 32 pixels a side
SPOT = (7, 41)


def checked(path: Path | str) -> Radiograph:
    """read_image plus the contract every result must meet."""
    r = read_image(path)
    assert r.pixels.dtype == np.float32 and r.pixels.ndim == 2
    assert r.pixels.shape == (r.info.height, r.info.width)
    assert np.isfinite(r.pixels).all()
    assert float(r.pixels.min()) >= 0.0 and float(r.pixels.max()) <= 1.0
    json.dumps(r.info.to_dict())
    return r


def noise12(shape: tuple[int, ...] = (ROWS, COLS), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


def smooth(shape: tuple[int, int] = (ROWS, COLS), top: int = 4095) -> np.ndarray:
    """A radiograph-like smooth image (lossy codecs are judged on these, not on noise)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    img = 0.5 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 7.0) + 0.15 * (xx / shape[1] - yy / shape[0])
    dtype = np.uint8 if top <= 255 else np.uint16
    return np.rint(np.clip(img, 0, 1) * top).astype(dtype)


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), normalised to [0, 1]: the reference the reader must meet."""
    x = np.asarray(x, dtype=np.float64)
    c, w = center - 0.5, width - 1.0
    out = (x - c) / w + 0.5
    out[x <= c - w / 2] = 0.0
    out[x > c + w / 2] = 1.0
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def png_bytes(arr: np.ndarray, colour_type: int, sbit: bytes | None = None) -> bytes:
    """A minimal PNG writer, so tests can make 16-bit grey+alpha and sBIT files no library writes."""
    arr = np.ascontiguousarray(arr)
    height, width = arr.shape[:2]
    depth = 8 * arr.dtype.itemsize
    rows = arr.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    extra = chunk(b"sBIT", sbit) if sbit else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(
        b"IEND", b""
    )


# --------------------------------------------------------------------------- DICOM value pipeline


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    data = noise12()
    for window in (None, (1800.0, 2400.0)):
        mono2 = checked(write_dicom(tmp_path / "m2.dcm", data, bits_stored=12, window=window))
        mono1 = checked(write_dicom(tmp_path / "m1.dcm", data, bits_stored=12, window=window,
                                    photometric="MONOCHROME1"))
        assert not mono2.info.inverted and mono1.info.inverted
        assert mono1.info.photometric == "MONOCHROME1"
        np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)


def test_rescale_slope_intercept_is_applied_before_the_window(tmp_path: Path) -> None:
    data = noise12()
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, rescale=(2.0, -1000.0),
                            window=(1000.0, 2001.0)))
    assert r.info.modality_lut and r.info.voi == "window" and r.info.scale == "window_range"
    np.testing.assert_allclose(r.pixels, linear_window(data * 2.0 - 1000.0, 1000.0, 2001.0), atol=1e-5)


def test_negative_slope_without_window_flips_the_min_max(tmp_path: Path) -> None:
    data = noise12()
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, rescale=(-1.0, 50.0)))
    assert r.info.modality_lut and r.info.voi == "none" and r.info.scale == "minmax"
    expected = (data.max() - data.astype(np.float64)) / (data.max() - data.min())
    np.testing.assert_allclose(r.pixels, expected, atol=1e-6)


def test_identity_rescale_is_not_reported_as_applied(tmp_path: Path) -> None:
    r = checked(write_dicom(tmp_path / "a.dcm", noise12(), bits_stored=12, rescale=(1.0, 0.0)))
    assert not r.info.modality_lut


def test_window_center_width(tmp_path: Path) -> None:
    data = noise12()
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, window=(1500.0, 1000.0)))
    assert (r.info.voi, r.info.window_center, r.info.window_width) == ("window", 1500.0, 1000.0)
    np.testing.assert_allclose(r.pixels, linear_window(data, 1500.0, 1000.0), atol=1e-6)
    assert (r.pixels == 0).any() and (r.pixels == 1).any()  # both ends clip


def test_the_first_of_several_windows_is_used(tmp_path: Path) -> None:
    data = noise12()
    several = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12,
                                  window=[(1500.0, 1000.0), (3000.0, 200.0), (100.0, 50.0)]))
    single = checked(write_dicom(tmp_path / "b.dcm", data, bits_stored=12, window=(1500.0, 1000.0)))
    np.testing.assert_array_equal(several.pixels, single.pixels)
    assert several.info.window_center == 1500.0 and several.info.window_width == 1000.0
    assert "first of 3 windows used" in several.info.notes


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_functions_follow_pydicom(tmp_path: Path, function: str) -> None:
    data = noise12()
    options = dict(bits_stored=12, window=(2000.0, 1500.0), voi_lut_function=function)
    path = write_dicom(tmp_path / "a.dcm", data, **options)
    r = checked(path)
    ds = build_dataset(data, **options)
    expected = apply_voi_lut(data, ds) / 4095.0  # unsigned 12-bit: pydicom's output range is 0..4095
    np.testing.assert_allclose(r.pixels, expected, atol=1e-5)
    assert f"VOI LUT function {function}" in r.info.notes


@pytest.mark.parametrize("bits", [8, 16])
def test_voi_lut_sequence(tmp_path: Path, bits: int) -> None:
    data = noise12()
    top = 2**bits - 1
    entries = np.rint(np.sqrt(np.linspace(0, 1, 1024)) * top).astype(int)  # a curve, not a line
    lut = Lut(entries, first_mapped=1000, bits=bits)
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, voi_lut=lut, window=(10.0, 20.0)))
    expected = entries[np.clip(data.astype(int) - 1000, 0, 1023)] / top
    np.testing.assert_allclose(r.pixels, expected, atol=1e-6)
    assert (r.info.voi, r.info.scale) == ("voi_lut", "lut_range")
    assert "VOI LUT used in preference to the window" in r.info.notes


def test_voi_lut_indexes_the_rescaled_values(tmp_path: Path) -> None:
    data = noise12()
    entries = np.arange(4096) // 16
    lut = Lut(entries, first_mapped=100, bits=8)
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, rescale=(1.0, 100.0), voi_lut=lut))
    expected = entries[np.clip(data.astype(int) + 100 - 100, 0, 4095)] / 255.0
    np.testing.assert_allclose(r.pixels, expected, atol=1e-6)
    assert r.info.modality_lut


def test_modality_lut_sequence(tmp_path: Path) -> None:
    data = noise12()
    mod = Lut(4095 - np.arange(4096), first_mapped=0, bits=12)  # an inverting modality LUT
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, modality_lut=mod,
                            window=(2048.0, 4096.0)))
    assert r.info.modality_lut
    np.testing.assert_allclose(r.pixels, (4095 - data) / 4095.0, atol=1e-6)


def test_voi_lut_data_as_ow_bytes(tmp_path: Path) -> None:
    """Implicit VR leaves LUT Data's VR ambiguous, so pydicom hands it over as OW bytes."""
    data = noise12()
    entries = np.arange(4096) // 16
    lut = Lut(entries, first_mapped=0, bits=8)
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, voi_lut=lut,
                            transfer_syntax=uid.ImplicitVRLittleEndian))
    np.testing.assert_allclose(r.pixels, entries[data] / 255.0, atol=1e-6)


def test_voi_lut_declaring_more_bits_than_it_uses(tmp_path: Path) -> None:
    data = noise12()
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, voi_lut=Lut(np.arange(4096), bits=16)))
    np.testing.assert_allclose(r.pixels, data / 4095.0, atol=1e-6)
    assert any("declares 16 bits but its entries use 12" in n for n in r.info.notes)


def test_signed_pixels_with_rescale_and_window(tmp_path: Path) -> None:
    data = np.random.default_rng(5).integers(-1000, 2000, (ROWS, COLS)).astype(np.int16)
    r = checked(write_dicom(tmp_path / "ct.dcm", data, rescale=(1.0, -1024.0), window=(40.0, 400.0)))
    np.testing.assert_allclose(r.pixels, linear_window(data - 1024.0, 40.0, 400.0), atol=1e-5)


def test_invalid_window_falls_back_to_min_max_with_a_note(tmp_path: Path) -> None:
    data = noise12()
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, window=(100.0, 0.5)))
    assert (r.info.voi, r.info.scale, r.info.window_center) == ("none", "minmax", None)
    assert any(n.startswith("window not applied") for n in r.info.notes)
    np.testing.assert_allclose(r.pixels, (data - data.min()) / float(data.max() - data.min()), atol=1e-6)


def test_constant_image_reads_as_zeros_with_a_note(tmp_path: Path) -> None:
    r = checked(write_dicom(tmp_path / "a.dcm", np.full((ROWS, COLS), 77, np.uint16), bits_stored=12))
    assert not r.pixels.any() and "constant image" in r.info.notes


def test_presentation_lut_shape_does_not_invert_monochrome2(tmp_path: Path) -> None:
    data = noise12()
    r = checked(write_dicom(tmp_path / "a.dcm", data, bits_stored=12, window=(2048.0, 4096.0),
                            extra={"PresentationLUTShape": "INVERSE"}))
    assert not r.info.inverted and any("INVERSE ignored" in n for n in r.info.notes)
    np.testing.assert_allclose(r.pixels, data / 4095.0, atol=1e-6)


def test_palette_colour_dicom(tmp_path: Path) -> None:
    data = smooth(top=255)
    ramp = (np.arange(256, dtype=np.uint16) * 257).astype("<u2").tobytes()
    extra: dict[str, object] = {}
    for colour in ("Red", "Green", "Blue"):
        extra[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        extra[f"{colour}PaletteColorLookupTableData"] = ramp
    r = checked(write_dicom(tmp_path / "p.dcm", data, photometric="PALETTE COLOR", extra=extra))
    np.testing.assert_allclose(r.pixels, data / 255.0, atol=1e-5)
    assert r.info.scale == "lut_range" and any("PALETTE COLOR converted" in n for n in r.info.notes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    slope=st.sampled_from([-3.0, -1.0, -0.5, 0.25, 0.5, 1.0, 2.0, 3.5]),
    intercept=st.integers(-3000, 3000),
    center=st.integers(-6000, 9000),
    width=st.integers(1, 12000),
    function=st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2"]),
    seed=st.integers(0, 2**16),
)
def test_value_pipeline_is_bounded_monotone_and_matches_pydicom(
    slope: float, intercept: int, center: int, width: int, function: str, photometric: str, seed: int
) -> None:
    stored = np.sort(np.random.default_rng(seed).integers(0, 4096, 200)).astype(np.uint16)[None, :]
    options = dict(photometric=photometric, bits_stored=12, rescale=(slope, float(intercept)),
                   window=(float(center), float(width)), voi_lut_function=function)
    with tempfile.TemporaryDirectory() as tmp:
        r = checked(write_dicom(Path(tmp) / "h.dcm", stored, **options))
    out = r.pixels[0].astype(np.float64)
    # Monotone in the modality value (slope * stored + intercept); MONOCHROME1 reverses it.
    sign = np.sign(slope) * (-1.0 if photometric == "MONOCHROME1" else 1.0)
    assert (np.diff(out) * sign >= -1e-7).all()

    # The reader (fast float32 path for LINEAR*) agrees with pydicom's own pipeline.
    ds = build_dataset(stored, **options)
    with np.errstate(over="ignore"):  # pydicom's SIGMOID overflows exp() far from the centre
        y = apply_windowing(apply_modality_lut(stored, ds), ds)
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)  # its output range
    expected = (y[0] - lo) / (hi - lo)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(out, expected, atol=2e-5)


# --------------------------------------------------------------------------- transfer syntaxes

LOSSLESS = [
    uid.RLELossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
]


def test_every_required_syntax_has_an_installed_decoder() -> None:
    for ts in LOSSLESS + [uid.JPEGLSNearLossless, uid.JPEG2000, uid.JPEGBaseline8Bit]:
        assert get_decoder(ts).is_available, ts.name


@pytest.mark.parametrize("ts", LOSSLESS, ids=lambda t: t.name)
def test_lossless_syntaxes_decode_exactly(tmp_path: Path, ts: uid.UID) -> None:
    data = noise12()
    ref = checked(write_dicom(tmp_path / "ref.dcm", data, bits_stored=12, window=(2048.0, 4096.0)))
    r = checked(write_dicom(tmp_path / "c.dcm", data, bits_stored=12, window=(2048.0, 4096.0),
                            transfer_syntax=ts))
    assert r.info.transfer_syntax == ts.name
    np.testing.assert_array_equal(r.pixels, ref.pixels)
    np.testing.assert_allclose(r.pixels, data / 4095.0, atol=1e-6)


@pytest.mark.parametrize(
    ("ts", "encoding", "top", "tolerance"),
    [
        (uid.JPEGLSNearLossless, {"jls_error": 3}, 4095, 3.0 / 4095 + 1e-6),
        (uid.JPEG2000, {"j2k_psnr": [55.0]}, 4095, 0.03),
        (uid.JPEGBaseline8Bit, None, 255, 0.05),
    ],
    ids=lambda v: v.name if isinstance(v, uid.UID) else "",
)
def test_lossy_syntaxes_decode_within_tolerance(
    tmp_path: Path, ts: uid.UID, encoding: dict | None, top: int, tolerance: float
) -> None:
    data = smooth(top=top)
    bits = 12 if top > 255 else 8
    window = (2048.0, 4096.0) if bits == 12 else (128.0, 256.0)
    ref = checked(write_dicom(tmp_path / "ref.dcm", data, bits_stored=bits, window=window))
    r = checked(write_dicom(tmp_path / "c.dcm", data, bits_stored=bits, window=window, transfer_syntax=ts,
                            encoding=encoding))
    assert r.info.transfer_syntax == ts.name
    error = np.abs(r.pixels - ref.pixels)
    assert float(error.max()) <= tolerance, float(error.max())


@pytest.mark.parametrize("ts", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEGBaseline8Bit], ids=str)
def test_colour_dicom_becomes_luma(tmp_path: Path, ts: uid.UID) -> None:
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    rgb = np.dstack([xx * 3, yy * 5, (xx + yy) * 2]).astype(np.uint8)
    r = checked(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB", transfer_syntax=ts))
    tolerance = 0.03 if ts == uid.JPEGBaseline8Bit else 1e-5
    np.testing.assert_allclose(r.pixels, luma(rgb) / 255.0, atol=tolerance)
    assert r.info.scale == "bits_stored" and r.info.voi == "none"
    assert any("converted to grey" in n for n in r.info.notes)


@pytest.mark.parametrize("ts", [uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLSLossless], ids=str)
def test_multi_frame_reads_the_first_frame(tmp_path: Path, ts: uid.UID) -> None:
    frames = np.stack([noise12(seed=s) for s in range(3)])
    r = checked(write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12, window=(2048.0, 4096.0),
                            transfer_syntax=ts))
    assert r.pixels.shape == (ROWS, COLS) and r.info.frames == 3
    np.testing.assert_allclose(r.pixels, frames[0] / 4095.0, atol=1e-6)
    assert "multi-frame: first of 3 frames used" in r.info.notes


def test_enhanced_multi_frame_takes_rescale_and_window_from_functional_groups(tmp_path: Path) -> None:
    frames = np.stack([noise12(seed=s) for s in range(2)])
    first = Dataset()
    first.FrameVOILUTSequence = [Dataset()]
    first.FrameVOILUTSequence[0].WindowCenter = 1000.0
    first.FrameVOILUTSequence[0].WindowWidth = 2001.0
    shared = Dataset()
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2.0
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1000.0
    extra = {"PerFrameFunctionalGroupsSequence": [first, Dataset()],
             "SharedFunctionalGroupsSequence": [shared]}
    r = checked(write_dicom(tmp_path / "e.dcm", frames, bits_stored=12, extra=extra))
    assert r.info.voi == "window" and r.info.modality_lut and r.info.window_center == 1000.0
    np.testing.assert_allclose(r.pixels, linear_window(frames[0] * 2.0 - 1000.0, 1000.0, 2001.0), atol=1e-5)
    assert any("functional groups" in n for n in r.info.notes)


# --------------------------------------------------------------------------- other formats


def test_png_8_and_16_bit_scaling(tmp_path: Path) -> None:
    grey8 = smooth(top=255)
    (tmp_path / "g8.png").write_bytes(png_bytes(grey8, 0))
    r = checked(tmp_path / "g8.png")
    np.testing.assert_allclose(r.pixels, grey8 / 255.0, atol=1e-6)
    assert (r.info.format, r.info.bits_stored, r.info.scale) == ("png", 8, "dtype_max")

    grey16 = smooth(top=65535)
    (tmp_path / "g16.png").write_bytes(png_bytes(grey16, 0))
    r = checked(tmp_path / "g16.png")
    np.testing.assert_allclose(r.pixels, grey16 / 65535.0, atol=1e-6)
    assert (r.info.bits_stored, r.info.scale) == (16, "dtype_max")


def test_png_16_bit_with_sbit(tmp_path: Path) -> None:
    data = noise12()
    (tmp_path / "s.png").write_bytes(png_bytes(data, 0, sbit=bytes([12])))
    r = checked(tmp_path / "s.png")
    np.testing.assert_allclose(r.pixels, data / 4095.0, atol=1e-6)
    assert (r.info.bits_stored, r.info.scale) == (12, "bits_stored")

    # A spec-following encoder scales 12-bit samples up to 16 bits: values above 4095 say so.
    scaled = (data << 4) | (data >> 8)
    (tmp_path / "t.png").write_bytes(png_bytes(scaled, 0, sbit=bytes([12])))
    r = checked(tmp_path / "t.png")
    np.testing.assert_allclose(r.pixels, scaled / 65535.0, atol=1e-6)
    assert r.info.scale == "dtype_max" and any("sBIT=12" in n for n in r.info.notes)


def test_png_colour_alpha_and_palette_become_grey(tmp_path: Path) -> None:
    grey = smooth(top=255)
    alpha = np.full_like(grey, 200)
    (tmp_path / "la.png").write_bytes(png_bytes(np.dstack([grey, alpha]), 4))
    r = checked(tmp_path / "la.png")
    np.testing.assert_allclose(r.pixels, grey / 255.0, atol=1e-6)
    assert "alpha channel ignored" in r.info.notes

    grey16 = smooth(top=65535)
    (tmp_path / "la16.png").write_bytes(png_bytes(np.dstack([grey16, np.full_like(grey16, 7)]), 4))
    r = checked(tmp_path / "la16.png")
    np.testing.assert_allclose(r.pixels, grey16 / 65535.0, atol=1e-6)

    # 16-bit RGB must keep its 16 bits (Pillow alone would cut them to 8).
    rgb16 = np.dstack([grey16, grey16 // 2, np.full_like(grey16, 1234)])
    (tmp_path / "rgb16.png").write_bytes(png_bytes(rgb16, 2))
    r = checked(tmp_path / "rgb16.png")
    np.testing.assert_allclose(r.pixels, luma(rgb16) / 65535.0, atol=2e-6)
    assert r.info.photometric == "RGB"

    (tmp_path / "rgba.png").write_bytes(png_bytes(np.dstack([grey, grey, grey, alpha]), 6))
    r = checked(tmp_path / "rgba.png")
    np.testing.assert_allclose(r.pixels, grey / 255.0, atol=1e-5)

    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    palette = np.asarray(Image.open(tmp_path / "p.png").convert("L"))
    r = checked(tmp_path / "p.png")
    np.testing.assert_allclose(r.pixels, palette / 255.0, atol=1.0 / 255 + 1e-6)
    assert "palette expanded to RGB" in r.info.notes


def test_tiff_depths(tmp_path: Path) -> None:
    grey16 = smooth(top=65535)
    cv2.imwrite(str(tmp_path / "g16.tif"), grey16)
    np.testing.assert_allclose(checked(tmp_path / "g16.tif").pixels, grey16 / 65535.0, atol=1e-6)

    rgb16 = np.dstack([grey16, grey16 // 3, grey16 // 2])  # BGR on disk
    cv2.imwrite(str(tmp_path / "c16.tif"), rgb16)
    r = checked(tmp_path / "c16.tif")
    np.testing.assert_allclose(r.pixels, luma(rgb16[..., ::-1]) / 65535.0, atol=2e-6)

    unit = (grey16 / 65535.0).astype(np.float32)
    cv2.imwrite(str(tmp_path / "f.tif"), unit)
    r = checked(tmp_path / "f.tif")
    np.testing.assert_allclose(r.pixels, unit, atol=1e-7)
    assert r.info.scale == "none"

    wide = unit * 1000 - 200
    cv2.imwrite(str(tmp_path / "w.tif"), wide)
    r = checked(tmp_path / "w.tif")
    np.testing.assert_allclose(r.pixels, (wide - wide.min()) / (wide.max() - wide.min()), atol=1e-5)
    assert r.info.scale == "minmax"

    pages = [Image.fromarray(smooth(top=255)), Image.fromarray(np.zeros((ROWS, COLS), np.uint8))]
    pages[0].save(tmp_path / "multi.tif", save_all=True, append_images=pages[1:])
    r = checked(tmp_path / "multi.tif")
    assert r.info.frames == 2 and "multi-frame: first of 2 frames used" in r.info.notes
    assert float(r.pixels.max()) > 0.5


def test_jpeg_rgb_becomes_grey(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    rgb = np.dstack([xx * 3, yy * 5, (xx + yy) * 2]).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    r = checked(tmp_path / "c.jpg")
    np.testing.assert_allclose(r.pixels, luma(rgb) / 255.0, atol=0.03)
    assert r.info.format == "jpeg" and r.info.photometric == "RGB"


def test_exif_orientation_is_noted_not_applied(tmp_path: Path) -> None:
    img = Image.fromarray(_spot_image(8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "e.jpg", exif=exif, quality=98)
    r = checked(tmp_path / "e.jpg")
    assert r.pixels.shape == (30, 50)
    assert np.unravel_index(int(np.argmax(r.pixels)), r.pixels.shape) == SPOT
    assert any("EXIF orientation 6 not applied" in n for n in r.info.notes)


def test_other_pillow_formats(tmp_path: Path) -> None:
    grey = smooth(top=255)
    Image.fromarray(grey).save(tmp_path / "g.gif")
    Image.fromarray(grey).save(tmp_path / "g.bmp")
    for name, fmt in (("g.gif", "gif"), ("g.bmp", "bmp")):
        r = checked(str(tmp_path / name))  # str paths are accepted too
        assert r.info.format == fmt
        np.testing.assert_allclose(r.pixels, grey / 255.0, atol=1.0 / 255 + 1e-6)


# --------------------------------------------------------------------------- orientation


def _spot_image(bits: int) -> np.ndarray:
    top = 2**bits - 1
    img = np.full((30, 50), top // 10, dtype=np.uint8 if bits == 8 else np.uint16)
    img[SPOT] = top
    img[25, 3] = top // 2  # a second, dimmer mark: a transpose or flip cannot map both back
    return img


def _with_cv2(name: str, image: np.ndarray, *params: int) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        assert cv2.imwrite(str(d / name), image, list(params))
        return d / name

    return write


def _with_factory(**options: object) -> Callable[[Path], Path]:
    return lambda d: write_dicom(d / "o.dcm", _spot_image(16), bits_stored=16, **options)


WRITERS: dict[str, Callable[[Path], Path]] = {
    "dicom": _with_factory(),
    "dicom-jpegls": _with_factory(transfer_syntax=uid.JPEGLSLossless),
    "dicom-rle": _with_factory(transfer_syntax=uid.RLELossless),
    "png8": _with_cv2("o.png", _spot_image(8)),
    "png16": _with_cv2("o.png", _spot_image(16)),
    "jpeg": _with_cv2("o.jpg", _spot_image(8), cv2.IMWRITE_JPEG_QUALITY, 98),
    "tiff8": _with_cv2("o.tif", _spot_image(8)),
    "tiff16": _with_cv2("o.tif", _spot_image(16)),
    "tiff-float": _with_cv2("o.tif", _spot_image(16).astype(np.float32)),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_orientation_is_kept(tmp_path: Path, kind: str) -> None:
    path = WRITERS[kind](tmp_path)
    r = checked(path)
    assert r.pixels.shape == (30, 50)
    assert read_image_size(path) == (30, 50)
    assert np.unravel_index(int(np.argmax(r.pixels)), r.pixels.shape) == SPOT
    assert r.pixels[25, 3] > r.pixels[24, 3] + 0.2


def tiff_bytes(image: np.ndarray, orientation: int, order: str = "<") -> bytes:
    """An uncompressed one-strip TIFF (grey or RGB, 8 or 16 bits) with an Orientation tag, written by hand so
    that nothing re-orients it on the way to disk."""
    rows, cols = image.shape[:2]
    samples = 1 if image.ndim == 2 else image.shape[2]
    bits = 8 * image.dtype.itemsize
    pixels = image.astype(image.dtype.newbyteorder(order)).tobytes()
    entries = 10
    bits_at = 8 + 2 + 12 * entries + 4  # BitsPerSample values after the IFD when there are several
    strip_at = bits_at + (2 * samples if samples > 1 else 0)
    bits_value = struct.pack(order + "HH", bits, 0) if samples == 1 else struct.pack(order + "I", bits_at)
    tags = [
        (256, 4, 1, struct.pack(order + "I", cols)),
        (257, 4, 1, struct.pack(order + "I", rows)),
        (258, 3, samples, bits_value),
        (259, 3, 1, struct.pack(order + "HH", 1, 0)),  # no compression
        (262, 3, 1, struct.pack(order + "HH", 1 if samples == 1 else 2, 0)),  # BlackIsZero or RGB
        (273, 4, 1, struct.pack(order + "I", strip_at)),
        (274, 3, 1, struct.pack(order + "HH", orientation, 0)),
        (277, 3, 1, struct.pack(order + "HH", samples, 0)),
        (278, 4, 1, struct.pack(order + "I", rows)),
        (279, 4, 1, struct.pack(order + "I", len(pixels))),
    ]
    head = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    ifd = struct.pack(order + "H", entries) + b"".join(struct.pack(order + "HHI", t, k, n) + v for t, k, n, v in tags)
    extra = b"" if samples == 1 else struct.pack(order + "H" * samples, *[bits] * samples)
    return head + ifd + struct.pack(order + "I", 0) + extra + pixels


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("kind", ["grey8", "grey16-big-endian", "rgb16"])  # rgb16: OpenCV's decoder
def test_tiff_orientation_tag_is_noted_not_applied(tmp_path: Path, kind: str, orientation: int) -> None:
    """Pillow and OpenCV turn a TIFF by its Orientation tag; the reader keeps the stored order, as for JPEG."""
    image = _spot_image(8 if kind == "grey8" else 16)
    if kind == "rgb16":
        image = np.dstack([image, image, image])
    path = tmp_path / "o.tif"
    path.write_bytes(tiff_bytes(image, orientation, ">" if kind.endswith("big-endian") else "<"))
    r = checked(path)
    assert r.pixels.shape == (30, 50) and read_image_size(path) == (30, 50)
    assert np.unravel_index(int(np.argmax(r.pixels)), r.pixels.shape) == SPOT
    assert r.pixels[25, 3] > r.pixels[24, 3] + 0.2
    assert f"TIFF orientation {orientation} not applied (stored row/column order kept)" in r.info.notes


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", ["scan.png", "scan", "IM0001.jpg"])
def test_dicom_is_found_by_magic_whatever_the_name(tmp_path: Path, name: str) -> None:
    path = write_dicom(tmp_path / name, noise12(), bits_stored=12)
    assert is_dicom(path)
    assert checked(path).info.format == "dicom"
    assert read_image_size(path) == (ROWS, COLS)


def test_non_dicom_files_are_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(png_bytes(smooth(top=255), 0))
    assert not is_dicom(tmp_path / "x.dcm") and checked(tmp_path / "x.dcm").info.format == "png"
    assert not is_dicom(tmp_path / "missing.dcm")
    (tmp_path / "short").write_bytes(b"DICM")
    assert not is_dicom(tmp_path / "short")


@pytest.mark.parametrize(
    "variant", [{"preamble": False}, {"file_meta": False, "transfer_syntax": uid.ImplicitVRLittleEndian}]
)
def test_dicom_without_preamble_is_read_with_force(tmp_path: Path, variant: dict) -> None:
    data = noise12()
    path = write_dicom(tmp_path / "bare", data, bits_stored=12, window=(2048.0, 4096.0), **variant)
    assert not is_dicom(path)  # no magic: `is_dicom` stays strict
    r = checked(path)
    assert r.info.format == "dicom" and any("no DICOM preamble" in n for n in r.info.notes)
    np.testing.assert_allclose(r.pixels, data / 4095.0, atol=1e-6)
    assert read_image_size(path) == (ROWS, COLS)


def test_read_info_is_recordable(tmp_path: Path) -> None:
    windows = [(1.0e3, 2.0e3), (5.0, 10.0)]
    r = checked(write_dicom(tmp_path / "a.dcm", noise12(), bits_stored=12, window=windows))
    d = json.loads(json.dumps(r.info.to_dict()))
    assert set(d) == set(ReadInfo.__dataclass_fields__)
    assert d["window_center"] == 1000.0 and d["notes"] == ["first of 2 windows used"]
    assert d["transfer_syntax"] == "Explicit VR Little Endian" and d["photometric"] == "MONOCHROME2"
    with pytest.raises(AttributeError):
        r.info.voi = "none"  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


def _truncated(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _unsupported_syntax(d: Path) -> Path:
    ds = build_dataset(np.zeros((30, 50), np.uint8))
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(d / "mpeg.dcm", enforce_file_format=True)
    return d / "mpeg.dcm"


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return write


def _cut(make: Callable[[Path], Path], keep: float) -> Callable[[Path], Path]:
    return lambda d: _truncated(make(d), keep)


def _dicom(name: str, **options: object) -> Callable[[Path], Path]:
    return lambda d: write_dicom(d / name, noise12(), bits_stored=12, **options)


# A JPEG's markers up to its frame header: JFIF APP0, then SOF1 (extended, 12-bit samples), 30x50, one component.
JPEG_12_BIT = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
               + b"\xff\xc1" + struct.pack(">HBHHB", 11, 12, 30, 50, 1) + b"\x01\x11\x00" + b"\xff\xd9")

BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty": (_bytes("e.png", b""), "empty file"),
    "random": (_bytes("r.png", np.random.default_rng(3).bytes(4000)), "not an image"),
    "bare-dicom-lookalike": (_bytes("b", b"\x08\x00" + np.random.default_rng(4).bytes(999)), "not an image"),
    "text": (_bytes("t.jpg", b"hello, not a picture"), "not an image"),
    "dicom-no-pixels": (_dicom("n.dcm", pixel_data=False), "DICOM has no pixel data"),
    "dicom-truncated": (_cut(_dicom("t.dcm"), 0.6), "truncated DICOM pixel data"),
    "dicom-rle-truncated": (_cut(_dicom("t.dcm", transfer_syntax=uid.RLELossless), 0.6), "truncated DICOM"),
    "dicom-header-only": (_cut(_dicom("h.dcm"), 0.05), "DICOM has no pixel data"),
    "dicom-unsupported-syntax": (_unsupported_syntax, "unsupported transfer syntax 1.2.840.10008.1.2.4.100"),
    "png-truncated": (_cut(_bytes("t.png", png_bytes(noise12(), 0)), 0.5), "truncated PNG"),
    "jpeg-truncated": (_cut(_with_cv2("t.jpg", smooth(top=255)), 0.5), "truncated"),
    "jpeg-12-bit": (_bytes("j.jpg", JPEG_12_BIT), "12-bit JPEG (SOF1): Pillow and OpenCV here decode 8-bit JPEG "
                                                "only; convert it to a 16-bit PNG"),
    "missing": (lambda d: d / "nope.png", "no such file"),
    "directory": (lambda d: d, "is a directory"),
}


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_failures_raise_image_read_error_naming_the_path(tmp_path: Path, case: str) -> None:
    make, reason = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = str(err.value)
    assert err.value.path == str(path) and message.startswith(str(path))
    assert reason in message and "\n" not in message


def test_unsupported_syntax_names_the_missing_decoder(tmp_path: Path) -> None:
    path = _unsupported_syntax(tmp_path)
    with pytest.raises(ImageReadError, match="no decoder installed"):
        read_image(path)
    assert read_image_size(path) == (30, 50)  # the header alone is enough for the size


@pytest.mark.parametrize("case", ["empty", "random", "text", "missing", "directory", "jpeg-12-bit"])
def test_size_failures_raise_image_read_error(tmp_path: Path, case: str) -> None:
    path = BAD_FILES[case][0](tmp_path)
    with pytest.raises(ImageReadError) as err:
        read_image_size(path)
    assert err.value.path == str(path)
    if case == "jpeg-12-bit":
        assert "12-bit JPEG (SOF1)" in str(err.value)


def test_real_12_bit_jpeg_says_why(tmp_path: Path) -> None:
    """pydicom's JPEG-lossy.dcm holds a 12-bit JPEG (Extended, SOF1): taken out of the DICOM, it is named so."""
    from pydicom.encaps import generate_fragmented_frames

    ds = dcmread(get_testdata_file("JPEG-lossy.dcm"))
    path = tmp_path / "lossy12.jpg"
    path.write_bytes(b"".join(next(generate_fragmented_frames(ds.PixelData))))
    with pytest.raises(ImageReadError, match="12-bit JPEG \\(SOF1\\).*convert it to a 16-bit PNG"):
        read_image(path)


def test_nan_in_a_float_tiff_is_an_error(tmp_path: Path) -> None:
    img = np.ones((ROWS, COLS), np.float32)
    img[3, 4] = np.nan
    cv2.imwrite(str(tmp_path / "n.tif"), img)
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(tmp_path / "n.tif")


# --------------------------------------------------------------------------- pydicom's own vendor files


def test_invalid_number_of_frames_names_the_element() -> None:
    """pydicom's badVR.dcm stores Number of Frames as '1A': say that, not a bare int() error."""
    path = get_testdata_file("badVR.dcm")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert str(err.value) == f"{path}: invalid DICOM header: Number of Frames '1A' is not an integer"


def test_decoder_warnings_become_notes_not_stderr() -> None:
    """A warning from pydicom has no file name and lands on stderr, in workers too; the notes keep it per file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping read_image fails the test
        r = read_image(get_testdata_file("MR_small_padded.dcm"))
    assert any(n.startswith("warning: ") and "padding" in n for n in r.info.notes)
    np.testing.assert_array_equal(r.pixels, read_image(get_testdata_file("MR_small.dcm")).pixels)


def test_unparseable_window_is_noted(tmp_path: Path) -> None:
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    ds.add_new(0x00281050, "LO", "xxxx")  # Window Center that no reader can use (explicit VR keeps it text)
    ds.save_as(tmp_path / "w.dcm")
    r = read_image(tmp_path / "w.dcm")
    assert (r.info.voi, r.info.scale) == ("none", "minmax")
    assert "window not applied (Window Center 'xxxx', Window Width '1600')" in r.info.notes
