"""Benchmark readers, one per public dataset in its native layout, looked up by name."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from afloc_cli.benchmark.datasets.base import (
    DEFAULT_PROMPT_TEMPLATE,
    Box,
    DatasetReader,
    Item,
    Problem,
    boxes_to_mask,
    fill_sizes,
    image_size,
)
from afloc_cli.benchmark.datasets.chexlocalize import ChexlocalizeReader
from afloc_cli.benchmark.datasets.covid_rural import CovidRuralReader
from afloc_cli.benchmark.datasets.ms_cxr import MsCxrReader
from afloc_cli.benchmark.datasets.nih_bbox import NihBboxReader
from afloc_cli.benchmark.datasets.rsna import RsnaReader
from afloc_cli.benchmark.datasets.siim import SiimReader
from afloc_cli.benchmark.datasets.synthetic import SyntheticReader
from afloc_cli.benchmark.datasets.vindr import VindrReader
from afloc_cli.errors import AflocError

READERS: dict[str, DatasetReader] = {
    r.name: r
    for r in (
        MsCxrReader(),
        RsnaReader(),
        ChexlocalizeReader(),
        CovidRuralReader(),
        SiimReader(),
        NihBboxReader(),
        VindrReader(),
        SyntheticReader(),
    )
}


def get_reader(name: str) -> DatasetReader:
    """The reader registered under `name`; an AflocError listing the known names otherwise."""
    try:
        return READERS[name]
    except KeyError:
        raise AflocError(f"unknown dataset {name!r}", hint=f"choose one of {', '.join(READERS)}") from None


def read_dataset(
    name: str,
    root: str | Path,
    split: str | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    **options: Any,
) -> tuple[list[Item], list[Problem]]:
    """Read `root` with the named reader; `options` are reader-specific (mimic_root, test_list, negatives)."""
    root = Path(root)
    if not root.exists():
        raise AflocError("no such file or folder", path=root, hint=f"download from {get_reader(name).published_at}")
    reader = get_reader(name)
    accepted = set(inspect.signature(reader.read).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise AflocError(f"{name} takes no option {', '.join(unknown)}")
    return reader.read(root, split=split, prompt_template=prompt_template, **options)  # type: ignore[call-arg]


__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "READERS",
    "Box",
    "DatasetReader",
    "Item",
    "Problem",
    "boxes_to_mask",
    "fill_sizes",
    "get_reader",
    "image_size",
    "read_dataset",
]
