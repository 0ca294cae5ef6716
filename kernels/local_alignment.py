"""GLoRIA local alignment R(i, j) for all image–text pairs, without the B × B × T × M attention.

For image i (regions v_m, m < M) and text j (real units e_t, unit_mask[j, t] True):

  s_tm = e_tᵀ v_m
  a_tm = softmax over the real units t of s_tm      (words first, for each region m)
  α_tm = softmax over the regions m of temp1 · a_tm  (then regions, for each unit t)
  c_t  = Σ_m α_tm v_m
  R    = log Σ_t exp(temp2 · cos(e_t, c_t))          (over the real units only)

with cos(x, y) = x·y / max(|x| |y|, 1e-8), as `train/losses.py` (words first,
then regions: the order the reference's attention_fn uses; SPEC.md "Losses").

Every path splits R into a fused part that returns two numbers per
(image, text, unit), ec_t = e_t·c_t and cc_t = |c_t|², and a tiny torch epilogue
(cosine, masked log-sum-exp) that autograd differentiates. The fused part has a
hand-written backward, so only (B_img, B_txt, T) and (B_img, B_txt, M) tensors
are kept between forward and backward. Its gradient, per pair, given g_ec, g_cc:

  u_t  = g_ec_t e_t + 2 g_cc_t c_t                     (dL/dc_t)
  ρ_t  = u_t·c_t = g_ec_t ec_t + 2 g_cc_t cc_t
  dα_tm = u_t·v_m = g_ec_t s_tm + 2 g_cc_t c_t·v_m
  da_tm = temp1 α_tm (dα_tm − ρ_t)                    (through the region softmax)
  κ_m  = Σ_t a_tm da_tm;  ds_tm = a_tm (da_tm − κ_m)  (through the word softmax)
  dE_t = g_ec_t c_t + Σ_m ds_tm v_m;   dV_m = Σ_t (α_tm u_t + ds_tm e_t)

The reference and the Triton path share this split (the torch path keeps the
epilogue and lets autograd, under checkpointing, do the rest):
- `reference_local_similarity`: plain autograd torch, everything materialised (tests, baselines);
- `torch_local_similarity`: the CPU path (and the training loss's off CUDA): the
  texts in chunks, each under torch.utils.checkpoint, so only the chunk's inputs
  and its scores outlive the forward (memory bounded by the chunk, at the cost of
  recomputing its forward);
- `triton_local_similarity`: the fused part in Triton (CUDA, or the CPU interpreter).
  Forward: one kernel for the word-softmax log-normaliser per (pair, region), one
  that streams region tiles per (pair, unit block) with an online region softmax
  and a (units × d) context accumulator in registers. Backward: the context c is
  recomputed for a chunk of images (chunk × B_txt × T × d), then κ, dV (per image
  and region tile, reducing over texts and units in registers) and dE (per text
  and unit block, reducing over images and regions in registers).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

try:  # Triton is optional: only the CUDA path (and the interpreter tests) need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

COS_EPS = 1e-8  # clamp on the product of the norms, as train/losses.py
# Torch path: elements of one B_img × chunk × T × M attention tensor per text chunk (512 MiB in fp32).
# Word level at B = 128 (T = 97, M = 38 × 38) gives 7 texts per chunk; sentence level usually one chunk.
DEFAULT_CHUNK_ELEMENTS = 1 << 27
# Below this many attention elements in all, autograd's ~5 saved tensors fit the chunk budget: no checkpointing.
SMALL_ATTENTION_ELEMENTS = DEFAULT_CHUNK_ELEMENTS // 8
# Elements of the recomputed context (images × texts × T × d, fp32) per Triton backward chunk: 1 GiB.
TRITON_CHUNK_ELEMENTS = 1 << 28
# Torch path: a chunk of texts closes at the first text shorter than this fraction of its longest (text_groups).
GROUP_LENGTH_RATIO = 0.75
MAX_TEMP1 = 60.0  # exp(temp1 · (a − 1)) stays above fp32's smallest normal for any a in [0, 1]


def _prepare(regions: Tensor, units: Tensor, unit_mask: Tensor,
             projection: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Validate and flatten: regions (B, d, M) or (B, d, h, w) (with `projection` (d, c): (B, c, ...)); units
    (B, T, d); mask (B, T)."""
    if regions.dim() == 4:
        regions = regions.flatten(2)
    if regions.dim() != 3:
        raise ValueError(f"regions must be (B, d, M) or (B, d, h, w), got {tuple(regions.shape)}")
    if projection is not None and (projection.dim() != 2 or projection.shape[1] != regions.shape[1]):
        raise ValueError(f"projection must be (d, c) with c = {regions.shape[1]} (the regions' channels), "
                         f"got {tuple(projection.shape)}")
    d = regions.shape[1] if projection is None else projection.shape[0]
    if units.dim() != 3 or units.shape[2] != d:
        raise ValueError(f"units must be (B, T, d) with d = {d}, got {tuple(units.shape)}")
    if unit_mask.shape != units.shape[:2]:
        raise ValueError(f"unit_mask must be {tuple(units.shape[:2])}, got {tuple(unit_mask.shape)}")
    mask = unit_mask.to(device=units.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every text needs at least one real unit ([CLS]); got a text with none")
    return regions, units, mask


def embed_regions(regions: Tensor, projection: Tensor | None) -> Tensor:
    """The embedded regions projection @ regions (B, d, M), from `_prepare`'s (B, c, M): the unfactored form."""
    return regions if projection is None else torch.matmul(projection.to(regions.dtype), regions)


def scores_from_terms(ec: Tensor, cc: Tensor, units: Tensor, mask: Tensor, temp2: float) -> Tensor:
    """The epilogue: (B_img, B_txt, T) terms -> R (B_img, B_txt), differentiable by autograd."""
    e_norm = units.to(ec.dtype).norm(dim=-1).unsqueeze(0)  # (1, B_txt, T)
    c_norm = cc.clamp_min(0).sqrt()
    cos = ec / (e_norm * c_norm).clamp_min(COS_EPS)
    return (temp2 * cos).masked_fill(~mask.unsqueeze(0), float("-inf")).logsumexp(dim=2)


# ----------------------------------------------------------------------------------------------
# Reference: autograd over the full (B_img, B_txt, T, M) attention.


def reference_local_similarity(
    regions: Tensor, units: Tensor, unit_mask: Tensor, temp1: float = 4.0, temp2: float = 5.0,
    projection: Tensor | None = None,
) -> Tensor:
    """R (B_img, B_txt) the direct way; memory grows as B_img · B_txt · T · (M + d)."""
    v, e, mask = _prepare(regions, units, unit_mask, projection)
    v = embed_regions(v, projection)
    dtype = torch.promote_types(torch.promote_types(v.dtype, e.dtype), torch.float32)
    v = v.to(dtype)
    e = e.to(dtype)
    s = torch.einsum("jtd,idm->ijtm", e, v)
    s = s.masked_fill(~mask[None, :, :, None], float("-inf"))
    a = torch.softmax(s, dim=2)
    alpha = torch.softmax(temp1 * a, dim=3)
    c = torch.einsum("ijtm,idm->ijtd", alpha, v)
    ec = (c * e.unsqueeze(0)).sum(-1)
    cc = (c * c).sum(-1)
    return scores_from_terms(ec, cc, e, mask, temp2)


# ----------------------------------------------------------------------------------------------
# Torch path: chunked over texts, checkpointed when large, autograd backward (the CPU's).


def default_chunk_size(n_img: int, n_txt: int, n_units: int, n_regions: int,
                       budget: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Texts per chunk so that one n_img × chunk × T × M tensor stays within `budget` elements."""
    per_text = max(1, n_img * n_units * n_regions)
    return max(1, min(n_txt, budget // per_text))


def text_groups(mask: Tensor, chunk: int, ratio: float = GROUP_LENGTH_RATIO) -> list[tuple[list[int], int]]:
    """Texts in chunks of similar length, each cut to its longest text's last real unit: [(texts, units)].

    Every attention tensor is padded to the chunk's unit count, so chunking texts in the order given
    pads each to the longest report in the batch; whole reports vary 2-4x in length (the demo's word
    level: 12-53 real units, padded to 54), and grouping them by length skips most of that work. The
    texts are taken longest first; a chunk closes at `chunk` texts or at the first text shorter than
    `ratio` times its longest. Cutting is exact: units past a text's last real one are padding.
    """
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    lengths = (mask.to(torch.int64) * positions).amax(dim=1).tolist()
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    groups: list[tuple[list[int], int]] = []
    for j in order:
        if groups and len(groups[-1][0]) < chunk and lengths[j] >= ratio * groups[-1][1]:
            groups[-1][0].append(j)
        else:
            groups.append(([j], lengths[j]))
    return groups


def _chunk_scores(v: Tensor, q: Tensor, e: Tensor, mask: Tensor, temp1: float, temp2: float,
                  matmul_dtype: torch.dtype | None = None, gram: Tensor | None = None) -> Tensor:
    """R for all images against one chunk of texts: v (I, k, M), q (c, T, k), e (c, T, d), mask (c, T) -> (I, c).

    q is the units in the regions' space: e itself (k = d), or Wᵀe in the factored form, where the
    embedded regions are W v and `gram` is WᵀW (k × k), so that s = qᵀv, the context is W ĉ with
    ĉ = Σ_m α v_m, e·c = q·ĉ and |c|² = ĉᵀ gram ĉ.

    `matmul_dtype` (bf16) runs the context product alpha·v, and its backward, in that dtype. The
    similarities s stay in v's dtype: they are softmax logits in the hundreds for trained embeddings
    (median |s| ~ 50 at the demo's word level), where bf16's rounding (~1 at the 99th percentile)
    would reorder the words; the context is a convex combination, and its rounding only nudges a cosine.
    """
    n_img, k, n_reg = v.shape
    c, t, _ = q.shape
    keep = mask.view(1, c, t, 1)
    low = (lambda x: x) if matmul_dtype is None else (lambda x: x.to(matmul_dtype))
    s = torch.matmul(q.reshape(1, c * t, k), v).view(n_img, c, t, n_reg)  # s[i, j, t, m] = e_jtᵀ (W) v_im
    s = s.masked_fill(~keep, float("-inf"))
    a = torch.softmax(s, dim=2)  # first over the units (words) of text j: padding gets weight 0
    alpha = torch.softmax(temp1 * a, dim=3)  # then over the regions, after scaling by temp1
    ctx = torch.matmul(low(alpha.view(n_img, c * t, n_reg)), low(v.transpose(1, 2))).to(v.dtype)
    ctx = ctx.view(n_img, c, t, k)
    ec = (ctx * q.unsqueeze(0)).sum(-1)
    cc = (ctx * ctx if gram is None else torch.matmul(ctx, gram) * ctx).sum(-1)
    return scores_from_terms(ec, cc, e, mask, temp2)


def torch_local_similarity(
    regions: Tensor,
    units: Tensor,
    unit_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    projection: Tensor | None = None,
) -> Tensor:
    """R (B_img, B_txt) on any device, `chunk_size` texts at a time (None: from DEFAULT_CHUNK_ELEMENTS).

    `projection` W (d, c): `regions` are c-channel features whose embedding is W v (the image
    encoder's bias-free 1x1 local embedders). With c < d every product runs in c dimensions, W
    folded into the texts (Wᵀe) and into the context's norm (WᵀW): the same R, d/c times fewer
    multiply-adds in its two large products (the demo's word level: 64 channels against MiniLM's 384).

    `matmul_dtype=torch.bfloat16` runs the context product (forward and its two backward products,
    three of the five matrix products that are most of the word-level loss's time on the CPU) in bf16,
    for bf16 training where the CPU computes it natively; the similarities, softmaxes and cosine stay
    fp32 (`_chunk_scores`; benchmarks/local_loss_speed.py).

    The texts run in chunks of similar length (`text_groups`), each cut to its own longest text.
    Under autograd each chunk runs inside `torch.utils.checkpoint`: only its inputs and
    its (B_img, chunk) scores are kept, and its attention is rebuilt in the backward
    pass, so peak memory is a few B_img × chunk × T × M tensors: linear in B for a
    fixed chunk (benchmarks/local_loss_memory.py: 0.09 of naive at B = 128).
    """
    v, e, mask = _prepare(regions, units, unit_mask, projection)
    dtype = torch.promote_types(torch.promote_types(v.dtype, e.dtype), torch.float32)  # softmaxes in >= fp32
    v, e = v.to(dtype), e.to(dtype)
    q, gram = e, None
    if projection is not None and v.shape[1] < projection.shape[0]:
        w = projection.to(dtype)
        q, gram = torch.matmul(e, w), w.t() @ w
    else:  # no projection, or no fewer channels than the text space: embedding the regions is cheaper
        v = embed_regions(v, projection)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = chunk_size or default_chunk_size(v.shape[0], e.shape[0], e.shape[1], v.shape[2])
    recompute = torch.is_grad_enabled() and (v.requires_grad or q.requires_grad)  # q carries e and W
    if chunk_size is None and v.shape[0] * e.shape[0] * e.shape[1] * v.shape[2] <= SMALL_ATTENTION_ELEMENTS:
        # Small problems (the CPU demo: B = 16) keep their few attention-sized tensors under plain
        # autograd, within the chunk budget, and skip the recomputation (1.5x faster there).
        recompute = False
    groups = text_groups(mask, chunk)
    columns = []
    for texts, n_units in groups:
        idx = torch.tensor(texts, device=e.device)
        args = (v, q[idx, :n_units], e[idx, :n_units], mask[idx, :n_units], float(temp1), float(temp2),
                matmul_dtype, gram)
        if recompute:
            columns.append(checkpoint(_chunk_scores, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            columns.append(_chunk_scores(*args))
    scores = torch.cat(columns, dim=1)
    order = [j for texts, _ in groups for j in texts]
    if order == list(range(len(order))):
        return scores
    return scores[:, torch.argsort(torch.tensor(order, device=scores.device))]


# ----------------------------------------------------------------------------------------------
# Triton kernels. They are plain functions here and become Triton kernels in `_kernels()`, so that
# TRITON_INTERPRET is read when they are first used, not when this module is imported.


def _lse_kernel(
    v_ptr, e_ptr, mask_ptr, lse_ptr,
    n_txt, T, D, M,
    sv_b, sv_d, sv_m, se_b, se_t, se_d,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (pair, region tile): log Σ_t exp(s_tm) over the real units (the word-softmax normaliser)."""
    pair = tl.program_id(0)
    i = pair // n_txt
    j = pair % n_txt
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < M
    d_ok = offs_d < D
    v = tl.load(
        v_ptr + i * sv_b + offs_d[:, None] * sv_d + offs_m[None, :] * sv_m,
        mask=d_ok[:, None] & m_ok[None, :], other=0.0,
    )  # fmt: skip
    run_max = tl.full([BM], float("-inf"), tl.float32)
    run_sum = tl.zeros([BM], tl.float32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        t_ok = offs_t < T
        real = tl.load(mask_ptr + j * T + offs_t, mask=t_ok, other=0) != 0
        e = tl.load(
            e_ptr + j * se_b + offs_t[:, None] * se_t + offs_d[None, :] * se_d,
            mask=t_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        s = tl.dot(e, v, input_precision=PREC)
        s = tl.where(real[:, None], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[None, :]), axis=0)
        run_max = new_max
    tl.store(lse_ptr + pair * M + offs_m, run_max + tl.log(run_sum), mask=m_ok)


def _fwd_kernel(
    v_ptr, e_ptr, mask_ptr, lse_ptr, ec_ptr, cc_ptr, l_ptr, c_ptr,
    n_txt, T, D, M, temp1, i_offset,
    sv_b, sv_d, sv_m, se_b, se_t, se_d,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, STORE_C: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (pair, unit block): stream region tiles; region softmax with the fixed shift temp1
    (temp1 · a ≤ temp1, so no running max); context accumulator (BT × BD) in registers."""
    local = tl.program_id(0)
    i = i_offset + local // n_txt
    j = local % n_txt
    pair = i * n_txt + j
    offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    t_ok = offs_t < T
    d_ok = offs_d < D
    real = tl.load(mask_ptr + j * T + offs_t, mask=t_ok, other=0) != 0
    e = tl.load(
        e_ptr + j * se_b + offs_t[:, None] * se_t + offs_d[None, :] * se_d,
        mask=t_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    acc = tl.zeros([BT, BD], tl.float32)
    norm = tl.zeros([BT], tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < M
        v = tl.load(
            v_ptr + i * sv_b + offs_d[:, None] * sv_d + offs_m[None, :] * sv_m,
            mask=d_ok[:, None] & m_ok[None, :], other=0.0,
        )  # fmt: skip
        s = tl.dot(e, v, input_precision=PREC)
        lse = tl.load(lse_ptr + pair * M + offs_m, mask=m_ok, other=0.0)
        a = tl.exp(tl.where(real[:, None], s - lse[None, :], float("-inf")))
        w = tl.where(m_ok[None, :], tl.exp(temp1 * (a - 1.0)), 0.0)
        norm += tl.sum(w, axis=1)
        acc += tl.dot(w.to(v.dtype), tl.trans(v), input_precision=PREC)
    c = acc / norm[:, None]
    ec = tl.sum(c * e.to(tl.float32), axis=1)
    cc = tl.sum(c * c, axis=1)
    tl.store(ec_ptr + pair * T + offs_t, ec, mask=t_ok)
    tl.store(cc_ptr + pair * T + offs_t, cc, mask=t_ok)
    tl.store(l_ptr + pair * T + offs_t, norm, mask=t_ok)
    if STORE_C:
        tl.store(
            c_ptr + local * T * D + offs_t[:, None] * D + offs_d[None, :], c,
            mask=t_ok[:, None] & d_ok[None, :],
        )  # fmt: skip


def _kappa_kernel(
    v_ptr, e_ptr, mask_ptr, lse_ptr, l_ptr, c_ptr, gec_ptr, gcc_ptr, rho_ptr, kappa_ptr,
    n_txt, T, D, M, temp1, i_offset,
    sv_b, sv_d, sv_m, se_b, se_t, se_d,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (pair, region tile): κ_m = Σ_t a_tm da_tm, which the word-softmax backward needs whole."""
    local = tl.program_id(0)
    i = i_offset + local // n_txt
    j = local % n_txt
    pair = i * n_txt + j
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < M
    d_ok = offs_d < D
    v = tl.load(
        v_ptr + i * sv_b + offs_d[:, None] * sv_d + offs_m[None, :] * sv_m,
        mask=d_ok[:, None] & m_ok[None, :], other=0.0,
    )  # fmt: skip
    lse = tl.load(lse_ptr + pair * M + offs_m, mask=m_ok, other=0.0)
    kappa = tl.zeros([BM], tl.float32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        t_ok = offs_t < T
        td_ok = t_ok[:, None] & d_ok[None, :]
        real = tl.load(mask_ptr + j * T + offs_t, mask=t_ok, other=0) != 0
        e = tl.load(e_ptr + j * se_b + offs_t[:, None] * se_t + offs_d[None, :] * se_d, mask=td_ok, other=0.0)
        c = tl.load(c_ptr + local * T * D + offs_t[:, None] * D + offs_d[None, :], mask=td_ok, other=0.0)
        norm = tl.load(l_ptr + pair * T + offs_t, mask=t_ok, other=1.0)
        g_ec = tl.load(gec_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
        g_cc = tl.load(gcc_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
        rho = tl.load(rho_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
        s = tl.dot(e, v, input_precision=PREC)
        a = tl.exp(tl.where(real[:, None], s - lse[None, :], float("-inf")))
        alpha = tl.exp(temp1 * (a - 1.0)) / norm[:, None]
        cv = tl.dot(c.to(v.dtype), v, input_precision=PREC)
        d_alpha = g_ec[:, None] * s + 2.0 * g_cc[:, None] * cv
        da = temp1 * alpha * (d_alpha - rho[:, None])
        kappa += tl.sum(a * da, axis=0)
    tl.store(kappa_ptr + local * M + offs_m, kappa, mask=m_ok)


def _dv_kernel(
    v_ptr, e_ptr, mask_ptr, lse_ptr, l_ptr, c_ptr, gec_ptr, gcc_ptr, rho_ptr, kappa_ptr, dv_ptr,
    n_txt, T, D, M, temp1, i_offset,
    sv_b, sv_d, sv_m, se_b, se_t, se_d,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (image, region tile): dV_m = Σ_j Σ_t (α_tm u_t + ds_tm e_t), reduced in registers."""
    local_i = tl.program_id(0)
    i = i_offset + local_i
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < M
    d_ok = offs_d < D
    v = tl.load(
        v_ptr + i * sv_b + offs_d[:, None] * sv_d + offs_m[None, :] * sv_m,
        mask=d_ok[:, None] & m_ok[None, :], other=0.0,
    )  # fmt: skip
    acc = tl.zeros([BD, BM], tl.float32)
    for j in range(0, n_txt):
        local = local_i * n_txt + j
        pair = i * n_txt + j
        lse = tl.load(lse_ptr + pair * M + offs_m, mask=m_ok, other=0.0)
        kappa = tl.load(kappa_ptr + local * M + offs_m, mask=m_ok, other=0.0)
        for t0 in range(0, T, BT):
            offs_t = t0 + tl.arange(0, BT)
            t_ok = offs_t < T
            td_ok = t_ok[:, None] & d_ok[None, :]
            real = tl.load(mask_ptr + j * T + offs_t, mask=t_ok, other=0) != 0
            e = tl.load(e_ptr + j * se_b + offs_t[:, None] * se_t + offs_d[None, :] * se_d, mask=td_ok, other=0.0)
            c = tl.load(c_ptr + local * T * D + offs_t[:, None] * D + offs_d[None, :], mask=td_ok, other=0.0)
            norm = tl.load(l_ptr + pair * T + offs_t, mask=t_ok, other=1.0)
            g_ec = tl.load(gec_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
            g_cc = tl.load(gcc_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
            rho = tl.load(rho_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
            s = tl.dot(e, v, input_precision=PREC)
            a = tl.exp(tl.where(real[:, None], s - lse[None, :], float("-inf")))
            keep = real[:, None] & m_ok[None, :]
            alpha = tl.where(keep, tl.exp(temp1 * (a - 1.0)) / norm[:, None], 0.0)
            cv = tl.dot(c.to(v.dtype), v, input_precision=PREC)
            d_alpha = g_ec[:, None] * s + 2.0 * g_cc[:, None] * cv
            da = temp1 * alpha * (d_alpha - rho[:, None])
            ds = a * (da - kappa[None, :])
            u = g_ec[:, None] * e.to(tl.float32) + 2.0 * g_cc[:, None] * c
            acc += tl.dot(tl.trans(e), ds.to(v.dtype), input_precision=PREC)
            acc += tl.dot(tl.trans(u.to(v.dtype)), alpha.to(v.dtype), input_precision=PREC)
    tl.store(
        dv_ptr + i * D * M + offs_d[:, None] * M + offs_m[None, :], acc,
        mask=d_ok[:, None] & m_ok[None, :],
    )  # fmt: skip


def _de_kernel(
    v_ptr, e_ptr, mask_ptr, lse_ptr, l_ptr, c_ptr, gec_ptr, gcc_ptr, rho_ptr, kappa_ptr, de_ptr,
    n_img_chunk, n_txt, T, D, M, temp1, i_offset,
    sv_b, sv_d, sv_m, se_b, se_t, se_d,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (text, unit block): dE_t += Σ_i (g_ec_t c_t + Σ_m ds_tm v_m) over this chunk's images."""
    j = tl.program_id(0)
    offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    t_ok = offs_t < T
    d_ok = offs_d < D
    td_ok = t_ok[:, None] & d_ok[None, :]
    real = tl.load(mask_ptr + j * T + offs_t, mask=t_ok, other=0) != 0
    e = tl.load(e_ptr + j * se_b + offs_t[:, None] * se_t + offs_d[None, :] * se_d, mask=td_ok, other=0.0)
    de_ptrs = de_ptr + j * T * D + offs_t[:, None] * D + offs_d[None, :]
    acc = tl.load(de_ptrs, mask=td_ok, other=0.0)
    for local_i in range(0, n_img_chunk):
        i = i_offset + local_i
        local = local_i * n_txt + j
        pair = i * n_txt + j
        c = tl.load(c_ptr + local * T * D + offs_t[:, None] * D + offs_d[None, :], mask=td_ok, other=0.0)
        norm = tl.load(l_ptr + pair * T + offs_t, mask=t_ok, other=1.0)
        g_ec = tl.load(gec_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
        g_cc = tl.load(gcc_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
        rho = tl.load(rho_ptr + pair * T + offs_t, mask=t_ok, other=0.0)
        acc += g_ec[:, None] * c
        c_low = c.to(v_ptr.dtype.element_ty)
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            m_ok = offs_m < M
            v = tl.load(
                v_ptr + i * sv_b + offs_d[:, None] * sv_d + offs_m[None, :] * sv_m,
                mask=d_ok[:, None] & m_ok[None, :], other=0.0,
            )  # fmt: skip
            lse = tl.load(lse_ptr + pair * M + offs_m, mask=m_ok, other=0.0)
            kappa = tl.load(kappa_ptr + local * M + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(e, v, input_precision=PREC)
            a = tl.exp(tl.where(real[:, None], s - lse[None, :], float("-inf")))
            alpha = tl.exp(temp1 * (a - 1.0)) / norm[:, None]
            cv = tl.dot(c_low, v, input_precision=PREC)
            d_alpha = g_ec[:, None] * s + 2.0 * g_cc[:, None] * cv
            da = temp1 * alpha * (d_alpha - rho[:, None])
            ds = tl.where(m_ok[None, :], a * (da - kappa[None, :]), 0.0)
            acc += tl.dot(ds.to(v.dtype), tl.trans(v), input_precision=PREC)
    tl.store(de_ptrs, acc, mask=td_ok)


_KERNEL_SOURCES = {
    "lse": _lse_kernel,
    "fwd": _fwd_kernel,
    "kappa": _kappa_kernel,
    "dv": _dv_kernel,
    "de": _de_kernel,
}


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _jit(interpret: bool) -> dict[str, Any]:
    # triton.jit reads TRITON_INTERPRET when it wraps a function, hence one set per mode.
    del interpret
    return {name: triton.jit(fn) for name, fn in _KERNEL_SOURCES.items()}


def _kernels() -> dict[str, Any]:
    if triton is None:
        raise RuntimeError("Triton is not installed; use the torch path (AFLOC_KERNELS=torch)")
    return _jit(interpreting())


def _pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(n))


class _Plan:
    """Launch constants shared by all kernels of one call."""

    def __init__(self, v: Tensor, e: Tensor, temp1: float, chunk: int) -> None:
        self.n_img, self.dim, self.n_reg = v.shape
        self.n_txt, self.n_units, _ = e.shape
        self.temp1 = temp1
        self.chunk = chunk
        self.bd = _pow2(self.dim)
        self.bt = 16
        self.bm = 32 if self.bd <= 256 else 16
        self.prec = "ieee" if v.dtype == torch.float32 and interpreting() else "tf32"
        self.warps = 4 if self.bd <= 256 else 8
        self.strides = (*v.stride(), *e.stride())


def _launch_forward(
    plan: _Plan, v: Tensor, e: Tensor, mask8: Tensor, lse: Tensor, i0: int, n_chunk: int, store_c: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """ec, cc, l for images i0 .. i0 + n_chunk (views into full-size buffers), and c if asked."""
    k = _kernels()
    shape = (plan.n_img, plan.n_txt, plan.n_units)
    ec = torch.zeros(shape, device=v.device, dtype=torch.float32)
    cc = torch.zeros_like(ec)
    norm = torch.ones_like(ec)
    c = (
        torch.empty(n_chunk, plan.n_txt, plan.n_units, plan.dim, device=v.device, dtype=torch.float32)
        if store_c
        else ec  # unused pointer
    )
    grid = (n_chunk * plan.n_txt, triton.cdiv(plan.n_units, plan.bt))
    k["fwd"][grid](
        v, e, mask8, lse, ec, cc, norm, c,
        plan.n_txt, plan.n_units, plan.dim, plan.n_reg, plan.temp1, i0, *plan.strides,
        BT=plan.bt, BM=plan.bm, BD=plan.bd, STORE_C=store_c, PREC=plan.prec, num_warps=plan.warps,
    )  # fmt: skip
    return ec, cc, norm, (c if store_c else None)


class _TritonTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, e: Tensor, mask: Tensor, temp1: float, chunk: int) -> tuple[Tensor, Tensor]:
        plan = _Plan(v, e, temp1, chunk)
        mask8 = mask.to(torch.int8).contiguous()
        lse = torch.empty(plan.n_img, plan.n_txt, plan.n_reg, device=v.device, dtype=torch.float32)
        grid = (plan.n_img * plan.n_txt, triton.cdiv(plan.n_reg, plan.bm))
        _kernels()["lse"][grid](
            v, e, mask8, lse, plan.n_txt, plan.n_units, plan.dim, plan.n_reg, *plan.strides,
            BT=plan.bt, BM=plan.bm, BD=plan.bd, PREC=plan.prec, num_warps=plan.warps,
        )  # fmt: skip
        ec, cc, norm, _ = _launch_forward(plan, v, e, mask8, lse, 0, plan.n_img, store_c=False)
        ctx.save_for_backward(v, e, mask8, lse, ec, cc, norm)
        ctx.plan = plan
        return ec, cc

    @staticmethod
    def backward(ctx: Any, g_ec: Tensor, g_cc: Tensor) -> tuple[Tensor | None, ...]:
        v, e, mask8, lse, ec, cc, norm = ctx.saved_tensors
        plan: _Plan = ctx.plan
        k = _kernels()
        keep = mask8.to(torch.float32).unsqueeze(0)
        g_ec = (g_ec.float() * keep).contiguous()
        g_cc = (g_cc.float() * keep).contiguous()
        rho = (g_ec * ec + 2 * g_cc * cc).contiguous()
        dv = torch.empty(v.shape, device=v.device, dtype=torch.float32)
        de = torch.zeros(e.shape, device=e.device, dtype=torch.float32)
        dims = (plan.n_txt, plan.n_units, plan.dim, plan.n_reg, plan.temp1)
        meta = {"BT": plan.bt, "BM": plan.bm, "BD": plan.bd, "PREC": plan.prec, "num_warps": plan.warps}
        for i0 in range(0, plan.n_img, plan.chunk):
            n_chunk = min(plan.chunk, plan.n_img - i0)
            _, _, _, c = _launch_forward(plan, v, e, mask8, lse, i0, n_chunk, store_c=True)
            kappa = torch.empty(n_chunk, plan.n_txt, plan.n_reg, device=v.device, dtype=torch.float32)
            n_mt = triton.cdiv(plan.n_reg, plan.bm)
            common = (v, e, mask8, lse, norm, c, g_ec, g_cc, rho, kappa)
            k["kappa"][(n_chunk * plan.n_txt, n_mt)](*common, *dims, i0, *plan.strides, **meta)
            k["dv"][(n_chunk, n_mt)](*common, dv, *dims, i0, *plan.strides, **meta)
            grid_e = (plan.n_txt, triton.cdiv(plan.n_units, plan.bt))
            k["de"][grid_e](*common, de, n_chunk, *dims, i0, *plan.strides, **meta)
        return dv.to(v.dtype), de.to(e.dtype), None, None, None


def triton_local_similarity(
    regions: Tensor,
    units: Tensor,
    unit_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    chunk_size: int | None = None,
    projection: Tensor | None = None,
) -> Tensor:
    """R (B_img, B_txt) with the fused part in Triton; chunk_size: images per backward chunk.

    `projection` (d, c): the regions are embedded first (the kernels work in the text space)."""
    if not 0 < temp1 <= MAX_TEMP1:
        raise ValueError(f"the Triton path needs 0 < temp1 <= {MAX_TEMP1}, got {temp1}")
    v, e, mask = _prepare(regions, units, unit_mask, projection)
    v = embed_regions(v, projection)
    dtype = torch.promote_types(v.dtype, e.dtype)
    if dtype == torch.float64:  # the kernels' dot products are fp32 / tf32 / bf16
        dtype = torch.float32
    v = v.to(dtype).contiguous()
    e = e.to(dtype).contiguous()
    per_image = max(1, e.shape[0] * e.shape[1] * v.shape[1])
    chunk = chunk_size or max(1, TRITON_CHUNK_ELEMENTS // per_image)
    ec, cc = _TritonTerms.apply(v, e, mask, float(temp1), chunk)
    return scores_from_terms(ec, cc, e, mask, temp2)


__all__ = [
    "COS_EPS",
    "reference_local_similarity",
    "scores_from_terms",
    "default_chunk_size",
    "embed_regions",
    "text_groups",
    "torch_local_similarity",
    "triton_available",
    "triton_local_similarity",
]
