"""Class prompts for zero-shot presence: each category's positive prompts, scored as one averaged text vector.

The reference scores a class by comparing the global image embedding with the
mean of several positive prompts' report embeddings (SPEC.md). A heat-map file
holds each prompt's cosine with the image and each prompt's vector, so the
class's cosine follows exactly without re-encoding anything:
cos(g, sum_k e_k) = sum_k |e_k| cos(g, e_k) / |sum_k e_k|.
A category with one prompt is that prompt's own stored score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from afloc_cli.errors import AflocError
from afloc_cli.vlp.heatmap import contrast_maps


def load_class_prompts(path: Path) -> dict[str, list[str]]:
    """A JSON object {category: [prompt, ...]}, checked so a typo fails here and not as a silent template."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AflocError("class-prompts file not found", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AflocError(f"not a readable JSON file ({exc})", path=path) from None
    if not isinstance(data, dict) or not data:
        raise AflocError("expected a JSON object {category: [prompt, ...]}", path=path)
    out: dict[str, list[str]] = {}
    for category, prompts in data.items():
        if isinstance(prompts, str):
            prompts = [prompts]
        if (not isinstance(prompts, list) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise AflocError(f"category {category!r}: expected a non-empty list of non-empty prompts", path=path)
        out[str(category)] = list(dict.fromkeys(p.strip() for p in prompts))
    return out


def resolve_class_prompts(given: dict[str, list[str]] | None, categories: list[str], template: str,
                          source: str = "--class-prompts") -> dict[str, list[str]]:
    """Every category's prompts: the given ones, else the template alone (the benchmark's default), spelt as the
    dataset readers spell their prompts (`fill_prompt`), so one finding is one prompt in the heat-map file."""
    from afloc_cli.benchmark.datasets.base import fill_prompt

    given = given or {}
    by_key = {c.lower(): c for c in categories}
    unknown = sorted(c for c in given if c.lower() not in by_key)
    if unknown:
        raise AflocError(f"{source} names categories this dataset does not have: {', '.join(map(repr, unknown))}",
                         hint=f"its categories are {', '.join(map(repr, categories))}")
    matched = {by_key[c.lower()]: prompts for c, prompts in given.items()}
    return {c: list(matched.get(c, [fill_prompt(template, c)])) for c in categories}


def class_cosines(scores: np.ndarray, embeddings: np.ndarray | None, ensembles: dict[str, list[str]],
                  file_prompts: dict[str, int], where: Path) -> np.ndarray:
    """(N, P) prompt cosines -> (N, C) cosines of each category's averaged prompt vector, C in `ensembles` order."""
    columns = []
    for category, prompts in ensembles.items():
        index = [file_prompts[p] for p in prompts]
        if len(index) == 1:
            columns.append(scores[:, index[0]].astype(np.float64))
            continue
        if embeddings is None:
            raise AflocError(f"category {category!r} has {len(index)} class prompts, and averaging them needs the "
                             "prompts' vectors, which this heat-map file lacks (written before they were kept)",
                             path=where, hint="localize again with this afloc, or give one prompt per category")
        vectors = embeddings[index].astype(np.float64)
        weights = np.linalg.norm(vectors, axis=1) / np.linalg.norm(vectors.sum(0))
        columns.append(scores[:, index].astype(np.float64) @ weights)
    return np.stack(columns, axis=1)


def presence_scores(own: np.ndarray, negative: np.ndarray | None, readout: str) -> np.ndarray:
    """(N, C) class cosines -> (N, C) zero-shot presence scores per the readout (runner.ZERO_SHOT says how)."""
    if readout == "contrast":  # the maps' contrast readout, on 1x1 "maps" of the categories
        return contrast_maps(torch.from_numpy(own)[:, :, None, None])[:, :, 0, 0].numpy()
    if negative is None:
        raise ValueError("the reference score needs the negative prompts' cosines")
    return 1.0 / (1.0 + np.exp(-10.0 * (own - negative)))  # softmax([own, negative] * 10)[0]
