"""Images x prompts -> raw similarity grids and image-level scores, batched.

Prompts are encoded once per run. The grid is the deep-local level (layer3,
aligned with sentences) as in the reference; the shallow level (layer2, words)
and a fused map are extensions, never the default. The image-level score is the
cosine between the global image embedding and the prompt's report embedding,
the similarity the global loss trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from afloc_cli.errors import AflocError
from afloc_cli.image.data.transforms import normalize
from afloc_cli.image.model.encoder import ImageFeatures, grid_sizes
from afloc_cli.vlp.model import AflocModel
from kernels.dispatch import localization_maps

Precision = Literal["fp32", "bf16", "fp16"]
Level = Literal["deep", "shallow", "fused"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AflocError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise AflocError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
    return torch.device(device)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise AflocError("--precision fp16 is for GPUs", hint="use bf16 or fp32 on the CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class EngineOutput:
    maps: torch.Tensor  # (B, P, g, g) float32 raw similarity (fused: weighted sum of the two min-max maps)
    scores: torch.Tensor  # (B, P) float32


class LocalizationEngine:
    def __init__(
        self,
        model: AflocModel,
        prompts: list[str],
        *,
        device: torch.device,
        precision: Precision = "fp32",
        level: Level = "deep",
        fused_shallow_weight: float | None = None,
    ) -> None:
        """fused_shallow_weight: the fused map's weight on the shallow level (None: the model config's)."""
        self.model = model.to(device).eval()
        self.device = device
        self.precision = precision
        self.level = level
        self.cfg = model.cfg
        if fused_shallow_weight is not None:  # in the engine's config, so the file's heatmap_config records it
            try:
                heatmap = dataclasses.replace(self.cfg.heatmap, fused_shallow_weight=float(fused_shallow_weight))
            except ValueError as exc:
                raise AflocError(str(exc)) from None
            self.cfg = self.cfg.replace(heatmap=heatmap)
        with torch.inference_mode():
            self.prompt_embeddings = model.encode_prompts(prompts).float().to(device)
        # On the CPU the image encoder runs as an inference copy with batch norms folded into the
        # convolutions and channels-last memory (x1.2 in fp32), in native bf16 when asked and the
        # CPU has it (x2.6; benchmarks/RESULTS.md). A compiled engine keeps its own path.
        self.encode_images = self.model.encode_images
        self.notes: list[str] = []
        if device.type == "cpu" and isinstance(model, AflocModel):
            from kernels.cpu import prepare_encoder

            fast = prepare_encoder(model.image_encoder, precision="bf16" if precision == "bf16" else "fp32")
            self.encode_images = fast
            if precision == "bf16" and fast.dtype != torch.bfloat16:
                self.notes.append(f"--precision bf16: {fast.reason}")
        sizes = grid_sizes(self.cfg.image, self.cfg.preprocess.image_size)
        self.grid = sizes["deep"] if level == "deep" else sizes["shallow"]

    @property
    def image_size(self) -> int:
        return self.cfg.preprocess.image_size

    @torch.inference_mode()
    def features(self, frames: torch.Tensor) -> ImageFeatures:
        """frames: (B, S, S) uint8 letterboxed images -> the encoder's features at the levels this map needs."""
        pre = self.cfg.preprocess
        x = normalize(frames.to(self.device, non_blocking=True), pre.mean, pre.std)
        levels = {"deep": ("deep", "global"), "shallow": ("shallow", "global")}.get(
            self.level, ("shallow", "deep", "global")
        )
        fast_cpu = self.encode_images is not self.model.encode_images
        with contextlib.nullcontext() if fast_cpu else autocast(self.device, self.precision):
            return self.encode_images(x.contiguous(), levels)

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> EngineOutput:
        """frames: (B, S, S) uint8 letterboxed images."""
        feats = self.features(frames)
        mode = self.cfg.heatmap.similarity
        global_ = feats.global_.float()
        if self.level in ("deep", "shallow"):
            grid = feats.deep if self.level == "deep" else feats.shallow
            maps, stats = localization_maps(grid.float(), self.prompt_embeddings, mode, global_=global_)
        else:
            shallow, stats = localization_maps(feats.shallow.float(), self.prompt_embeddings, mode, global_=global_,
                                               normalize=True)
            deep, _ = localization_maps(feats.deep.float(), self.prompt_embeddings, mode, normalize=True)
            deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
            w = self.cfg.heatmap.fused_shallow_weight
            maps = w * shallow + (1.0 - w) * deep
        scores = stats.scores
        return EngineOutput(maps=maps.float().cpu(), scores=scores.float().cpu())
