"""The one image reader: a radiograph file -> float32 (rows, cols) in [0, 1], plus what was applied.

DICOM (found by the "DICM" magic, whatever the extension) goes through the display
pipeline of PS3.3 C.11, in this order: Modality LUT (rescale slope/intercept or
Modality LUT Sequence) -> VOI LUT or the *first* window -> MONOCHROME1 inversion ->
[0, 1]. Only the first frame of a multi-frame file is decoded. Files without the
128-byte preamble are read too when Pillow does not recognise them and they start
like a DICOM data set (group 0002 or 0008): pydicom reads them with `force=True`,
and `ReadInfo.notes` says so. `is_dicom` stays strict (magic only), since it is used
to pick files out of folders.

PNG, JPEG, TIFF and whatever else Pillow opens are decoded by Pillow, except where
Pillow would silently drop bits (16-bit colour PNG, >8-bit multi-sample TIFF) or
cannot decode a TIFF: those go to OpenCV. Pillow is the default because it reports
truncated files as errors instead of filling them with grey.

Pixels are never transposed or re-oriented (EXIF orientation is noted, not applied):
annotations and heatmaps are in the stored row/column order. Pillow and OpenCV would
turn a TIFF by its Orientation tag, so the tag is reset to 1 in a copy of the bytes
before either decodes it (`read_image_size` takes the TIFF's stored width and length).
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import asdict, dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from afloc_cli.errors import ImageReadError

__all__ = ["Radiograph", "ReadInfo", "is_dicom", "read_image", "read_image_size"]

PathType = str | PathLike[str]

_LUMA = (np.float32(0.299), np.float32(0.587), np.float32(0.114))  # ITU-R BT.601
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAG_LE, _PIXEL_TAG_BE = b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"  # (7FE0,0010)
_BARE_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")  # LE and BE group 0002 / 0008


@dataclass(frozen=True)
class ReadInfo:
    """What the reader applied to one file. It is written into output files, hence `to_dict`."""

    format: str
    height: int
    width: int
    transfer_syntax: str | None
    photometric: str | None
    modality_lut: bool
    voi: str
    window_center: float | None
    window_width: float | None
    inverted: bool
    frames: int
    bits_stored: int | None
    scale: str
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True, eq=False)
class Radiograph:
    pixels: np.ndarray  # float32 (rows, cols) in [0, 1], stored row/column order
    info: ReadInfo


class _Unreadable(Exception):
    """Internal: the one-line reason; `read_image` adds the path."""


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_magic(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A data set written without preamble starts with a group 0002 (meta) or 0008 element."""
    return head[:2] in _BARE_DICOM_GROUPS


def is_dicom(path: PathType) -> bool:
    """True when the file has the DICOM "DICM" magic at byte 128 (extension is irrelevant)."""
    try:
        with open(path, "rb") as f:
            return _has_magic(f.read(132))
    except OSError:
        return False


def _read_bytes(path: Path, size: int = -1) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(size)
    except FileNotFoundError:
        raise _Unreadable("no such file") from None
    except IsADirectoryError:
        raise _Unreadable("is a directory, not an image file") from None
    except PermissionError:
        raise _Unreadable("permission denied") from None
    except OSError as exc:
        raise _Unreadable(f"cannot read the file ({exc.strerror or _one_line(exc)})") from exc
    if not data:
        raise _Unreadable("empty file")
    return data


def read_image(path: PathType) -> Radiograph:
    """Read any supported radiograph; every failure is an `ImageReadError` naming the path."""
    try:
        data = _read_bytes(Path(path))
        with warnings.catch_warnings(record=True) as caught:  # decoders' warnings go into the notes, not stderr
            warnings.simplefilter("always")
            radiograph = _read_dicom(data, magic=True) if _has_magic(data) else _read_other(data)
        if caught:
            extra = tuple(dict.fromkeys(f"warning: {_one_line(w.message, 160)}" for w in caught))
            radiograph = Radiograph(radiograph.pixels, replace(radiograph.info, notes=radiograph.info.notes + extra))
        return radiograph
    except _Unreadable as exc:
        raise ImageReadError(str(exc), path=path) from exc
    except MemoryError as exc:
        raise ImageReadError("not enough memory to decode the image", path=path) from exc
    except Exception as exc:  # a decoder's own exception: still one line, still this file
        reason = f"cannot read the image ({type(exc).__name__}: {_one_line(exc)})"
        raise ImageReadError(reason, path=path) from exc


def read_image_size(path: PathType) -> tuple[int, int]:
    """(height, width) from the header alone: DICOM Rows/Columns or Pillow's lazy open."""
    p = Path(path)
    try:
        head = _read_bytes(p, 132)
        if _has_magic(head):
            return _dicom_size(p, magic=True)
        try:
            with Image.open(p) as im:
                width, height = im.size
                if im.format == "TIFF":  # Pillow reports the size as the Orientation tag turns it; stored here
                    width, height = im.tag_v2.get(256, width), im.tag_v2.get(257, height)
            return int(height), int(width)
        except UnidentifiedImageError:
            if _looks_like_bare_dicom(head):
                return _dicom_size(p, magic=False)
            raise _unrecognised(_read_bytes(p, 1 << 20)) from None
    except _Unreadable as exc:
        raise ImageReadError(str(exc), path=path) from exc
    except Exception as exc:
        raise ImageReadError(f"cannot read the image header ({type(exc).__name__}: {_one_line(exc)})",
                             path=path) from exc


# --------------------------------------------------------------------------- DICOM


def _dicom_size(path: Path, *, magic: bool) -> tuple[int, int]:
    try:
        ds = pydicom.dcmread(path, force=not magic, stop_before_pixels=True,
                             specific_tags=["Rows", "Columns"])
    except Exception as exc:
        raise _Unreadable(f"unreadable DICOM header ({_one_line(exc)})") from exc
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        if not magic:
            raise _Unreadable("not an image (format not recognised)")
        raise _Unreadable("DICOM has no Rows/Columns (not an image)")
    return int(rows), int(cols)


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax; for a file without File Meta, the encoding pydicom found."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise _Unreadable("DICOM without File Meta and of unknown encoding")
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _decode_first_frame(ds: Dataset, ts: UID) -> np.ndarray:
    syntax = f"{ts} ({ts.name})" if ts.name != str(ts) else str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        reason = f"unsupported transfer syntax {syntax} (no decoder installed: pydicom has none)"
        raise _Unreadable(reason) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "unknown"
        raise _Unreadable(f"unsupported transfer syntax {syntax} (no decoder installed: {missing})")
    try:
        return pixel_array(ds, index=0)
    except ValueError as exc:
        if "less than expected" in str(exc):
            sizes = re.search(r"\((\d+) vs (\d+) bytes\)", str(exc))
            detail = f"{sizes[1]} of {sizes[2]} bytes" if sizes else _one_line(exc)
            raise _Unreadable(f"truncated DICOM pixel data ({detail})") from exc
        raise _Unreadable(f"cannot decode DICOM pixel data, {ts.name} ({_one_line(exc)})") from exc
    except Exception as exc:
        raise _Unreadable(f"cannot decode DICOM pixel data, {ts.name} ({_one_line(exc)})") from exc


def _number(value: Any) -> float | None:
    """First value of a possibly multi-valued numeric element, or None when empty/invalid."""
    if value is None:
        return None
    if isinstance(value, list | tuple | MultiValue):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list | tuple | MultiValue) else 1


def _first_lut(ds: Dataset, keyword: str) -> Dataset | None:
    """The first usable item of a Modality/VOI LUT Sequence (descriptor and data present)."""
    seq = ds.get(keyword)
    if not seq:
        return None
    item = seq[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return item


def _lut_table(item: Dataset, ds: Dataset) -> tuple[np.ndarray, int, int]:
    """(entries, first value mapped, bits per entry) of one LUT item.

    LUT Data may arrive as US values or as OW bytes (16-bit words, or packed bytes for
    some 8-bit tables). A first-mapped value stored as US for signed data is two's complement.
    """
    desc = [int(v) for v in item.LUTDescriptor]
    if len(desc) != 3:
        raise ValueError(f"LUT Descriptor has {len(desc)} values, expected 3")
    count, first, bits = desc[0] or 65536, desc[1], desc[2]
    if first > 32767 and int(ds.get("PixelRepresentation") or 0) == 1:
        first -= 65536
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):
        little = ds.original_encoding[1] is not False
        if bits <= 8 and len(raw) == count:
            entries = np.frombuffer(raw, dtype=np.uint8)
        else:
            entries = np.frombuffer(raw[: 2 * count], dtype="<u2" if little else ">u2")
    else:
        entries = np.asarray(raw if isinstance(raw, list | tuple | MultiValue) else [raw], dtype=np.int64)
    if len(entries) < count:
        raise ValueError(f"LUT Data has {len(entries)} entries, its descriptor says {count}")
    return entries[:count].astype(np.int32), first, bits


def _lut_index(values: np.ndarray, first: int, count: int) -> np.ndarray:
    """Table positions of `values`: below the first mapped value -> 0, past the end -> last (PS3.3 C.11)."""
    idx = np.rint(values).astype(np.int32) if values.dtype.kind == "f" else values.astype(np.int32)
    if first:
        idx -= np.int32(first)
    np.clip(idx, 0, count - 1, out=idx)
    return idx


def _read_dicom(data: bytes, *, magic: bool) -> Radiograph:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not magic)
    except Exception as exc:
        raise _Unreadable(f"unreadable DICOM header ({_one_line(exc)})") from exc
    notes: list[str] = [] if magic else ["no DICOM preamble: read with pydicom force=True"]
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if not magic and "Rows" not in ds:
            raise _Unreadable("not an image (format not recognised)")
        if _PIXEL_TAG_LE in data or _PIXEL_TAG_BE in data:  # pydicom drops an element cut short
            raise _Unreadable("truncated DICOM: the pixel data element is incomplete")
        raise _Unreadable("DICOM has no pixel data")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise _Unreadable("DICOM has no Rows/Columns")

    ts = _transfer_syntax(ds)
    raw_frames = ds.get("NumberOfFrames")
    try:
        frames = max(int(raw_frames or 1), 1)
    except (TypeError, ValueError):
        raise _Unreadable(f"invalid DICOM header: Number of Frames {str(raw_frames)!r} is not an integer") from None
    if frames > 1:
        notes.append(f"multi-frame: first of {frames} frames used")

    arr = _decode_first_frame(ds, ts)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise _Unreadable("DICOM float pixel data has NaN or infinite values")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper() or None
    bits_stored = int(ds.BitsStored) if ds.get("BitsStored") else None
    common = dict(format="dicom", height=int(rows), width=int(cols), transfer_syntax=ts.name,
                  photometric=photometric, frames=frames, bits_stored=bits_stored)

    if photometric == "PALETTE COLOR" or arr.ndim == 3:
        return _dicom_colour(ds, arr, photometric, notes, common)
    if lifted := _lift_functional_groups(ds):
        notes.append(f"{', '.join(lifted)} taken from the first frame's functional groups")
    return _dicom_grey(ds, arr, photometric, notes, common)


_FRAME_MACROS = (
    ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
)


def _lift_functional_groups(ds: Dataset) -> list[str]:
    """Enhanced multi-frame objects keep rescale and window in functional groups, not at the top.

    Copies the first frame's values (per-frame group first, then the shared one) to the top
    level where the top level has none, so the one pipeline applies; returns what was copied.
    """
    groups = [seq[0] for kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")
              if (seq := ds.get(kw))]
    lifted: list[str] = []
    for group in groups:
        for macro, keywords in _FRAME_MACROS:
            if not (items := group.get(macro)):
                continue
            for keyword in keywords:
                if keyword not in ds and keyword in items[0]:
                    ds[keyword] = items[0][keyword]
                    lifted.append(keyword)
    return lifted


def _dicom_colour(ds: Dataset, arr: np.ndarray, photometric: str | None, notes: list[str],
                  common: dict[str, Any]) -> Radiograph:
    """Colour has no Modality/VOI stage; grey is the luma, scaled by the sample range."""
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
            top = float(2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
        except Exception as exc:
            raise _Unreadable(f"cannot apply the DICOM palette ({_one_line(exc)})") from exc
        scale = "lut_range"
    else:
        rgb = arr
        top = float(2 ** int(common["bits_stored"] or 8 * rgb.dtype.itemsize) - 1)
        scale = "bits_stored"
    notes.append(f"{photometric or 'colour'} converted to grey (ITU-R 601 luma)")
    grey = _luma(rgb)
    grey *= np.float32(1.0 / top)
    np.clip(grey, 0.0, 1.0, out=grey)
    info = ReadInfo(**common, modality_lut=False, voi="none", window_center=None, window_width=None,
                    inverted=False, scale=scale, notes=tuple(notes))
    return Radiograph(grey, info)


def _dicom_grey(ds: Dataset, arr: np.ndarray, photometric: str | None, notes: list[str],
                common: dict[str, Any]) -> Radiograph:
    """Modality LUT -> VOI LUT (preferred over a window, as pydicom's apply_voi_lut does) or first window.

    The [0, 1] scale is the output range of the VOI stage: 0..2^bits-1 of the LUT, or the
    window's output range. Without a VOI stage the image's own min-max is used: Bits
    Stored often overstates the used range (12-bit data in 16 bits) and after a rescale
    the range is arbitrary (e.g. Hounsfield units), so either would give a washed-out or
    black image.

    The PS3.3 C.11 formulas are implemented here rather than called from pydicom 3.0:
    its apply_voi wraps table indices for 8-bit LUTs with more than 256 entries, its
    apply_modality_lut rejects 12-bit tables, and its windowing (float64 + masks) is ~5x
    slower. The tests check these results against pydicom where pydicom is right.
    """
    values, slope, intercept = arr, 1.0, 0.0
    modality_item = _first_lut(ds, "ModalityLUTSequence")
    if modality_item is not None:
        try:
            entries, first, _ = _lut_table(modality_item, ds)
        except Exception as exc:
            raise _Unreadable(f"invalid Modality LUT ({_one_line(exc)})") from exc
        values = entries[_lut_index(arr, first, len(entries))]
    else:
        s, b = _number(ds.get("RescaleSlope")), _number(ds.get("RescaleIntercept"))
        if s is not None and b is not None:
            slope, intercept = s, b
    rescaled = (slope, intercept) != (1.0, 0.0)  # an identity rescale is not reported as applied
    modality = modality_item is not None or rescaled

    def modality_values() -> np.ndarray:
        if not rescaled:
            return values
        out = values.astype(np.float32)
        out *= np.float32(slope)
        out += np.float32(intercept)
        return out

    voi, center, width, scale = "none", None, None, "minmax"
    pixels: np.ndarray | None = None
    window_c, window_w = _number(ds.get("WindowCenter")), _number(ds.get("WindowWidth"))
    has_window = window_c is not None and window_w is not None
    raw_c, raw_w = (str(ds.get(k) or "").strip() for k in ("WindowCenter", "WindowWidth"))
    if not has_window and (raw_c or raw_w):  # present but unusable: say so rather than fall back silently
        notes.append(f"window not applied (Window Center {raw_c[:40]!r}, Window Width {raw_w[:40]!r})")
    voi_item = _first_lut(ds, "VOILUTSequence")
    if voi_item is not None:
        try:
            pixels = _voi_lut(modality_values(), voi_item, ds, notes)
            voi, scale = "voi_lut", "lut_range"
            if (n := len(ds.VOILUTSequence)) > 1:
                notes.append(f"first of {n} VOI LUTs used")
            if has_window:
                notes.append("VOI LUT used in preference to the window")
        except Exception as exc:
            notes.append(f"VOI LUT not applied ({_one_line(exc, 120)})")
    if pixels is None and window_c is not None and window_w is not None:
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        try:
            pixels = _window(values, slope, intercept, window_c, window_w, function, notes)
            voi, scale, center, width = "window", "window_range", window_c, window_w
            if (n := _count(ds.WindowCenter)) > 1:
                notes.append(f"first of {n} windows used")
        except ValueError as exc:
            notes.append(f"window not applied ({exc})")
    if pixels is None:
        flat = modality_values()
        pixels = _to_unit(flat, float(flat.min()), float(flat.max()), notes)

    inverted = photometric == "MONOCHROME1"
    if inverted:
        np.subtract(np.float32(1.0), pixels, out=pixels)
    elif str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE":
        notes.append("Presentation LUT Shape INVERSE ignored (only MONOCHROME1 is inverted)")
    info = ReadInfo(**common, modality_lut=modality, voi=voi, window_center=center, window_width=width,
                    inverted=inverted, scale=scale, notes=tuple(notes))
    return Radiograph(pixels, info)


def _voi_lut(values: np.ndarray, item: Dataset, ds: Dataset, notes: list[str]) -> np.ndarray:
    """Look the modality values up in the VOI LUT, scaled by the LUT's output range.

    The range is 2^bits - 1 from the LUT Descriptor, except when the entries need fewer
    bits than declared: some CR vendors declare 16 bits for 12-bit tables, and viewers
    (Horos, Cornerstone) then scale by the bits actually used. So does this reader, with a note.
    """
    entries, first, bits = _lut_table(item, ds)
    used = max(int(entries.max()).bit_length(), 8)
    if used < bits:
        notes.append(f"VOI LUT declares {bits} bits but its entries use {used}: scaled to {used} bits")
        bits = used
    table = entries.astype(np.float32)
    table *= np.float32(1.0 / (2**bits - 1))
    np.clip(table, 0.0, 1.0, out=table)
    return table[_lut_index(values, first, len(table))]


def _window(stored: np.ndarray, slope: float, intercept: float, center: float, width: float, function: str,
            notes: list[str]) -> np.ndarray:
    """The first window (PS3.3 C.11.2.1.2-3) on slope * stored + intercept, output in [0, 1].

    Rescale and window are folded into one float32 affine map plus a clip; the piecewise
    LINEAR definitions are continuous, so clipping the affine part is exact.
    """
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        notes.append(f"unknown VOI LUT function {function!r}: LINEAR used")
        function = "LINEAR"
    elif function != "LINEAR":
        notes.append(f"VOI LUT function {function}")
    if function == "LINEAR":
        if width < 1.0:
            raise ValueError(f"Window Width {width:g} < 1 is invalid for LINEAR")
        center, width = center - 0.5, width - 1.0
    elif width <= 0.0:
        raise ValueError(f"Window Width {width:g} <= 0 is invalid for {function}")

    out = stored.astype(np.float32)
    if function == "SIGMOID":
        k = -4.0 / width
        out *= np.float32(slope * k)
        out += np.float32((intercept - center) * k)
        with np.errstate(over="ignore"):
            np.exp(out, out=out)
        out += np.float32(1.0)
        np.reciprocal(out, out=out)
        return out
    if width == 0.0:  # LINEAR with width 1: a threshold at the centre
        out *= np.float32(slope)
        out += np.float32(intercept)
        return np.greater(out, np.float32(center)).astype(np.float32)
    out *= np.float32(slope / width)
    out += np.float32((intercept - center) / width + 0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------- shared value helpers


def _to_unit(values: np.ndarray, lo: float, hi: float, notes: list[str]) -> np.ndarray:
    """float32 (values - lo) / (hi - lo), clipped to [0, 1]; a zero span gives zeros and a note."""
    out = values.astype(np.float32)  # always a fresh array, so in-place work is safe
    span = hi - lo
    if span == 0.0:
        notes.append("constant image")
        out.fill(0.0)
        return out
    out -= np.float32(lo)
    out *= np.float32(1.0 / span)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _luma(rgb: np.ndarray, bgr: bool = False) -> np.ndarray:
    """ITU-R 601 luma of the first three samples, float32."""
    r, b = (2, 0) if bgr else (0, 2)
    out = rgb[..., r].astype(np.float32)
    out *= _LUMA[0]
    out += _LUMA[1] * rgb[..., 1]
    out += _LUMA[2] * rgb[..., b]
    return out


# --------------------------------------------------------------------------- PNG / JPEG / TIFF / others


def _png_header(data: bytes) -> tuple[int | None, int | None, tuple[int, ...] | None]:
    """(bit depth, colour type, sBIT) from the chunks before the image data."""
    bit_depth = colour_type = None
    sbit: tuple[int, ...] | None = None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 10:
            bit_depth, colour_type = body[8], body[9]
        elif kind == b"sBIT":
            sbit = tuple(body)
        elif kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return bit_depth, colour_type, sbit


def _jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(sample precision, n of SOFn) from a JPEG's frame header, found by walking the segments before it."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 < len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            return data[pos + 4], marker - 0xC0
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _unrecognised(data: bytes) -> _Unreadable:
    """Why Pillow could not identify the file: a JPEG of another precision than 8 bits, or not an image."""
    frame = _jpeg_frame(data)
    if frame is not None and frame[0] != 8:
        return _Unreadable(f"{frame[0]}-bit JPEG (SOF{frame[1]}): Pillow and OpenCV here decode 8-bit JPEG "
                           "only; convert it to a 16-bit PNG")
    return _Unreadable("not an image (format not recognised)")


def _tiff_stored_order(data: bytes) -> tuple[bytes, int | None]:
    """The TIFF with its first IFD's Orientation set to 1, and the orientation it had (None: no tag; the bytes
    as they are for other formats).

    Pillow and OpenCV both turn a TIFF by this tag on load, whatever flags they get; with the tag at 1 they
    decode the stored row/column order, which is the order of JPEG and PNG here and of the annotations.
    """
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        offset_format, count_format, entry_size, value_at = "I", "H", 12, 8
    elif data[:4] in (b"II+\x00", b"MM\x00+"):  # BigTIFF
        offset_format, count_format, entry_size, value_at = "Q", "Q", 20, 12
    else:
        return data, None
    order = "<" if data[:2] == b"II" else ">"
    try:
        start = 8 if offset_format == "Q" else 4
        (ifd,) = struct.unpack_from(order + offset_format, data, start)
        (count,) = struct.unpack_from(order + count_format, data, ifd)
        first = ifd + struct.calcsize(count_format)
        for k in range(count):
            entry = first + k * entry_size
            tag, kind = struct.unpack_from(order + "HH", data, entry)
            if tag == 0x0112 and kind in (3, 4):  # Orientation, SHORT (or LONG): left-justified in the entry
                value = order + ("H" if kind == 3 else "I")
                (orientation,) = struct.unpack_from(value, data, entry + value_at)
                if orientation == 1:
                    return data, 1
                patched = bytearray(data)
                struct.pack_into(value, patched, entry + value_at, 1)
                return bytes(patched), orientation
    except struct.error:  # a damaged header: the decoders will say so
        pass
    return data, None


def _needs_opencv(im: Image.Image, fmt: str, data: bytes) -> bool:
    """Cases where Pillow would reduce >8-bit colour samples to 8 bits."""
    if fmt == "png":
        bit_depth, colour_type, _ = _png_header(data)
        return bit_depth == 16 and colour_type in (2, 4, 6)
    if fmt == "tiff":
        bits = im.tag_v2.get(258)  # BitsPerSample
        return isinstance(bits, tuple) and len(bits) > 1 and max(bits) > 8
    return False


def _opencv_decode(data: bytes) -> np.ndarray | None:
    import cv2  # only for the few files Pillow cannot take; keeps `is_dicom` imports light

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _decode_error(fmt: str, exc: BaseException) -> _Unreadable:
    text = _one_line(exc)
    if "truncat" in text.lower():
        return _Unreadable(f"truncated {fmt.upper()} ({text})")
    return _Unreadable(f"cannot decode {fmt.upper()} ({text})")


def _pillow_array(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if transparent else "RGB")
        notes.append("palette expanded to RGB")
    elif mode not in ("1", "L", "LA", "RGB", "RGBA", "RGBX", "I", "F") and not mode.startswith("I;16"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, premultiplied modes
        notes.append(f"{mode} converted to RGB")
    return np.asarray(im)


def _read_other(data: bytes) -> Radiograph:
    data, tiff_orientation = _tiff_stored_order(data)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if _looks_like_bare_dicom(data):
            return _read_dicom(data, magic=False)
        raise _unrecognised(data) from None
    except Exception as exc:
        if "truncat" in str(exc).lower():
            raise _Unreadable(f"truncated image file ({_one_line(exc)})") from exc
        raise _Unreadable(f"cannot open the image ({_one_line(exc)})") from exc
    with im:
        fmt = (im.format or "unknown").lower()
        notes: list[str] = []
        frames = int(getattr(im, "n_frames", 1) or 1)
        if frames > 1:
            notes.append(f"multi-frame: first of {frames} frames used")
        if tiff_orientation is not None:
            orientation = tiff_orientation
        else:
            try:
                orientation = im.getexif().get(0x0112)
            except Exception:
                orientation = None
        if orientation not in (None, 1):
            tag = "TIFF" if tiff_orientation is not None else "EXIF"
            notes.append(f"{tag} orientation {orientation} not applied (stored row/column order kept)")

        bgr = False
        if _needs_opencv(im, fmt, data):
            arr = _opencv_decode(data)
            if arr is None:
                raise _Unreadable(f"cannot decode {fmt.upper()} (OpenCV failed on this >8-bit colour file)")
            bgr = True
        else:
            try:
                im.load()
                arr = _pillow_array(im, notes)
            except Exception as exc:
                if fmt != "tiff" or (arr := _opencv_decode(data)) is None:
                    raise _decode_error(fmt, exc) from exc
                bgr = True
                notes.append("decoded by OpenCV")
        height, width = int(arr.shape[0]), int(arr.shape[1])
        return _raster_to_unit(arr, fmt, bgr, notes, data, height, width, frames)


def _raster_to_unit(arr: np.ndarray, fmt: str, bgr: bool, notes: list[str], data: bytes, height: int,
                    width: int, frames: int) -> Radiograph:
    """Colour -> luma, alpha dropped, then integers by their bit range and floats by min-max (or as is)."""
    photometric = "MONOCHROME2"
    if arr.ndim == 3:
        channels = arr.shape[2]
        if channels in (2, 4):
            notes.append("alpha channel ignored")
        if channels >= 3:
            photometric = "RGB"
            notes.append("RGB converted to grey (ITU-R 601 luma)")
            grey = _luma(arr, bgr)
        else:
            grey = arr[..., 0]
    else:
        grey = arr
    kind = arr.dtype.kind

    bits: int | None
    if kind == "b":
        bits, lo, hi, scale = 1, 0.0, 1.0, "dtype_max"
    elif kind == "u" and arr.dtype.itemsize <= 2:
        bits = 8 * arr.dtype.itemsize
        lo, hi, scale = 0.0, float(2**bits - 1), "dtype_max"
        if fmt == "png" and bits == 16:
            bits, hi, scale = _png_significant_bits(data, arr, notes)
    elif kind == "f":
        if not np.isfinite(grey).all():
            raise _Unreadable(f"{fmt.upper()} float image has NaN or infinite values")
        bits = None
        lo, hi = float(grey.min()), float(grey.max())
        if lo >= 0.0 and hi <= 1.0:
            lo, hi, scale = 0.0, 1.0, "none"
        else:
            scale = "minmax"
    else:  # 32-bit integers: no meaningful nominal range
        bits = None
        lo, hi, scale = float(grey.min()), float(grey.max()), "minmax"

    pixels = _to_unit(grey, lo, hi, notes)
    info = ReadInfo(format=fmt, height=height, width=width, transfer_syntax=None, photometric=photometric,
                    modality_lut=False, voi="none", window_center=None, window_width=None, inverted=False,
                    frames=frames, bits_stored=bits, scale=scale, notes=tuple(notes))
    return Radiograph(pixels, info)


def _png_significant_bits(data: bytes, arr: np.ndarray, notes: list[str]) -> tuple[int, float, str]:
    """A 16-bit PNG's divisor: 2^sBIT - 1 when sBIT declares fewer bits, else 65535.

    The PNG spec asks encoders to scale samples up to the full 16 bits and keep the
    original depth in sBIT, but medical converters often store 12-bit values as they
    are and declare sBIT=12. Values above 2^sBIT - 1 show the file followed the
    spec, so it is divided by 65535 then.
    """
    _, colour_type, sbit = _png_header(data)
    if not sbit:
        return 16, 65535.0, "dtype_max"
    significant = max(sbit[:3] if colour_type in (2, 6) else sbit[:1])
    if not 0 < significant < 16:
        return 16, 65535.0, "dtype_max"
    top = 2**significant - 1
    samples = arr if arr.ndim == 2 else arr[..., : 3 if arr.shape[2] >= 3 else 1]  # alpha excluded
    if int(samples.max()) > top:
        notes.append(f"sBIT={significant} but values exceed {top}: treated as full 16-bit")
        return 16, 65535.0, "dtype_max"
    return significant, float(top), "bits_stored"
