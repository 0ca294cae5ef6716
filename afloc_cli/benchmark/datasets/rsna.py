"""RSNA Pneumonia (Kaggle), in either of the two forms people score it in.

- Kaggle's `stage_2_train_labels.csv` (`patientId,x,y,width,height,Target`): one
  row per box; a negative is one row with empty coordinates and Target 0.
- MedKLIP's test list (`ID,img_path,boxes,classes`, boxes `x;y;w;h|x;y;w;h` or
  `nan`), the split AFLoc and MedKLIP report: split "test". Its `img_path` points
  at the authors' machine, so the image is looked up as given, then as
  `stage_2_train_images/<ID>.dcm` under the Kaggle root.

Both keep negatives as items with `positive=False` (they matter for AUROC);
localization is scored on positives only.
"""

from __future__ import annotations

from pathlib import Path

from afloc_cli.benchmark.datasets.base import (
    DEFAULT_PROMPT_TEMPLATE,
    Box,
    CsvTable,
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

LABELS = "stage_2_train_labels.csv"
IMAGES = "stage_2_train_images"
KAGGLE_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
# Every RSNA radiograph is 1024x1024 and both box lists are in its pixels, so a downsampled copy (MedKLIP's PNGs
# may be one) is scored by scaling the boxes, as the reference's box_mapping(box, 1024, 1024, 224) does.
SIZE = 1024
MEDKLIP_COLUMNS = ("ID", "img_path", "boxes", "classes")
CATEGORY = "Pneumonia"


def _is_empty(text: str) -> bool:
    return text == "" or text.lower() == "nan"


def _flag(text: str) -> str:
    """'1', '1.0' -> '1'; '0', '0.0' -> '0'; anything else unchanged (and then reported)."""
    value = parse_float(text)
    return str(int(value)) if value in (0.0, 1.0) else text


def _header(path: Path) -> list[str]:
    """The stripped header fields; undecodable bytes become U+FFFD, as in read_csv."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return [h.strip() for h in f.readline().split(",")]


def _find_medklip_list(folder: Path) -> Path | None:
    for path in sorted(folder.glob("*.csv")):
        if all(c in _header(path) for c in MEDKLIP_COLUMNS):
            return path
    return None


class RsnaReader:
    name = "rsna"
    published_at = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"

    def read(
        self,
        root: Path,
        split: str | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        test_list: Path | None = None,
    ) -> tuple[list[Item], list[Problem]]:
        """`root` is the Kaggle folder (or either CSV itself); `test_list` names MedKLIP's list explicitly.

        split None reads Kaggle's labels (or the MedKLIP list when only that is
        there); split "test" reads the MedKLIP list.
        """
        root = Path(root)
        prompt = fill_prompt(prompt_template, CATEGORY)
        if root.is_file():
            header = _header(root)
            if all(c in header for c in MEDKLIP_COLUMNS):
                test_list, root = root, root.parent
            else:
                check_split(self.name, split, [])
                return self._read_kaggle(root, root.parent, prompt)
        labels = root / LABELS
        if test_list is None and (split == "test" or not labels.is_file()):
            test_list = _find_medklip_list(root)
        if test_list is not None:
            check_split(self.name, split, ["test"])
            return self._read_medklip(Path(test_list), root, prompt)
        if split == "test":
            raise AflocError(
                "expected MedKLIP's test list (a CSV with ID,img_path,boxes,classes) for split 'test'",
                path=root,
                hint="give the list CSV itself as --root, or put it in the --root folder (any *.csv with those "
                     "columns is found); it comes from https://github.com/MediaBrain-SJTU/MedKLIP",
            )
        check_split(self.name, split, [])
        if not labels.is_file():
            raise missing(LABELS, root, self.published_at)
        return self._read_kaggle(labels, root, prompt)

    def _read_kaggle(self, labels: Path, root: Path, prompt: str) -> tuple[list[Item], list[Problem]]:
        table = read_csv(labels)
        col = table.require_columns(KAGGLE_COLUMNS, self.published_at)
        file = str(labels)
        boxes: dict[str, list[Box]] = {}
        negative: dict[str, int] = {}
        first_line: dict[str, int] = {}
        problems: list[Problem] = []
        for line, fields in table.rows:
            pid = field_of(fields, col["patientId"])
            target = _flag(field_of(fields, col["Target"]))
            raw = [field_of(fields, col[k]) for k in ("x", "y", "width", "height")]
            if not pid:
                problems.append(Problem(file, line, "empty patientId"))
                continue
            if target == "0" and all(_is_empty(v) for v in raw):
                if pid in boxes:
                    problems.append(Problem(file, line, f"{pid} has boxes and also a Target 0 row"))
                    continue
                negative[pid] = line
                first_line.setdefault(pid, line)
                continue
            if target != "1":
                problems.append(Problem(file, line, f"Target {target!r} with coordinates {raw}: expected 1"))
                continue
            box = _parse_box([parse_float(v) for v in raw])
            if isinstance(box, str):
                problems.append(Problem(file, line, box))
                continue
            if pid in negative:
                problems.append(Problem(file, line, f"{pid} has a Target 0 row and also boxes"))
                continue
            boxes.setdefault(pid, []).append(box)
            first_line.setdefault(pid, line)
        images = root / IMAGES
        if not images.is_dir():
            raise missing(IMAGES + "/", root, self.published_at)
        items: list[Item] = []
        for pid, line in first_line.items():
            image = images / f"{pid}.dcm"
            if not image.is_file():
                problems.append(Problem(file, line, f"image not found: {image}"))
                continue
            items.append(self._item(pid, image, None, prompt, tuple(boxes.get(pid, ()))))
        return items, problems

    def _read_medklip(self, test_list: Path, root: Path, prompt: str) -> tuple[list[Item], list[Problem]]:
        if not test_list.is_file():
            raise missing(test_list.name, test_list.parent, "https://github.com/MediaBrain-SJTU/MedKLIP")
        table: CsvTable = read_csv(test_list)
        col = table.require_columns(MEDKLIP_COLUMNS, "https://github.com/MediaBrain-SJTU/MedKLIP")
        file = str(test_list)
        problems: list[Problem] = []
        items: list[Item] = []
        seen: set[str] = set()
        for line, fields in table.rows:
            pid = field_of(fields, col["ID"])
            raw_path = field_of(fields, col["img_path"])
            raw_boxes = field_of(fields, col["boxes"])
            label = _flag(field_of(fields, col["classes"]))
            if not pid:
                problems.append(Problem(file, line, "empty ID"))
                continue
            if pid in seen:
                problems.append(Problem(file, line, f"{pid} listed twice"))
                continue
            parsed: tuple[Box, ...] = ()
            if label == "1":
                result = _parse_box_list(raw_boxes)
                if isinstance(result, str):
                    problems.append(Problem(file, line, result))
                    continue
                parsed = result
            elif label == "0":
                if not _is_empty(raw_boxes):
                    problems.append(Problem(file, line, f"classes 0 with boxes {raw_boxes!r}"))
                    continue
            else:
                problems.append(Problem(file, line, f"classes {label!r}: expected 0 or 1"))
                continue
            image = _resolve_image(raw_path, pid, test_list.parent, root)
            if image is None:
                problems.append(Problem(file, line, f"image not found: {raw_path} nor {IMAGES}/{pid}.dcm"))
                continue
            seen.add(pid)
            items.append(self._item(pid, image, "test", prompt, parsed))
        return items, problems

    def _item(self, pid: str, image: Path, split: str | None, prompt: str, boxes: tuple[Box, ...]) -> Item:
        return Item(
            dataset=self.name,
            item_id=pid,
            image_id=pid,
            image_path=image,
            split=split,
            category=CATEGORY,
            prompt=prompt,
            positive=bool(boxes),
            height=SIZE,
            width=SIZE,
            boxes=boxes,
        )


def _parse_box(values: list[float | None]) -> Box | str:
    """A box from x, y, width, height, or the reason it is not one."""
    if any(v is None for v in values):
        return "coordinates must be numbers"
    x, y, w, h = (float(v) for v in values)  # type: ignore[arg-type]
    if w <= 0 or h <= 0:
        return f"box has no area (width={w}, height={h})"
    return Box(x, y, w, h)


def _parse_box_list(text: str) -> tuple[Box, ...] | str:
    """MedKLIP's `x;y;w;h|x;y;w;h`, or the reason it cannot be read."""
    if _is_empty(text):
        return "classes 1 without boxes"
    boxes: list[Box] = []
    for part in text.split("|"):
        values = part.split(";")
        box = _parse_box([parse_float(v) for v in values] if len(values) == 4 else [None] * 4)
        if isinstance(box, str):
            return f"box {part!r}: {box}"
        boxes.append(box)
    return tuple(boxes)


def _resolve_image(raw_path: str, pid: str, list_dir: Path, root: Path) -> Path | None:
    candidates = []
    if raw_path and not _is_empty(raw_path):
        given = Path(raw_path)
        candidates += [given] if given.is_absolute() else [list_dir / given, root / given]
    for folder in dict.fromkeys([root, list_dir]):
        candidates += [folder / IMAGES / f"{pid}.dcm", folder.parent / IMAGES / f"{pid}.dcm"]
    for c in candidates:
        if c.is_file():
            return c
    return None
