"""Writing a rendered radiograph as PNG (8/16-bit) or DICOM (MONOCHROME2/MONOCHROME1).

Every byte is a function of the image and its identifiers: PNGs carry no time
chunks, DICOM UIDs are derived from names by hashing, dates are synthetic.
That is what makes two runs with one seed byte-identical.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

FORMATS: tuple[str, ...] = ("png8", "png16", "dcm-mono2", "dcm-mono1")
EXTENSIONS = {"png8": "png", "png16": "png", "dcm-mono2": "dcm", "dcm-mono1": "dcm"}
DICOM_BITS = 12
_UID_NAMESPACE = uuid.UUID("6f0c1a52-8e4b-4f3c-9a57-3d2b1c0e7a11")  # fixed: the corpus's own namespace
IMPLEMENTATION_VERSION = "AFLOC_SYNTH_1"


def synthetic_uid(*parts: object) -> UID:
    """A UUID-derived DICOM UID (2.25.<uuid as integer>) that depends only on `parts`."""
    name = "/".join(str(p) for p in parts)
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


IMPLEMENTATION_UID = synthetic_uid("afloc-synth", "implementation")


def to_uint(image: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] float -> unsigned integers over the full range of `bits`, rounded."""
    top = (1 << bits) - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.clip(np.rint(image * top), 0, top).astype(dtype)


def encode_png(image: np.ndarray, bits: int) -> bytes:
    ok, buf = cv2.imencode(".png", to_uint(image, bits), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV always encodes a 2-D uint array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


@dataclass(frozen=True)
class DicomIdentity:
    """The synthetic patient/study identifiers of one image."""

    seed: int
    index: int
    dicom_id: str
    subject_id: int
    study_id: int
    sex: str
    view: str  # "PA" or "AP"


def _synthetic_datetime(seed: int, index: int) -> dt.datetime:
    """A shifted-to-the-future date like MIMIC's, from the identifiers, never from the clock."""
    h = int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "big")
    return dt.datetime(2150, 1, 1) + dt.timedelta(seconds=h % (3650 * 86400))


def dicom_dataset(image: np.ndarray, ident: DicomIdentity, inverted: bool) -> Dataset:
    """A Digital X-Ray (for presentation) dataset holding `image` as 12-bit MONOCHROME2 or 1."""
    stored = to_uint(image, DICOM_BITS)
    if inverted:
        stored = ((1 << DICOM_BITS) - 1 - stored).astype(np.uint16)
    sop_uid = synthetic_uid("afloc-synth", ident.seed, ident.index, "sop")
    when = _synthetic_datetime(ident.seed, ident.index)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = f"SYN{ident.study_id}"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "afloc synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"CHEST ({ident.view})"
    ds.SeriesDescription = f"CHEST {ident.view}"
    ds.PatientName = f"SYNTHETIC^{ident.subject_id}"
    ds.PatientID = str(ident.subject_id)
    ds.PatientBirthDate = ""
    ds.PatientSex = ident.sex
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = ident.view
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.StudyInstanceUID = synthetic_uid("afloc-synth", ident.seed, ident.index, "study")
    ds.SeriesInstanceUID = synthetic_uid("afloc-synth", ident.seed, ident.index, "series")
    ds.StudyID = str(ident.study_id)[-8:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImagerPixelSpacing = [f"{430.0 / max(stored.shape):.6f}"] * 2  # a 43-cm detector
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if inverted else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PresentationLUTShape = "INVERSE" if inverted else "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if inverted else "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = DICOM_BITS
    ds.HighBit = DICOM_BITS - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def write_image(path: Path, image: np.ndarray, fmt: str, ident: DicomIdentity) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png8":
        path.write_bytes(encode_png(image, 8))
    elif fmt == "png16":
        path.write_bytes(encode_png(image, 16))
    elif fmt in ("dcm-mono2", "dcm-mono1"):
        dicom_dataset(image, ident, inverted=fmt == "dcm-mono1").save_as(path, enforce_file_format=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
