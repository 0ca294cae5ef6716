"""`afloc prepare` and `afloc pretrain`: the decoded-once cache, then multi-level contrastive training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from afloc_cli.commands import WORKERS_HELP, decode_workers, stderr_console
from afloc_cli.commands.localize import EXIT_SOME_FAILED
from afloc_cli.errors import AflocError


def prepare_command(
    corpus: Path = typer.Argument(..., help="Manifest CSV/Parquet, folder with manifest.csv, or MIMIC-CXR-JPG root."),
    out: Path = typer.Option(..., "--out", help="Cache folder (resumable: run again to complete it)."),
    size: int = typer.Option(224, "--size", help="Letterbox size (the model's input)."),
    workers: int | None = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    reports_root: Path | None = typer.Option(
        None, "--reports-root",
        help="MIMIC-CXR: the folder holding the reports' files/ (mimic-cxr-reports.zip unpacked), when it is "
        "neither the JPG root nor PhysioNet's mimic-cxr/2.0.0 beside it.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Decode every image of a corpus once into a memory-mapped uint8 cache for training.

    Run it again to finish an interrupted cache, to retry images that failed, or to take up reports and splits
    edited since: rows that cannot train are listed with the reason in OUT/problems.csv."""
    from train.data import prepare_cache

    console = stderr_console()
    with Progress(TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=not sys.stderr.isatty() or as_json) as progress:
        task = progress.add_task("images", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        summary = prepare_cache(corpus, out, size=size, workers=decode_workers(workers), on_progress=on_progress,
                                reports_root=reports_root)
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
    else:
        if summary["records_updated"]:
            console.print("reports or splits changed since this cache was made: the cache now holds the new ones")
        console.print(f"cache {out}: {summary['done']}/{summary['n']} images ready, {summary['failed']} unreadable"
                      + (f" (see {out / 'failures.csv'})" if summary["failed"] else "")
                      + f", {summary['problems']} rows that cannot train"
                      + (f" (see {out / 'problems.csv'})" if summary["problems"] else ""))
    if summary["failed"]:  # the README's exit code for a batch with unreadable images, as localize gives
        raise typer.Exit(EXIT_SOME_FAILED)


def pretrain_command(
    data: Path = typer.Argument(..., help="A prepared cache (afloc prepare), or a corpus to prepare into OUT/cache."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints/, metrics.csv, model.safetensors."),
    config: Path | None = typer.Option(None, "--config", help="TOML training config."),
    preset: str | None = typer.Option(None, "--preset", help="Model shape to start from: resnet50 or small."),
    losses: str | None = typer.Option(None, "--losses", help="Comma list of global,sent,word (ablations)."),
    overrides: list[str] | None = typer.Option(None, "--set", help="Override a setting: key=value (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from OUT/checkpoints/last.json."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Pretrain AFLoc's three contrastive losses (torchrun-ready: run under torchrun for DDP).

    With --resume the run's own config (saved with its checkpoints) is the config: --config/--set/--preset/--losses
    may repeat it, and may change only epochs, max_steps, workers, checkpoint_every and keep_best (to extend the
    run, or to suit another machine), which leave every step's computation as it was."""
    from train.config import config_for_resume, differences, read_saved_config, read_settings, with_losses
    from train.data import FrameCache, prepare_cache
    from train.distributed import init_from_env, launched_rank, on_main_rank, shutdown
    from train.loop import last_checkpoint
    from train.main import train

    console = stderr_console()
    main_rank = launched_rank() == 0  # under torchrun only rank 0 speaks; every rank trains
    settings = read_settings(config, overrides, preset)
    checkpoint = last_checkpoint(out)
    if checkpoint is not None and not resume:
        raise AflocError("run folder already has checkpoints", path=out, hint="use --resume or a new --out")
    if checkpoint is None:
        cfg = with_losses(settings.resolve(), losses)
    else:
        saved = read_saved_config(checkpoint)
        cfg = config_for_resume(saved, settings, losses, source=checkpoint / "config.json")
        changed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differences(saved, cfg).items())
        if main_rank:
            console.print(f"resuming with the run's saved config ({checkpoint / 'config.json'})"
                          + (f", changed: {changed}" if changed else ""))
    cache_dir = data
    if not (data / "meta.json").is_file():
        cache_dir = out / "cache"
        if main_rank:
            console.print(f"preparing {data} into {cache_dir} ...")
        # Under torchrun every rank gets here, and --out is one folder on storage every rank shares (README,
        # "Run on a cluster"): rank 0 alone prepares the cache, the others wait for it (and stop if it fails).
        dist = init_from_env()  # train() joins this same process group
        try:
            on_main_rank(lambda: prepare_cache(data, cache_dir, size=cfg.model.preprocess.image_size,
                                               workers=cfg.workers), dist, what="to prepare the cache")
        except BaseException:
            shutdown(dist)
            raise
    state = train(cfg, FrameCache(cache_dir), out, device=device, resume=resume, console=console,
                  show_progress=sys.stderr.isatty() and not as_json)
    if not main_rank:
        return
    summary = {"out": str(out), "steps": state.step, "epochs_done": state.epoch,
               "model": str(out / "model.safetensors")}
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
    else:
        console.print(f"trained {state.step} steps -> {out / 'model.safetensors'}")
