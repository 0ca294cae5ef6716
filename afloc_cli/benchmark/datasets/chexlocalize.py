"""CheXlocalize: radiologist segmentations of CheXpert val/test images, as COCO RLE per task.

`CheXlocalize/gt_segmentations_{val,test}.json` maps an image id such as
`patient64541_study1_view1_frontal` to `{task: {"size": [h, w], "counts": RLE}}`;
the image is `CheXpert/{val,test}/patient64541/study1/view1_frontal.jpg`
(`CheXpert-v1.0/valid/...` beside `gt_segmentations_val.json` in the first release). Every
image yields one item per task: an all-zero mask or a missing key is a negative.
The JSON's "Airspace Opacity" is CheXpert's "Lung Opacity". Per-task thresholds
are tuned on val and applied to test (see `metrics.tune_thresholds`).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import numpy as np

from afloc_cli.benchmark.datasets.base import DEFAULT_PROMPT_TEMPLATE, Item, Problem, check_split, fill_prompt, missing
from afloc_cli.benchmark.datasets.rle import coco_counts, coco_foreground, decode_coco
from afloc_cli.errors import AflocError

TASKS = (
    "Airspace Opacity",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Lung Lesion",
    "Pleural Effusion",
    "Pneumothorax",
    "Support Devices",
)
CANONICAL = {"Airspace Opacity": "Lung Opacity"}
SPLITS = ("val", "test")
_IMAGE_ID = re.compile(r"^(patient\d+)_(study\d+)_(view\d+_\w+)$")


def _zeros(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width), dtype=bool)


# The CheXpert image folder's names: Stanford AIMI's current release ships `CheXpert/`, the first (val-only)
# release `CheXpert-v1.0/` beside the JSONs.
CHEXPERT_NAMES = ("CheXpert", "CheXpert-v1.0")


def _segmentations(path: Path, hint: str | None = None) -> dict:
    """A segmentation JSON ({image_id: {task: RLE}}), read as leniently as the CSVs: a stray byte is no traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        raise AflocError(f"not valid JSON ({e})", path=path) from None
    if not isinstance(data, dict):
        raise AflocError("expected an object {image_id: {task: RLE}}", path=path, hint=hint)
    return data


def _rle(rle: dict) -> tuple[list[int], int, int]:
    """(counts, height, width) of one COCO RLE; KeyError, TypeError or ValueError where it is not one."""
    h, w = (int(v) for v in rle["size"])
    return coco_counts(rle["counts"]), h, w


def _layout(root: Path) -> tuple[Path, Path]:
    """(folder of the JSONs, CheXpert folder): root holds both, or root is the CheXlocalize folder.

    The JSONs lie in `CheXlocalize/` (current release) or in root itself (first release, or the user points at
    the CheXlocalize folder); the images in a CheXpert folder beside them or one level up.
    """
    if (root / "CheXlocalize").is_dir():
        seg_dir = root / "CheXlocalize"
    elif any(root.glob("gt_segmentations_*.json")):
        seg_dir = root
    else:
        seg_dir = root / "CheXlocalize"
    for base in (root, seg_dir, root.parent):
        for name in CHEXPERT_NAMES:
            if (base / name).is_dir():
                return seg_dir, base / name
    return seg_dir, root / "CheXpert"


class ChexlocalizeReader:
    name = "chexlocalize"
    published_at = "https://github.com/rajpurkarlab/cheXlocalize (Stanford AIMI)"

    def read(
        self, root: Path, split: str | None = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    ) -> tuple[list[Item], list[Problem]]:
        root = Path(root)
        seg_dir, chexpert = _layout(root)
        if split is not None:
            check_split(self.name, split, SPLITS)
            splits = [split]
        else:
            splits = [s for s in SPLITS if (seg_dir / f"gt_segmentations_{s}.json").is_file()]
            if not splits:
                raise missing("CheXlocalize/gt_segmentations_test.json", root, self.published_at)
        items: list[Item] = []
        problems: list[Problem] = []
        for s in splits:
            more_items, more_problems = self._read_split(root, seg_dir, chexpert, s, prompt_template)
            items += more_items
            problems += more_problems
        return items, problems

    def _read_split(
        self, root: Path, seg_dir: Path, chexpert: Path, split: str, template: str
    ) -> tuple[list[Item], list[Problem]]:
        json_path = seg_dir / f"gt_segmentations_{split}.json"
        if not json_path.is_file():
            raise missing(f"CheXlocalize/gt_segmentations_{split}.json", root, self.published_at)
        data = _segmentations(json_path)
        image_dir = chexpert / split
        if not image_dir.is_dir() and split == "val" and (chexpert / "valid").is_dir():
            image_dir = chexpert / "valid"
        file = str(json_path)
        items: list[Item] = []
        problems: list[Problem] = []
        for image_id, tasks in data.items():
            match = _IMAGE_ID.match(str(image_id).strip())
            if match is None or not isinstance(tasks, dict):
                problems.append(Problem(file, None, f"{image_id}: not patientN_studyN_viewK_frontal with tasks"))
                continue
            image_path = image_dir / match[1] / match[2] / f"{match[3]}.jpg"
            if not image_path.is_file():
                problems.append(Problem(file, None, f"{image_id}: image not found: {image_path}"))
                continue
            parsed: dict[str, tuple[list[int], int, int]] = {}
            for task, rle in tasks.items():
                try:
                    counts, h, w = _rle(rle)
                    if sum(counts) != h * w:
                        raise ValueError(f"RLE covers {sum(counts)} pixels, size says {h}x{w}")
                except (KeyError, TypeError, ValueError) as e:
                    problems.append(Problem(file, None, f"{image_id} / {task}: unreadable RLE ({e})"))
                    continue
                parsed[str(task).strip()] = (counts, h, w)
            sizes = {(h, w) for _, h, w in parsed.values()}
            if len(sizes) > 1:
                problems.append(Problem(file, None, f"{image_id}: tasks disagree on the image size {sorted(sizes)}"))
                continue
            size = next(iter(sizes), None)
            failed = {str(t).strip() for t in tasks} - set(parsed)
            for task in [*TASKS, *(t for t in parsed if t not in TASKS)]:
                if task in failed:
                    continue
                category = CANONICAL.get(task, task)
                if task in parsed:
                    counts, h, w = parsed[task]
                    positive = coco_foreground(counts) > 0
                    mask = partial(decode_coco, counts, h, w)
                elif size is not None:
                    positive, (h, w) = False, size
                    mask = partial(_zeros, h, w)
                else:
                    positive, h, w, mask = False, None, None, None  # type: ignore[assignment]
                items.append(
                    Item(
                        dataset=self.name,
                        item_id=f"{image_id}/{category}",
                        image_id=str(image_id),
                        image_path=image_path,
                        split=split,
                        category=category,
                        prompt=fill_prompt(template, category),
                        positive=positive,
                        height=h,
                        width=w,
                        mask=mask,
                    )
                )
        return items, problems


def read_human_benchmark(root: Path) -> tuple[dict[tuple[str, str], tuple[list[int], int, int]], list[Problem]]:
    """The radiologist benchmark `hb_segmentations_test.json` (same format as the truth), if shipped.

    Keyed by (image id, canonical category), as the truth items are, so a human
    segmentation is scored with the very code that scores the model's maps. Read
    before localizing, so a malformed file stops the run before the long part; an
    entry it cannot use is a problem row, never dropped silently.
    """
    seg_dir, _ = _layout(Path(root))
    path = seg_dir / "hb_segmentations_test.json"
    if not path.is_file():
        return {}, []
    data = _segmentations(path, hint="is this hb_segmentations_test.json as CheXlocalize ships it?")
    file = str(path)
    out: dict[tuple[str, str], tuple[list[int], int, int]] = {}
    problems: list[Problem] = []
    for image_id, tasks in data.items():
        if not isinstance(tasks, dict):
            problems.append(Problem(file, None, f"{image_id}: expected an object {{task: RLE}}"))
            continue
        for task, rle in tasks.items():
            try:
                counts, h, w = _rle(rle)
            except (KeyError, TypeError, ValueError) as e:
                problems.append(Problem(file, None, f"{image_id}/{task}: human segmentation not a COCO RLE "
                                                    f"({type(e).__name__}: {e})"))
                continue
            if sum(counts) != h * w:
                problems.append(Problem(file, None, f"{image_id}/{task}: human segmentation covers {sum(counts)} "
                                                    f"pixels, its size {h}x{w} has {h * w}"))
                continue
            out[(str(image_id).strip(), CANONICAL.get(str(task).strip(), str(task).strip()))] = (counts, h, w)
    return out, problems
