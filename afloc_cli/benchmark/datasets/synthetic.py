"""The project's synthetic corpus, scored exactly like MS-CXR plus negatives.

The root holds an MS-CXR-layout `MS_CXR_Local_Alignment_v1.1.0.csv` whose `path`
is relative to the root (the positives, one phrase per item), and `labels.csv`
with one row per image: image id, path, split, then one 0/1 column per finding
kind. Every 0 is a negative item (prompt from the template); kinds are matched
to the CSV's category names ignoring case, '_' and '-'.
"""

from __future__ import annotations

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
from afloc_cli.benchmark.datasets.ms_cxr import group_rows, parse_csv_rows

PHRASES = "MS_CXR_Local_Alignment_v1.1.0.csv"
LABELS = "labels.csv"
_ID_COLUMNS = ("image_id", "dicom_id", "id")


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


class SyntheticReader:
    name = "synthetic"
    published_at = "`afloc synth` (the project's own generator)"

    def read(
        self, root: Path, split: str | None = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    ) -> tuple[list[Item], list[Problem]]:
        root = Path(root)
        for name in (PHRASES, LABELS):
            if not (root / name).is_file():
                raise missing(name, root, self.published_at)
        rows, problems, _ = parse_csv_rows(root / PHRASES, self.published_at)
        table = read_csv(root / LABELS)
        id_col = next((c for c in _ID_COLUMNS if c in table.header), table.header[0] if table.header else "")
        col = table.require_columns((id_col, "path", "split"), self.published_at)
        kinds = [h for h in table.header if h not in (id_col, "path", "split") and h]
        category_of = {_key(r.category): r.category for r in rows}
        label_splits = [field_of(f, col["split"]) or None for _, f in table.rows]
        check_split(self.name, split, [*(r.split for r in rows), *label_splits])
        items, more = group_rows(rows, self.name, root, split=split)
        problems += more
        positive_pairs = {(it.image_id, _key(it.category)) for it in items}
        file = str(root / LABELS)
        for line, fields in table.rows:
            image_id, rel = field_of(fields, col[id_col]), field_of(fields, col["path"])
            row_split = field_of(fields, col["split"]) or None
            if split is not None and row_split != split:
                continue
            if not image_id or not rel:
                problems.append(Problem(file, line, f"empty {id_col} or path"))
                continue
            image_path = root / rel
            if not image_path.is_file():
                problems.append(Problem(file, line, f"image not found: {image_path}"))
                continue
            for kind in kinds:
                value = field_of(fields, table.header.index(kind))
                category = category_of.get(_key(kind), kind)
                has_phrase = (image_id, _key(kind)) in positive_pairs
                if value == "1":
                    if not has_phrase:
                        problems.append(Problem(file, line, f"{kind} is 1 but {PHRASES} has no phrase for {image_id}"))
                    continue
                if value != "0":
                    problems.append(Problem(file, line, f"{kind} is {value!r}: expected 0 or 1"))
                    continue
                if has_phrase:
                    problems.append(Problem(file, line, f"{kind} is 0 but {PHRASES} has a phrase for {image_id}"))
                    continue
                items.append(
                    Item(
                        dataset=self.name,
                        item_id=f"{image_id}/{category}",
                        image_id=image_id,
                        image_path=image_path,
                        split=row_split,
                        category=category,
                        prompt=fill_prompt(prompt_template, category),
                        positive=False,
                    )
                )
        return items, problems
