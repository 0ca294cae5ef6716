"""Heat-map files -> what cohort scripts and other tools read: tables and maps in original pixels.

Tables are computed in the model frame (fast: one 224x224 map per pair) and
reported in original pixels through the image's letterbox, so 50,000 images x
20 prompts take minutes, not hours; exported maps are full size.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import torch

from afloc_cli.atomic import write_atomic
from afloc_cli.benchmark.datasets.chexlocalize import CANONICAL as CHEXLOCALIZE_CANONICAL
from afloc_cli.benchmark.datasets.chexlocalize import TASKS as CHEXLOCALIZE_TASKS
from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.store import HeatmapFile, printable
from afloc_cli.image.data.transforms import Letterbox
from afloc_cli.vlp.heatmap import contrast_maps, frame_maps, minmax_signed, original_map
from afloc_cli.vlp.overlay import write_png


def _heatmap_settings(hf: HeatmapFile) -> tuple[float, int]:
    cfg = json.loads(str(hf.attrs.get("heatmap_config", "{}")))
    return float(cfg.get("sigma", 1.5)), int(cfg.get("nan_margin", 0))


READOUTS = ("reference", "contrast")


def resolve_readout(hf: HeatmapFile, readout: str | None) -> str:
    """The readout asked for, else the one the file was localized with (`afloc localize --readout`)."""
    chosen = readout or str(hf.attrs.get("readout", "reference"))
    if chosen not in READOUTS:
        raise AflocError(f"readout must be reference or contrast, not {chosen!r}")
    if chosen == "contrast" and hf.n_prompts < 2:
        raise AflocError("the contrast readout needs two or more prompts per image (it compares each prompt's map "
                         f"with the others'); this file has {hf.n_prompts}: use --readout reference", path=hf.path)
    return chosen


def _read_maps(raw: np.ndarray, readout: str) -> torch.Tensor:
    maps = torch.from_numpy(raw)
    return contrast_maps(maps) if readout == "contrast" else maps


def score_table(hf: HeatmapFile, threshold: float = 0.5, readout: str | None = None) -> pl.DataFrame:
    """One row per image x prompt: score, peak (original pixels), area above `threshold` of the [-1, 1] map.

    `readout` "contrast" reads each prompt's map against all the file's other prompts (`contrast_maps`);
    None takes the file's own. The score column stays the image-level similarity either way.
    """
    readout = resolve_readout(hf, readout)
    sigma, margin = _heatmap_settings(hf)
    columns: dict[str, list] = {k: [] for k in (
        "index", "path", "prompt", "status", "score", "peak_row", "peak_col", "area_fraction", "area_px")}
    scores = hf.scores()
    for i in range(hf.n_images):
        record = hf.record(i)
        ok = record.status == "ok"
        if ok:
            lb = Letterbox(**record.letterbox)
            frames = frame_maps(_read_maps(hf.maps(i), readout), lb.size, sigma, margin)
            content = frames[(..., *lb.image_region)].numpy()
            norm = minmax_signed(content)
        for p, prompt in enumerate(hf.prompts):
            columns["index"].append(int(hf.indices[i]))
            columns["path"].append(printable(record.path))  # a table column is UTF-8; /index is the exact key
            columns["prompt"].append(printable(prompt))
            columns["status"].append(record.status)
            if not ok:
                for key in ("score", "peak_row", "peak_col", "area_fraction", "area_px"):
                    columns[key].append(None)
                continue
            m = np.where(np.isnan(content[p]), -np.inf, content[p])
            r, c = np.unravel_index(int(np.argmax(m)), m.shape)
            x, y = lb.frame_to_original(lb.pad_left + c + 0.5, lb.pad_top + r + 0.5)
            above = np.nanmean(norm[p] > threshold)
            columns["score"].append(float(scores[i, p]))
            columns["peak_row"].append(int(min(max(np.floor(y), 0), lb.height - 1)))
            columns["peak_col"].append(int(min(max(np.floor(x), 0), lb.width - 1)))
            columns["area_fraction"].append(round(float(above), 6))
            columns["area_px"].append(int(round(float(above) * lb.height * lb.width)))
    return pl.DataFrame(columns, schema={
        "index": pl.Int64, "path": pl.String, "prompt": pl.String, "status": pl.String, "score": pl.Float64,
        "peak_row": pl.Int64, "peak_col": pl.Int64, "area_fraction": pl.Float64, "area_px": pl.Int64,
    })


def iter_original_maps(hf: HeatmapFile, readout: str | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """(image, prompt, map over the original pixels) for every successful pair, NaN outside the image."""
    readout = resolve_readout(hf, readout)
    sigma, margin = _heatmap_settings(hf)
    for i in range(hf.n_images):
        record = hf.record(i)
        if record.status != "ok":
            continue
        lb = Letterbox(**record.letterbox)
        maps = _read_maps(hf.maps(i), readout)
        for p in range(hf.n_prompts):
            yield i, p, original_map(maps[p], lb, sigma, margin).numpy()


def output_folder(folder: Path) -> None:
    """Make an export folder up front, or refuse it on one line: a file in the way, a read-only disk."""
    if folder.exists() and not folder.is_dir():
        raise AflocError("is a file, not a folder", path=folder, hint="name a folder for the exported maps")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AflocError(f"cannot make the folder: {exc.strerror or exc}", path=folder) from None
    if not os.access(folder, os.W_OK):
        raise AflocError("folder is not writable", path=folder)


def _name(hf: HeatmapFile, i: int, p: int, suffix: str) -> str:
    from afloc_cli.vlp.overlay import overlay_name

    # Only the final suffix: an image stem may itself hold ".png" (scan.png.dcm).
    return overlay_name(hf.record(i).path, int(hf.indices[i]), p, hf.prompts[p]).removesuffix(".png") + suffix


def export_png(hf: HeatmapFile, folder: Path, readout: str | None = None) -> int:
    """16-bit grey PNGs of the [-1, 1] map at original size (0 = -1, 65535 = +1, NaN -> 0)."""
    readout = resolve_readout(hf, readout)  # refuse a bad readout before the folder is made
    output_folder(folder)
    n = 0
    for i, p, heat in iter_original_maps(hf, readout):
        norm = minmax_signed(heat)
        grey = np.nan_to_num((norm + 1) / 2 * 65535, nan=0).round().astype(np.uint16)
        write_png(folder / _name(hf, i, p, ".png"), grey)
        n += 1
    return n


def _save_npy(path: Path, heat: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would add ".npy" to a temporary's name
        np.save(f, heat.astype(np.float32))


def export_npy(hf: HeatmapFile, folder: Path, readout: str | None = None) -> int:
    """float32 .npy maps at original size (raw similarity, or its contrast; NaN outside the image)."""
    readout = resolve_readout(hf, readout)  # refuse a bad readout before the folder is made
    output_folder(folder)
    n = 0
    for i, p, heat in iter_original_maps(hf, readout):
        write_atomic(folder / _name(hf, i, p, ".npy"), lambda tmp, heat=heat: _save_npy(tmp, heat))
        n += 1
    return n


# cheXlocalize's scripts skip every pickle whose task is not one of its ten (the dataset reader's TASKS); our
# categories say "Lung Opacity" where cheXlocalize says "Airspace Opacity".
_TASK_NAMES = {t.lower(): t for t in CHEXLOCALIZE_TASKS} | {v.lower(): k for k, v in CHEXLOCALIZE_CANONICAL.items()}


def chexlocalize_task(prompt: str) -> str | None:
    """cheXlocalize's task for a prompt: the task's name, or the template "Findings suggesting <task>." (any case)."""
    text = prompt.strip().rstrip(".").strip().lower()
    if text.startswith("findings suggesting "):
        text = text[len("findings suggesting "):].strip()
    return _TASK_NAMES.get(text)


def chexlocalize_id(path: str) -> str:
    """cheXlocalize's image id: the last three path parts joined by `_`, without an image suffix.

    Only a known image suffix is dropped: a PACS file named by its SOP Instance UID (`1.2.840.1.101`) keeps
    its last component.
    """
    from afloc_cli.localize.inputs import IMAGE_SUFFIXES

    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        p = p.with_suffix("")
    return "_".join(p.parts[-3:])


def export_chexlocalize(hf: HeatmapFile, folder: Path, tasks: dict[str, str] | None = None,
                        readout: str | None = None) -> int:
    """cheXlocalize's saliency pickles: `{image_id}_{task}_map.pkl` with map, prob, task, gt, cxr_img, cxr_dims.

    The map is the smoothed, upsampled map over the image's own part of the model frame (letterbox padding
    cropped), (1, 1, rh, rw): cheXlocalize resizes it bilinearly (align_corners=False) to `cxr_dims`, which then
    gives exactly afloc's map at original size. `prob` is the image score; `gt` is unknown here (NaN); `tasks`
    maps prompts to cheXlocalize task names (default: `chexlocalize_task`); prompts without a task and pairs
    that were not localized (NaN maps) are not written.
    """
    from afloc_cli.image.data.io import read_image

    readout = resolve_readout(hf, readout)
    sigma, _ = _heatmap_settings(hf)
    names = {p: (tasks or {}).get(p) or chexlocalize_task(p) for p in hf.prompts}
    if not any(t in CHEXLOCALIZE_TASKS for t in names.values()):
        raise AflocError("no prompt names a cheXlocalize task (its scripts read only these: "
                         f"{', '.join(CHEXLOCALIZE_TASKS)}); prompt with the task's name or "
                         "'Findings suggesting <task>.'", path=hf.path)
    named = [t for t in names.values() if t in CHEXLOCALIZE_TASKS]
    if twice := sorted({t for t in named if named.count(t) > 1}):
        raise AflocError(f"several prompts name the cheXlocalize task {twice[0]!r}, and it reads one map per image "
                         "and task: export a file with one prompt per task", path=hf.path)
    ids: dict[str, str] = {}  # one pickle per id and task: two images with one id would overwrite each other
    id_of: dict[str, str] = {}
    for record in hf.records():
        if record.status != "ok":
            continue
        image_id = id_of[record.path] = chexlocalize_id(record.path)
        if ids.setdefault(image_id, record.path) != record.path:
            raise AflocError(f"{ids[image_id]} and {record.path} get the same cheXlocalize image id {image_id!r} "
                             "(the last three path parts), so one's maps would overwrite the other's", path=hf.path,
                             hint="localize and export each root separately")
    output_folder(folder)
    scores = hf.scores()
    n = 0
    for i in range(hf.n_images):
        record = hf.record(i)
        if record.status != "ok":
            continue
        path = Path(record.path)
        image_id = id_of[record.path]
        pixels = torch.from_numpy(read_image(path).pixels)
        lb = Letterbox(**record.letterbox)
        maps = frame_maps(_read_maps(hf.maps(i), readout), lb.size, sigma)[(..., *lb.image_region)]
        for p, prompt in enumerate(hf.prompts):
            task = names[prompt]
            if task not in CHEXLOCALIZE_TASKS or not bool(torch.isfinite(maps[p]).all()):
                continue
            blob = {
                "map": maps[p].reshape(1, 1, *maps.shape[-2:]).float().clone(),  # own storage: not the whole frame
                "prob": float(scores[i, p]),
                "task": task,
                "gt": float("nan"),
                "cxr_img": pixels.unsqueeze(0).expand(3, -1, -1).clone(),
                "cxr_dims": (record.width, record.height),
            }
            data = pickle.dumps(blob)
            write_atomic(folder / f"{image_id}_{task}_map.pkl", lambda tmp, data=data: tmp.write_bytes(data))
            n += 1
    return n


def open_heatmaps(path: Path) -> HeatmapFile:
    """The file scores and export read; HeatmapFile.open says why one cannot be (and if its run is unfinished)."""
    return HeatmapFile.open(path)
