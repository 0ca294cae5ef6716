"""`afloc import-reference`: the reference Pretrained_CXR.ckpt -> one self-contained afloc checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from afloc_cli.commands import stderr_console
from afloc_cli.errors import AflocError, TextModelError


def _check_out(ckpt: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that cannot be written before the (long) conversion, naming --out.

    --out X.ckpt for the input X.ckpt with --overwrite replaced the authors' checkpoint by its conversion (and
    the recorded source_sha256 then named a file that no longer existed); a folder failed only at the very end.
    """
    if out.exists() and ckpt.exists() and os.path.samefile(out, ckpt):
        raise AflocError("the output is the input: it would replace the reference checkpoint it converts",
                         path=out, hint="write the afloc checkpoint elsewhere (e.g. model.safetensors)")
    if out.is_dir():
        raise AflocError("is a folder: --out names the checkpoint file to write", path=out,
                         hint="e.g. --out FOLDER/model.safetensors")
    if out.exists() and not overwrite:
        raise AflocError("output exists", path=out, hint="use --overwrite")


def import_reference_command(
    ckpt: Path = typer.Argument(..., help="The reference PyTorch Lightning checkpoint (Pretrained_CXR.ckpt)."),
    out: Path = typer.Option(..., "--out", help="The afloc checkpoint to write (.safetensors)."),
    text_model: str | None = typer.Option(
        None, "--text-model",
        help="Local folder or cached id of the BERT it was trained with (default: the one it names).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Convert the reference checkpoint without running its pickled code; report every unused key."""
    from afloc_cli.checkpoint.io import save_checkpoint, sha256_file
    from afloc_cli.checkpoint.reference import read_reference_checkpoint, to_model
    from afloc_cli.text.model.loading import resolve_text_model

    _check_out(ckpt, out, overwrite)
    ref = read_reference_checkpoint(ckpt)
    name = text_model or ref.text_model_name()
    if not name:
        raise AflocError("the checkpoint does not name its text model", path=ckpt, hint="pass --text-model")
    try:
        folder = resolve_text_model(name)
    except TextModelError as exc:
        if text_model is not None:
            raise
        raise TextModelError(  # the checkpoint names it (often a hub id or the authors' own path)
            exc.message, path=exc.path,
            hint=f"pass --text-model FOLDER: a local copy of the BERT it was trained with ({name}); "
            "config.json and the tokenizer files are read, its weights come from the checkpoint",
        ) from exc
    model, report = to_model(ref, folder)
    sha = save_checkpoint(model, out, provenance={"imported_from": str(ckpt), "source_sha256": sha256_file(ckpt),
                                                  "report": report})
    if as_json:
        typer.echo(json.dumps({"out": str(out), "sha256": sha, "report": report}, indent=2))
        return
    console = stderr_console()
    for line in report:
        console.print(line)
    console.print(f"wrote {out} (sha256 {sha})")
