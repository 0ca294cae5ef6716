"""`afloc localize`: folders of radiographs x prompt lists -> one HDF5 file of heat maps."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from afloc_cli.commands import WORKERS_HELP, decode_workers, stderr_console
from afloc_cli.errors import AflocError

if TYPE_CHECKING:
    from afloc_cli.text.inference_engine import PromptList

EXIT_SOME_FAILED = 3


def _prompts(prompts_file: Path | None, prompt: list[str] | None) -> PromptList:
    from afloc_cli.text.inference_engine import parse_prompts, read_prompts_file

    if prompts_file is not None and prompt:
        raise AflocError("give --prompts FILE or --prompt TEXT, not both")
    if prompts_file is not None:
        result = read_prompts_file(prompts_file)
    elif prompt:
        result = parse_prompts(list(prompt), "--prompt", comments=False)  # taken as given: `#2 rib fracture`
    else:
        raise AflocError("no prompts", hint="pass --prompts FILE (one per line) or --prompt TEXT (repeatable)")
    if not result.prompts:
        raise AflocError("the prompt list is empty", path=prompts_file)
    return result


def _check_outputs(out: Path, overlays: Path | None, inputs: list[Path], replace: bool) -> None:
    """Refuse outputs that could not be written, or must not be, before the model loads and any image is read."""
    from afloc_cli.heatmaps.readout import output_folder
    from afloc_cli.heatmaps.store import check_output_file

    if out.exists() and not out.is_dir() and not replace:
        raise AflocError("output exists", path=out, hint="use --overwrite to replace it or --resume to complete it")
    check_output_file(out)
    target = out.resolve()
    if any(p.resolve() == target for p in inputs):  # --overwrite is for a previous output, never an input
        raise AflocError("the output is also one of the input images", path=out, hint="write the file elsewhere")
    if out.is_file() and replace and not _is_hdf5(out):  # a folder walk leaves --out out of its inputs
        raise AflocError("the output exists and is not a heat-map file (an image?): --overwrite and --resume only "
                         "replace or complete an HDF5 file", path=out, hint="write the file elsewhere")
    if overlays is not None:
        output_folder(overlays)


def _is_hdf5(path: Path) -> bool:
    """HDF5's signature at byte 0 (files afloc writes have no user block)."""
    try:
        with path.open("rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _own_outputs(out: Path, overlays: Path | None) -> list[Path]:
    """What this run writes: a folder walk must not take it for input on this run or a rerun."""
    from afloc_cli.heatmaps.store import JOURNAL_SUFFIX

    return [out, out.with_name(out.name + JOURNAL_SUFFIX), *([overlays] if overlays is not None else [])]


def _one_line(text: str) -> str:
    """Escape what is not printable (a newline in a file name) so each failure stays one console line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _overlay_writer(folder: Path, prompts: list[str], sigma: float, margin: int, readout: str):
    import numpy as np
    import torch

    from afloc_cli.image.data.io import read_image
    from afloc_cli.image.data.transforms import Letterbox, to_uint8
    from afloc_cli.vlp.heatmap import contrast_maps, original_map
    from afloc_cli.vlp.overlay import overlay_name, render_overlay, write_png

    def write(items: list[dict], maps: np.ndarray) -> None:
        for item, item_maps in zip(items, maps, strict=True):
            radiograph = read_image(item["path"])
            image = to_uint8(radiograph.pixels)
            lb = Letterbox(**item["letterbox"])
            grids = torch.from_numpy(item_maps)
            if readout == "contrast":
                grids = contrast_maps(grids)
            for p, prompt in enumerate(prompts):
                heat = original_map(grids[p], lb, sigma, margin).numpy()
                name = overlay_name(item["path"], item["index"], p, prompt)
                write_png(folder / name, render_overlay(image, heat, prompt))

    return write


def localize_command(
    inputs: list[Path] = typer.Argument(..., help="Files, folders (recursive) or CSV/TXT lists of paths (a CSV "
                                        "names its path column path, image_path, image, file, filename or "
                                        "file_path, or has no header and the paths first)."),
    prompts_file: Path | None = typer.Option(None, "--prompts", help="UTF-8 file, one prompt per line, # comments."),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Checkpoint (default: $AFLOC_CHECKPOINT)."),
    out: Path = typer.Option(..., "--out", help="Output HDF5 file. With --shard, {rank} in it becomes the shard's "
                             "K, so each torchrun rank or Slurm array task writes its own file (part-{rank}.h5)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (GPU)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    workers: int | None = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    level: str = typer.Option("deep", "--level", help="deep (reference), shallow or fused."),
    readout: str = typer.Option("reference", "--readout", help="How scores, exports and overlays read the maps: "
                                "reference (each prompt's own map, the paper's) or contrast (against the other "
                                "prompts' maps; needs two or more prompts). The file keeps the raw maps either way."),
    overlays: Path | None = typer.Option(None, "--overlays", help="Also write overlay PNGs here."),
    shard: str | None = typer.Option(None, "--shard", help="K/N (0-based) or auto (torchrun / Slurm array)."),
    resume: bool = typer.Option(False, "--resume", help="Complete an interrupted run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable file."),
    text_model: str | None = typer.Option(None, "--text-model", help="Text model folder for a reference .ckpt."),
    engine_dir: Path | None = typer.Option(None, "--engine", help="Engine folder from `afloc compile`."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Localize every prompt in every radiograph; exit 0 if all images succeeded, 3 if some failed."""
    from afloc_cli.checkpoint.loader import checkpoint_path, load_any
    from afloc_cli.heatmaps.store import inputs_sha256
    from afloc_cli.localize.inputs import collect_inputs, parse_shard, shard_indices, shard_output
    from afloc_cli.localize.runner import run_localize
    from afloc_cli.text.inference_engine import check_prompts
    from afloc_cli.vlp.inference_engine import LocalizationEngine, resolve_device

    if precision not in ("fp32", "bf16", "fp16"):
        raise AflocError(f"--precision must be fp32, bf16 or fp16, not {precision!r}")
    if level not in ("deep", "shallow", "fused"):
        raise AflocError(f"--level must be deep, shallow or fused, not {level!r}")
    if readout not in ("reference", "contrast"):
        raise AflocError(f"--readout must be reference or contrast, not {readout!r}")
    if resume and overwrite:
        raise AflocError("--resume and --overwrite contradict each other")
    console = stderr_console()
    prompt_list = _prompts(prompts_file, prompt)
    if readout == "contrast" and len(prompt_list.prompts) < 2:
        raise AflocError("--readout contrast compares each prompt's map with the other prompts' maps and needs two "
                         f"or more prompts; got {len(prompt_list.prompts)}", hint="add prompts or use the reference "
                         "readout", path=prompts_file)
    shard_spec = parse_shard(shard)
    out = shard_output(out, shard, shard_spec)
    collected = collect_inputs(list(inputs), exclude=_own_outputs(out, overlays))
    all_paths = collected.paths
    if not all_paths:
        raise AflocError("no radiographs found in the inputs", hint="DICOM, PNG, JPEG and TIFF files are read")
    indices = shard_indices(len(all_paths), shard_spec)
    paths = [all_paths[i] for i in indices]
    _check_outputs(out, overlays, all_paths, resume or overwrite)

    loaded = load_any(checkpoint_path(checkpoint), text_model)
    torch_device = resolve_device(device)
    model = loaded.model
    if engine_dir is not None:
        from afloc_cli.compile.engine import load_engine

        compiled = load_engine(engine_dir, loaded.sha256, torch_device, text_encoder=loaded.model.text_encoder)
        compiled.check_batch_size(batch_size)  # refuse before the run, not midway
        model = compiled.bind(loaded.model)
        precision = compiled.precision
    engine = LocalizationEngine(model, prompt_list.prompts, device=torch_device,  # type: ignore[arg-type]
                                precision=precision, level=level)  # type: ignore[arg-type]
    prompt_list = check_prompts(prompt_list, loaded.model.text_encoder.tokenizer, loaded.model.cfg.text.max_length)
    for note in [*collected.notes, *loaded.notes, *prompt_list.notes, *engine.notes]:
        console.print(f"note: {note}", style="yellow")

    on_batch = None
    if overlays is not None:
        hm = loaded.model.cfg.heatmap
        on_batch = _overlay_writer(overlays, prompt_list.prompts, hm.sigma, hm.nan_margin, readout)

    show = sys.stderr.isatty() and not as_json
    with Progress(
        TextColumn("[bold]localize"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(), console=console, disable=not show,
    ) as progress:
        task = progress.add_task("images", total=len(paths), rate="")
        state = {"seen": 0}

        def on_progress(n_batch: int, n_done: int) -> None:
            state["seen"] += n_batch
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, advance=n_batch, rate=f"{state['seen'] / elapsed:.1f} img/s")

        summary = run_localize(
            engine,
            paths=paths,
            indices=indices,
            prompts=prompt_list.prompts,
            out=out,
            checkpoint_sha256=loaded.sha256,
            batch_size=batch_size,
            workers=decode_workers(workers),
            resume=resume,
            overwrite=overwrite,
            strict=strict,
            on_progress=on_progress,
            on_batch=on_batch,
            readout=readout,
            inputs_sha256=inputs_sha256([str(p) for p in all_paths]),
            n_inputs=len(all_paths),
        )
    info = summary.to_dict() | {"checkpoint_sha256": loaded.sha256, "shard": shard_spec}
    if as_json:
        typer.echo(json.dumps(info, sort_keys=True))
    else:
        console.print(
            f"localized {summary.done} images x {summary.prompts} prompts -> {out} "
            f"({summary.failed} failed, {summary.skipped_resumed} already done, "
            f"{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s)"
        )
        for failure in summary.failures[:10]:
            console.print(f"failed: {_one_line(failure['error'])}", style="red")
        if len(summary.failures) > 10:
            console.print(f"... and {len(summary.failures) - 10} more (see `afloc scores` or the file's /status)")
    if summary.failed:
        raise typer.Exit(EXIT_SOME_FAILED)
