"""The training entry point behind `afloc pretrain` (also under `torchrun -m afloc_cli pretrain ...`)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from afloc_cli.vlp.inference_engine import resolve_device
from train.config import TrainConfig
from train.data import FrameCache
from train.distributed import init_from_env, shutdown
from train.loop import Trainer, TrainState


def train(
    cfg: TrainConfig,
    cache: FrameCache,
    out: Path,
    *,
    device: str = "auto",
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> TrainState:
    console = console or Console(stderr=True)
    dist = init_from_env()
    torch_device = resolve_device(device)
    if torch_device.type == "cuda" and dist.enabled:
        torch_device = torch.device("cuda", dist.local_rank)
    try:
        trainer = Trainer(cfg, cache, out, dist=dist, device=torch_device, log=console.print)
        if dist.is_main:
            s = trainer.train_set.stats
            listed = [cache.folder / n for n in ("problems.csv", "failures.csv") if (cache.folder / n).is_file()]
            console.print(f"train pairs: {s.usable} usable, {s.skipped_empty_report} empty reports skipped, "
                          f"{s.skipped_unreadable} unreadable images skipped"
                          + (f" (rows and reasons: {', '.join(map(str, listed))})" if listed else "")
                          + f"; precision {trainer.precision}")
        if resume:
            trainer.resume()
        steps_per_epoch = len(trainer.train_set) // cfg.batch_size // max(1, cfg.optim.accumulate)
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        with Progress(TextColumn("[bold]pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                      disable=not (show_progress and dist.is_main)) as progress:
            task = progress.add_task("steps", total=total, completed=trainer.state.step, info="")

            def on_step(row: dict) -> None:
                parts = [f"loss {row['loss']:.3f}"]
                for key, label in (("loss_global", "gr"), ("loss_sentence", "ds"), ("loss_word", "sw")):
                    if row[key] == row[key]:  # not NaN: that loss is on
                        parts.append(f"{label} {row[key]:.3f}")
                parts.append(f"{row['images_per_s']:.1f} img/s")
                progress.update(task, completed=row["step"], info=" ".join(parts))

            return trainer.fit(on_step=on_step)
    finally:
        shutdown(dist)
