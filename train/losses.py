"""AFLoc's contrastive losses (SPEC.md, "Losses"): global–report and the GLoRIA-style local loss.

The local loss compares every image with every text through word→region
attention, so a direct implementation materialises a B × B × T × M attention
tensor (128 × 128 × 97 × 1444 floats is 9 GB, several times over once autograd
keeps its intermediates). Here the texts are processed in chunks, and under
autograd each chunk runs inside `torch.utils.checkpoint`: only the chunk's
inputs and its (B, chunk) scores are kept, and the chunk's attention is
recomputed during the backward pass. Peak memory is then about a handful of
B × chunk × T × M tensors: linear in B for a fixed chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

COS_EPS = 1e-8  # clamp on the product of norms, as the reference's cosine similarity
# Default work per chunk: elements of one B_img × chunk × T × M tensor (2**27 floats = 512 MiB in fp32).
# Word level at B = 128 (T = 97, M = 38 × 38) gives 7 texts per chunk; sentence level usually one chunk.
DEFAULT_CHUNK_ELEMENTS = 1 << 27


def _cosine(x: Tensor, y: Tensor, eps: float = COS_EPS) -> Tensor:
    """Cosine over the last dim, the eps clamping the product of the norms (not each norm)."""
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)


def _symmetric_ce(logits: Tensor) -> Tensor:
    """CE(image→text) + CE(text→image) with the matching pair on the diagonal (the reference sums both)."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"contrastive logits must be square (B, B), got {tuple(logits.shape)}")
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)


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


def default_chunk_size(n_img: int, n_txt: int, n_units: int, n_regions: int,
                       budget: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Texts per chunk so that one n_img × chunk × T × M tensor stays within `budget` elements."""
    per_text = max(1, n_img * n_units * n_regions)
    return max(1, min(n_txt, budget // per_text))


def _chunk_scores(v: Tensor, e: Tensor, mask: Tensor, temp1: float, temp2: float) -> Tensor:
    """R for all images against one chunk of texts.

    v: (I, d, M) regions; e: (c, T, d) units; mask: (c, T) real units. Returns (I, c).
    """
    n_img, _, n_reg = v.shape
    c, t, d = e.shape
    keep = mask.view(1, c, t, 1)
    # s[i, j, t, m] = e_jtᵀ v_im
    s = torch.matmul(e.reshape(1, c * t, d), v).view(n_img, c, t, n_reg)
    s = s.masked_fill(~keep, float("-inf"))
    a = torch.softmax(s, dim=2)  # first over the units (words) of text j: padding gets weight 0
    alpha = torch.softmax(temp1 * a, dim=3)  # then over the regions, after scaling by temp1
    ctx = torch.matmul(alpha.view(n_img, c * t, n_reg), v.transpose(1, 2)).view(n_img, c, t, d)
    cos = _cosine(ctx, e.unsqueeze(0))  # (I, c, T)
    return (temp2 * cos).masked_fill(~mask.unsqueeze(0), float("-inf")).logsumexp(dim=2)


def local_similarity(
    regions: Tensor,
    units: Tensor,
    unit_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Image–text matching scores R (B_img, B_txt) of the GLoRIA local loss.

    For image i (regions v_m) and text j (real units e_t, unit_mask[j] True):
      a_tm = softmax over the units t of (e_tᵀ v_m), for each region m;
      α_tm = softmax over the regions m of (temp1 · a_tm);
      c_t  = Σ_m α_tm v_m;
      R[i, j] = log Σ_t exp(temp2 · cos(e_t, c_t)), over the real units only.
    Softmax over words first, then over regions: the reference's attention_fn
    softmaxes dim -1 (words), multiplies by temp1, then softmaxes dim -2
    (regions); checkpoints trained with it rely on that order. Padding units are
    left out of both the word softmax and the log-sum-exp, as the reference keeps
    only the first cap_len units of each text.

    regions: (B_img, d, M) or (B_img, d, h, w); units: (B_txt, T, d);
    unit_mask: (B_txt, T) bool, at least one True per text ([CLS] is a unit).
    chunk_size: texts per chunk; None picks one from DEFAULT_CHUNK_ELEMENTS.
    """
    if regions.dim() == 4:
        regions = regions.flatten(2)
    if regions.dim() != 3:
        raise ValueError(f"regions must be (B, d, M) or (B, d, h, w), got {tuple(regions.shape)}")
    if units.dim() != 3 or units.shape[2] != regions.shape[1]:
        raise ValueError(f"units must be (B, T, d) with d = {regions.shape[1]}, got {tuple(units.shape)}")
    if unit_mask.shape != units.shape[:2]:
        raise ValueError(f"unit_mask must be {tuple(units.shape[:2])}, got {tuple(unit_mask.shape)}")
    unit_mask = unit_mask.to(device=units.device, dtype=torch.bool)
    if not bool(unit_mask.any(dim=1).all()):
        raise ValueError("every text needs at least one real unit ([CLS]); got a text with none")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    n_img, _, n_reg = regions.shape
    n_txt, n_units, _ = units.shape
    chunk = chunk_size or default_chunk_size(n_img, n_txt, n_units, n_reg)
    recompute = torch.is_grad_enabled() and (regions.requires_grad or units.requires_grad)
    columns = []
    for j0 in range(0, n_txt, chunk):
        args = (regions, units[j0:j0 + chunk], unit_mask[j0:j0 + chunk], temp1, temp2)
        if recompute:
            # Keep only the inputs; the chunk's B × chunk × T × M attention is rebuilt in backward.
            columns.append(checkpoint(_chunk_scores, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            columns.append(_chunk_scores(*args))
    return torch.cat(columns, dim=1)


def local_loss(
    regions: Tensor,
    units: Tensor,
    unit_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    temp3: float = 10.0,
    chunk_size: int | None = None,
) -> Tensor:
    """L_DS / L_SW: logits = temp3 · R (see local_similarity), CE(img→txt) + CE(txt→img).

    Images and texts must pair up (B_img = B_txt), matching pairs on the diagonal. On CUDA
    the fused Triton kernel of `kernels/` computes R (flash-style, forward and backward);
    elsewhere the chunked, checkpointed torch version above does.
    """
    from kernels.dispatch import resolve_backend

    try:
        backend = resolve_backend(regions)
    except (RuntimeError, ValueError):
        backend = "torch"
    if backend == "triton":
        from kernels.dispatch import local_similarity as fused

        scores = fused(regions, units, unit_mask, temp1, temp2, backend="triton")
    else:
        scores = local_similarity(regions, units, unit_mask, temp1, temp2, chunk_size)
    return _symmetric_ce(temp3 * scores)


__all__ = ["COS_EPS", "DEFAULT_CHUNK_ELEMENTS", "default_chunk_size", "global_loss", "local_loss",
           "local_similarity"]
