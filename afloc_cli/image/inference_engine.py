"""From a file on disk to the encoder's input: read, 8-bit, letterbox. Runs in decode workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afloc_cli.image.data.io import ReadInfo, read_image
from afloc_cli.image.data.transforms import Letterbox, to_uint8


@dataclass
class PreparedImage:
    frame: np.ndarray  # uint8 (size, size), letterboxed
    letterbox: Letterbox
    info: ReadInfo


def prepare_image(path: Path | str, size: int) -> PreparedImage:
    """Read any supported radiograph and letterbox it as the reference did its 8-bit files.

    The reference trained on 8-bit JPEGs resized with INTER_AREA, so the image is
    quantised to 8 bits first and resized second.
    """
    radiograph = read_image(path)
    pixels = to_uint8(radiograph.pixels)
    letterbox = Letterbox.for_shape(pixels.shape[0], pixels.shape[1], size)
    return PreparedImage(letterbox.apply(pixels), letterbox, radiograph.info)
