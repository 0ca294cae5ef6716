"""Class prompts: the averaged-embedding cosine from stored per-prompt cosines, and the benchmark's use of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afloc_cli.benchmark.class_prompts import (
    class_cosines,
    load_class_prompts,
    presence_scores,
    resolve_class_prompts,
)
from afloc_cli.benchmark.datasets import fill_sizes, read_dataset
from afloc_cli.benchmark.runner import run_benchmark, select_items
from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.store import HeatmapWriter, ImageRecord
from afloc_cli.image.data.io import read_image_size
from afloc_cli.image.data.transforms import Letterbox


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), dim=st.integers(2, 12),
       seed=st.integers(0, 2**31 - 1))
def test_class_cosine_equals_the_cosine_of_the_mean_embedding(n: int, sizes: list[int], dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, dim))
    prompts = [f"c{c}-p{k}" for c, size in enumerate(sizes) for k in range(size)]
    vectors = rng.normal(size=(len(prompts), dim)) * rng.uniform(0.2, 3.0, size=(len(prompts), 1))  # unequal norms
    scores = _unit(images) @ _unit(vectors).T
    ensembles = {f"c{c}": [f"c{c}-p{k}" for k in range(size)] for c, size in enumerate(sizes)}
    got = class_cosines(scores, vectors, ensembles, {p: j for j, p in enumerate(prompts)}, Path("x.h5"))
    for c, members in enumerate(ensembles.values()):
        mean = vectors[[prompts.index(p) for p in members]].mean(0)
        np.testing.assert_allclose(got[:, c], _unit(images) @ _unit(mean), rtol=1e-9, atol=1e-12)


def test_presence_scores_per_readout() -> None:
    own = np.array([[0.3, 0.1, -0.2]])
    np.testing.assert_allclose(presence_scores(own, None, "contrast"), [[0.35, 0.05, -0.4]])
    ref = presence_scores(own, np.array([[0.3, 0.0, 0.1]]), "reference")
    np.testing.assert_allclose(ref, 1 / (1 + np.exp(-10 * np.array([[0.0, 0.1, -0.3]]))))
    with pytest.raises(ValueError):
        presence_scores(own, None, "reference")


def test_loading_and_resolving_refuse_what_would_silently_fall_back(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    with pytest.raises(AflocError, match="not found"):
        load_class_prompts(path)
    path.write_text("{not json")
    with pytest.raises(AflocError, match="cp.json: not a readable JSON file"):
        load_class_prompts(path)
    path.write_text(json.dumps({"Pneumothorax": []}))
    with pytest.raises(AflocError, match="'Pneumothorax': expected a non-empty list"):
        load_class_prompts(path)
    path.write_text(json.dumps({"pneumothorax": ["There is a pneumothorax.", "There is a pneumothorax."],
                                "Cardiomegaly": "The heart is enlarged."}))
    loaded = load_class_prompts(path)
    assert loaded == {"pneumothorax": ["There is a pneumothorax."], "Cardiomegaly": ["The heart is enlarged."]}
    resolved = resolve_class_prompts(loaded, ["Cardiomegaly", "Nodule", "Pneumothorax"], "Findings of {category}.")
    assert resolved == {"Cardiomegaly": ["The heart is enlarged."], "Nodule": ["Findings of nodule."],
                        "Pneumothorax": ["There is a pneumothorax."]}
    with pytest.raises(AflocError, match="does not have: 'Pneumothorx'"):
        resolve_class_prompts({"Pneumothorx": ["x y"]}, ["Pneumothorax"], "{category}")


def _ensemble_file(corpus: Path, h5: Path, with_embeddings: bool) -> tuple[list[str], dict[str, list[str]]]:
    """Scores from image and prompt vectors: each category's template is blind, its two class prompts are not.

    Prompt vectors are built so that the template and the negative carry no signal and the two class prompts
    each carry half of it plus their own noise: averaging them (as the reference does) sees the truth best.
    """
    items, _ = read_dataset("synthetic", corpus, split="test")
    items = fill_sizes(select_items(items, "phrase", "Findings suggesting {category}.", None))
    categories = sorted({it.category for it in items})
    paths = list(dict.fromkeys(str(it.image_path) for it in items))
    k = len(categories)
    dim = 2 * k + 4
    rng = np.random.default_rng(0)
    images = rng.normal(0, 0.3, size=(len(paths), dim))
    images[:, k:2 * k] = rng.normal(0, 1.0, size=(len(paths), k))  # what one member alone also reads
    for it in items:
        if it.positive:
            images[paths.index(str(it.image_path)), categories.index(it.category)] += 1.0
    ensembles = {c: [f"There is {c.lower()}.", f"{c} is present."] for c in categories}
    prompts, vectors = [], []
    for j, c in enumerate(categories):
        blind = np.zeros(dim)
        blind[2 * k + j % 4] = 1.0
        prompts += [f"Findings suggesting {c}.", f"No {c.lower()}."]
        vectors += [blind, blind]
        for m, p in enumerate(ensembles[c]):
            v = np.zeros(dim)
            v[j] = 1.0
            v[k + j] = 1.5 if m == 0 else -0.75  # noise that the other member cancels in the sum
            prompts.append(p)
            vectors.append(v * (1 + m))  # unequal norms, as real report embeddings have
    phrases = list(dict.fromkeys(it.prompt for it in items if it.positive and it.prompt not in prompts))
    vectors += [np.ones(dim)] * len(phrases)
    prompts += phrases
    vectors_arr = np.array(vectors, np.float32)
    scores = (_unit(images) @ _unit(vectors_arr.astype(np.float64)).T).astype(np.float32)
    grid = 19
    maps = rng.normal(size=(len(paths), len(prompts), grid, grid)).astype(np.float32)
    records = []
    for path in paths:
        h, w = read_image_size(path)
        records.append(ImageRecord(path=path, height=h, width=w,
                                   letterbox=Letterbox.for_shape(h, w, 224).to_dict(), reader={}))
    writer = HeatmapWriter(h5, paths=paths, prompts=prompts, grid=grid,
                           attrs={"checkpoint_sha256": "made-up", "heatmap_config": json.dumps({"sigma": 1.5})},
                           prompt_embeddings=vectors_arr if with_embeddings else None)
    writer.write_batch(list(range(len(paths))), maps, scores, records)
    writer.finalize()
    return categories, ensembles


def _macro(result) -> float:
    return float(result.auroc.filter(pl.col("category") == "macro")["auroc"][0])


def test_benchmark_scores_the_averaged_class_prompts(corpus: Path, tmp_path: Path) -> None:
    categories, ensembles = _ensemble_file(corpus, tmp_path / "maps.h5", with_embeddings=True)
    for readout in ("reference", "contrast"):
        template = run_benchmark("synthetic", corpus, tmp_path / f"t-{readout}", heatmaps=tmp_path / "maps.h5",
                                 split="test", n_boot=20, readout=readout)
        averaged = run_benchmark("synthetic", corpus, tmp_path / f"e-{readout}", heatmaps=tmp_path / "maps.h5",
                                 split="test", n_boot=20, readout=readout, class_prompts=ensembles)
        assert _macro(template) < 0.6  # the template carries no signal by construction
        assert _macro(averaged) > 0.97, readout
        protocol = json.loads((tmp_path / f"e-{readout}" / "protocol.json").read_text())
        assert protocol["class_prompts"] == ensembles and "averaged" in protocol["zero_shot"]
        assert json.loads((tmp_path / f"t-{readout}" / "protocol.json").read_text())["class_prompts"] == {
            c: [f"Findings suggesting {c.lower()}."] for c in categories}  # the readers' spelling
    # One member alone carries noise the other cancels: the average is what sees the truth.
    single = {c: [members[0]] for c, members in ensembles.items()}
    one = run_benchmark("synthetic", corpus, tmp_path / "one", heatmaps=tmp_path / "maps.h5", split="test",
                        n_boot=20, readout="contrast", class_prompts=single)
    assert _macro(one) < 0.9


def test_benchmark_refuses_class_prompts_it_cannot_score(corpus: Path, tmp_path: Path) -> None:
    _, ensembles = _ensemble_file(corpus, tmp_path / "bare.h5", with_embeddings=False)
    with pytest.raises(AflocError, match="averaging them needs the prompts' vectors"):
        run_benchmark("synthetic", corpus, tmp_path / "a", heatmaps=tmp_path / "bare.h5", split="test", n_boot=0,
                      class_prompts=ensembles)
    absent = {c: ["Something never localized."] for c in ensembles}
    with pytest.raises(AflocError, match=r"lacks \d+ of the zero-shot prompts \(the class prompts, and No"):
        run_benchmark("synthetic", corpus, tmp_path / "b", heatmaps=tmp_path / "bare.h5", split="test", n_boot=0,
                      class_prompts=absent)
