"""COVID Rural (TCIA COVID-19-AR with opacity masks): the "unseen disease" test.

`jpgs/<stem>.jpg` with `pngs_masks/<stem>.png`; a mask pixel > 0 is opacity. One
item per image with the prompt for pneumonia; images whose mask is empty are
kept as negatives (localization is scored on the non-empty ones).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from afloc_cli.benchmark.datasets.base import DEFAULT_PROMPT_TEMPLATE, Item, Problem, check_split, fill_prompt, missing

CATEGORY = "Pneumonia"


def read_mask(path: Path) -> np.ndarray:
    """Bool (H, W): any channel > 0, alpha ignored (palette images: index > 0)."""
    with Image.open(path) as im:
        bands = [b for b in im.getbands() if b != "A"]
        channels = [np.asarray(im.getchannel(b)) for b in bands] if len(bands) != len(im.getbands()) else None
        a = np.stack(channels, axis=-1) if channels else np.asarray(im)
    if a.ndim == 3:
        return np.any(a > 0, axis=2)
    return a > 0


class CovidRuralReader:
    name = "covid-rural"
    published_at = "https://github.com/haimingt/opacity_segmentation_covid_chest_X_ray (images: TCIA COVID-19-AR)"

    def read(
        self, root: Path, split: str | None = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    ) -> tuple[list[Item], list[Problem]]:
        root = Path(root)
        check_split(self.name, split, [])
        jpgs, masks = root / "jpgs", root / "pngs_masks"
        for folder in (jpgs, masks):
            if not folder.is_dir():
                raise missing(folder.name + "/", root, self.published_at)
        images = {p.stem: p for p in sorted(jpgs.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")}
        mask_files = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() == ".png"}
        prompt = fill_prompt(prompt_template, CATEGORY)
        items: list[Item] = []
        problems: list[Problem] = []
        for stem in sorted(set(mask_files) - set(images)):
            problems.append(Problem(str(mask_files[stem]), None, f"no image jpgs/{stem}.jpg for this mask"))
        for stem, image_path in images.items():
            mask_path = mask_files.get(stem)
            if mask_path is None:
                problems.append(Problem(str(image_path), None, f"no mask pngs_masks/{stem}.png for this image"))
                continue
            try:
                mask = read_mask(mask_path)
                with Image.open(image_path) as im:
                    width, height = im.size
            except OSError as e:
                problems.append(Problem(str(mask_path), None, f"cannot read image or mask ({e})"))
                continue
            if mask.shape != (height, width):
                problems.append(
                    Problem(str(mask_path), None, f"mask is {mask.shape[0]}x{mask.shape[1]}, image {height}x{width}")
                )
                continue
            items.append(
                Item(
                    dataset=self.name,
                    item_id=stem,
                    image_id=stem,
                    image_path=image_path,
                    split=None,
                    category=CATEGORY,
                    prompt=prompt,
                    positive=bool(mask.any()),
                    height=height,
                    width=width,
                    mask=partial(read_mask, mask_path),
                )
            )
        return items, problems
