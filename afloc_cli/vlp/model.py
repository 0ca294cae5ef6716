"""The AFLoc model: the image and text encoders side by side, sharing one embedding space."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from torch import nn

from afloc_cli.config import ModelConfig
from afloc_cli.image.model.encoder import LEVELS, ImageEncoder, ImageFeatures
from afloc_cli.text.data.sentences import PreparedText, prepare_prompt
from afloc_cli.text.model.encoder import TextEncoder, TextFeatures
from afloc_cli.text.model.loading import resolve_text_model


class AflocModel(nn.Module):
    def __init__(self, cfg: ModelConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.embed_dim

    def encode_images(self, x: torch.Tensor, levels: Collection[str] = LEVELS,
                      project_local: bool = True) -> ImageFeatures:
        return self.image_encoder(x, levels, project_local)

    def encode_texts(self, texts: Sequence[PreparedText]) -> TextFeatures:
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.text_encoder.tokenize(texts).to(device))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Prompts -> report-level embeddings (P, d), prepared as the reference's inference does."""
        prepared = [prepare_prompt(p) for p in prompts]
        chunks = [
            self.encode_texts(prepared[i : i + batch_size]).report for i in range(0, len(prepared), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)


def build_model(cfg: ModelConfig, *, text_folder: Path | str | None = None, pretrained_text: bool = True) -> AflocModel:
    """A fresh model: pretrained text encoder (from a local folder), randomly initialised image side."""
    folder = Path(text_folder) if text_folder is not None else resolve_text_model(cfg.text.model)
    text = TextEncoder.from_folder(cfg.text, folder, pretrained=pretrained_text)
    image = ImageEncoder(cfg.image, text.hidden_size)
    return AflocModel(cfg, image, text)
