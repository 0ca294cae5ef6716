"""The contrastive losses against deliberately naive references written here (loops over pairs), in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train.losses import default_chunk_size, global_loss, local_loss, local_similarity

TOL = {"rtol": 1e-5, "atol": 1e-5}
F64 = torch.float64


# ------------------------------------------------------------------ naive references


def naive_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum() / torch.clamp(torch.sqrt((x * x).sum()) * torch.sqrt((y * y).sum()), min=1e-8)


def naive_similarity(regions: torch.Tensor, units: torch.Tensor, mask: torch.Tensor,
                     temp1: float = 4.0, temp2: float = 5.0) -> torch.Tensor:
    """One image–text pair at a time, each softmax spelled out; padding units are simply dropped."""
    v_all = regions.reshape(regions.shape[0], regions.shape[1], -1)  # (B, d, M)
    rows = []
    for i in range(v_all.shape[0]):
        v = v_all[i]  # (d, M)
        row = []
        for j in range(units.shape[0]):
            e = units[j][mask[j]]  # (T_j, d): the real units only
            s = e @ v  # (T_j, M)
            a = torch.exp(s) / torch.exp(s).sum(dim=0, keepdim=True)  # over the words, per region
            z = torch.exp(temp1 * a)
            alpha = z / z.sum(dim=1, keepdim=True)  # then over the regions, per word
            terms = []
            for t in range(e.shape[0]):
                c = (alpha[t].unsqueeze(0) * v).sum(dim=1)  # Σ_m α_tm v_m
                terms.append(torch.exp(temp2 * naive_cos(e[t], c)))
            row.append(torch.log(torch.stack(terms).sum()))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def naive_ce_both_ways(logits: torch.Tensor) -> torch.Tensor:
    n = logits.shape[0]
    img2txt = -sum(logits[k, k] - torch.log(torch.exp(logits[k]).sum()) for k in range(n)) / n
    txt2img = -sum(logits[k, k] - torch.log(torch.exp(logits[:, k]).sum()) for k in range(n)) / n
    return img2txt + txt2img


def naive_local_loss(regions, units, mask, temp1=4.0, temp2=5.0, temp3=10.0) -> torch.Tensor:
    return naive_ce_both_ways(temp3 * naive_similarity(regions, units, mask, temp1, temp2))


def naive_global_loss(image: torch.Tensor, text: torch.Tensor, temp3: float = 10.0) -> torch.Tensor:
    n = image.shape[0]
    logits = torch.stack([torch.stack([temp3 * naive_cos(image[i], text[j]) for j in range(n)]) for i in range(n)])
    return naive_ce_both_ways(logits)


# ------------------------------------------------------------------ helpers


def make_inputs(b: int, d: int, grid: tuple[int, ...], counts: list[int], t: int, seed: int,
                prefix: bool = True, b_img: int | None = None):
    """Random regions (b_img, d, *grid) and units (b, t, d) with `counts[j]` real units in text j."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b_img or b, d, *grid, generator=g, dtype=F64)
    units = torch.randn(b, t, d, generator=g, dtype=F64)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for j, n in enumerate(counts):
        if prefix:
            mask[j, :n] = True
        else:  # anywhere in the row: the loss must not assume a prefix layout
            mask[j, torch.randperm(t, generator=g)[:n]] = True
    return regions, units, mask


def grads(fn, regions: torch.Tensor, units: torch.Tensor, *rest, weight: torch.Tensor | None = None):
    r = regions.detach().clone().requires_grad_(True)
    u = units.detach().clone().requires_grad_(True)
    out = fn(r, u, *rest)
    scalar = out if weight is None else (out * weight).sum()
    gr, gu = torch.autograd.grad(scalar, (r, u))
    return out.detach(), gr, gu


def assert_same_loss_and_grads(regions, units, mask, chunk_size, **temps) -> None:
    want, want_gr, want_gu = grads(lambda r, u: naive_local_loss(r, u, mask, **temps), regions, units)
    got, got_gr, got_gu = grads(lambda r, u: local_loss(r, u, mask, chunk_size=chunk_size, **temps), regions, units)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_gr, want_gr, **TOL)
    torch.testing.assert_close(got_gu, want_gu, **TOL)


# ------------------------------------------------------------------ local loss: fixed cases


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5, 7, None])
@pytest.mark.parametrize("grid", [(6,), (2, 3)], ids=["BdM", "Bdhw"])
def test_local_loss_matches_naive_ragged(chunk_size: int | None, grid: tuple[int, ...]) -> None:
    # B = 5: chunks of 2, 3 and 4 do not divide it; text 1 has a single real unit ([CLS] alone).
    regions, units, mask = make_inputs(5, 4, grid, counts=[3, 1, 4, 2, 4], t=4, seed=1)
    assert_same_loss_and_grads(regions, units, mask, chunk_size)


def test_local_similarity_matches_naive_with_weighted_grads() -> None:
    """R itself (not only the loss), with an arbitrary upstream gradient, and B_img ≠ B_txt."""
    regions, units, mask = make_inputs(4, 3, (2, 2), counts=[2, 1, 3, 3], t=3, seed=2, b_img=3)
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    want = grads(lambda r, u: naive_similarity(r, u, mask), regions, units, weight=weight)
    got = grads(lambda r, u: local_similarity(r, u, mask, chunk_size=3), regions, units, weight=weight)
    assert got[0].shape == (3, 4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_non_default_temperatures() -> None:
    regions, units, mask = make_inputs(3, 4, (5,), counts=[2, 3, 1], t=3, seed=4)
    assert_same_loss_and_grads(regions, units, mask, 2, temp1=1.5, temp2=2.0, temp3=3.0)


def test_padding_is_ignored_and_gets_no_gradient() -> None:
    regions, units, mask = make_inputs(3, 4, (5,), counts=[2, 1, 3], t=4, seed=5)
    garbage = units.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), 4, dtype=F64)
    zeros = units.clone()
    zeros[~mask] = 0.0
    base, _, gu = grads(lambda r, u: local_loss(r, u, mask, chunk_size=2), regions, garbage)
    for padded in (zeros, units):
        torch.testing.assert_close(local_loss(regions, padded, mask, chunk_size=2), base, **TOL)
    assert torch.all(gu[~mask] == 0)
    _, gr0, gu0 = grads(lambda r, u: local_loss(r, u, mask, chunk_size=2), regions, zeros)
    assert torch.isfinite(gr0).all() and torch.isfinite(gu0).all()


def test_word_softmax_comes_before_region_softmax() -> None:
    """The other order (regions first, then words) gives a different R: the order is pinned."""
    regions, units, mask = make_inputs(2, 3, (4,), counts=[3, 3], t=3, seed=6)
    v, e = regions[0], units[0]
    s = e @ v
    alpha = torch.softmax(4.0 * torch.softmax(s, dim=1), dim=0)  # the swapped order: regions, then words
    c = alpha @ v.t()
    swapped = torch.logsumexp(torch.stack([5.0 * naive_cos(e[t], c[t]) for t in range(3)]), 0)
    r = local_similarity(regions, units, mask)
    assert not torch.allclose(r[0, 0], swapped)
    torch.testing.assert_close(r, naive_similarity(regions, units, mask), **TOL)


def test_chunking_and_no_grad_path_agree() -> None:
    regions, units, mask = make_inputs(6, 4, (3, 3), counts=[1, 2, 3, 4, 4, 2], t=4, seed=7)
    ref = local_similarity(regions, units, mask, chunk_size=6)
    with torch.no_grad():
        for chunk in (1, 4, 5, 100):
            torch.testing.assert_close(local_similarity(regions, units, mask, chunk_size=chunk), ref,
                                       rtol=1e-12, atol=1e-12)


def test_loss_is_invariant_to_a_shared_batch_permutation() -> None:
    regions, units, mask = make_inputs(5, 3, (4,), counts=[2, 3, 1, 3, 2], t=3, seed=8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(local_loss(regions[perm], units[perm], mask[perm], chunk_size=2),
                               local_loss(regions, units, mask, chunk_size=3), **TOL)


def test_gradcheck_through_the_checkpointed_chunks() -> None:
    regions, units, mask = make_inputs(3, 2, (3,), counts=[2, 1, 2], t=2, seed=9)
    r = regions.requires_grad_(True)
    u = units.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r, u: local_loss(r, u, mask, chunk_size=2), (r, u))


def test_saved_activations_are_not_b_b_t_m() -> None:
    """Under autograd only the chunk inputs and (B, chunk) scores stay alive, not the attention."""
    b, d, t, m = 16, 4, 8, 49
    regions, units, mask = make_inputs(b, d, (7, 7), counts=[t] * b, t=t, seed=10)
    regions.requires_grad_(True)
    units.requires_grad_(True)
    saved: dict[int, int] = {}  # storage address -> elements (the same input saved by every chunk counts once)

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes() // x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = local_loss(regions, units, mask, chunk_size=2)
    loss.backward()
    assert max(saved.values()) < b * 2 * t * m  # not even one chunk's attention survives the forward
    assert sum(saved.values()) < b * b * t * m / 10


def test_default_chunk_size_keeps_the_word_level_linear_in_b() -> None:
    assert default_chunk_size(128, 128, 97, 38 * 38) == 7
    assert default_chunk_size(1024, 1024, 97, 38 * 38) == 1
    assert default_chunk_size(128, 128, 12, 19 * 19) == 128  # sentence level: one chunk
    assert default_chunk_size(4, 3, 2, 2) == 3


def test_bad_inputs_are_rejected() -> None:
    regions, units, mask = make_inputs(2, 3, (4,), counts=[2, 1], t=2, seed=11)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="at least one real unit"):
        local_loss(regions, units, empty)
    with pytest.raises(ValueError, match="units must be"):
        local_loss(regions, units[..., :2], mask)
    with pytest.raises(ValueError, match="unit_mask"):
        local_loss(regions, units, mask[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        local_loss(regions, units, mask, chunk_size=0)
    with pytest.raises(ValueError, match="square"):
        local_loss(regions[:1], units, mask)


# ------------------------------------------------------------------ local loss: random shapes


@st.composite
def local_cases(draw):
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    grid = draw(st.sampled_from([(1,), (3,), (5,), (1, 2), (2, 2), (3, 2)]))
    d = draw(st.integers(1, 5))
    chunk = draw(st.one_of(st.none(), st.integers(1, b + 1)))
    prefix = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    return b, t, counts, grid, d, chunk, prefix, seed, scale


@settings(max_examples=40, deadline=None)
@given(local_cases())
def test_local_loss_matches_naive_random_shapes(case) -> None:
    b, t, counts, grid, d, chunk, prefix, seed, scale = case
    regions, units, mask = make_inputs(b, d, grid, counts, t, seed, prefix=prefix)
    assert_same_loss_and_grads(scale * regions, scale * units, mask, chunk)


# ------------------------------------------------------------------ global loss


def test_global_loss_matches_naive_values_and_grads() -> None:
    g = torch.Generator().manual_seed(12)
    image = torch.randn(6, 5, generator=g, dtype=F64)
    text = torch.randn(6, 5, generator=g, dtype=F64)
    want = grads(lambda i, t: naive_global_loss(i, t), image, text)
    got = grads(lambda i, t: global_loss(i, t), image, text)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, **TOL)
    torch.testing.assert_close(global_loss(image, text, temp3=2.5), naive_global_loss(image, text, 2.5), **TOL)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16))
def test_global_loss_is_symmetric_and_scale_free(b: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=g, dtype=F64)
    text = torch.randn(b, d, generator=g, dtype=F64)
    loss = global_loss(image, text)
    torch.testing.assert_close(loss, naive_global_loss(image, text), **TOL)
    torch.testing.assert_close(global_loss(text, image), loss, **TOL)  # swapping the roles
    torch.testing.assert_close(global_loss(3.0 * image, 0.5 * text), loss, **TOL)  # cosine, not dot


def test_global_loss_known_values() -> None:
    # Orthonormal pairs: logits = 10 · I, each direction's CE = log(1 + (B − 1) e^{-10}).
    eye = torch.eye(4, dtype=F64)
    want = 2 * math.log(1 + 3 * math.exp(-10.0))
    torch.testing.assert_close(global_loss(eye, eye), torch.tensor(want, dtype=F64))
    assert float(global_loss(eye[:1], eye[:1])) == 0.0  # one pair: no negatives, no loss
    zero = torch.zeros(2, 3, dtype=F64)  # eps on the product of norms keeps this finite
    assert torch.isfinite(global_loss(zero, zero))
    with pytest.raises(ValueError):
        global_loss(eye, eye[:3])


def test_bf16_training_runs_local_products_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision=bf16 hands bf16 to both local losses' context products; the losses stay near fp32's."""
    import random

    import train.loop as loop
    from afloc_cli.config import ImageConfig, PreprocessConfig, small_config
    from afloc_cli.text.data.sentences import prepare_report
    from afloc_cli.vlp.model import build_model
    from train.config import TrainConfig
    from train.distributed import DistInfo

    cfg = TrainConfig(model=small_config().replace(
        image=ImageConfig(arch="resnet18", hidden_sizes=(8, 16, 32, 64), embedding_size=8, internal_size=None),
        preprocess=PreprocessConfig(image_size=64)), batch_size=4)
    torch.manual_seed(0)
    random.seed(0)
    model = build_model(cfg.model).eval()
    frames = torch.randint(0, 255, (4, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    texts = [prepare_report(r) for r in ("Small left pleural effusion. Heart size normal.", "Right upper lobe opacity.",
                                         "Large right pneumothorax. No effusion.", "The lungs are clear.")]
    seen: list[torch.dtype | None] = []
    real = loop.local_loss
    monkeypatch.setattr(loop, "local_loss", lambda *a, **k: seen.append(k.get("matmul_dtype")) or real(*a, **k))
    forward = loop._Forward(model, ("global", "deep", "shallow"))
    losses = {p: {k: float(v.detach()) for k, v in
                  loop.compute_losses(forward, model, frames, texts, cfg, DistInfo(), torch.device("cpu"), p).items()}
              for p in ("fp32", "bf16")}
    assert seen == [None, None, torch.bfloat16, torch.bfloat16]
    for name in ("sentence", "word", "total"):
        assert abs(losses["bf16"][name] - losses["fp32"][name]) < 0.05 * abs(losses["fp32"][name])
