"""Build small DICOM files for tests, in any transfer syntax the installed encoders can write.

The point is that tests state *what* a file should contain (pixels, photometric
interpretation, rescale, windows, LUTs, frames, transfer syntax) in one call and
get a real file on disk, written by pydicom (and transcoded by GDCM for the
JPEG process 1/14 syntaxes that pydicom cannot encode).

Array shape decides frames and samples per pixel, so nothing has to be said twice:

* ``(rows, cols)``                 one frame, one sample
* ``(frames, rows, cols)``         several frames, one sample
* ``(rows, cols, 3)``              one frame, colour (photometric RGB or YBR_*)
* ``(frames, rows, cols, 3)``      several frames, colour

The dtype decides Bits Allocated (8/16) and Pixel Representation (unsigned/signed).

Typical use::

    from dicom_factory import Lut, write_dicom   # tests/ is on sys.path under pytest
    write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, rescale=(2.0, -100.0), window=[(400, 800), (40, 80)])
    write_dicom(tmp_path / "b.dcm", arr, transfer_syntax=JPEGLSNearLossless, encoding={"jls_error": 2})
    write_dicom(tmp_path / "c", arr, voi_lut=Lut(data=range(4096), first_mapped=0, bits=12))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = [
    "COMPRESSED_SYNTAXES",
    "GDCM_ENCODED",
    "LOSSY_SYNTAXES",
    "NATIVE_SYNTAXES",
    "PYDICOM_ENCODED",
    "Lut",
    "build_dataset",
    "write_dicom",
]

NATIVE_SYNTAXES: frozenset[UID] = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
# Encoded by pydicom's own plugins: RLE natively, JPEG-LS by pyjpegls, JPEG 2000 by pylibjpeg-openjpeg.
PYDICOM_ENCODED: frozenset[UID] = frozenset(
    {RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000}
)
# pydicom has no JPEG process 1/14 encoder; GDCM transcodes the written file.
GDCM_ENCODED: frozenset[UID] = frozenset({JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1})
COMPRESSED_SYNTAXES: frozenset[UID] = PYDICOM_ENCODED | GDCM_ENCODED
LOSSY_SYNTAXES: frozenset[UID] = frozenset({JPEGLSNearLossless, JPEG2000, JPEGBaseline8Bit})

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422"}


@dataclass(frozen=True)
class Lut:
    """One item of a Modality or VOI LUT Sequence.

    `bits` is the third LUT Descriptor value (bits per entry); `first_mapped`
    the second (the first stored value the table maps). Entries are written as
    US values, so they must fit in 16 bits.
    """

    data: Sequence[int] | Iterable[int]
    first_mapped: int = 0
    bits: int = 16
    explanation: str = field(default="")

    def item(self) -> Dataset:
        values = [int(v) for v in self.data]
        if not values:
            raise ValueError("a LUT needs at least one entry")
        if min(values) < 0 or max(values) > 0xFFFF:
            raise ValueError("LUT entries must fit in 16 unsigned bits")
        item = Dataset()
        # 65536 entries are written as 0, as the standard asks.
        item.LUTDescriptor = [len(values) % 65536, int(self.first_mapped), int(self.bits)]
        item.LUTData = values
        item["LUTData"].VR = "US"
        if self.explanation:
            item.LUTExplanation = self.explanation
        return item


def _split_shape(pixels: np.ndarray, photometric: str) -> tuple[int, int]:
    """(frames, samples per pixel) from the array shape and the photometric interpretation."""
    colour = photometric in _COLOUR
    expected = {(False, 2): 1, (False, 3): "f", (True, 3): 1, (True, 4): "f"}.get((colour, pixels.ndim))
    if expected is None:
        raise ValueError(f"array of shape {pixels.shape} does not fit photometric {photometric}")
    if colour and pixels.shape[-1] != 3:
        raise ValueError(f"colour arrays need 3 samples in the last axis, got shape {pixels.shape}")
    frames = pixels.shape[0] if expected == "f" else 1
    return frames, 3 if colour else 1


def _windows(window: tuple[float, float] | Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Accept one (center, width) pair or a list of pairs."""
    if len(window) == 2 and all(isinstance(v, int | float | np.number) for v in window):
        return [(float(window[0]), float(window[1]))]  # type: ignore[arg-type]
    return [(float(c), float(w)) for c, w in window]  # type: ignore[misc]


def build_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    voi_lut_function: str | None = None,
    voi_lut: Lut | Sequence[Lut] | None = None,
    modality_lut: Lut | None = None,
    pixel_data: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Dataset:
    """An uncompressed (Explicit VR Little Endian) Secondary Capture dataset holding `pixels`.

    Parameters
    ----------
    pixels: uint8/int8/uint16/int16 array; its shape gives frames and samples (see the module doc).
    photometric: MONOCHROME1, MONOCHROME2, RGB, YBR_FULL or YBR_FULL_422 (YBR data must already be YBR).
    bits_stored: defaults to the dtype's bit count; values must fit in it.
    rescale: (Rescale Slope, Rescale Intercept).
    window: (Window Center, Window Width), or a list of them for several windows (VM > 1).
    voi_lut_function: the VOI LUT Function element (LINEAR, LINEAR_EXACT, SIGMOID).
    voi_lut: one LUT or several (items of the VOI LUT Sequence).
    modality_lut: one LUT for the Modality LUT Sequence (used instead of rescale).
    pixel_data: False leaves Pixel Data out, keeping Rows/Columns (for "no pixel data" errors).
    extra: more elements by keyword, e.g. {"PresentationLUTShape": "INVERSE"}.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype.kind not in "ui" or pixels.dtype.itemsize not in (1, 2):
        raise ValueError(f"pixels must be 8- or 16-bit integers, got {pixels.dtype}")
    frames, _ = _split_shape(pixels, photometric)
    bits = int(bits_stored or pixels.dtype.itemsize * 8)

    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "TEST"
    ds.PatientName = "TEST^IMAGE"

    # set_pixel_data fills Rows, Columns, Samples, Bits*, Pixel Representation, Planar Configuration
    # and Number of Frames consistently with the array.
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    if frames == 1 and "NumberOfFrames" in ds:
        del ds.NumberOfFrames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
        ds.RescaleType = "US"
    if modality_lut is not None:
        ds.ModalityLUTSequence = [modality_lut.item()]
    if window is not None:
        pairs = _windows(window)
        centers, widths = [c for c, _ in pairs], [w for _, w in pairs]
        ds.WindowCenter = centers if len(centers) > 1 else centers[0]
        ds.WindowWidth = widths if len(widths) > 1 else widths[0]
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        luts = [voi_lut] if isinstance(voi_lut, Lut) else list(voi_lut)
        ds.VOILUTSequence = [lut.item() for lut in luts]
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if not pixel_data:
        del ds.PixelData
    return ds


def _gdcm_transcode(path: Path, transfer_syntax: UID) -> None:
    """Re-encode the file at `path` in place with GDCM (JPEG baseline / lossless)."""
    import gdcm  # python-gdcm

    target = {
        JPEGBaseline8Bit: gdcm.TransferSyntax.JPEGBaselineProcess1,
        JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
        JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }[transfer_syntax]
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise RuntimeError(f"GDCM cannot read {path}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(target))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"GDCM cannot transcode {path} to {transfer_syntax.name}")
    tmp = path.with_name(path.name + ".gdcm-tmp")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM cannot write {tmp}")
    os.replace(tmp, path)


def write_dicom(
    path: str | os.PathLike[str],
    pixels: np.ndarray,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    encoding: Mapping[str, Any] | None = None,
    preamble: bool = True,
    file_meta: bool = True,
    **dataset_options: Any,
) -> Path:
    """Write `pixels` as a DICOM file at `path` (any extension, or none) and return the path.

    Parameters
    ----------
    transfer_syntax: a UID from NATIVE_SYNTAXES or COMPRESSED_SYNTAXES. JPEG 2000 (openjpeg's
        default 6 resolutions) needs at least 32 rows and columns; JPEG Baseline needs 8-bit pixels.
    encoding: options for pydicom's encoder, e.g. {"jls_error": 2} for JPEG-LS near-lossless
        or {"j2k_cr": [10]} / {"j2k_psnr": [60]} for lossy JPEG 2000 (one of them is required there).
    preamble: False drops the 128-byte preamble and "DICM" magic, keeping the File Meta group.
    file_meta: False writes the bare dataset (Implicit VR Little Endian, no preamble, no meta),
        like old ACR-NEMA-style files.
    dataset_options: passed to `build_dataset` (photometric, bits_stored, rescale, window, ...).
    """
    path = Path(path)
    ts = UID(transfer_syntax)
    ds = build_dataset(pixels, **dataset_options)

    if not file_meta:
        if ts != ImplicitVRLittleEndian:
            raise ValueError("a file without File Meta must be Implicit VR Little Endian")
        del ds.file_meta
        ds.preamble = None
        dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
        return path

    if ts in PYDICOM_ENCODED:
        options = dict(encoding or {})
        if ts == JPEG2000 and not ({"j2k_cr", "j2k_psnr"} & options.keys()):
            options["j2k_cr"] = [10.0]
        ds.compress(ts, generate_instance_uid=False, **options)
    elif ts in NATIVE_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = ts
    elif ts not in GDCM_ENCODED:
        raise ValueError(f"no encoder for transfer syntax {ts} ({ts.name})")
    ds.save_as(path, enforce_file_format=True)

    if ts in GDCM_ENCODED:
        if ts == JPEGBaseline8Bit and ds.BitsAllocated != 8:
            raise ValueError("JPEG Baseline needs 8-bit pixels")
        _gdcm_transcode(path, ts)
        if ts == JPEGBaseline8Bit and ds.SamplesPerPixel == 3:
            # GDCM converts colour to YCbCr inside the JPEG stream but keeps "RGB"; label it as the
            # standard asks, otherwise every reader shows YCbCr values as RGB.
            written = dcmread(path)
            written.PhotometricInterpretation = "YBR_FULL_422"
            written.save_as(path, enforce_file_format=True)

    if not preamble:
        data = path.read_bytes()
        path.write_bytes(data[132:])
    return path
