"""VinDr-CXR: corner boxes from several radiologists per image.

PhysioNet ships `annotations/annotations_{train,test}.csv`
(`image_id,rad_id,class_name,x_min,y_min,x_max,y_max`), Kaggle ships `train.csv`
(with `class_id` too); images are `train/<image_id>.dicom` / `test/<image_id>.dicom`.
"No finding" rows have empty coordinates. Boxes of all radiologists are united
per image and class. Every class seen in the file that an image lacks is a
negative item for that image (for AUROC).
"""

from __future__ import annotations

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

NO_FINDING = "No finding"
COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
SPLITS = ("train", "test")


def _annotation_files(root: Path) -> dict[str, Path]:
    """split -> annotation CSV, PhysioNet layout first, then Kaggle's train.csv."""
    found = {s: root / "annotations" / f"annotations_{s}.csv" for s in SPLITS}
    found = {s: p for s, p in found.items() if p.is_file()}
    if not found and (root / "train.csv").is_file():
        found["train"] = root / "train.csv"
    return found


class VindrReader:
    name = "vindr"
    published_at = "https://physionet.org/content/vindr-cxr/"

    def read(
        self,
        root: Path,
        split: str | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        negatives: bool = True,
    ) -> tuple[list[Item], list[Problem]]:
        root = Path(root)
        files = _annotation_files(root)
        if not files:
            raise missing("annotations/annotations_train.csv (or Kaggle's train.csv)", root, self.published_at)
        if split is not None:
            if split in SPLITS and split not in files:
                raise missing(f"annotations/annotations_{split}.csv", root, self.published_at)
            check_split(self.name, split, files)
            files = {split: files[split]}
        items: list[Item] = []
        problems: list[Problem] = []
        for s, path in files.items():
            more_items, more_problems = self._read_file(root, s, path, prompt_template, negatives)
            items += more_items
            problems += more_problems
        return items, problems

    def _read_file(
        self, root: Path, split: str, path: Path, template: str, negatives: bool
    ) -> tuple[list[Item], list[Problem]]:
        table = read_csv(path)
        col = table.require_columns(COLUMNS, self.published_at)
        file = str(path)
        boxes: dict[str, dict[str, list[Box]]] = {}  # image -> class -> boxes, in file order
        first_line: dict[str, int] = {}
        classes: dict[str, None] = {}
        unusable: dict[tuple[str, str], int] = {}  # (image, class) -> index in problems of its first unusable box row
        problems: list[Problem] = []
        for line, fields in table.rows:
            image_id = field_of(fields, col["image_id"])
            class_name = field_of(fields, col["class_name"])
            raw = [field_of(fields, col[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
            if not image_id or not class_name:
                problems.append(Problem(file, line, "empty image_id or class_name"))
                continue
            if class_name == NO_FINDING:
                if any(v and v.lower() != "nan" for v in raw):
                    problems.append(Problem(file, line, f"'{NO_FINDING}' with coordinates {raw}"))
                    continue
                boxes.setdefault(image_id, {})
                first_line.setdefault(image_id, line)
                continue
            coords = [parse_float(v) for v in raw]
            if any(c is None for c in coords):
                problems.append(Problem(file, line, f"{class_name} needs x_min, y_min, x_max, y_max numbers"))
                unusable.setdefault((image_id, class_name), len(problems) - 1)
                continue
            x0, y0, x1, y1 = (float(c) for c in coords)  # type: ignore[arg-type]
            if x1 <= x0 or y1 <= y0:
                problems.append(Problem(file, line, f"box has no area ({x0}, {y0}, {x1}, {y1})"))
                unusable.setdefault((image_id, class_name), len(problems) - 1)
                continue
            boxes.setdefault(image_id, {}).setdefault(class_name, []).append(Box.from_corners(x0, y0, x1, y1))
            first_line.setdefault(image_id, line)
            classes.setdefault(class_name, None)
        items: list[Item] = []
        for image_id, by_class in boxes.items():
            image_path = root / split / f"{image_id}.dicom"
            if not image_path.is_file():
                problems.append(Problem(file, first_line[image_id], f"image not found: {image_path}"))
                continue
            for class_name in classes:
                found = by_class.get(class_name)
                if not found and (image_id, class_name) in unusable:
                    # A radiologist marked the finding but the box is unusable: not a negative, and no truth.
                    # Said on that row's own problem, so one bad line counts once.
                    k = unusable[(image_id, class_name)]
                    problems[k] = Problem(problems[k].file, problems[k].row,
                                          f"{problems[k].reason}; {image_id}/{class_name} is left out: its only box "
                                          "rows are unusable, so it is neither a positive nor a negative")
                    continue
                if not found and not negatives:
                    continue
                items.append(
                    Item(
                        dataset=self.name,
                        item_id=f"{image_id}/{class_name}",
                        image_id=image_id,
                        image_path=image_path,
                        split=split,
                        category=class_name,
                        prompt=fill_prompt(template, class_name),
                        positive=bool(found),
                        boxes=tuple(found or ()),
                    )
                )
        return items, problems
