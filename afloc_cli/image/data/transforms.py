"""The one letterbox transform: original pixels <-> the square model frame.

The reference resizes the long side to the target with OpenCV's INTER_AREA,
truncating the short side (`int(short * target / long)`), and zero-pads the
short side centred, floor before and ceil after. Everything that maps between
the original image and the model frame (inputs, heatmaps, ground truth) goes
through `Letterbox` so the two directions can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterboxed image: original (h, w) -> resized (rh, rw) + padding."""

    height: int  # original
    width: int
    size: int  # square frame side
    resized_height: int
    resized_width: int
    pad_top: int
    pad_left: int

    @classmethod
    def for_shape(cls, height: int, width: int, size: int) -> Letterbox:
        if height <= 0 or width <= 0:
            raise ValueError(f"image has no pixels ({height}x{width})")
        if height >= width:
            rh, rw = size, int(float(width) * (size / float(height)))
        else:
            rh, rw = int(float(height) * (size / float(width))), size
        rh, rw = max(rh, 1), max(rw, 1)
        return cls(
            height=height,
            width=width,
            size=size,
            resized_height=rh,
            resized_width=rw,
            pad_top=(size - rh) // 2,
            pad_left=(size - rw) // 2,
        )

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.height

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.width

    @property
    def image_region(self) -> tuple[slice, slice]:
        """(rows, cols) of the frame that hold the image: everything else is padding."""
        return (slice(self.pad_top, self.pad_top + self.resized_height),
                slice(self.pad_left, self.pad_left + self.resized_width))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    # ---- points and boxes ------------------------------------------------------------
    def original_to_frame(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        """Continuous pixel coordinates (pixel edges at integers) in the original -> frame."""
        return x * self.scale_x + self.pad_left, y * self.scale_y + self.pad_top

    def frame_to_original(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        return (x - self.pad_left) / self.scale_x, (y - self.pad_top) / self.scale_y

    # ---- images ----------------------------------------------------------------------
    def apply(self, image: np.ndarray) -> np.ndarray:
        """Letterbox a 2-D array (any dtype OpenCV resizes) into the size x size frame."""
        if image.ndim != 2 or image.shape != (self.height, self.width):
            raise ValueError(f"expected a {self.height}x{self.width} grey image, got shape {image.shape}")
        if (self.resized_height, self.resized_width) == (self.height, self.width):
            resized = image
        else:
            resized = cv2.resize(
                image, (self.resized_width, self.resized_height), interpolation=cv2.INTER_AREA
            )
        out = np.zeros((self.size, self.size), dtype=image.dtype)
        out[self.image_region] = resized
        return out

    def frame_to_original_map(self, frame_map: torch.Tensor) -> torch.Tensor:
        """Undo the letterbox for maps (..., size, size): crop the padding, resize bilinearly.

        Bilinear with align_corners=False, the convention of the heatmap protocol, so a
        pixel centre maps to the same continuous coordinate both ways.
        """
        crop = frame_map[(..., *self.image_region)]
        lead = crop.shape[:-2]
        flat = crop.reshape(-1, 1, self.resized_height, self.resized_width)
        out = torch.nn.functional.interpolate(
            flat, size=(self.height, self.width), mode="bilinear", align_corners=False
        )
        return out.reshape(*lead, self.height, self.width)

    def original_mask_to_frame(self, mask: np.ndarray, any_coverage: bool = False) -> np.ndarray:
        """A boolean mask in original pixels -> the frame (area-resampled; > 0.5 kept, or >= 1e-5 with
        `any_coverage`, the reference's rule for COVID-Rural's float masks)."""
        framed = self.apply(mask.astype(np.float32))
        return framed >= 1e-5 if any_coverage else framed > 0.5

    def boxes_to_frame_mask(self, boxes: Iterable[tuple[float, float, float, float]]) -> np.ndarray:
        """Boxes (x, y, w, h) in original pixels, filled in the frame the way the reference maps them: every
        coordinate times size / long side, the padding added, then floored (corner and size alike)."""
        s = self.size / float(max(self.height, self.width))
        out = np.zeros((self.size, self.size), dtype=bool)
        for x, y, w, h in boxes:
            c0, r0 = math.floor(x * s + self.pad_left), math.floor(y * s + self.pad_top)
            c1, r1 = c0 + math.floor(w * s), r0 + math.floor(h * s)
            out[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
        return out


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """[0, 1] float grey -> 8-bit grey, rounding half up as the reference's 8-bit files were."""
    return np.clip(np.floor(image01 * 255.0 + 0.5), 0, 255).astype(np.uint8)


def normalize(frame_u8: np.ndarray | torch.Tensor, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """8-bit frames (..., H, W) -> float tensors (..., 3, H, W) in [-1, 1] (x/255, then (x-mean)/std)."""
    t = torch.as_tensor(frame_u8)
    x = t.float().div_(255.0).sub_(mean).div_(std)
    return x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:])
