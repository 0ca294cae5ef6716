"""kernels/: every Triton kernel against its torch reference (values and gradients), the CPU paths, dispatch.

Without CUDA the Triton kernels run on Triton's CPU interpreter. Triton 3.x reads
TRITON_INTERPRET when triton.jit wraps a function (runtime/jit.py), not at import;
kernels/ wraps its kernels at launch time, once per value of the variable, so the
flag only has to be set while these tests run, even if another module imported
kernels/ first. It is set before triton is imported (for the probe) and then only
while this module's tests run, so other modules never inherit it. With CUDA
(benchmarks/gpu_check.sh) the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
_SAVED_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels import dispatch  # noqa: E402
from kernels import local_alignment as la  # noqa: E402
from kernels import localization as loc  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
FAST = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # reported as the skip reason below
    triton = tl = None
    _IMPORT_ERROR = str(_exc)


def _probe(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2.0)


def _triton_problem() -> str | None:
    """Why the Triton kernels cannot run here, or None. Never a silent skip: the reason is the skip message."""
    if triton is None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    try:
        x = torch.arange(16, dtype=torch.float32, device=DEVICE)
        y = torch.empty_like(x)
        triton.jit(_probe)[(1,)](x, y, BLOCK=16)
        if not torch.equal(y, x * 2):
            return "the Triton probe kernel ran but returned wrong values"
    except Exception as exc:  # noqa: BLE001 - any failure is the reason to report
        where = "on CUDA" if CUDA else "in the CPU interpreter (TRITON_INTERPRET=1)"
        return f"Triton cannot run {where}: {type(exc).__name__}: {exc}"
    return None


TRITON_PROBLEM = _triton_problem()
needs_triton = pytest.mark.skipif(TRITON_PROBLEM is not None, reason=TRITON_PROBLEM or "")
TRITON_TESTS = ("test_triton_local_alignment_matches_reference", "test_triton_local_alignment_block_edges",
                "test_triton_local_alignment_embeds_projected_regions", "test_triton_localization_matches_reference")


def _interpreter_spoiled() -> bool:
    """Importing torch._inductor (the compile tests do) breaks Triton's CPU interpreter for the rest of
    the process ("Cannot call @triton.jit'd outside of the scope of a kernel"); such a process runs the
    Triton tests in a fresh interpreter instead (test_triton_kernels_in_a_fresh_process)."""
    return not CUDA and "torch._inductor" in sys.modules and not os.environ.get("AFLOC_TRITON_FRESH")


def _fresh_process_only() -> None:
    if _interpreter_spoiled():
        pytest.skip("torch._inductor was imported in this process: run in a fresh process instead "
                    "by test_triton_kernels_in_a_fresh_process")


def _restore_interpret() -> None:
    if _SAVED_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED_INTERPRET


# Other test modules collected in this process should not inherit the interpreter flag:
# it is set again only while this module's tests run (kernels/ reads it at each launch).
_restore_interpret()


@pytest.fixture(autouse=True, scope="module")
def _interpreter_while_here():
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret()


# ------------------------------------------------------------------------------------------------
# Local alignment


@st.composite
def alignment_problems(draw: st.DrawFn, max_units: int = 20, max_dim: int = 40, max_regions: int = 40) -> dict:
    n_img = draw(st.integers(1, 3))
    n_txt = draw(st.integers(1, 3))
    n_units = draw(st.integers(1, max_units))
    dim = draw(st.integers(1, max_dim))
    n_reg = draw(st.integers(1, max_regions))
    # Ragged word counts: a prefix of real units per text, or any pattern with at least one real unit.
    rows = []
    for _ in range(n_txt):
        if draw(st.booleans()):
            rows.append([t < draw(st.integers(1, n_units)) for t in range(n_units)])
        else:
            row = draw(st.lists(st.booleans(), min_size=n_units, max_size=n_units))
            row[draw(st.integers(0, n_units - 1))] = True
            rows.append(row)
    seed = draw(st.integers(0, 2**16))
    chunk = draw(st.integers(1, n_img))
    return {"shape": (n_img, n_txt, n_units, dim, n_reg), "mask": rows, "seed": seed, "chunk": chunk}


def _tensors(problem: dict, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    n_img, n_txt, n_units, dim, n_reg = problem["shape"]
    gen = torch.Generator().manual_seed(problem["seed"])
    regions = torch.randn(n_img, dim, n_reg, generator=gen, dtype=torch.float64)
    units = torch.randn(n_txt, n_units, dim, generator=gen, dtype=torch.float64)
    mask = torch.tensor(problem["mask"], dtype=torch.bool)
    units = torch.where(mask[..., None], units, 50.0 * torch.randn_like(units))  # garbage in the padding
    weights = torch.randn(n_img, n_txt, generator=gen, dtype=torch.float64)
    return tuple(t.to(device) for t in (regions.to(dtype), units.to(dtype), mask, weights.to(dtype)))


def _value_and_grads(fn, regions, units, mask, weights, **kwargs) -> tuple[torch.Tensor, ...]:
    v = regions.detach().clone().requires_grad_()
    e = units.detach().clone().requires_grad_()
    r = fn(v, e, mask, 4.0, 5.0, **kwargs)
    gv, ge = torch.autograd.grad((r * weights).sum(), (v, e))
    return r.detach(), gv, ge


def test_reference_agrees_with_train_losses():
    """kernels' reference and train/losses.py (chunked over texts, checkpointed) are the same math."""
    from train.losses import local_similarity as train_local_similarity

    for seed in range(3):
        problem = {"shape": (3, 4, 7, 12, 10), "seed": seed, "chunk": 1,
                   "mask": [[True] * 7, [True, True, False, False, False, False, False],
                            [True, False, True, True, False, True, False], [True] * 3 + [False] * 4]}  # fmt: skip
        regions, units, mask, weights = _tensors(problem, torch.float64, torch.device("cpu"))
        ref = _value_and_grads(la.reference_local_similarity, regions, units, mask, weights)
        for chunk in (1, 3):
            got = _value_and_grads(train_local_similarity, regions, units, mask, weights, chunk_size=chunk)
            for a, b in zip(got, ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@FAST
@given(alignment_problems())
def test_torch_path_matches_reference(problem):
    regions, units, mask, weights = _tensors(problem, torch.float64, torch.device("cpu"))
    ref = _value_and_grads(la.reference_local_similarity, regions, units, mask, weights)
    got = _value_and_grads(la.torch_local_similarity, regions, units, mask, weights, chunk_size=problem["chunk"])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.count_nonzero(got[2][~mask]) == 0  # padding gets no gradient


@needs_triton
@FAST
@given(alignment_problems())
def test_triton_local_alignment_matches_reference(problem):
    _fresh_process_only()
    regions, units, mask, weights = _tensors(problem, torch.float32, DEVICE)
    ref = _value_and_grads(la.reference_local_similarity, regions.double(), units.double(), mask, weights.double())
    got = _value_and_grads(la.triton_local_similarity, regions, units, mask, weights, chunk_size=problem["chunk"])
    # fp32 kernels (tf32 dot products on CUDA) against an fp64 reference.
    tol = 2e-2 if CUDA else 2e-4
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    assert torch.count_nonzero(got[2][~mask]) == 0


@needs_triton
def test_triton_local_alignment_block_edges():
    _fresh_process_only()
    """Shapes straddling every block size (16 units, 16/32 regions, 16..64 dims) and several chunks."""
    problem = {"shape": (4, 2, 17, 33, 65), "seed": 7, "chunk": 3,
               "mask": [[True] * 17, [True] * 16 + [False]]}  # fmt: skip
    regions, units, mask, weights = _tensors(problem, torch.float32, DEVICE)
    ref = _value_and_grads(la.reference_local_similarity, regions.double(), units.double(), mask, weights.double())
    got = _value_and_grads(la.triton_local_similarity, regions, units, mask, weights, chunk_size=3)
    tol = 2e-2 if CUDA else 2e-4
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@FAST
@given(alignment_problems(), st.integers(1, 48))
def test_factored_regions_match_embedded_regions(problem, channels):
    """`projection` W: the torch path folds W into the texts (channels < d) or embeds the regions (channels >= d);
    either way R and its gradients (features, W, units) are those of the reference on W @ features."""
    _, units, mask, weights = _tensors(problem, torch.float64, torch.device("cpu"))
    n_img, _, _, dim, n_reg = problem["shape"]
    gen = torch.Generator().manual_seed(problem["seed"] + 1)
    feats = torch.randn(n_img, channels, n_reg, generator=gen, dtype=torch.float64)
    proj = torch.randn(dim, channels, generator=gen, dtype=torch.float64) / channels**0.5

    def value_and_grads(fn, **kwargs):
        h, w, e = (t.detach().clone().requires_grad_() for t in (feats, proj, units))
        r = fn(h, e, mask, 4.0, 5.0, projection=w, **kwargs)
        return (r.detach(), *torch.autograd.grad((r * weights).sum(), (h, w, e)))

    def embedded_reference(h, e, m, t1, t2, projection):
        return la.reference_local_similarity(torch.einsum("dc,icm->idm", projection, h), e, m, t1, t2)

    want = value_and_grads(embedded_reference)
    for got in (value_and_grads(la.torch_local_similarity, chunk_size=problem["chunk"]),
                value_and_grads(la.reference_local_similarity)):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.count_nonzero(want[3][~mask]) == 0


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6).filter(any), min_size=1, max_size=9),
       st.integers(1, 5))
def test_text_groups_cover_every_text_once_within_the_chunk(rows, chunk):
    mask = torch.tensor(rows)
    groups = la.text_groups(mask, chunk)
    assert sorted(j for texts, _ in groups for j in texts) == list(range(len(rows)))
    last = [max(t for t, real in enumerate(row) if real) + 1 for row in rows]
    for k, (texts, n_units) in enumerate(groups):
        assert 1 <= len(texts) <= chunk
        assert n_units == max(last[j] for j in texts)  # cut after the group's last real unit: nothing real lost
        assert min(last[j] for j in texts) >= la.GROUP_LENGTH_RATIO * n_units  # little padding inside a group
        if k + 1 < len(groups):  # a group closes only when full or when the next text is much shorter
            nxt = last[groups[k + 1][0][0]]
            assert len(texts) == chunk or nxt < la.GROUP_LENGTH_RATIO * n_units
            assert nxt <= min(last[j] for j in texts)  # longest first


def test_text_groups_split_ragged_reports_by_length():
    """Reports of 40, 38, 12 and 11 units in a batch padded to 40: two chunks, cut at 40 and 12."""
    lengths = [12, 40, 11, 38]
    mask = torch.arange(40)[None, :] < torch.tensor(lengths)[:, None]
    assert la.text_groups(mask, chunk=8) == [([1, 3], 40), ([0, 2], 12)]
    assert la.text_groups(mask, chunk=1) == [([1], 40), ([3], 38), ([0], 12), ([2], 11)]


@needs_triton
def test_triton_local_alignment_embeds_projected_regions():
    """Given features and their embedder (training's call), the Triton path embeds them and matches the reference."""
    _fresh_process_only()
    problem = {"shape": (3, 2, 9, 24, 20), "seed": 5, "chunk": 2, "mask": [[True] * 9, [True] * 4 + [False] * 5]}
    _, units, mask, weights = _tensors(problem, torch.float32, DEVICE)
    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(3, 6, 20, generator=gen).to(DEVICE)
    proj = (torch.randn(24, 6, generator=gen) / 6**0.5).to(DEVICE)

    def value_and_grads(fn, dtype):
        h, w, e = (t.detach().to(dtype).clone().requires_grad_() for t in (feats, proj, units))
        r = fn(h, e, mask, 4.0, 5.0, projection=w)
        return (r.detach(), *torch.autograd.grad((r * weights.to(dtype)).sum(), (h, w, e)))

    want = value_and_grads(la.reference_local_similarity, torch.float64)
    got = value_and_grads(la.triton_local_similarity, torch.float32)
    tol = 2e-2 if CUDA else 2e-4
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_local_alignment_rejects_text_without_units():
    regions = torch.randn(2, 4, 5)
    units = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    for fn in (la.reference_local_similarity, la.torch_local_similarity):
        with pytest.raises(ValueError, match="at least one real unit"):
            fn(regions, units, mask)


def test_torch_path_handles_spatial_regions_chunks_and_bf16():
    gen = torch.Generator().manual_seed(3)
    regions = torch.randn(3, 8, 3, 4, generator=gen)
    units = torch.randn(2, 5, 8, generator=gen)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    ref = la.reference_local_similarity(regions, units, mask)
    torch.testing.assert_close(la.torch_local_similarity(regions, units, mask), ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    expected = _value_and_grads(la.reference_local_similarity, regions.double(), units.double(), mask, weights)
    for chunk in (1, 2):  # text chunks under checkpointing
        got = _value_and_grads(la.torch_local_similarity, regions.double(), units.double(), mask, weights,
                               chunk_size=chunk)  # fmt: skip
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    low = la.torch_local_similarity(regions.bfloat16(), units.bfloat16(), mask)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=5e-2, atol=5e-2)


@FAST
@given(alignment_problems())
def test_bf16_products_stay_close_to_fp32(problem):
    """bf16 training's local loss: the context product in bf16, the rest fp32; values and gradients near fp64.

    Tolerances: bf16 keeps 8 bits of mantissa (relative 4e-3 per input); the context is a convex
    combination of the regions, so its error stays relative, and the cosine and log-sum-exp damp it.
    """
    regions, units, mask, weights = _tensors(problem, torch.float32, torch.device("cpu"))
    ref = _value_and_grads(la.reference_local_similarity, regions.double(), units.double(), mask, weights.double())
    got = _value_and_grads(la.torch_local_similarity, regions, units, mask, weights, chunk_size=problem["chunk"],
                           matmul_dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in got)
    r, gv, ge = (t.double() for t in got)
    torch.testing.assert_close(r, ref[0], rtol=0.05, atol=0.05)
    for a, b in ((gv, ref[1]), (ge, ref[2])):
        scale = b.abs().max().clamp_min(1e-3)
        assert float((a - b).abs().max() / scale) < 0.1
    assert torch.count_nonzero(ge[~mask]) == 0


# ------------------------------------------------------------------------------------------------
# Localization


@st.composite
def localization_problems(draw: st.DrawFn) -> dict:
    return {
        "b": draw(st.integers(1, 3)),
        "c": draw(st.integers(1, 80)),
        "g": draw(st.integers(1, 9)),
        "p": draw(st.integers(1, 20)),
        "mode": draw(st.sampled_from(["dot", "cosine"])),
        "normalize": draw(st.booleans()),
        "with_global": draw(st.booleans()),
        "channels_last": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 0.5, 3.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _loc_inputs(pb: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(pb["seed"])
    grid = torch.randn(pb["b"], pb["c"], pb["g"], pb["g"], generator=gen)
    if pb["channels_last"]:
        grid = grid.contiguous(memory_format=torch.channels_last)
    prompts = torch.randn(pb["p"], pb["c"], generator=gen)
    glob = torch.randn(pb["b"], pb["c"], generator=gen) if pb["with_global"] else None
    return grid.to(device), prompts.to(device), None if glob is None else glob.to(device)


def _check_localization(fn, pb: dict, device: torch.device, tol: float) -> None:
    grid, prompts, glob = _loc_inputs(pb, device)
    kwargs = {"scale": pb["scale"], "global_": glob, "normalize": pb["normalize"]}
    ref_maps, ref_stats = loc.reference_localization(grid.double(), prompts.double(), pb["mode"], **{
        **kwargs, "global_": None if glob is None else glob.double()})  # fmt: skip
    maps, stats = fn(grid, prompts, pb["mode"], **kwargs)
    assert maps.shape == (pb["b"], pb["p"], pb["g"], pb["g"]) and maps.dtype == torch.float32
    if pb["normalize"]:
        # Maps whose span is ~0 (a 1x1 grid) normalise to -1 by convention, as the reference.
        span = (ref_stats.hi - ref_stats.lo)[..., None, None]
        ok = (span > 1e-3).expand_as(maps)
        torch.testing.assert_close(maps.double()[ok], ref_maps[ok], rtol=tol, atol=tol * 10)
    else:
        torch.testing.assert_close(maps.double(), ref_maps, rtol=tol, atol=tol)
    torch.testing.assert_close(stats.lo.double(), ref_stats.lo, rtol=tol, atol=tol)
    torch.testing.assert_close(stats.hi.double(), ref_stats.hi, rtol=tol, atol=tol)
    if glob is None:
        assert stats.scores is None
    else:
        torch.testing.assert_close(stats.scores.double(), ref_stats.scores, rtol=tol, atol=tol)


@FAST
@given(localization_problems())
def test_torch_localization_matches_reference(pb):
    _check_localization(loc.torch_localization, pb, torch.device("cpu"), 1e-5)


@needs_triton
@FAST
@given(localization_problems())
def test_triton_localization_matches_reference(pb):
    _fresh_process_only()
    _check_localization(loc.triton_localization, pb, DEVICE, 1e-5)


def test_minmax_from_stats_matches_engine_rule():
    gen = torch.Generator().manual_seed(0)
    grid, prompts = torch.randn(2, 6, 4, 4, generator=gen), torch.randn(3, 6, generator=gen)
    maps, stats = loc.torch_localization(grid, prompts)
    flat = maps.flatten(2)
    lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    expected = (maps - lo) / (hi - lo).clamp(min=1e-12) * 2 - 1
    torch.testing.assert_close(loc.minmax_signed(maps, stats), expected)
    torch.testing.assert_close(loc.torch_localization(grid, prompts, normalize=True)[0], expected)


# ------------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_picks_torch_on_cpu_and_honours_the_flag(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(x) == "torch"
    assert dispatch.resolve_backend(x, "reference") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve_backend(x) == "reference"
    assert dispatch.resolve_backend(x, "torch") == "torch"  # the argument wins over the environment
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.resolve_backend(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(RuntimeError, match="CUDA"):
        dispatch.resolve_backend(x, "triton")


def test_dispatch_reference_flag_routes_to_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(la, "reference_local_similarity", lambda *a, **k: calls.append("local") or torch.zeros(1))
    monkeypatch.setattr(loc, "reference_localization", lambda *a, **k: calls.append("loc") or (None, None))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    dispatch.local_similarity(torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool))
    dispatch.localization_maps(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2))
    assert calls == ["local", "loc"]


def test_dispatch_default_paths_agree_with_reference(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    gen = torch.Generator().manual_seed(1)
    regions, units = torch.randn(3, 8, 10, generator=gen), torch.randn(3, 4, 8, generator=gen)
    mask = torch.tensor([[True] * 4, [True, False, False, False], [True, True, True, False]])
    torch.testing.assert_close(
        dispatch.local_similarity(regions, units, mask), la.reference_local_similarity(regions, units, mask)
    )
    grid, prompts = torch.randn(2, 8, 5, 5, generator=gen), torch.randn(2, 8, generator=gen)
    maps, _ = dispatch.localization_maps(grid, prompts, "cosine")
    torch.testing.assert_close(maps, loc.reference_localization(grid, prompts, "cosine")[0])


# ------------------------------------------------------------------------------------------------
# CPU fast path


def _randomise_batch_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial eval statistics, so folding has something to fold."""
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            bn.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            bn.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def test_cpu_fast_encoder_heatmaps_match_fp32():
    """Heat maps (smoothed, upsampled, min-max to [-1, 1]) of the fast encoder vs the fp32 eager one.

    Tolerances on the [-1, 1] maps: folded fp32 within 1e-4 (max abs); folded bf16
    channels-last within 0.1 max abs and 0.02 mean abs (bf16 has 8 mantissa bits; the
    error builds up over the ResNet's layers). bf16 is only checked where the CPU has it.
    """
    from afloc_cli.config import small_config
    from afloc_cli.image.model.encoder import ImageEncoder
    from afloc_cli.vlp.heatmap import frame_maps, minmax_signed
    from kernels import cpu

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    encoder = ImageEncoder(small_config().image, 32).eval()
    _randomise_batch_norms(encoder, gen)
    x = torch.rand(2, 3, 224, 224, generator=gen) * 2 - 1
    prompts = torch.randn(3, 32, generator=gen)

    def heatmaps(enc) -> torch.Tensor:
        with torch.inference_mode():
            deep = enc(x, ("deep",)).deep.float()
        maps, _ = loc.torch_localization(deep, prompts)
        return torch.from_numpy(minmax_signed(frame_maps(maps, 224)))

    expected = heatmaps(encoder)
    folded = cpu.prepare_encoder(encoder, precision="fp32", channels_last=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())  # the original is untouched
    assert (heatmaps(folded) - expected).abs().max() < 1e-4

    dtype, reason = cpu.resolve_precision("auto")
    if dtype != torch.bfloat16:
        pytest.skip(f"bf16 part not checked: {reason}")
    fast = cpu.prepare_encoder(encoder, precision="bf16", channels_last=True)
    assert fast.dtype == torch.bfloat16
    diff = (heatmaps(fast) - expected).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_precision_falls_back_without_native_bf16(monkeypatch):
    from kernels import cpu

    monkeypatch.setattr(cpu, "cpu_capabilities", lambda: cpu.CpuCapabilities("AVX2", False, False, 2))
    dtype, reason = cpu.resolve_precision("auto")
    assert dtype == torch.float32 and "no native bf16" in reason
    assert cpu.resolve_precision("bf16")[0] == torch.float32
    assert cpu.resolve_precision("fp32") == (torch.float32, "fp32 requested")
    with pytest.raises(ValueError):
        cpu.resolve_precision("fp8")  # type: ignore[arg-type]


def test_fold_needs_batch_norms():
    from afloc_cli.config import small_config
    from afloc_cli.image.model.encoder import ImageEncoder
    from kernels import cpu

    folded = cpu.fold_conv_bn(ImageEncoder(small_config().image, 8))
    with pytest.raises(ValueError, match="no convolution"):
        cpu.fold_conv_bn(folded)


@needs_triton
def test_triton_kernels_in_a_fresh_process():
    """Where this process can no longer run Triton's interpreter, the Triton tests run in a new one."""
    if not _interpreter_spoiled():
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, AFLOC_TRITON_FRESH="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", " or ".join(TRITON_TESTS)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(TRITON_TESTS)} passed" in result.stdout


def test_benchmark_scripts_import_and_parse_arguments():
    """Every benchmarks/*.py starts (imports resolve, --help parses): gpu_check.sh must not meet a stale import."""
    root = Path(__file__).resolve().parents[1]
    scripts = sorted((root / "benchmarks").glob("*.py"))
    assert len(scripts) >= 10
    running = {s.name: subprocess.Popen([sys.executable, str(s), "--help"], cwd=root, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True) for s in scripts}
    for name, proc in running.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-800:]}"
