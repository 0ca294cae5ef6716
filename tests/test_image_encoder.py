"""Image encoder levels and grids at 224 input, and config as data."""

from __future__ import annotations

import json

import pytest
import torch

from afloc_cli.config import ImageConfig, ModelConfig, small_config
from afloc_cli.image.model.encoder import ImageEncoder, grid_sizes


@pytest.mark.parametrize(
    ("cfg", "shallow", "deep"),
    [
        (ImageConfig(arch="resnet50"), 38, 19),  # reference: 224 -> 299 inside the forward
        (ImageConfig(arch="resnet50", internal_size=None), 28, 14),
        (ImageConfig(arch="resnet18"), 38, 19),
        (ImageConfig(arch="resnet34", internal_size=None), 28, 14),
        (small_config().image, 28, 14),
    ],
)
def test_levels_at_224(cfg, shallow, deep):
    torch.manual_seed(0)
    dim = 48
    enc = ImageEncoder(cfg, dim).eval()
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        f = enc(x)
    assert f.shallow.shape == (2, dim, shallow, shallow)
    assert f.deep.shape == (2, dim, deep, deep)
    assert f.global_.shape == (2, dim)
    assert grid_sizes(cfg, 224) == {"shallow": shallow, "deep": deep}


def test_resnet50_channels_match_reference():
    enc = ImageEncoder(ImageConfig(arch="resnet50"), 768)
    assert tuple(enc.local2_embedder.weight.shape) == (768, 512, 1, 1)
    assert tuple(enc.local_embedder.weight.shape) == (768, 1024, 1, 1)
    assert tuple(enc.global_embedder.weight.shape) == (768, 2048)
    assert enc.local_embedder.bias is None and enc.local2_embedder.bias is None
    assert enc.global_embedder.bias is not None
    backbone = sum(p.numel() for p in enc.backbone.parameters())
    assert backbone == 23_508_032  # torchvision resnet50 without fc


def test_only_requested_levels_are_computed():
    enc = ImageEncoder(small_config().image, 16).eval()
    with torch.no_grad():
        f = enc(torch.zeros(1, 3, 224, 224), levels=("deep",))
    assert f.shallow is None and f.global_ is None and f.deep is not None


def test_unprojected_levels_and_their_projections_give_the_projected_levels():
    torch.manual_seed(0)
    enc = ImageEncoder(small_config().image, 24).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        projected = enc(x)
        raw = enc(x, project_local=False)
        proj = enc.local_projections()
    assert tuple(raw.shallow.shape[1:2]) == (64,) and tuple(raw.deep.shape[1:2]) == (128,)
    assert tuple(proj["shallow"].shape) == (24, 64) and tuple(proj["deep"].shape) == (24, 128)
    for level in ("shallow", "deep"):
        want = getattr(projected, level)
        got = torch.einsum("dc,bchw->bdhw", proj[level], getattr(raw, level))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw.global_, projected.global_)


def test_config_json_roundtrip():
    cfg = small_config()
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["image"]["hidden_sizes"] == [32, 64, 128, 256]
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"image": {"nope": 1}})
