"""The batch localization pipeline: decode workers -> batched inference -> background HDF5 writes.

Decoding runs in DataLoader worker processes (one image reader, many cores),
inference in the main thread, and writing in the heat-map store's background
thread, so the encoder is the only thing the run waits for. A file that cannot
be read becomes a "failed" row with its reason; the run goes on unless strict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from afloc_cli import __version__
from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.store import AsyncHeatmapWriter, HeatmapFile, HeatmapWriter, ImageRecord
from afloc_cli.image.inference_engine import prepare_image
from afloc_cli.vlp.inference_engine import LocalizationEngine


@dataclass
class RunSummary:
    out: str
    images: int
    prompts: int
    done: int
    failed: int
    skipped_resumed: int
    seconds: float
    images_per_second: float
    failures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class _Decode(Dataset):
    """Reads and letterboxes one image per item; failures are returned, not raised."""

    def __init__(self, items: list[tuple[int, Path]], size: int) -> None:
        self.items = items
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, path = self.items[i]
        try:
            prepared = prepare_image(path, self.size)
        except AflocError as exc:
            return {"index": index, "path": str(path), "frame": None, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill a 50,000-image run
            return {"index": index, "path": str(path), "frame": None, "error": f"{path}: {type(exc).__name__}: {exc}"}
        return {
            "index": index,
            "path": str(path),
            "frame": torch.from_numpy(prepared.frame),
            "letterbox": prepared.letterbox.to_dict(),
            "reader": prepared.info.to_dict(),
            "error": "",
        }


def _collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def run_attrs(engine: LocalizationEngine, checkpoint_sha256: str, readout: str = "reference") -> dict[str, Any]:
    """Everything that must match for a resume or a merge, and that a reader needs to interpret the maps.

    `readout` is how readers (scores, export, overlays) turn the stored raw maps into heat maps; the
    stored maps are the raw similarities either way.
    """
    cfg = engine.cfg
    return {
        "readout": readout,
        "checkpoint_sha256": checkpoint_sha256,
        "model_config": cfg.to_json(),
        "preprocessing": json.dumps(cfg.preprocess.__dict__, sort_keys=True),
        "heatmap_config": json.dumps({**cfg.heatmap.__dict__, "level": engine.level}, sort_keys=True),
        "level": engine.level,
        "grid": engine.grid,
        "precision": engine.precision,
        "afloc_version": __version__,
    }


def _prompt_vectors(engine: LocalizationEngine) -> np.ndarray | None:
    """The prompts' text-side vectors, kept in the file so prompt ensembles can be scored from it later."""
    vectors = getattr(engine, "prompt_embeddings", None)
    return None if vectors is None else vectors.detach().float().cpu().numpy()


def run_localize(
    engine: LocalizationEngine,
    *,
    paths: list[Path],
    indices: list[int],
    prompts: list[str],
    out: Path,
    checkpoint_sha256: str,
    batch_size: int = 16,
    workers: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_batch: Callable[[list[dict[str, Any]], np.ndarray], None] | None = None,
    wanted: np.ndarray | None = None,
    readout: str = "reference",
    inputs_sha256: str | None = None,
    n_inputs: int | None = None,
) -> RunSummary:
    """Localize `paths` (the items of this shard, with their global `indices`) into `out`.

    `wanted` (len(paths), P) bool keeps only those (image, prompt) maps and stores NaN for the
    rest: a phrase-grounding benchmark asks one phrase per image, and NaN chunks compress to
    almost nothing, so one file still serves every pair. `inputs_sha256` (of the full input list) lets
    `merge` refuse shards made over different lists; `n_inputs` (its length) lets it see a missing last shard.
    """
    attrs = run_attrs(engine, checkpoint_sha256, readout)
    if inputs_sha256 is not None:
        attrs["inputs_sha256"] = inputs_sha256
    if n_inputs is not None:
        attrs["n_inputs"] = int(n_inputs)
    writer = HeatmapWriter(
        out,
        paths=[str(p) for p in paths],
        indices=indices,
        prompts=prompts,
        grid=engine.grid,
        attrs=attrs,
        resume=resume,
        overwrite=overwrite,
        prompt_embeddings=_prompt_vectors(engine),
    )
    done = writer.done_indices()
    pending = [(i, p) for i, p in enumerate(paths) if i not in done]
    loader = DataLoader(
        _Decode(pending, engine.image_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    start = time.perf_counter()
    n_done = n_failed = 0
    failures: list[dict[str, str]] = []
    with AsyncHeatmapWriter(writer) as sink:
        for batch in loader:
            ok = [item for item in batch if item["frame"] is not None]
            for item in batch:
                if item["frame"] is None:
                    n_failed += 1
                    failures.append({"path": item["path"], "error": item["error"]})
                    sink.write_failure(
                        item["index"],
                        ImageRecord(path=item["path"], height=0, width=0, letterbox={}, reader={},
                                    status="failed", error=item["error"]),
                    )
                    if strict:
                        raise AflocError(item["error"], hint="--strict stops at the first unreadable file")
            if ok:
                frames = torch.stack([item["frame"] for item in ok])
                result = engine(frames)
                records = [
                    ImageRecord(
                        path=item["path"],
                        height=item["letterbox"]["height"],
                        width=item["letterbox"]["width"],
                        letterbox=item["letterbox"],
                        reader=item["reader"],
                    )
                    for item in ok
                ]
                maps = result.maps.numpy()
                if wanted is not None:
                    keep = wanted[[item["index"] for item in ok]]
                    maps = np.where(keep[:, :, None, None], maps, np.nan).astype(np.float32)
                sink.write_batch([item["index"] for item in ok], maps, result.scores.numpy(), records)
                if on_batch is not None:
                    on_batch(ok, maps)
                n_done += len(ok)
            if on_progress is not None:
                on_progress(len(batch), n_done)
        sink.finalize()
    seconds = time.perf_counter() - start
    processed = n_done + n_failed
    # Failures journaled by an earlier, interrupted attempt count too: the file is the truth.
    with HeatmapFile.open(out) as done_file:
        recorded = done_file.failures()
    seen = {f["path"] for f in failures}
    failures += [{"path": r.path, "error": r.error} for r in recorded if r.path not in seen]
    n_failed = len(failures)
    return RunSummary(
        out=str(out),
        images=len(paths),
        prompts=len(prompts),
        done=n_done,
        failed=n_failed,
        skipped_resumed=len(done),
        seconds=round(seconds, 3),
        images_per_second=round(processed / seconds, 2) if seconds > 0 else 0.0,
        failures=failures,
    )
