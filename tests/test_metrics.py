"""The AFLoc-protocol metrics against oracles: perfect and inverted maps, hand-computed cases, properties."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from afloc_cli.benchmark import metrics as M


def _truth() -> np.ndarray:
    t = np.zeros((20, 30), dtype=bool)  # non-square on purpose
    t[4:9, 18:27] = True
    return t


# ---------------------------------------------------------------- normalisation


def test_normalize_minmax_over_non_nan_pixels() -> None:
    m = np.array([[np.nan, 2.0], [4.0, 6.0]])
    out = M.normalize_minmax(m)
    assert np.isnan(out[0, 0])
    np.testing.assert_allclose(out[0, 1:], [-1.0])
    np.testing.assert_allclose(out[1], [0.0, 1.0])
    assert (M.normalize_minmax(np.full((3, 4), 7.0)) == -1.0).all()  # constant: nothing rises above any t
    batch = M.normalize_minmax(np.stack([m, m * 10 - 3]))
    np.testing.assert_allclose(batch[0], batch[1])


# ---------------------------------------------------------------- oracles


def test_perfect_map_scores_perfectly() -> None:
    t = _truth()
    rng = np.random.default_rng(0)
    scores = M.score_item(t.astype(float), t)
    assert all(scores[M.column(k, x)] == 1.0 for k in ("iou", "dice") for x in M.DEFAULT_THRESHOLDS)
    assert scores["pointing"] == 1.0
    assert scores["cnr"] == 0.0  # a two-valued map has zero variance inside and out: 0 by the protocol
    noisy = t.astype(float) + 0.01 * rng.standard_normal(t.shape)
    assert M.score_item(noisy, t)["cnr"] > 20


def test_inverted_map_scores_zero_and_negative_cnr() -> None:
    t = _truth()
    rng = np.random.default_rng(1)
    inverted = (~t).astype(float) + 0.01 * rng.standard_normal(t.shape)
    scores = M.score_item(inverted, t)
    assert all(scores[M.column(k, x)] == 0.0 for k in ("iou", "dice") for x in M.DEFAULT_THRESHOLDS)
    assert scores["pointing"] == 0.0
    assert scores["cnr"] < -20
    assert M.score_item(inverted, t, absolute_cnr=True)["cnr_abs"] == pytest.approx(-scores["cnr"])


def test_iou_dice_hand_computed() -> None:
    m = np.array([[0.9, 0.25, -1.0], [0.45, 0.05, np.nan]])
    t = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    iou, dice = M.iou_dice(m, t, (0.1, 0.3, 0.5, 0.95))
    # the truth pixel under NaN is out of both masks (AFLoc's compute_iou: gtmask[~nan]): truth 2
    # t=.1: pred {.9,.25,.45}, inter 2 -> 2/3, 4/5; t=.3: pred {.9,.45}, inter 1 -> 1/3, 2/4
    # t=.5: pred {.9}, inter 1 -> 1/2, 2/3; t=.95: nothing predicted -> NaN
    np.testing.assert_allclose(iou[:3], [2 / 3, 1 / 3, 1 / 2])
    np.testing.assert_allclose(dice[:3], [4 / 5, 2 / 4, 2 / 3])
    assert np.isnan(iou[3]) and np.isnan(dice[3])
    iou_empty, dice_empty = M.iou_dice(m, np.zeros_like(t))
    assert np.isnan(iou_empty).all() and np.isnan(dice_empty).all()
    only_under_nan = np.zeros_like(t)
    only_under_nan[1, 2] = True  # truth only where the map is NaN: empty truth -> NaN, not 0
    assert np.isnan(M.iou_dice(m, only_under_nan)[0]).all()
    with pytest.raises(ValueError, match="same frame"):
        M.iou_dice(m, t.T)


def test_cnr_hand_computed() -> None:
    m = np.array([[1.0, 3.0, np.nan], [0.0, 0.0, 2.0], [2.0, np.nan, np.nan]])
    t = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=bool)
    # inside {1, 3}: mean 2, var 1; outside {0, 0, 2, 2}: mean 1, var 1 -> 1 / sqrt(2)
    assert M.cnr(m, t) == pytest.approx(1 / np.sqrt(2))
    assert M.cnr(-m, t) == pytest.approx(-1 / np.sqrt(2))
    assert M.cnr(-m, t, absolute=True) == pytest.approx(1 / np.sqrt(2))
    assert np.isnan(M.cnr(m, np.zeros_like(t)))


def test_pointing_game_ignores_nan_and_needs_truth() -> None:
    m = np.array([[np.nan, 0.2, 0.1], [0.0, 0.9, 0.3]])
    t = np.zeros((2, 3), dtype=bool)
    t[1, 1] = True
    assert M.pointing_game(m, t) == 1.0
    t2 = np.zeros((2, 3), dtype=bool)
    t2[0, 0] = True  # only the NaN pixel is truth
    assert M.pointing_game(m, t2) == 0.0
    assert np.isnan(M.pointing_game(m, np.zeros_like(t)))
    assert np.isnan(M.pointing_game(np.full((2, 3), np.nan), t))


binary_pairs = st.integers(1, 8).flatmap(
    lambda h: st.integers(1, 8).flatmap(lambda w: st.tuples(arrays(bool, (h, w)), arrays(bool, (h, w))))
)


@settings(max_examples=60, deadline=None)
@given(binary_pairs)
def test_iou_dice_symmetric_bounded_and_related(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    iou_ab, dice_ab = M.iou_dice(a.astype(float), b, (0.5,))
    iou_ba, dice_ba = M.iou_dice(b.astype(float), a, (0.5,))
    np.testing.assert_allclose(iou_ab, iou_ba, equal_nan=True)
    np.testing.assert_allclose(dice_ab, dice_ba, equal_nan=True)
    if a.any() and b.any():
        assert 0.0 <= iou_ab[0] <= dice_ab[0] <= 1.0
        assert dice_ab[0] == pytest.approx(2 * iou_ab[0] / (1 + iou_ab[0]))
    else:
        assert np.isnan(iou_ab[0])


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, (5, 7), elements=st.integers(-100, 100)), st.integers(1, 50), st.integers(-50, 50))
def test_scores_invariant_to_positive_affine_maps(m: np.ndarray, scale: int, shift: int) -> None:
    t = np.zeros((5, 7), dtype=bool)
    t[1:3, 4:6] = True
    a = M.score_item(m.astype(float), t)
    b = M.score_item((m * scale + shift).astype(float), t)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12, nan_ok=True), k


# ---------------------------------------------------------------- aggregation and bootstrap


def _per_item() -> pl.DataFrame:
    return M.per_item_table(
        [
            {"item_id": "a1", "category": "A", "iou@0.1": 1.0, "iou@0.2": 0.5, "cnr": 2.0, "pointing": 1.0},
            {"item_id": "a2", "category": "A", "iou@0.1": float("nan"), "iou@0.2": 0.0, "cnr": 1.0, "pointing": 0.0},
            {"item_id": "a3", "category": "A", "iou@0.1": 0.5, "iou@0.2": 0.25, "cnr": 0.0, "pointing": 1.0},
            {"item_id": "b1", "category": "B", "iou@0.1": 0.0, "iou@0.2": 0.25, "cnr": -1.0, "pointing": 0.0},
        ]
    )


def test_summary_is_category_mean_then_macro_then_threshold_mean() -> None:
    per_cat, summary = M.summarize(_per_item(), n_boot=200)
    a = per_cat.filter(pl.col("category") == "A").row(0, named=True)
    assert a["iou@0.1"] == pytest.approx(0.75) and a["iou@0.2"] == pytest.approx(0.25) and a["n_items"] == 3
    assert a["iou"] == pytest.approx(0.5) and a["cnr"] == pytest.approx(1.0) and a["protocol"] == "AFLoc"
    value = dict(zip(summary["metric"], summary["value"], strict=True))
    assert value["iou@0.1"] == pytest.approx((0.75 + 0.0) / 2)
    assert value["iou@0.2"] == pytest.approx((0.25 + 0.25) / 2)
    assert value["iou"] == pytest.approx((0.375 + 0.25) / 2)
    assert value["cnr"] == pytest.approx((1.0 - 1.0) / 2)
    assert value["pointing"] == pytest.approx((2 / 3 + 0) / 2)
    assert set(summary["protocol"]) == {"AFLoc"}
    assert summary.filter(pl.col("metric") == "cnr")["note"][0] == "signed"


def _naive_macro(values: np.ndarray, codes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = []
    for k in range(values.shape[1]):
        cats = []
        for c in np.unique(codes):
            v = values[idx][codes[idx] == c, k]
            v = v[~np.isnan(v)]
            if v.size:
                cats.append(v.mean())
        out.append(np.mean(cats) if cats else np.nan)
    return np.array(out)


def test_bootstrap_matches_a_naive_loop_over_the_same_resamples() -> None:
    rng = np.random.default_rng(5)
    values = rng.random((40, 3))
    values[rng.random((40, 3)) < 0.2] = np.nan
    codes = rng.integers(0, 4, 40)
    _, macro, reps = M.bootstrap_macro(values, codes, n_boot=25, seed=0)
    np.testing.assert_allclose(macro, _naive_macro(values, codes, np.arange(40)))
    draw = np.random.default_rng(0)
    for r in range(25):
        np.testing.assert_allclose(reps[r], _naive_macro(values, codes, draw.integers(0, 40, size=40)))


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(2)
    rows = [
        {"category": f"c{i % 5}", "iou@0.1": rng.random(), "iou@0.3": rng.random(), "cnr": rng.normal()}
        for i in range(300)
    ]
    per_item = M.per_item_table(rows)
    _, first = M.summarize(per_item)
    _, second = M.summarize(per_item)
    assert first.equals(second)
    for row in first.iter_rows(named=True):
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
        assert row["ci_low"] < row["ci_high"] and row["n_boot"] == 1000 and row["seed"] == 0
    _, other = M.summarize(per_item, seed=1)
    assert not np.allclose(other["ci_low"].to_numpy(), first["ci_low"].to_numpy())


def test_bootstrap_at_benchmark_scale() -> None:
    """10k items x 1,000 resamples (its speed: benchmarks/metrics_speed.py)."""
    rng = np.random.default_rng(3)
    values = rng.random((10_000, 12))
    codes = rng.integers(0, 8, 10_000)
    _, macro, reps = M.bootstrap_macro(values, codes, n_boot=1000, seed=0)
    assert reps.shape == (1000, 12) and not np.isnan(reps).any()
    # Replicates scatter around the point estimate by about its standard error.
    assert np.all(np.abs(reps.mean(axis=0) - macro) < 0.01)
    assert np.all((reps.std(axis=0) > 0.001) & (reps.std(axis=0) < 0.01))


def test_tuned_thresholds_per_category() -> None:
    per_item = M.per_item_table(
        [
            {"category": "A", "iou@0.1": 0.2, "iou@0.3": 0.6, "dice@0.1": 0.3, "dice@0.3": 0.7},
            {"category": "B", "iou@0.1": 0.5, "iou@0.3": 0.1, "dice@0.1": 0.6, "dice@0.3": 0.2},
        ]
    )
    chosen = M.tune_thresholds(per_item)
    assert chosen == {"A": 0.3, "B": 0.1}
    tuned = M.apply_thresholds(per_item, chosen)
    assert tuned["iou@tuned"].to_list() == [0.6, 0.5] and tuned["dice@tuned"].to_list() == [0.7, 0.6]
    assert "iou@0.1" not in tuned.columns
    _, summary = M.summarize(tuned, n_boot=10)
    assert dict(zip(summary["metric"], summary["value"], strict=True))["iou"] == pytest.approx(0.55)


# ---------------------------------------------------------------- AUROC


def test_auroc_hand_computed_with_ties() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = np.array([0, 0, 1, 1, 1], dtype=bool)
    # positive-negative pairs: .35>.1, .35<.4, .8>.1, .8>.4, .4>.1, .4=.4 (one half) -> 4.5 / 6
    assert M.auroc(scores, labels) == pytest.approx(0.75)
    assert M.auroc(-scores, labels) == pytest.approx(0.25)
    assert np.isnan(M.auroc(scores, np.ones(5, dtype=bool)))
    np.testing.assert_allclose(M.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_weighted_auroc_equals_ranks_and_pair_counting(pairs: list[tuple[int, bool]]) -> None:
    s = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs])
    expected = M.auroc(s, y)
    if y.all() or not y.any():
        assert np.isnan(expected)
        return
    pos, neg = s[y], s[~y]
    by_pairs = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert expected == pytest.approx(by_pairs)
    assert M._weighted_auroc(s, y, np.ones((1, s.size)))[0] == pytest.approx(expected)
    # multiplicities equal duplicated rows
    w = np.arange(1, s.size + 1, dtype=float)[None, :] % 3
    dup = np.repeat(np.arange(s.size), w[0].astype(int))
    assert M._weighted_auroc(s, y, w)[0] == pytest.approx(M.auroc(s[dup], y[dup]), nan_ok=True)


def test_auroc_table_per_category_and_macro() -> None:
    frame = pl.DataFrame(
        {
            "category": ["A"] * 5 + ["B"] * 4,
            "score": [0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.8, 0.2, 0.1],
            "positive": [False, False, True, True, True, True, True, False, False],
        }
    )
    table = M.auroc_table(frame, n_boot=300)
    rows = {r["category"]: r for r in table.iter_rows(named=True)}
    assert rows["A"]["auroc"] == pytest.approx(0.75) and rows["B"]["auroc"] == pytest.approx(1.0)
    assert rows["macro"]["auroc"] == pytest.approx(0.875)
    assert rows["A"]["n_positive"] == 3 and rows["A"]["n_negative"] == 2
    assert rows["macro"]["ci_low"] <= 0.875 <= rows["macro"]["ci_high"]
    assert set(table["protocol"]) == {"AFLoc"}
    assert table.equals(M.auroc_table(frame, n_boot=300))
