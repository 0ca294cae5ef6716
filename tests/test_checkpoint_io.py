"""Our checkpoint format: self-contained, exact round trip, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afloc_cli.checkpoint.io import load_checkpoint, read_header, save_checkpoint, sha256_file
from afloc_cli.cli import run
from afloc_cli.errors import CheckpointError


@pytest.fixture(scope="module")
def saved(small_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    sha = save_checkpoint(small_model, path, provenance={"note": "test"})
    return path, sha


def test_roundtrip_is_exact(small_model, saved):
    path, sha = saved
    assert sha == sha256_file(path)
    loaded = load_checkpoint(path)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        a, b = small_model.encode_images(x), loaded.encode_images(x)
    for level in ("shallow", "deep", "global_"):
        torch.testing.assert_close(getattr(a, level), getattr(b, level), rtol=0, atol=0)
    prompts = ["small left pleural effusion", "Pneumothorax"]
    torch.testing.assert_close(small_model.encode_prompts(prompts), loaded.encode_prompts(prompts), rtol=0, atol=0)


# Saves the conftest's tiny model (fixed seed) with a provenance whose strings need JSON escaping.
_SAVE_TINY = r"""
import sys, torch
from afloc_cli.checkpoint.io import save_checkpoint
from afloc_cli.config import ImageConfig, PreprocessConfig, small_config
from afloc_cli.vlp.model import build_model
torch.manual_seed(0)
cfg = small_config().replace(
    image=ImageConfig(arch="resnet18", hidden_sizes=(8, 16, 32, 64), embedding_size=8, internal_size=None),
    preprocess=PreprocessConfig(image_size=64),
)
print(save_checkpoint(build_model(cfg).eval(), sys.argv[1], provenance={"note": "caf\u00e9 \u2028 \x01 / \\"}))
"""


def test_the_same_model_gives_the_same_file_in_any_process(tmp_path: Path) -> None:
    """The header's metadata order once followed a per-process hash: two imports of one checkpoint differed."""
    repo = Path(__file__).resolve().parents[1]
    runs = {}
    for seed in ("1", "2"):  # two processes at once: each has its own hash seeds (Python's and Rust's)
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
        runs[seed] = subprocess.Popen([sys.executable, "-c", _SAVE_TINY, str(tmp_path / f"model{seed}.safetensors")],
                                      env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shas = []
    for seed, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        shas.append(out.strip().splitlines()[-1])
        assert shas[-1] == sha256_file(tmp_path / f"model{seed}.safetensors")
    assert shas[0] == shas[1]
    assert (tmp_path / "model1.safetensors").read_bytes() == (tmp_path / "model2.safetensors").read_bytes()
    assert read_header(tmp_path / "model1.safetensors").provenance == {"note": "caf\u00e9 \u2028 \x01 / \\"}


def test_header_carries_config_and_tokenizer(saved, small_model):
    header = read_header(saved[0])
    assert header.config == small_model.cfg
    assert "tokenizer.json" in header.tokenizer_files or "vocab.txt" in header.tokenizer_files
    assert header.text_model_config["model_type"] == "bert"
    assert header.provenance == {"note": "test"}


def test_checkpoint_loads_without_the_text_model_folder(saved, monkeypatch):
    import afloc_cli.text.model.loading as loading

    def refuse(name):
        raise AssertionError("load_checkpoint must not look for the text model")

    monkeypatch.setattr(loading, "resolve_text_model", refuse)
    load_checkpoint(saved[0])


def test_missing_and_malformed_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_header(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not an afloc checkpoint"):
        read_header(bad)


def test_inspect_cli_json(saved, capsys):
    assert run(["inspect", str(saved[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "afloc"
    assert info["sha256"] == saved[1]
    assert info["levels"]["deep (layer3 -> sentences)"].startswith("14x14")
    assert info["parameters"]["text_encoder"] > 1_000_000


def test_inspect_cli_missing_file_one_line_exit_2(tmp_path, capsys):
    code = run(["inspect", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing.safetensors" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _one_line_error(args: list[str], capsys) -> str:
    code = run(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_damaged_and_foreign_files_are_named_for_what_they_are(saved, tmp_path: Path, capsys) -> None:
    """A damaged safetensors file, or no checkpoint at all, was "not a readable PyTorch checkpoint (KeyError: 208)"."""
    import h5py
    from PIL import Image
    from safetensors.torch import save_file

    from afloc_cli.checkpoint.loader import load_any

    data = saved[0].read_bytes()
    data_start = 8 + int.from_bytes(data[:8], "little")
    cases = {"header_cut.safetensors": data[:50_000], "data_cut.safetensors": data[: data_start + 1000]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        err = _one_line_error(["inspect", str(tmp_path / name)], capsys)
        assert name in err and "truncated safetensors file" in err and "PyTorch" not in err
        with pytest.raises(CheckpointError, match="truncated safetensors file"):  # compile, localize --checkpoint
            load_any(tmp_path / name)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    assert "a safetensors file, but not an afloc checkpoint" in _one_line_error(["inspect", str(plain)], capsys)
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f["x"] = [1]
    assert "not a checkpoint: an HDF5 file" in _one_line_error(["inspect", str(tmp_path / "run.h5")], capsys)
    Image.new("L", (4, 4)).save(tmp_path / "image.png")
    assert "not a checkpoint: a PNG image" in _one_line_error(["inspect", str(tmp_path / "image.png")], capsys)


def test_inspect_an_afloc_file_without_the_global_projection(saved, tmp_path: Path, capsys) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved[0]), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "image_encoder.global_embedder.weight"}  # noqa: SIM118
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial), metadata=metadata)
    err = _one_line_error(["inspect", str(partial)], capsys)
    assert "partial.safetensors" in err and "image_encoder.global_embedder.weight" in err


def test_inspect_prints_the_whole_sha256_in_80_columns(saved, capsys, monkeypatch) -> None:
    """The table was cut to the terminal's (or a pipe's) 80 columns, and the sha256 users copy lost its end."""
    monkeypatch.setenv("COLUMNS", "80")
    assert run(["inspect", str(saved[0])]) == 0
    assert saved[1] in capsys.readouterr().out


def test_a_checkpoint_gets_the_umask_mode(small_model, tmp_path: Path) -> None:
    """safetensors writes its files 0600; a checkpoint on shared storage must be readable as the umask allows."""
    old = os.umask(0o027)
    try:
        save_checkpoint(small_model, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640
