"""NIH ChestX-ray14 boxes: `BBox_List_2017.csv` on the 1024x1024 PNGs.

The header reads `Image Index,Finding Label,Bbox [x,y,w,h],,,`: the bracketed
name is itself split by its commas, and three empty columns trail, so the file
is read by position (image, label, x, y, w, h). Coordinates are floats.
"Infiltrate" is ChestX-ray14's "Infiltration". The download spreads images over
`images_001/images/` ... `images_012/images/`; `images/` is searched too. The
boxes are in the published 1024x1024 pixels whatever the files' size, so a
downsampled copy is scored by scaling them (the runner's `truth_letterbox`).
"""

from __future__ import annotations

import os
from pathlib import Path

from afloc_cli.benchmark.datasets.base import (
    DEFAULT_PROMPT_TEMPLATE,
    Box,
    Item,
    Problem,
    check_split,
    field_of,
    fill_prompt,
    missing,
    parse_float,
    read_csv,
)
from afloc_cli.errors import AflocError

LABELS = "BBox_List_2017.csv"
CANONICAL = {"Infiltrate": "Infiltration"}
SIZE = 1024  # every ChestX-ray14 PNG as published; the boxes are in its pixels


def index_images(root: Path) -> dict[str, Path]:
    """File name -> path over `images/` and `images_*/images/` (and `images_*/` itself)."""
    folders = [root / "images"]
    for child in sorted(root.glob("images_*")):
        folders += [child / "images", child]
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    found.setdefault(entry.name, Path(entry.path))
    return found


class NihBboxReader:
    name = "nih-bbox"
    published_at = "https://nihcc.app.box.com/v/ChestXray-NIHCC"

    def read(
        self, root: Path, split: str | None = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    ) -> tuple[list[Item], list[Problem]]:
        root = Path(root)
        check_split(self.name, split, [])
        labels = root / LABELS
        if not labels.is_file():
            raise missing(LABELS, root, self.published_at)
        table = read_csv(labels)
        if len(table.header) < 3 or table.header[:2] != ["Image Index", "Finding Label"]:
            raise AflocError(
                f"expected the header 'Image Index,Finding Label,Bbox [x,y,w,h]' (found {','.join(table.header)})",
                path=labels,
                hint=f"download from {self.published_at}",
            )
        images = index_images(root)
        if not images:
            raise missing("images/ (or images_001/images/ ...)", root, self.published_at)
        file = str(labels)
        groups: dict[tuple[str, str], list[Box]] = {}
        first_line: dict[tuple[str, str], int] = {}
        problems: list[Problem] = []
        for line, fields in table.rows:
            name, label = field_of(fields, 0), field_of(fields, 1)
            coords = [parse_float(field_of(fields, i)) for i in range(2, 6)]
            if not name or not label:
                problems.append(Problem(file, line, "empty Image Index or Finding Label"))
                continue
            if any(c is None for c in coords):
                problems.append(Problem(file, line, "x, y, w, h must be numbers"))
                continue
            x, y, w, h = (float(c) for c in coords)  # type: ignore[arg-type]
            if w <= 0 or h <= 0:
                problems.append(Problem(file, line, f"box has no area (w={w}, h={h})"))
                continue
            key = (name, CANONICAL.get(label, label))
            groups.setdefault(key, []).append(Box(x, y, w, h))
            first_line.setdefault(key, line)
        items: list[Item] = []
        for (name, category), boxes in groups.items():
            path = images.get(name)
            if path is None:
                problems.append(Problem(file, first_line[(name, category)], f"image not found: {name}"))
                continue
            stem = Path(name).stem
            items.append(
                Item(
                    dataset=self.name,
                    item_id=f"{stem}/{category}",
                    image_id=stem,
                    image_path=path,
                    split=None,
                    category=category,
                    prompt=fill_prompt(prompt_template, category),
                    positive=True,
                    height=SIZE,
                    width=SIZE,
                    boxes=tuple(boxes),
                )
            )
        return items, problems
