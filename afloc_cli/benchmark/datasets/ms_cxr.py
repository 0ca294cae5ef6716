"""MS-CXR (PhysioNet): phrase-grounding boxes on MIMIC-CXR-JPG images.

One row per box; a phrase with several boxes has several rows, so rows are
grouped by dicom_id and label_text into one item. The phrase is matched
without regard to case, as the reference's evaluation merges it (it lowercases
`label_text`); the prompt is the first row's own `label_text`. `path` is
relative to the MIMIC-CXR-JPG 2.0.0 root, which is passed as `mimic_root` or
found beside the annotation (`mimic-cxr-jpg/2.0.0/` or a `files/` folder, up
to three folders up: PhysioNet's own download puts both under
`physionet.org/files/`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from afloc_cli.benchmark.datasets.base import (
    DEFAULT_PROMPT_TEMPLATE,
    Box,
    Item,
    Problem,
    check_split,
    field_of,
    parse_float,
    read_csv,
)
from afloc_cli.errors import AflocError

CSV_NAMES = ("MS_CXR_Local_Alignment_v1.1.0.csv", "MS_CXR_Local_Alignment_v1.0.0.csv")
JSON_NAMES = ("MS_CXR_Local_Alignment_v1.1.0.json", "MS_CXR_Local_Alignment_v1.0.0.json")
COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
MIMIC_URL = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"


@dataclass(frozen=True, slots=True)
class BoxRow:
    """One annotation row, already parsed; `line` is None for JSON annotations."""

    file: str
    line: int | None
    dicom_id: str
    category: str
    label_text: str
    path: str
    box: Box
    width: int
    height: int
    split: str | None


def parse_csv_rows(csv_path: Path, published_at: str) -> tuple[list[BoxRow], list[Problem], bool]:
    """Rows of an MS-CXR-layout CSV; the flag says whether it has a split column (v1.1.0)."""
    table = read_csv(csv_path)
    col = table.require_columns(COLUMNS, published_at)
    has_split = "split" in col
    rows: list[BoxRow] = []
    problems: list[Problem] = []
    file = str(csv_path)
    for line, fields in table.rows:

        def get(name: str, fields: list[str] = fields) -> str:
            return field_of(fields, col[name])

        dicom_id, label_text, path = get("dicom_id"), get("label_text"), get("path")
        if not dicom_id or not label_text or not path or not get("category_name"):
            problems.append(Problem(file, line, "empty dicom_id, category_name, label_text or path"))
            continue
        coords = [parse_float(get(k)) for k in ("x", "y", "w", "h")]
        size = [parse_float(get(k)) for k in ("image_width", "image_height")]
        reason = _check_box(coords, size)
        if reason:
            problems.append(Problem(file, line, reason))
            continue
        x, y, w, h = (float(c) for c in coords)  # type: ignore[arg-type]
        rows.append(
            BoxRow(
                file=file,
                line=line,
                dicom_id=dicom_id,
                category=get("category_name"),
                label_text=label_text,
                path=path,
                box=Box(x, y, w, h),
                width=int(size[0]),  # type: ignore[arg-type]
                height=int(size[1]),  # type: ignore[arg-type]
                split=(get("split") or None) if has_split else None,
            )
        )
    return rows, problems, has_split


def _check_box(coords: list[float | None], size: list[float | None]) -> str | None:
    if any(c is None for c in coords):
        return "x, y, w, h must be numbers"
    if any(s is None or s <= 0 for s in size):
        return "image_width and image_height must be positive numbers"
    if coords[2] <= 0 or coords[3] <= 0:  # type: ignore[operator]
        return f"box has no area (w={coords[2]}, h={coords[3]})"
    return None


def parse_json_rows(json_path: Path) -> tuple[list[BoxRow], list[Problem], bool]:
    """Rows of the MS-CXR COCO JSON (images with path/width/height, annotations with bbox and label_text)."""
    file = str(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8", errors="replace"))
        images = {img["id"]: img for img in data["images"]}
        categories = {cat["id"]: cat["name"] for cat in data["categories"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AflocError(f"not an MS-CXR COCO file ({e})", path=json_path) from None
    rows: list[BoxRow] = []
    problems: list[Problem] = []
    has_split = False
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict):  # a problem row like any other unusable annotation, not a traceback
            problems.append(Problem(file, None, f"annotations[{n}]: expected an object, found {type(ann).__name__}"))
            continue
        ann_id = ann.get("id")
        image_id = ann.get("image_id")
        img = images.get(image_id) if isinstance(image_id, int | str) else None
        if img is None:
            problems.append(Problem(file, None, f"annotation {ann_id}: unknown image_id {ann.get('image_id')}"))
            continue
        bbox = ann.get("bbox")
        bbox = bbox if isinstance(bbox, list) else []
        coords = [parse_float(str(v)) for v in bbox] if len(bbox) == 4 else [None] * 4
        size = [parse_float(str(img.get("width", ""))), parse_float(str(img.get("height", "")))]
        label_text = str(ann.get("label_text", "")).strip()
        path = str(img.get("path", "")).strip()
        category = str(categories.get(ann.get("category_id"), "")).strip()
        reason = _check_box(coords, size)
        if not reason and (not label_text or not path or not category):
            reason = "empty label_text, category or image path"
        if reason:
            problems.append(Problem(file, None, f"annotation {ann_id}: {reason}"))
            continue
        split = ann.get("split", img.get("split"))
        has_split = has_split or split is not None
        x, y, w, h = (float(c) for c in coords)  # type: ignore[arg-type]
        rows.append(
            BoxRow(
                file=file,
                line=None,
                dicom_id=Path(str(img.get("file_name", path))).stem,
                category=category,
                label_text=label_text,
                path=path,
                box=Box(x, y, w, h),
                width=int(size[0]),  # type: ignore[arg-type]
                height=int(size[1]),  # type: ignore[arg-type]
                split=str(split).strip() if split is not None else None,
            )
        )
    return rows, problems, has_split


def group_rows(
    rows: list[BoxRow], dataset: str, image_root: Path, check_images: bool = True, split: str | None = None
) -> tuple[list[Item], list[Problem]]:
    """One item per dicom_id and case-folded label_text, boxes in file order; inconsistent rows become problems.

    Item ids (`<dicom_id>/<k>`, k the phrase's rank on its image in the file) are numbered over the whole file,
    before `split` and missing images drop any, so one phrase has one id in every run's tables.
    """
    groups: dict[tuple[str, str], list[BoxRow]] = {}
    for row in rows:
        groups.setdefault((row.dicom_id, row.label_text.casefold()), []).append(row)
    items: list[Item] = []
    problems: list[Problem] = []
    phrase_index: dict[str, int] = {}
    exists: dict[Path, bool] = {}
    for (dicom_id, _), members in groups.items():
        first = members[0]
        label_text = first.label_text
        k = phrase_index.get(dicom_id, 0)
        phrase_index[dicom_id] = k + 1
        if split is not None and first.split != split:
            continue
        kept = [first]
        for other in members[1:]:
            if (other.category, other.width, other.height, other.path) != (
                first.category,
                first.width,
                first.height,
                first.path,
            ):
                problems.append(
                    Problem(
                        other.file,
                        other.line,
                        f"disagrees with the first row of phrase {label_text!r} "
                        f"on {dicom_id} (category, image size or path)",
                    )
                )
                continue
            kept.append(other)
        image_path = image_root / first.path
        if check_images:
            if image_path not in exists:
                exists[image_path] = image_path.is_file()
            if not exists[image_path]:
                problems.append(Problem(first.file, first.line, f"image not found: {image_path}"))
                continue
        items.append(
            Item(
                dataset=dataset,
                item_id=f"{dicom_id}/{k}",
                image_id=dicom_id,
                image_path=image_path,
                split=first.split,
                category=first.category,
                prompt=label_text,
                positive=True,
                height=first.height,
                width=first.width,
                boxes=tuple(r.box for r in kept),
            )
        )
    return items, problems


def find_annotation(root: Path, published_at: str) -> Path:
    """The annotation file: `root` itself, or the newest CSV, else the COCO JSON, inside `root`."""
    if root.is_file():
        return root
    for name in (*CSV_NAMES, *JSON_NAMES):
        if (root / name).is_file():
            return root / name
    raise AflocError(f"expected {CSV_NAMES[0]} (or {CSV_NAMES[1]})", path=root, hint=f"download from {published_at}")


def _mimic_versions(folder: Path) -> list[Path]:
    """MIMIC-CXR-JPG version folders under `folder`: 2.0.0 (what MS-CXR cites) first, then the newest.

    PhysioNet now serves 2.1.0, whose JPGs sit at the same `files/...` paths; a download of both datasets
    puts them side by side under `physionet.org/files/`, which itself sits in a folder with `files/`.
    """
    found: list[Path] = []
    for name in ("mimic-cxr-jpg", "MIMIC-CXR-JPG"):
        if (folder / name).is_dir():
            versions = sorted((p for p in (folder / name).iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
            found += sorted(versions, key=lambda p: p.name != "2.0.0")  # stable: 2.0.0, then newest first
    return found


def find_mimic_root(annotation_dir: Path, explicit: Path | None, sample: str | None) -> Path:
    """The MIMIC-CXR-JPG root the `path` column is relative to (2.0.0, or another version beside it)."""
    if explicit is not None:
        explicit = Path(explicit)
        if not explicit.is_dir():
            raise AflocError(
                "expected the MIMIC-CXR-JPG 2.0.0 root folder", path=explicit, hint=f"download from {MIMIC_URL}"
            )
        return explicit
    candidates: list[Path] = []
    folder = annotation_dir.resolve()
    for _ in range(4):
        candidates += [*_mimic_versions(folder), folder]
        folder = folder.parent
    with_files = [c for c in candidates if (c / "files").is_dir()]
    if sample is not None:
        for c in with_files:
            if (c / sample).is_file():
                return c
    if with_files:
        return with_files[0]
    raise AflocError(
        "expected MIMIC-CXR-JPG 2.0.0 (a folder with files/p10/...) beside the MS-CXR annotation",
        path=annotation_dir,
        hint=f"give its folder with --mimic-root, or download it from {MIMIC_URL}",
    )


class MsCxrReader:
    name = "ms-cxr"
    published_at = "https://physionet.org/content/ms-cxr/"

    def read(
        self,
        root: Path,
        split: str | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        mimic_root: Path | None = None,
    ) -> tuple[list[Item], list[Problem]]:
        """`prompt_template` is unused: MS-CXR's prompt is each phrase's own label_text."""
        root = Path(root)
        annotation = find_annotation(root, self.published_at)
        if annotation.suffix.lower() == ".json":
            rows, problems, has_split = parse_json_rows(annotation)
        else:
            rows, problems, has_split = parse_csv_rows(annotation, self.published_at)
        if split is not None:
            if not has_split:
                raise AflocError(
                    f"{annotation.name} has no split column (MS-CXR v1.0.0)",
                    path=annotation,
                    hint="use MS_CXR_Local_Alignment_v1.1.0.csv, or omit the split",
                )
            check_split(self.name, split, (r.split for r in rows))
        wanted = [r for r in rows if split is None or r.split == split]
        image_root = find_mimic_root(annotation.parent, mimic_root, wanted[0].path if wanted else None)
        items, more = group_rows(rows, self.name, image_root, split=split)
        return items, problems + more
