"""The finding kinds of the synthetic corpus and where each may be drawn.

Keys are stable identifiers (used on the command line and in synth.json);
category names follow MS-CXR's spelling so benchmark code can treat the
synthetic ground truth like the real one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    key: str
    category: str  # MS-CXR style category_name, also the labels.csv column
    sided: bool  # drawn in one lung (left/right) or central (the heart)
    zones: tuple[str, ...]  # lung zones it may occupy; () for central kinds
    keywords: tuple[str, ...]  # every report mention contains one of these (lower case)


KINDS: tuple[Kind, ...] = (
    Kind("lung_opacity", "Lung Opacity", True, ("upper", "middle", "lower"), ("opaci", "airspace disease")),
    Kind("consolidation", "Consolidation", True, ("upper", "middle", "lower"), ("consolidat",)),
    Kind("nodule", "Nodule", True, ("upper", "middle", "lower"), ("nodul",)),
    Kind("atelectasis", "Atelectasis", True, ("middle", "lower"), ("atelecta",)),
    Kind("pleural_effusion", "Pleural Effusion", True, ("lower",), ("effusion",)),
    Kind("pneumothorax", "Pneumothorax", True, ("upper",), ("pneumothora",)),
    Kind("cardiomegaly", "Cardiomegaly", False, (), ("cardiomegaly", "enlarged")),
)

KIND_BY_KEY: dict[str, Kind] = {k.key: k for k in KINDS}
KIND_KEYS: tuple[str, ...] = tuple(k.key for k in KINDS)
DEFAULT_HOLDOUT = "consolidation"  # an unseen kind that still resembles a seen one, as COVID pneumonia does
SIDES: tuple[str, ...] = ("right", "left")  # the patient's sides; right is drawn on the image's left
SPLITS: tuple[str, ...] = ("train", "val", "test")


def resolve_kind(name: str) -> Kind:
    """Accept a key ("pleural_effusion") or a category name ("Pleural Effusion"), any case."""
    wanted = name.strip().lower().replace(" ", "_").replace("-", "_")
    for kind in KINDS:
        if wanted in (kind.key, kind.category.lower().replace(" ", "_")):
            return kind
    raise KeyError(name)
