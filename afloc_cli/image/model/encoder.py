"""The image encoder: a ResNet whose three depths are projected into the text space.

| level   | stage  | grid at 299 | projection                          | aligned with |
| shallow | layer2 | 38x38       | 1x1 conv, no bias (local2_embedder) | words        |
| deep    | layer3 | 19x19       | 1x1 conv, no bias (local_embedder)  | sentences    |
| global  | layer4 | pooled      | Linear with bias (global_embedder)  | report       |

The backbone is `transformers.ResNetModel`, the same network as torchvision's
ResNet (stride in the 3x3 conv), so reference weights map onto it key by key.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetModel

from afloc_cli.config import ImageConfig

LEVELS = ("shallow", "deep", "global")


@dataclass
class ImageFeatures:
    shallow: torch.Tensor | None  # (B, d, g2, g2), layer2 projected (unprojected: (B, c2, g2, g2))
    deep: torch.Tensor | None  # (B, d, g3, g3), layer3 projected (unprojected: (B, c3, g3, g3))
    global_: torch.Tensor | None  # (B, d)


def grid_sizes(cfg: ImageConfig, image_size: int) -> dict[str, int]:
    """Grid side of each local level for a square input of `image_size` (no forward pass needed)."""
    s = cfg.internal_size or image_size
    s = (s + 1) // 2  # conv1: stride 2, padding 3
    s = (s + 1) // 2  # max pool: stride 2, padding 1
    shallow = (s + 1) // 2  # layer2: stride 2
    deep = (shallow + 1) // 2  # layer3: stride 2
    return {"shallow": shallow, "deep": deep}


def resnet_config(cfg: ImageConfig) -> ResNetConfig:
    spec = cfg.resolved()
    return ResNetConfig(
        num_channels=3,
        embedding_size=spec["embedding_size"],
        hidden_sizes=list(spec["hidden_sizes"]),
        depths=list(spec["depths"]),
        layer_type=spec["layer_type"],
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
    )


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.backbone = ResNetModel(resnet_config(cfg))
        c2, c3, c4 = cfg.resolved()["hidden_sizes"][1:]
        self.local2_embedder = nn.Conv2d(c2, embed_dim, kernel_size=1, bias=False)
        self.local_embedder = nn.Conv2d(c3, embed_dim, kernel_size=1, bias=False)
        self.global_embedder = nn.Linear(c4, embed_dim)

    def local_projections(self) -> dict[str, torch.Tensor]:
        """The local embedders as (d, c) matrices: the loss folds them into the texts (train/losses.py)."""
        return {"shallow": self.local2_embedder.weight.flatten(1), "deep": self.local_embedder.weight.flatten(1)}

    def forward(self, x: torch.Tensor, levels: Collection[str] = LEVELS, project_local: bool = True) -> ImageFeatures:
        """x: (B, 3, H, W) in [-1, 1]. Only the requested levels are computed.

        project_local=False returns the local levels before their 1x1 embedders (`local_projections`).
        """
        if self.cfg.internal_size is not None and x.shape[-1] != self.cfg.internal_size:
            size = self.cfg.internal_size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=self.cfg.internal_align_corners)
        stages = self.backbone.encoder.stages
        h = self.backbone.embedder(x)
        h = stages[0](h)
        h2 = stages[1](h)
        h3 = stages[2](h2)
        shallow = deep = None
        if "shallow" in levels:
            shallow = self.local2_embedder(h2) if project_local else h2
        if "deep" in levels:
            deep = self.local_embedder(h3) if project_local else h3
        global_ = None
        if "global" in levels:
            h4 = stages[3](h3)
            global_ = self.global_embedder(torch.flatten(self.backbone.pooler(h4), 1))
        return ImageFeatures(shallow=shallow, deep=deep, global_=global_)
