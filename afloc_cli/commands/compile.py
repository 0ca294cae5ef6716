"""`afloc compile`: a checkpoint -> an engine folder that `afloc localize --engine` runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from afloc_cli.commands import stderr_console


def compile_command(
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Checkpoint (default: $AFLOC_CHECKPOINT)."),
    out: Path = typer.Option(..., "--out", help="Engine folder to create."),
    backend: str = typer.Option("aoti", "--backend", help="tensorrt (NVIDIA GPU) or aoti (AOTInductor, CPU or GPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (GPU)."),
    batch_sizes: str = typer.Option("1,8,64", "--batch-sizes",
                                    help="Batch profile: min,opt,max (all are checked for parity)."),
    image_size: int | None = typer.Option(None, "--image-size", min=16,
                                          help="Frame side (default: the checkpoint's, 224 for AFLoc)."),
    input_format: str = typer.Option("normalized", "--input-format",
                                     help="normalized (what localize feeds) or uint8 (frames, normalised inside)."),
    shallow: bool = typer.Option(False, "--shallow", help="Also output the shallow (layer2) level."),
    text: bool = typer.Option(True, "--text/--no-text", help="Also compile the text encoder."),
    device: str = typer.Option("auto", "--device", help="aoti: auto, cpu or cuda (tensorrt: cuda)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing engine folder."),
    text_model: str | None = typer.Option(None, "--text-model", help="Text model folder for a reference .ckpt."),
    as_json: bool = typer.Option(False, "--json", help="Print the engine's metadata on stdout."),
) -> None:
    """Compile the encoders; check them against eager; keep the engine only if they agree (exit 4 if not)."""
    from afloc_cli.checkpoint.loader import checkpoint_path, load_any
    from afloc_cli.compile.engine import BuildOptions, build_engine, check_out, resolve_build_device
    from afloc_cli.compile.export import parse_batch_sizes

    profile, sizes = parse_batch_sizes(batch_sizes)
    options = BuildOptions(
        backend=backend, precision=precision, profile=profile, batch_sizes=tuple(sizes), image_size=image_size,
        input_format=input_format, shallow=shallow, text=text, device=device,
    )
    resolve_build_device(options)  # refuse an impossible request before loading anything
    check_out(out, overwrite)
    console = stderr_console()
    loaded = load_any(checkpoint_path(checkpoint), text_model)
    for note in loaded.notes:
        console.print(f"note: {note}", style="yellow")
    meta = build_engine(
        loaded.model, checkpoint_sha256=loaded.sha256, checkpoint_path=loaded.path, out=out, options=options,
        overwrite=overwrite, log=console.print,
    )
    if as_json:
        typer.echo(json.dumps(meta, sort_keys=True))
    else:
        console.print(f"engine written to {out} ({meta['backend']}, {meta['precision']}, batch "
                      f"{profile.min}..{profile.max}, device {meta['device']})")
