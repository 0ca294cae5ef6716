"""`afloc benchmark`: a dataset as downloaded + heat maps -> metric tables that say how they were made.

The maps come from `afloc localize`'s own pipeline and file (so an interrupted
benchmark resumes), or from any heat-map file in our schema. Scoring happens in
the model frame (224 x 224), where the reference scores: the truth (boxes or
masks in original pixels) is letterboxed exactly as the image was. Truth stated at another
size than its image (a resized copy) enters by its own size when the aspect agrees; otherwise
the item is a problem row.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from afloc_cli import __version__
from afloc_cli.atomic import write_atomic
from afloc_cli.benchmark.class_prompts import class_cosines, presence_scores, resolve_class_prompts
from afloc_cli.benchmark.datasets import fill_sizes, read_dataset
from afloc_cli.benchmark.datasets.base import Item, Problem, fill_prompt
from afloc_cli.benchmark.metrics import (
    DEFAULT_THRESHOLDS,
    PROTOCOL,
    apply_thresholds,
    auroc_table,
    per_item_table,
    score_item,
    summarize,
    tune_thresholds,
)
from afloc_cli.checkpoint.io import sha256_file
from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.store import HeatmapFile
from afloc_cli.image.data.transforms import Letterbox
from afloc_cli.vlp.heatmap import contrast_maps, frame_maps, nan_border

# IoU / Dice / CNR read off the paper's figure (SPEC.md, "What the paper reports").
PAPER = {
    "rsna": {"AFLoc": (0.343, 0.485, 1.54), "MedKLIP": (0.318, 0.465, 1.04)},
    "ms-cxr": {"AFLoc": (0.325, 0.463, 1.64), "GLoRIA": (0.269, 0.393, 1.29),
               "AFLoc re-run (third party)": (0.323, 0.461, 1.63)},
    "covid-rural": {"AFLoc": (0.211, 0.323, 1.07), "BioViL": (0.192, 0.298, 0.98)},
}
NEGATIVE_TEMPLATE = "No {category}."
READOUTS = ("reference", "contrast")
# The class's cosine is that of the mean of its class prompts' report embeddings (class_prompts.py):
# the template prompt alone unless --class-prompts gives more.
ZERO_SHOT = {
    "reference": "two-way softmax (x10) of the global image-text cosine of the category's class prompts (report "
                 f"embeddings averaged) against {NEGATIVE_TEMPLATE!r} (the reference's zero-shot classification)",
    "contrast": "global image-text cosine of the category's class prompts (report embeddings averaged) minus its "
                "mean over the other categories' on the same image",
}
# Why contrast exists for the image-level score too: the reference's negative prompt only separates what
# the text model separates, and a general-purpose sentence model puts "No pneumothorax." next to
# "pneumothorax", so the softmax can cancel what the image side learned (benchmarks/RESULTS.md,
# "Zero-shot scores"). The contrast score asks which finding's prompts the image is closest to.


@dataclass
class BenchmarkResult:
    out: Path
    summary: pl.DataFrame
    per_category: pl.DataFrame
    auroc: pl.DataFrame | None
    protocol: dict[str, Any]
    problems: int
    notes: list[str] = field(default_factory=list)
    human: pl.DataFrame | None = None  # CheXlocalize's radiologist benchmark, scored the same way


def _same_file(path: str | Path) -> str:
    """The path as the OS resolves it (from the current folder), so two spellings of one image compare equal."""
    return str(Path(path).resolve())


def _annotation_hashes(root: Path) -> dict[str, str]:
    """sha256 of the annotation files at the dataset root (CSV/JSON), so a table names its exact inputs."""
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root])
                   if p.is_file() and p.suffix.lower() in (".csv", ".json", ".gz") and p.stat().st_size < 512 << 20)
    return {str(p.relative_to(root) if root.is_dir() else p.name): sha256_file(p) for p in files[:50]}


class PromptIndex(dict):
    """Prompt -> its column in a heat-map file, matched without regard to case.

    The text model sees every prompt lower-cased, so 'Findings suggesting Atelectasis.' (how files written before
    the template prompts took the readers' spelling name them) is the same prompt as 'Findings suggesting
    atelectasis.'; the first column of a spelling wins.
    """

    def __init__(self, prompts: list[str]) -> None:
        super().__init__()
        for j, prompt in enumerate(prompts):
            self.setdefault(prompt.casefold(), j)

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and super().__contains__(prompt.casefold())

    def __getitem__(self, prompt: str) -> int:
        return super().__getitem__(prompt.casefold())

    def get(self, prompt: str, default: int | None = None) -> int | None:  # type: ignore[override]
        return super().get(prompt.casefold(), default)


def select_items(items: list[Item], prompt_source: str, template: str, limit: int | None) -> list[Item]:
    """Items in a fixed order; `template` prompts replace phrases when asked; `limit` keeps the first N images."""
    from dataclasses import replace

    ordered = sorted(items, key=lambda it: (str(it.image_path), it.category, it.prompt, it.item_id))
    if prompt_source == "template":
        ordered = [replace(it, prompt=fill_prompt(template, it.category)) for it in ordered]
    elif prompt_source != "phrase":
        raise AflocError(f"--prompt-source must be phrase or template, not {prompt_source!r}")
    if limit is not None:
        keep: list[str] = []
        for it in ordered:
            key = str(it.image_path)
            if key not in keep:
                keep.append(key)
            if len(keep) >= limit:
                break
        allowed = set(keep)
        ordered = [it for it in ordered if str(it.image_path) in allowed]
    return ordered


# How maps and truth meet in the model frame. "reference" is the paper's evaluation (its localization.py run with
# --margin, as its run.sh does for every chest dataset): the whole frame is scored, letterbox padding included.
FRAMINGS = {
    "reference": "the paper's: the whole model frame is scored, letterbox padding included, with a NaN border of "
                 "14/224 of the frame (the reference's --margin); boxes scaled into the frame by size / long side, "
                 "padding added, floored (its box_mapping); masks area-resampled, > 0.5 kept (>= 1e-5 for "
                 "COVID-Rural, whose masks the reference resamples as floats)",
    "image": "the image only: the letterbox padding is NaN (in neither the min-max nor any metric) and the heat-map "
             "file's own NaN margin applies (none by default); boxes and masks filled in original pixels, "
             "area-resampled into the frame, > 0.5 kept",
}
REFERENCE_MARGIN = 14  # pixels of a 224 frame: the border outside the reference's 448-of-512 centre crop
ANY_COVERAGE = {"covid-rural"}  # datasets whose masks the reference resamples as floats, keeping any coverage
# How far (relative) an annotation's aspect may differ from its image's and still be scaled onto it: a resized copy
# keeps the aspect to within its rounding (CheXpert-v1.0-small: < 0.1%), another picture does not.
ASPECT_TOLERANCE = 0.01


def _blank(heat: torch.Tensor, lb: Letterbox, framing: str, file_margin: int) -> torch.Tensor:
    """NaN where the framing scores nothing: the reference's border, or the letterbox padding (no truth can
    lie there) plus the file's own margin."""
    if framing == "reference":
        return nan_border(heat, round(REFERENCE_MARGIN * lb.size / 224))
    out = torch.full_like(heat, float("nan"))
    region = (..., *lb.image_region)
    out[region] = nan_border(heat, file_margin)[region]
    return out


def truth_letterbox(it: Item, lb: Letterbox) -> Letterbox:
    """The letterbox that brings the item's truth into the frame of `lb` (the image as localized).

    `lb` itself when the annotation's size (Item.height/width) is the image's. A resized copy of the image (same
    aspect within ASPECT_TOLERANCE) gets a letterbox of the annotation's own size: its boxes and masks land where
    the finding lies in the frame, as the reference maps them by the annotation's size (box_mapping with its
    width/height, masks letterboxed by their own). Another aspect means the truth belongs to another picture: an
    AflocError, which the runner turns into a problem row.
    """
    if it.height is None or it.width is None or (it.height, it.width) == (lb.height, lb.width):
        return lb
    if abs((it.height * lb.width) / (it.width * lb.height) - 1.0) > ASPECT_TOLERANCE:
        raise AflocError(f"the annotation is {it.height}x{it.width} pixels but the image is {lb.height}x{lb.width}, "
                         "another aspect ratio: the truth cannot be scaled onto it")
    return Letterbox.for_shape(it.height, it.width, lb.size)


def frame_truth(it: Item, lb: Letterbox, framing: str, dataset: str) -> np.ndarray:
    """The item's truth in the frame of `lb`, as `framing` brings it there (FRAMINGS; sizes: truth_letterbox)."""
    own = truth_letterbox(it, lb)
    if framing == "reference" and it.mask is None:
        return own.boxes_to_frame_mask((b.x, b.y, b.w, b.h) for b in it.boxes)
    try:
        truth = it.truth_mask(own.height, own.width)
    except ValueError as e:  # a mask of another size than its annotation states
        raise AflocError(str(e)) from None
    return own.original_mask_to_frame(truth, any_coverage=framing == "reference" and dataset in ANY_COVERAGE)


def run_benchmark(
    dataset: str,
    root: Path,
    out: Path,
    *,
    heatmaps: Path | None = None,
    localize: Callable[[list[Path], list[str], np.ndarray, Path], tuple[Path, str]] | None = None,
    split: str | None = None,
    prompt_template: str = "Findings suggesting {category}.",
    prompt_source: str = "phrase",
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    n_boot: int = 1000,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    readout: str = "reference",
    class_prompts: dict[str, list[str]] | None = None,
    framing: str = "reference",
) -> BenchmarkResult:
    """Score `dataset`; `localize(paths, prompts, wanted, h5)` makes the maps when no `heatmaps` file is given.

    `readout` "reference" scores each prompt's own map (the paper's); "contrast" scores it against the maps of
    the other categories' template prompts on the same image (`contrast_maps`), so those are always localized.
    `class_prompts` {category: [prompt, ...]} are the positive prompts of the zero-shot score (default: the
    template alone); their report embeddings are averaged, as the reference does. `framing` is how maps and
    truth meet in the model frame (FRAMINGS; "reference" is the paper's).
    """
    if readout not in READOUTS:
        raise AflocError(f"--readout must be one of {', '.join(READOUTS)}, not {readout!r}")
    if framing not in FRAMINGS:
        raise AflocError(f"--framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
    if out.exists() and not out.is_dir():
        raise AflocError("--out must be a folder, and this is a file", path=out,
                         hint="choose a folder for the tables and heat maps")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file among its parents, no permission: one line, not a traceback
        raise AflocError(f"cannot create the --out folder ({e.strerror})", path=out) from None
    items, problems = read_dataset(dataset, root, split=split, prompt_template=prompt_template, **(options or {}))
    segmentations: dict[tuple[str, str], tuple[list[int], int, int]] = {}
    if dataset == "chexlocalize":  # the radiologists' file, checked before the long localization
        from afloc_cli.benchmark.datasets.chexlocalize import read_human_benchmark

        segmentations, human_problems = read_human_benchmark(root)
        problems += human_problems
    items = fill_sizes(select_items(items, prompt_source, prompt_template, limit), problems)
    if not items:
        raise AflocError(f"no items to score in {dataset} (split {split})", path=root,
                         hint=f"{len(problems)} rows or images could not be used, e.g. {problems[0]}" if problems
                         else None)
    has_negatives = any(not it.positive for it in items)
    categories = sorted({it.category for it in items})
    if readout == "contrast" and len(categories) < 2:  # before any localization: maps and AUROC alike need it
        raise AflocError("the contrast readout needs two or more prompts per image, and this dataset has only "
                         f"one category ({categories[0]!r}): use --readout reference", path=root)

    ensembles = resolve_class_prompts(class_prompts, categories, prompt_template)
    negatives = {c: fill_prompt(NEGATIVE_TEMPLATE, c) for c in categories}
    notes: list[str] = []
    if class_prompts and not has_negatives:  # checked above like everywhere, but there is nothing to use them on
        notes.append(f"--class-prompts not used: the {dataset} items scored include no image without a finding, so "
                     "there is no zero-shot AUROC for class prompts to score")

    paths = list(dict.fromkeys(str(it.image_path) for it in items))
    prompts = list(dict.fromkeys(it.prompt for it in items if it.positive))
    for c in categories:  # every readout's prompts, so one file serves both (the demo scores it twice)
        wanted_prompts = [fill_prompt(prompt_template, c)] if has_negatives or readout == "contrast" else []
        if has_negatives:
            wanted_prompts += [*ensembles[c], negatives[c]]
        for p in wanted_prompts:
            if p not in prompts:
                prompts.append(p)
    path_index = {p: i for i, p in enumerate(paths)}
    prompt_index = {p: j for j, p in enumerate(prompts)}
    wanted = np.zeros((len(paths), len(prompts)), dtype=bool)
    for it in items:
        if it.positive:
            wanted[path_index[str(it.image_path)], prompt_index[it.prompt]] = True
            if readout == "contrast":  # the contrast set of every positive image
                for c in categories:
                    wanted[path_index[str(it.image_path)], prompt_index[fill_prompt(prompt_template, c)]] = True
    checkpoint_sha = None
    if heatmaps is None:
        if localize is None:
            raise AflocError("give --checkpoint (to localize first) or --heatmaps FILE")
        heatmaps, checkpoint_sha = localize([Path(p) for p in paths], prompts, wanted, out / "heatmaps.h5")

    rows: list[dict[str, Any]] = []
    score_rows: list[dict[str, Any]] = []
    rescaled = 0  # items whose truth is stated at another size than their image's (a resized copy)
    unscored: set[str] = set()  # items whose truth cannot be brought onto their image: problem rows
    unread: set[str] = set()  # images the heat-map file records as failed: problem rows
    with HeatmapFile.open(heatmaps) as hf:
        checkpoint_sha = checkpoint_sha or str(hf.attrs.get("checkpoint_sha256", ""))
        hm_cfg = json.loads(str(hf.attrs.get("heatmap_config", "{}")))
        preprocessing = json.loads(str(hf.attrs.get("preprocessing", "{}")))
        model_config = json.loads(str(hf.attrs.get("model_config", "{}")))
        sigma, margin = float(hm_cfg.get("sigma", 1.5)), int(hm_cfg.get("nan_margin", 0))
        # By resolved path: a file localized as nih/images/x.png serves --root /data/nih and the reverse.
        file_rows = {_same_file(path): i for i, path in enumerate(hf.paths)}
        row_of = {p: file_rows.get(_same_file(p)) for p in paths}  # once per image, not per item
        file_prompts = PromptIndex(hf.prompts)
        missing_prompts = sorted({it.prompt for it in items if it.positive and it.prompt not in file_prompts})
        if missing_prompts:
            raise AflocError(f"the heat-map file lacks {len(missing_prompts)} prompts, e.g. {missing_prompts[0]!r}",
                             path=heatmaps)
        presence = None
        if has_negatives:
            needed = [p for c in categories for p in ensembles[c]]
            if readout == "reference":
                needed += list(negatives.values())
            lacking = [p for p in needed if p not in file_prompts]
            if lacking and class_prompts:
                raise AflocError(f"the heat-map file lacks {len(lacking)} of the zero-shot prompts (the class prompts"
                                 f"{', and No {category}. for this readout' if readout == 'reference' else ''}), "
                                 f"e.g. {lacking[0]!r}", path=heatmaps,
                                 hint="localize with them too, or score without --class-prompts")
            if lacking:
                has_negatives = False
                kinds = [repr(prompt_template)] + ([repr(NEGATIVE_TEMPLATE)] if readout == "reference" else [])
                notes.append(f"zero-shot AUROC skipped: the heat-map file lacks the template prompts "
                             f"({' and '.join(kinds)} per category)")
            elif absent := sum(1 for p in {str(it.image_path) for it in items if not it.positive}
                               if row_of[p] is None):
                has_negatives = False
                notes.append(f"zero-shot AUROC skipped: the heat-map file lacks {absent} of the images without "
                             "a finding (localized for the positives only?)")
            else:
                scores = hf.scores()
                own = class_cosines(scores, hf.prompt_embeddings(), ensembles, file_prompts, heatmaps)
                negative = (None if readout == "contrast" else
                            scores[:, [file_prompts[negatives[c]] for c in categories]].astype(np.float64))
                presence = presence_scores(own, negative, readout)
        column = {c: k for k, c in enumerate(categories)}
        records = hf.records()  # column by column, once: not one small read per item
        for it in items:
            if not it.positive and not has_negatives:
                continue
            i = row_of[str(it.image_path)]
            if i is None:
                raise AflocError(f"the heat-map file has no map for {it.image_path}", path=heatmaps)
            record = records[i]
            base = {"item_id": it.item_id, "image_id": it.image_id, "category": it.category,
                    "prompt": it.prompt, "split": it.split or ""}
            if record.status != "ok":  # localize could not decode it: one problem row per image
                if str(it.image_path) not in unread:
                    unread.add(str(it.image_path))
                    problems.append(Problem(str(it.image_path), None, f"image not read, not scored: {record.error}"))
                continue
            lb = Letterbox(**record.letterbox)
            truth = None
            if it.positive:
                try:
                    truth = frame_truth(it, lb, framing, dataset)
                except AflocError as e:
                    problems.append(Problem(str(it.image_path), None, f"{it.item_id}: {e}"))
                    unscored.add(it.item_id)
                    continue
                rescaled += truth_letterbox(it, lb) is not lb
            if presence is not None:
                score_rows.append({**base, "positive": it.positive, "score": float(presence[i, column[it.category]])})
            if truth is None:
                continue
            if readout == "contrast":
                raw = _contrast_raw(hf, i, it, categories, file_prompts, prompt_template, heatmaps)
            else:
                raw = torch.from_numpy(hf.raw(i, file_prompts[it.prompt]))
            heat = _blank(frame_maps(raw, lb.size, sigma), lb, framing, margin)
            rows.append({**base, **score_item(heat.numpy(), truth, thresholds)})
    if rescaled:
        notes.append(f"truth rescaled for {rescaled} items: their annotation states another size than the image "
                     f"file (a resized copy), same aspect within {ASPECT_TOLERANCE:.0%}; brought into the frame "
                     "by the annotation's own size, as the reference does")
    if unread:
        notes.append(f"{len(unread)} images could not be read and are not scored (problems.csv)")
    if unscored:
        notes.append(f"{len(unscored)} items not scored: their truth does not fit their image (problems.csv)")
    if not rows:  # every positive a problem row or unlocalized: a clear stop, not an empty table's traceback
        # Nothing is written: --out keeps the earlier run's tables whole, so the problems go in the message.
        raise AflocError(f"no item of {dataset} could be scored", path=root,
                         hint=(f"{len(problems)} rows or items could not be used, e.g. {problems[0]}"
                               if problems else "; ".join(notes) or "no item has the finding"))
    per_item = per_item_table(rows)
    if dataset == "chexlocalize" and per_item.height:
        val = per_item.filter(pl.col("split") == "val")
        test = per_item.filter(pl.col("split") == "test")
        if val.height and test.height:
            chosen = tune_thresholds(val)
            per_item = apply_thresholds(test, chosen)
            notes.append(f"CheXlocalize: per-task thresholds tuned on val, scored on test: {chosen}")
        else:
            notes.append("CheXlocalize: per-task threshold tuning needs both splits (omit --split)")
    per_category, summary = summarize(per_item, n_boot=n_boot)
    human = None
    if dataset == "chexlocalize":  # the model's own scored items, so the two rows compare like with like
        kept = [it for it in items if it.item_id not in unscored and str(it.image_path) not in unread]
        human = _human_benchmark(dataset, segmentations, kept, thresholds, n_boot, framing, problems)
    if human is not None:
        notes.append("CheXlocalize human benchmark (hb_segmentations_test.json) scored with the same code: "
                     "human_summary.csv")
    auroc = auroc_table(pl.DataFrame(score_rows), n_boot=n_boot) if score_rows else None

    protocol = {
        "protocol": PROTOCOL,
        "dataset": dataset,
        "root": str(root),
        "split": split,
        "checkpoint_sha256": checkpoint_sha,
        "heatmaps": str(heatmaps),
        "heatmap_config": hm_cfg,
        "preprocessing": preprocessing,
        "model_config": model_config,
        "readout": readout,
        "contrast": (None if readout == "reference" else
                     "raw grid of the item's prompt minus the mean raw grid of the other categories' template "
                     f"prompts ({prompt_template!r}) on the same image, before smoothing"),
        "zero_shot": None if not has_negatives else ZERO_SHOT[readout],
        "class_prompts": ensembles if has_negatives else None,
        "prompt_source": prompt_source,
        "prompt_template": prompt_template,
        "negative_template": NEGATIVE_TEMPLATE if has_negatives and readout == "reference" else None,
        "prompts": prompts,
        "thresholds": list(thresholds),
        "framing": framing,
        "scoring_frame": f"model frame (letterboxed, {FRAMINGS[framing]})",
        "cnr": "signed",
        "bootstrap": {"resamples": n_boot, "seed": 0, "unit": "image-phrase pair", "confidence": 0.95},
        "limit": limit,
        "n_items_scored": per_item.height,
        "n_problems": len(problems),
        "afloc_version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "annotation_sha256": _annotation_hashes(root),
        "notes": notes,
    }
    _write_tables(out, per_item, per_category, summary, auroc, protocol, problems, human)
    return BenchmarkResult(out, summary, per_category, auroc, protocol, len(problems), notes, human)


def _human_benchmark(dataset: str, segmentations: dict[tuple[str, str], tuple[list[int], int, int]],
                     items: list[Item], thresholds: tuple[float, ...], n_boot: int, framing: str,
                     problems: list[Problem]) -> pl.DataFrame | None:
    """Radiologists' own segmentations scored as if they were maps, as the human row beside the model.

    A human segmentation whose size cannot be brought onto the truth's becomes a problem row, like the model's."""
    from afloc_cli.benchmark.datasets.rle import decode_coco

    if not segmentations:
        return None
    rows = []
    for it in items:
        key = (it.image_id, it.category)
        if not it.positive or it.split != "test" or key not in segmentations:
            continue
        counts, h, w = segmentations[key]
        lb = Letterbox.for_shape(h, w, 224)
        human = lb.apply(decode_coco(counts, h, w).astype(np.float32))
        try:
            truth = frame_truth(it, lb, framing, dataset)
        except AflocError as e:
            problems.append(Problem("hb_segmentations_test.json", None, f"{it.item_id}: {e}"))
            continue
        heat = _blank(torch.from_numpy(human), lb, framing, 0).numpy()
        rows.append({"item_id": it.item_id, "category": it.category, **score_item(heat, truth, thresholds)})
    if not rows:
        return None
    _, summary = summarize(per_item_table(rows), n_boot=n_boot)
    return summary.with_columns(pl.lit("human benchmark (radiologists)").alias("source"))


def _contrast_raw(hf: HeatmapFile, i: int, it: Item, categories: list[str], file_prompts: dict[str, int],
                  prompt_template: str, heatmaps: Path) -> torch.Tensor:
    """The item's raw grid under the contrast readout: against the other categories' template prompts.

    The item's own category template is left out of the set: it names the same finding, and subtracting it
    would cancel the very signal the item is scored on.
    """
    others = [fill_prompt(prompt_template, c) for c in categories if c != it.category]
    others = [p for p in others if p != it.prompt]  # non-empty: run_benchmark checked for two categories
    missing_prompts = [p for p in others if p not in file_prompts]
    if missing_prompts:
        raise AflocError(f"the contrast readout needs every category's template prompt; the heat-map file lacks "
                         f"{len(missing_prompts)}, e.g. {missing_prompts[0]!r}", path=heatmaps)
    maps = hf.maps(i)
    stack = torch.from_numpy(np.stack([maps[file_prompts[p]] for p in (it.prompt, *others)]))
    if torch.isnan(stack).any():
        raise AflocError(f"the heat-map file has no maps of the contrast prompts for {it.image_path} (localized "
                         "with only the wanted pairs?): re-localize with --readout contrast", path=heatmaps)
    return contrast_maps(stack)[0]


def _write_tables(out: Path, per_item: pl.DataFrame, per_category: pl.DataFrame, summary: pl.DataFrame,
                  auroc: pl.DataFrame | None, protocol: dict[str, Any], problems: list[Problem],
                  human: pl.DataFrame | None) -> None:
    """Every table of a finished run, each replaced atomically, protocol.json last.

    Written only once the run has succeeded, so a refused or failed rerun leaves the earlier run's tables whole;
    a table this run does not produce (no problems, no negatives, no human benchmark) is removed, so the folder
    never mixes two runs.
    """
    def atomic(name: str, write: Callable[[str], None]) -> None:
        write_atomic(out / name, lambda tmp: write(str(tmp)))

    def optional(name: str, table: pl.DataFrame | None) -> None:
        if table is not None:
            atomic(name, table.write_csv)
        else:
            (out / name).unlink(missing_ok=True)

    atomic("per_item.parquet", lambda p: per_item.write_parquet(p, statistics=False))
    atomic("per_category.csv", per_category.write_csv)
    atomic("summary.csv", summary.write_csv)
    # problems.csv: the rows and items that could not be used, each with its file and reason.
    optional("problems.csv", pl.DataFrame([asdict(p) for p in problems]) if problems else None)
    optional("auroc.csv", auroc)
    optional("human_summary.csv", human)
    atomic("protocol.json", lambda p: Path(p).write_text(json.dumps(protocol, indent=2, default=str)))
