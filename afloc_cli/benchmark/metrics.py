"""THE metrics of the AFLoc protocol (DATASETS.md, "Scoring"); every table says protocol = "AFLoc".

Per item (a heat map and its truth in the same frame, original pixels):
- the map is min-max normalised to [-1, 1] over its non-NaN pixels;
- IoU and Dice of `map > t` for each threshold t, NaN when the prediction or
  the truth is empty;
- CNR = (mu_in - mu_out) / sqrt(var_in + var_out), signed as AFLoc's code (0
  when both variances are 0), |CNR| as an option;
- pointing game: is the (first) non-NaN argmax inside the truth.

Aggregation: mean per category (NaN ignored), then the macro mean over
categories, then the mean over thresholds. 95% confidence intervals come from
1,000 bootstrap resamples of the items (numpy default_rng(0)), each recomputing
the macro value; per-item values are computed once and resamples only reweight
them, so 10,000 items x 1,000 resamples take seconds.

Zero-shot AUROC (image-level scores against positive labels) is rank-based with
ties counted one half, per category and macro, with the same bootstrap.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

PROTOCOL = "AFLoc"
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
N_BOOT = 1000
SEED = 0
CONFIDENCE = 0.95
SWEEP_METRICS = ("iou", "dice")  # columns "iou@0.1", ...: averaged over thresholds after the macro mean
SCALAR_METRICS = ("cnr", "cnr_abs", "pointing")
_NOTES = {
    "iou": "macro over categories, then mean over thresholds",
    "dice": "macro over categories, then mean over thresholds",
    "cnr": "signed",
    "cnr_abs": "absolute",
    "pointing": "hit rate of the argmax",
}


def threshold_label(t: float) -> str:
    """0.1 -> '0.1' (the suffix of the per-threshold columns)."""
    return f"{float(t):g}"


def column(metric: str, t: float | str) -> str:
    return f"{metric}@{t if isinstance(t, str) else threshold_label(t)}"


# ---------------------------------------------------------------- per item


def normalize_minmax(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [-1, 1] over the non-NaN pixels of each map (last two axes); NaN kept, constant -> -1."""
    a = np.asarray(heatmap)
    a = a.astype(np.result_type(a.dtype, np.float32), copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN maps stay all-NaN
        lo = np.nanmin(a, axis=(-2, -1), keepdims=True)
        hi = np.nanmax(a, axis=(-2, -1), keepdims=True)
    span = hi - lo
    span = np.where(span > 0, span, 1.0)
    return (a - lo) / span * 2.0 - 1.0


def _pair(heatmap: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(heatmap)
    if m.dtype.kind != "f":
        m = m.astype(np.float64)
    t = np.asarray(truth, dtype=bool)
    if m.shape != t.shape:
        raise ValueError(f"heatmap {m.shape} and truth {t.shape} are not in the same frame")
    return m, t


def iou_dice(
    heatmap: np.ndarray, truth: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """IoU and Dice of `heatmap > t` per threshold (arrays of len(thresholds)); NaN where either side is empty.

    Both masks are taken over the non-NaN pixels only (AFLoc's compute_iou/compute_dice: gtmask[~nan]).
    """
    m, t = _pair(heatmap, truth)
    t = t & ~np.isnan(m)
    n_truth = int(np.count_nonzero(t))
    inside = m[t]
    pred = np.array([np.count_nonzero(m > x) for x in thresholds], dtype=np.float64)
    inter = np.array([np.count_nonzero(inside > x) for x in thresholds], dtype=np.float64)
    empty = (pred == 0) | (n_truth == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(empty, np.nan, inter / (pred + n_truth - inter))
        dice = np.where(empty, np.nan, 2.0 * inter / (pred + n_truth))
    return iou, dice


def cnr(heatmap: np.ndarray, truth: np.ndarray, absolute: bool = False) -> float:
    """(mu_in - mu_out) / sqrt(var_in + var_out) over non-NaN pixels; 0 when both variances are 0.

    NaN when either region has no pixel. Population variances (ddof 0).
    """
    m, t = _pair(heatmap, truth)
    valid = ~np.isnan(m)
    inside, outside = m[t & valid], m[~t & valid]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    denominator = float(np.sqrt(inside.var() + outside.var()))
    if denominator == 0.0:
        return 0.0
    value = float(inside.mean() - outside.mean()) / denominator
    return abs(value) if absolute else value


def pointing_game(heatmap: np.ndarray, truth: np.ndarray) -> float:
    """1.0 when the argmax (NaN ignored, first in row-major order on ties) lies in the truth; NaN if undefined."""
    m, t = _pair(heatmap, truth)
    if not t.any() or np.isnan(m).all():
        return float("nan")
    return float(t.flat[int(np.nanargmax(m))])


def score_item(
    heatmap: np.ndarray,
    truth: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    normalize: bool = True,
    absolute_cnr: bool = False,
) -> dict[str, float]:
    """All localization metrics of one item: {'iou@0.1': .., 'dice@0.1': .., 'cnr': .., 'pointing': ..}.

    The map is min-max normalised first (the protocol) unless `normalize` is False.
    """
    m = normalize_minmax(heatmap) if normalize else np.asarray(heatmap)
    iou, dice = iou_dice(m, truth, thresholds)
    out: dict[str, float] = {}
    for t, value in zip(thresholds, iou, strict=True):
        out[column("iou", t)] = float(value)
    for t, value in zip(thresholds, dice, strict=True):
        out[column("dice", t)] = float(value)
    out["cnr_abs" if absolute_cnr else "cnr"] = cnr(m, truth, absolute=absolute_cnr)
    out["pointing"] = pointing_game(m, truth)
    return out


def per_item_table(rows: Iterable[Mapping[str, object]]) -> pl.DataFrame:
    """Rows of `score_item` output plus identifying keys (at least 'category') -> the per-item table."""
    frame = pl.DataFrame(list(rows), infer_schema_length=None)
    if frame.height and "category" not in frame.columns:
        raise ValueError("per-item rows need a 'category'")
    metrics = [c for c in frame.columns if _family(c) is not None]
    keys = [c for c in frame.columns if c not in metrics]
    return frame.select(keys + metrics).with_columns(pl.col(metrics).cast(pl.Float64))


# ---------------------------------------------------------------- aggregation


def _family(name: str) -> str | None:
    if "@" in name:
        prefix = name.split("@", 1)[0]
        return prefix if prefix in SWEEP_METRICS else None
    return name if name in SCALAR_METRICS else None


def metric_families(columns: Iterable[str]) -> dict[str, list[str]]:
    """'iou' -> ['iou@0.1', ...], 'cnr' -> ['cnr'], ... in column order."""
    families: dict[str, list[str]] = {}
    for c in columns:
        fam = _family(c)
        if fam is not None:
            families.setdefault(fam, []).append(c)
    return families


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _resample_weights(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """(count, n) multiplicities of each item in `count` resamples of n items with replacement."""
    idx = np.stack([rng.integers(0, n, size=n) for _ in range(count)])
    flat = (idx + (np.arange(count) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=count * n).reshape(count, n).astype(np.float64)


def _chunks(n_items: int, n_boot: int) -> list[int]:
    size = max(1, min(n_boot, 4_000_000 // max(n_items, 1)))
    return [min(size, n_boot - start) for start in range(0, n_boot, size)]


def bootstrap_macro(
    values: np.ndarray, codes: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Macro means of each column of `values` (N, K) over categories `codes` (N,), with bootstrap replicates.

    Returns (per_category (C, K), macro (K,), replicates (n_boot, K)). Within a
    category NaN items are ignored; categories without a value are left out of
    the macro mean. Resample r draws N items with replacement from
    default_rng(seed), in order.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    codes = np.asarray(codes)
    n, k = values.shape
    n_cat = int(codes.max()) + 1 if n else 0
    valid = ~np.isnan(values)
    filled = np.where(valid, values, 0.0)
    members = [np.flatnonzero(codes == c) for c in range(n_cat)]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_category = np.stack([filled[m].sum(0) / valid[m].sum(0) for m in members]) if n_cat else np.empty((0, k))
    macro = _nanmean(per_category, axis=0) if n_cat else np.full(k, np.nan)
    replicates = np.full((n_boot, k), np.nan)
    if n == 0 or n_boot == 0:
        return per_category, macro, replicates
    rng = np.random.default_rng(seed)
    start = 0
    for size in _chunks(n, n_boot):
        weights = _resample_weights(rng, n, size)
        sums = np.empty((size, n_cat, k))
        counts = np.empty((size, n_cat, k))
        for c, m in enumerate(members):
            w = weights[:, m]
            sums[:, c] = w @ filled[m]
            counts[:, c] = w @ valid[m].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            replicates[start : start + size] = _nanmean(sums / counts, axis=1)
        start += size
    return per_category, macro, replicates


def _interval(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - confidence) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo = np.nanquantile(replicates, alpha, axis=0)
        hi = np.nanquantile(replicates, 1.0 - alpha, axis=0)
    return lo, hi


def summarize(
    per_item: pl.DataFrame,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
    category: str = "category",
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per_category, summary) from a per-item table, with bootstrap CIs on the macro values.

    per_category: one row per category with each metric family (threshold mean)
    and each per-threshold column. summary: one row per family ('iou', 'dice',
    'cnr', 'pointing') and per threshold column ('iou@0.1', ...), with value,
    ci_low, ci_high. Score positives only: negatives have no truth.
    """
    families = metric_families(per_item.columns)
    columns = [c for cols in families.values() for c in cols]
    if not columns:
        raise ValueError("no metric columns (iou@t, dice@t, cnr, pointing) in the per-item table")
    cats = per_item.get_column(category).cast(pl.String).fill_null("").to_numpy()
    names, codes = np.unique(cats, return_inverse=True) if len(cats) else (np.array([], dtype=str), np.array([], int))
    values = per_item.select(columns).to_numpy().astype(np.float64) if per_item.height else np.empty((0, len(columns)))
    per_cat, macro, reps = bootstrap_macro(values, codes, n_boot, seed)
    # families: mean over their columns (thresholds) of the macro values, for the point and for each replicate
    fam_index = {f: [columns.index(c) for c in cols] for f, cols in families.items()}
    fam_point = {f: float(_nanmean(macro[i], axis=0)) for f, i in fam_index.items()}
    fam_reps = {f: _nanmean(reps[:, i], axis=1) for f, i in fam_index.items()}
    col_lo, col_hi = _interval(reps, confidence)
    counts = np.bincount(codes, minlength=len(names)) if len(names) else np.array([], int)

    per_category = pl.DataFrame(
        {
            "protocol": [PROTOCOL] * len(names),
            "category": [str(n) for n in names],
            "n_items": counts.astype(np.int64),
            **{f: _nanmean(per_cat[:, i], axis=1) if len(names) else [] for f, i in fam_index.items()},
            **{c: per_cat[:, j] for j, c in enumerate(columns) if "@" in c},
        },
        schema_overrides={f: pl.Float64 for f in families},
    )
    rows = []
    for f in families:
        lo, hi = _interval(fam_reps[f][:, None], confidence)
        rows.append((f, fam_point[f], float(lo[0]), float(hi[0]), _NOTES.get(f, "")))
    for j, c in enumerate(columns):
        if "@" in c:
            rows.append((c, float(macro[j]), float(col_lo[j]), float(col_hi[j]), "macro over categories"))
    summary = pl.DataFrame(
        {
            "protocol": [PROTOCOL] * len(rows),
            "metric": [r[0] for r in rows],
            "value": [r[1] for r in rows],
            "ci_low": [r[2] for r in rows],
            "ci_high": [r[3] for r in rows],
            "confidence": [confidence] * len(rows),
            "n_items": [int(per_item.height)] * len(rows),
            "n_categories": [len(names)] * len(rows),
            "n_boot": [n_boot] * len(rows),
            "seed": [seed] * len(rows),
            "note": [r[4] for r in rows],
        },
        schema_overrides={"value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64},
    )
    return per_category, summary


def tune_thresholds(per_item: pl.DataFrame, metric: str = "iou", category: str = "category") -> dict[str, float]:
    """Per category, the sweep threshold with the best mean `metric` (CheXlocalize: tune on val, apply to test).

    Ties go to the smaller threshold; a category with no value at any threshold gets the smallest.
    """
    cols = [c for c in metric_families(per_item.columns).get(metric, []) if not c.endswith("@tuned")]
    if not cols:
        raise ValueError(f"no {metric}@t columns to tune on")
    thresholds = [float(c.split("@", 1)[1]) for c in cols]
    order = np.argsort(thresholds, kind="stable")
    means = per_item.group_by(category, maintain_order=True).agg(pl.col(cols).fill_nan(None).mean())
    chosen: dict[str, float] = {}
    for row in means.iter_rows(named=True):
        scores = np.array([np.nan if row[cols[i]] is None else row[cols[i]] for i in order], dtype=np.float64)
        best = int(np.nanargmax(scores)) if not np.isnan(scores).all() else 0
        chosen[str(row[category])] = thresholds[order[best]]
    return chosen


def apply_thresholds(per_item: pl.DataFrame, chosen: Mapping[str, float], category: str = "category") -> pl.DataFrame:
    """Replace the sweep columns by 'iou@tuned' / 'dice@tuned' at each category's chosen threshold."""
    out = per_item
    for metric in SWEEP_METRICS:
        cols = metric_families(per_item.columns).get(metric, [])
        if not cols:
            continue
        expr: pl.Expr = pl.lit(float("nan"), dtype=pl.Float64)
        for cat, t in chosen.items():
            name = column(metric, t)
            if name not in per_item.columns:
                raise ValueError(f"{name} (tuned for {cat}) is not in the per-item table")
            expr = pl.when(pl.col(category) == cat).then(pl.col(name)).otherwise(expr)
        out = out.with_columns(expr.alias(column(metric, "tuned"))).drop(cols)
    return out


# ---------------------------------------------------------------- zero-shot classification


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    mean_rank = upper - (counts - 1) / 2.0
    return mean_rank[inverse.ravel()]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count 1/2); NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ")
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of each row of `weights` (B, n) as item multiplicities; ties count 1/2."""
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order], weights[:, order]
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    group = np.repeat(np.arange(start.size), counts)
    first, last = start[group], (start + counts - 1)[group]
    neg = w * (~y)
    cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(neg, axis=1)], axis=1)
    below = cum[:, first]
    tied = cum[:, last + 1] - below
    pos = w * y
    num = (pos * (below + 0.5 * tied)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / (pos.sum(1) * neg.sum(1))


def auroc_table(
    frame: pl.DataFrame,
    *,
    score: str = "score",
    label: str = "positive",
    category: str = "category",
    n_boot: int = N_BOOT,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> pl.DataFrame:
    """Per-category AUROC and their macro mean ('macro' row), with bootstrap CIs over the rows of `frame`."""
    frame = frame.filter(pl.col(score).is_not_null() & pl.col(score).is_not_nan())
    cats = frame.get_column(category).cast(pl.String).fill_null("").to_numpy()
    s = frame.get_column(score).cast(pl.Float64).to_numpy()
    y = frame.get_column(label).cast(pl.Boolean).to_numpy()
    names = np.unique(cats) if len(cats) else np.array([], dtype=str)
    members = [np.flatnonzero(cats == c) for c in names]
    point = np.array([auroc(s[m], y[m]) for m in members], dtype=np.float64)
    reps = np.full((n_boot, len(names)), np.nan)
    n = len(s)
    if n and n_boot:
        rng = np.random.default_rng(seed)
        start = 0
        for size in _chunks(n, n_boot):
            weights = _resample_weights(rng, n, size)
            for c, m in enumerate(members):
                reps[start : start + size, c] = _weighted_auroc(s[m], y[m], weights[:, m])
            start += size
    lo, hi = _interval(reps, confidence)
    macro_reps = _nanmean(reps, axis=1) if len(names) else np.full(n_boot, np.nan)
    macro_lo, macro_hi = _interval(macro_reps[:, None], confidence)
    macro = float(_nanmean(point, axis=0)) if len(names) else float("nan")
    return pl.DataFrame(
        {
            "protocol": [PROTOCOL] * (len(names) + 1),
            "category": [*(str(c) for c in names), "macro"],
            "n_positive": [*(int(y[m].sum()) for m in members), int(y.sum())],
            "n_negative": [*(int((~y[m]).sum()) for m in members), int((~y).sum())],
            "auroc": [*point.tolist(), macro],
            "ci_low": [*lo.tolist(), float(macro_lo[0])],
            "ci_high": [*hi.tolist(), float(macro_hi[0])],
            "confidence": [confidence] * (len(names) + 1),
            "n_boot": [n_boot] * (len(names) + 1),
            "seed": [seed] * (len(names) + 1),
        },
        schema_overrides={"auroc": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64},
    )
