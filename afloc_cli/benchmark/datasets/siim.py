"""SIIM-ACR Pneumothorax (Kaggle): relative, column-major RLE masks on 1024x1024 DICOMs.

`train-rle.csv` has `ImageId, EncodedPixels` (the header ships with a leading
space); `-1` is a negative, several rows for one image are a union. The DICOMs
sit at `dicom-images-train/<Study>/<Series>/<ImageId>.dcm`, found by walking the tree.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from afloc_cli.benchmark.datasets.base import (
    DEFAULT_PROMPT_TEMPLATE,
    Item,
    Problem,
    check_split,
    field_of,
    fill_prompt,
    missing,
    read_csv,
)
from afloc_cli.benchmark.datasets.rle import decode_relative, parse_relative

LABELS = "train-rle.csv"
IMAGES = "dicom-images-train"
CATEGORY = "Pneumothorax"
SIZE = 1024  # every SIIM-ACR radiograph; the RLE is defined on this grid


def index_dicoms(folder: Path) -> dict[str, Path]:
    """ImageId (file stem) -> path, for every .dcm below `folder`."""
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(".dcm"):
                found.setdefault(name[:-4], Path(dirpath) / name)
    return found


class SiimReader:
    name = "siim"
    published_at = "https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation"

    def read(
        self, root: Path, split: str | None = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    ) -> tuple[list[Item], list[Problem]]:
        root = Path(root)
        check_split(self.name, split, [])
        labels = root / LABELS
        if not labels.is_file():
            raise missing(LABELS, root, self.published_at)
        if not (root / IMAGES).is_dir():
            raise missing(IMAGES + "/", root, self.published_at)
        table = read_csv(labels)
        col = table.require_columns(("ImageId", "EncodedPixels"), self.published_at)
        file = str(labels)
        runs: dict[str, list[str]] = {}
        negative: set[str] = set()
        first_line: dict[str, int] = {}
        problems: list[Problem] = []
        for line, fields in table.rows:
            image_id = field_of(fields, col["ImageId"])
            encoded = field_of(fields, col["EncodedPixels"])
            if not image_id:
                problems.append(Problem(file, line, "empty ImageId"))
                continue
            if encoded == "-1":
                if image_id in runs:
                    problems.append(Problem(file, line, f"{image_id} has a mask and also a -1 row"))
                    continue
                negative.add(image_id)
            else:
                try:
                    parse_relative(encoded, SIZE, SIZE)
                except ValueError as e:
                    problems.append(Problem(file, line, str(e)))
                    continue
                if image_id in negative:
                    problems.append(Problem(file, line, f"{image_id} has a -1 row and also a mask"))
                    continue
                runs.setdefault(image_id, []).append(encoded)
            first_line.setdefault(image_id, line)
        dicoms = index_dicoms(root / IMAGES)
        prompt = fill_prompt(prompt_template, CATEGORY)
        items: list[Item] = []
        for image_id, line in first_line.items():
            path = dicoms.get(image_id)
            if path is None:
                problems.append(Problem(file, line, f"no {IMAGES}/**/{image_id}.dcm"))
                continue
            encodings = runs.get(image_id)
            positive = bool(encodings) and any(int(n) > 0 for e in encodings for n in e.split()[1::2])
            items.append(
                Item(
                    dataset=self.name,
                    item_id=image_id,
                    image_id=image_id,
                    image_path=path,
                    split=None,
                    category=CATEGORY,
                    prompt=prompt,
                    positive=positive,
                    height=SIZE,
                    width=SIZE,
                    mask=partial(decode_relative, list(encodings or []), SIZE, SIZE),
                )
            )
        return items, problems
