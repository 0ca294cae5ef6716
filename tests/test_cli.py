"""The command line as a whole: every finished command is registered, and startup stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afloc_cli.cli import app, run

COMMANDS = {"localize", "scores", "export", "merge", "benchmark", "synth", "prepare", "pretrain", "compile",
            "demo", "inspect", "import-reference"}


def test_every_command_is_registered_and_has_help(capsys):
    names = {c.name for c in app.registered_commands}
    assert names == COMMANDS
    for name in sorted(names):
        assert run([name, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out


def test_help_does_not_import_torch():
    """`afloc --help` and usage errors must be instant: heavy libraries load inside the commands."""
    code = "import sys; import afloc_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'polars', 'h5py') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_and_unknown_command(capsys):
    assert run(["--version"]) == 0
    assert "afloc" in capsys.readouterr().out
    assert run(["no-such-command"]) == 2


def test_cli_reference_is_in_sync():
    """docs/cli.md is generated from the app: regenerate it with `python -m afloc_cli.cli_reference`."""
    from pathlib import Path

    from afloc_cli.cli_reference import render

    committed = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/cli.md is stale: run `python -m afloc_cli.cli_reference > docs/cli.md`"


# ---- output paths and shards, with a real (tiny) model ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from afloc_cli.checkpoint.io import save_checkpoint
    from afloc_cli.config import ImageConfig, PreprocessConfig, small_config
    from afloc_cli.vlp.model import build_model

    torch.manual_seed(0)
    cfg = small_config().replace(
        image=ImageConfig(arch="resnet18", hidden_sizes=(8, 16, 32, 64), embedding_size=8, internal_size=None),
        preprocess=PreprocessConfig(image_size=64),
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(build_model(cfg).eval(), path)
    return path


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 50), dtype=np.uint8)).save(path)
    return path


def _localize(args: list[str], ckpt: Path) -> int:
    return run(["localize", *args, "--prompt", "left effusion", "--checkpoint", str(ckpt), "--workers", "0"])


def test_merge_refuses_shards_of_different_input_lists(tmp_path, tiny_checkpoint, capsys):
    """A file that lands in the folder between shard jobs shifts every index: merging them mixed images up."""
    folder = tmp_path / "in"
    for i in range(1, 5):
        _png(folder / f"img{i}.png", i)
    assert _localize([str(folder), "--out", str(tmp_path / "s0.h5"), "--shard", "0/2"], tiny_checkpoint) == 0
    _png(folder / "img0.png", 9)
    assert _localize([str(folder), "--out", str(tmp_path / "s1.h5"), "--shard", "1/2"], tiny_checkpoint) == 0
    capsys.readouterr()
    assert run(["merge", str(tmp_path / "s0.h5"), str(tmp_path / "s1.h5"), "--out", str(tmp_path / "m.h5")]) == 2
    err = capsys.readouterr().err
    assert "s1.h5: made with a different input list" in err and "s0.h5" in err and "Traceback" not in err
    assert not (tmp_path / "m.h5").exists()
