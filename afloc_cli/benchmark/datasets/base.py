"""What every benchmark reader hands back: items with truth in original pixels, and the rows it could not use.

A reader takes a dataset's root exactly as its publisher ships it. A row it
cannot use becomes a `Problem` (file, row, reason): reported, never a crash and
never silently dropped. A file that is missing altogether is an `AflocError`
naming the file and where to download it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from afloc_cli.errors import AflocError, ImageReadError

DEFAULT_PROMPT_TEMPLATE = "Findings suggesting {category}."


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in original pixels: top-left corner plus size."""

    x: float
    y: float
    w: float
    h: float

    @classmethod
    def from_corners(cls, x_min: float, y_min: float, x_max: float, y_max: float) -> Box:
        return cls(x_min, y_min, x_max - x_min, y_max - y_min)

    def pixel_span(self) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1), half-open, before clipping.

        Start and size floored (`int(y) : int(y) + int(h)`), so integer boxes cover exactly w x h original
        pixels. This is the image framing's truth; the reference framing maps boxes into the model frame first
        (`Letterbox.boxes_to_frame_mask`), as the paper's box_mapping does.
        """
        r0, c0 = math.floor(self.y), math.floor(self.x)
        return r0, r0 + math.floor(self.h), c0, c0 + math.floor(self.w)


@dataclass(slots=True)
class Item:
    """One image-phrase pair (or image-finding pair) with its truth in original pixels."""

    dataset: str
    item_id: str
    image_id: str
    image_path: Path
    split: str | None
    category: str  # canonical finding name
    prompt: str  # the phrase to localize
    positive: bool  # has the finding; negatives carry no truth and matter for AUROC only
    height: int | None = None  # original size when the annotation states it; else filled from the image header
    width: int | None = None
    boxes: tuple[Box, ...] = ()
    mask: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """'mask' for segmentation truth, 'box' otherwise (negatives of box datasets included)."""
        return "mask" if self.mask is not None else "box"

    def with_size(self, height: int, width: int) -> Item:
        """A copy with the original size filled in (from the image header)."""
        return replace(self, height=int(height), width=int(width))

    def truth_mask(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Bool (H, W) truth in original pixel order: OR of the filled boxes (clipped), or the decoded mask."""
        h = self.height if height is None else int(height)
        w = self.width if width is None else int(width)
        if self.mask is not None:
            m = np.asarray(self.mask(), dtype=bool)
            if (h is not None and m.shape[0] != h) or (w is not None and m.shape[1] != w):
                raise ValueError(f"{self.dataset} {self.item_id}: mask is {m.shape[0]}x{m.shape[1]}, image is {h}x{w}")
            return m
        if h is None or w is None:
            raise ValueError(f"{self.dataset} {self.item_id}: image size unknown; read it from the image header")
        return boxes_to_mask(self.boxes, h, w)


def boxes_to_mask(boxes: Iterable[Box], height: int, width: int) -> np.ndarray:
    """OR of filled boxes, clipped to the image."""
    out = np.zeros((height, width), dtype=bool)
    for box in boxes:
        r0, r1, c0, c1 = box.pixel_span()
        r0, r1 = max(r0, 0), min(r1, height)
        c0, c1 = max(c0, 0), min(c1, width)
        if r1 > r0 and c1 > c0:
            out[r0:r1, c0:c1] = True
    return out


@dataclass(frozen=True, slots=True)
class Problem:
    """A row a reader could not use. `row` is the line number in the file (header = line 1), or None."""

    file: str
    row: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.row}" if self.row is not None else self.file
        return f"{where}: {self.reason}"


class DatasetReader(Protocol):
    name: str
    published_at: str  # where users download it, for error messages

    def read(
        self, root: Path, split: str | None = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    ) -> tuple[list[Item], list[Problem]]: ...


# ---------------------------------------------------------------- helpers shared by the readers


def fill_prompt(template: str, category: str) -> str:
    """The template with the finding in lower case, acronyms kept ('ILD' stays 'ILD')."""
    words = [w if (len(w) > 1 and w.isupper()) else w.lower() for w in category.split(" ")]
    return template.format(category=" ".join(words))


def missing(file: str | Path, root: Path, published_at: str) -> AflocError:
    """The error for a file the download should contain."""
    return AflocError(f"expected {file}", path=root, hint=f"download from {published_at}")


def require(root: Path, relative: str, published_at: str) -> Path:
    path = root / relative
    if not path.exists():
        raise missing(relative, root, published_at)
    return path


@dataclass(frozen=True, slots=True)
class CsvTable:
    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (line number, stripped fields)

    def require_columns(self, columns: Sequence[str], published_at: str) -> dict[str, int]:
        """Column name -> index; an AflocError naming the absent columns."""
        index: dict[str, int] = {}
        for i, name in enumerate(self.header):
            index.setdefault(name, i)
        absent = [c for c in columns if c not in index]
        if absent:
            raise AflocError(
                f"expected columns {', '.join(absent)} (found {', '.join(self.header)})",
                path=self.path,
                hint=f"is this the file as downloaded from {published_at}?",
            )
        return index


def read_csv(path: Path) -> CsvTable:
    """All records of a CSV with whitespace stripped from header and fields; blank lines dropped.

    Bytes that are not UTF-8 (a stray Latin-1 letter in a name) become U+FFFD, as the corpus reader does
    ("utf8-lossy"): one odd byte must not stop a benchmark, and a field it spoils fails its row's own checks.
    """
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return CsvTable(path, [], [])
        rows: list[tuple[int, list[str]]] = []
        start = reader.line_num + 1
        for record in reader:
            fields = [c.strip() for c in record]
            if any(fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    return CsvTable(path, header, rows)


def field_of(fields: list[str], index: int) -> str:
    """A field by index, '' when a short row lacks it."""
    return fields[index] if index < len(fields) else ""


def parse_float(text: str) -> float | None:
    """A finite float, or None for empty/'nan'/garbage."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_split(name: str, split: str | None, available: Iterable[str | None]) -> None:
    """An AflocError when a split is asked of a dataset (or file) that has none or not that one."""
    if split is None:
        return
    names = sorted({s for s in available if s is not None})
    if not names:
        raise AflocError(f"{name} has no split column, so --split {split} cannot be applied", hint="omit the split")
    if split not in names:
        raise AflocError(f"{name} has no split {split!r}", hint=f"choose one of {', '.join(names)}")


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding pixels.

    Uses the project's image reader when present (`afloc_cli.image.data.io`);
    otherwise pydicom (Rows, Columns) for DICOM and Pillow for the rest.
    """
    try:
        from afloc_cli.image.data.io import read_image_size  # type: ignore[import-not-found]
    except ImportError:
        read_image_size = None
    if read_image_size is not None:
        h, w = read_image_size(path)
        return int(h), int(w)
    if path.suffix.lower() in {".dcm", ".dicom"}:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return int(h), int(w)


def fill_sizes(items: Iterable[Item], problems: list[Problem] | None = None) -> list[Item]:
    """Items with height/width filled from image headers where the annotation did not state them.

    With `problems`, an image whose header cannot be read becomes one problem row (its path and why) and its
    items are left out, so one bad file does not stop the rest; without it, the ImageReadError propagates.
    """
    cache: dict[Path, tuple[int, int] | None] = {}
    out: list[Item] = []
    for item in items:
        if item.height is not None and item.width is not None:
            out.append(item)
            continue
        if item.image_path not in cache:
            try:
                cache[item.image_path] = image_size(item.image_path)
            except ImageReadError as e:
                if problems is None:
                    raise
                cache[item.image_path] = None
                problems.append(Problem(str(item.image_path), None, f"image not read, not scored: {e.message}"))
        size = cache[item.image_path]
        if size is not None:
            out.append(item.with_size(*size))
    return out
