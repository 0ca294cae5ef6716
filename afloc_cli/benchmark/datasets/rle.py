"""Run-length encodings the benchmarks ship their masks in, decoded here without pycocotools.

Both are column-major (Fortran order): runs walk down the first column, then
the second, and so on. Decoding therefore fills a flat vector and reshapes it
with order="F" to (height, width), which keeps rows as rows.

- COCO RLE (CheXlocalize): counts alternate background/foreground starting with
  background; `counts` is either a list of ints or pycocotools' compact string,
  where each count is written as little-endian groups of 5 bits, one printable
  character per group (value + 48), bit 0x20 saying "another group follows" and
  bit 0x10 of the last group carrying the sign; from the fourth count on, the
  value stored is the difference to the count two places earlier.
- Relative RLE (SIIM-ACR): "start length start length ...", 1 = foreground, each
  start counted from the end of the previous run.
"""

from __future__ import annotations

import numpy as np


def decode_coco_string(text: str) -> list[int]:
    """The compact string form of COCO RLE counts -> the run lengths."""
    counts: list[int] = []
    pos, n = 0, len(text)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("truncated RLE string")
            group = ord(text[pos]) - 48
            if group < 0 or group > 63:
                raise ValueError(f"invalid RLE character {text[pos]!r}")
            pos += 1
            value |= (group & 0x1F) << shift
            shift += 5
            more = bool(group & 0x20)
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_coco_string(counts: list[int]) -> str:
    """Run lengths -> the compact string form (the inverse of `decode_coco_string`)."""
    chars: list[str] = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negatives stay negative
            more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
            if more:
                group |= 0x20
            chars.append(chr(group + 48))
    return "".join(chars)


def coco_counts(counts: str | list[int]) -> list[int]:
    """Counts in either COCO form -> list of ints, validated non-negative."""
    runs = decode_coco_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in runs):
        raise ValueError("negative run length in RLE")
    return runs


def coco_foreground(counts: list[int]) -> int:
    """Number of foreground pixels: the odd-indexed runs."""
    return int(sum(counts[1::2]))


def decode_coco(counts: str | list[int], height: int, width: int) -> np.ndarray:
    """COCO RLE -> bool (height, width), column-major runs starting with background."""
    runs = np.asarray(coco_counts(counts), dtype=np.int64)
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE covers {int(runs.sum())} pixels, size says {height}x{width}")
    values = (np.arange(runs.size) % 2).astype(bool)
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")


def encode_coco(mask: np.ndarray) -> list[int]:
    """Bool (H, W) -> COCO run lengths (column-major, starting with background)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat[0]:
        runs = [0, *runs]
    return [int(r) for r in runs]


def parse_relative(encoded: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """SIIM's relative RLE -> absolute (starts, ends) in the column-major flat vector, validated."""
    try:
        numbers = np.array([int(tok) for tok in encoded.split()], dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"RLE is not a list of integers ({e})") from None
    if numbers.size == 0 or numbers.size % 2:
        raise ValueError("RLE needs start/length pairs")
    if numbers.min() < 0:
        raise ValueError("RLE has a negative start or length")
    offsets, lengths = numbers[0::2], numbers[1::2]
    ends = np.cumsum(offsets + lengths)
    if int(ends[-1]) > height * width:
        raise ValueError(f"RLE runs past the {height}x{width} image")
    return ends - lengths, ends


def decode_relative(encoded: str | list[str], height: int, width: int) -> np.ndarray:
    """SIIM's relative RLE (or the union of several) -> bool (height, width).

    Fill the flat vector, then reshape column-major: the same as SIIM's
    "reshape to (width, height) and transpose".
    """
    total = height * width
    flat = np.zeros(total + 1, dtype=np.int32)
    for text in [encoded] if isinstance(encoded, str) else encoded:
        starts, ends = parse_relative(text, height, width)
        np.add.at(flat, starts, 1)
        np.add.at(flat, ends, -1)
    filled = np.cumsum(flat[:-1]) > 0
    return filled.reshape((height, width), order="F")


def encode_relative(mask: np.ndarray) -> str:
    """Bool (H, W) -> SIIM relative RLE (the inverse of `decode_relative`); '-1' when empty."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    padded = np.concatenate([[False], flat, [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = change[0::2], change[1::2]
    if starts.size == 0:
        return "-1"
    previous_end = np.concatenate([[0], ends[:-1]])
    pairs = np.stack([starts - previous_end, ends - starts], axis=1).ravel()
    return " ".join(str(int(v)) for v in pairs)
