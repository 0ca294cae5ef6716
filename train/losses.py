"""AFLoc's contrastive losses (SPEC.md, "Losses"): global–report and the GLoRIA-style local loss.

The local loss compares every image with every text through word→region
attention; a direct implementation materialises a B × B × T × M tensor (9 GB at
B = 128 on the word level, several times over under autograd). Its scores R come
from `kernels.dispatch.local_similarity`, whose paths never do: the Triton kernel
on CUDA, and on other devices text chunks under `torch.utils.checkpoint`
(memory linear in B for a fixed chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import local_similarity
from kernels.local_alignment import COS_EPS, DEFAULT_CHUNK_ELEMENTS, default_chunk_size


def _symmetric_ce(logits: Tensor) -> Tensor:
    """CE(image→text) + CE(text→image) with the matching pair on the diagonal (the reference sums both)."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"contrastive logits must be square (B, B), got {tuple(logits.shape)}")
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_gradient(t: Tensor, factor: float) -> Tensor:
    """`t` unchanged forward, its gradient times `factor` backward (1: untouched; 0: detached).

    Why: a loss can then train its own head on shared features without reshaping the layers below them
    (`optim.word_backbone_grad`)."""
    if factor == 1.0:
        return t
    if factor == 0.0:
        return t.detach()
    return _ScaleGradient.apply(t, factor)


def global_loss(image: Tensor, text: Tensor, temp3: float = 10.0) -> Tensor:
    """L_GR: logits = temp3 · cos(image_i, text_j), symmetric cross-entropy with in-batch negatives.

    image, text: (B, d). Returns CE(img→txt) + CE(txt→img), so swapping the two
    arguments gives the same value.
    """
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"global_loss expects image and text of the same (B, d) shape, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    dots = image @ text.t()
    norms = image.norm(dim=1).unsqueeze(1) * text.norm(dim=1).unsqueeze(0)
    return _symmetric_ce(temp3 * dots / norms.clamp_min(COS_EPS))


def local_loss(
    regions: Tensor,
    units: Tensor,
    unit_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    temp3: float = 10.0,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    projection: Tensor | None = None,
) -> Tensor:
    """L_DS / L_SW: logits = temp3 · R (see local_similarity), CE(img→txt) + CE(txt→img).

    matmul_dtype: bf16 runs the CPU path's context product in bf16 (bf16 training).
    projection (d, c): `regions` are the c-channel features before the bias-free 1x1 local embedder
    whose weight this is; the CPU path then folds it into the texts (the same loss, fewer products).

    Images and texts must pair up (B_img = B_txt), matching pairs on the diagonal. R comes
    from `kernels.dispatch`: the fused Triton kernel on CUDA (flash-style, forward and
    backward), the chunked, checkpointed torch path elsewhere.
    """
    scores = local_similarity(regions, units, unit_mask, temp1, temp2, chunk_size, matmul_dtype=matmul_dtype,
                              projection=projection)
    return _symmetric_ce(temp3 * scores)


__all__ = ["COS_EPS", "DEFAULT_CHUNK_ELEMENTS", "default_chunk_size", "global_loss", "local_loss",
           "local_similarity", "scale_gradient"]
