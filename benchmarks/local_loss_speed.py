"""One forward + backward of the local similarity: naive, the torch path in fp32, with a bf16 context product,
and factored (the torch path in fp32 given the features before the 1x1 embedder, as training calls it).

Shapes are the CPU demo recipe's (batch 16, 160 px, small preset, frozen MiniLM,
whole reports): the word level aligns up to 64 word slots (about 45 real) with
the 20 x 20 shallow grid, the sentence level up to 12 sentence slots with the
10 x 10 deep grid, d = 384; and the same at batch 32. The naive path is
`reference_local_similarity` (everything materialised, plain autograd). The
bf16 column is what `precision=bf16` training runs on the CPU
(`matmul_dtype=torch.bfloat16`: the context product alpha·v in bf16, the
similarities and softmaxes in fp32); its error against fp32 is printed beside it.
The factored column is what training runs since the embedders are folded into
the texts (`projection=`: the small preset's 64 layer2 and 128 layer3 channels
against d = 384); `fp32/fact` is its speed-up over the torch fp32 column on the
same embedded regions, and `|dR| fact` their largest difference.

    .venv/bin/python benchmarks/local_loss_speed.py            # ~1 min on two idle cores
    .venv/bin/python benchmarks/local_loss_speed.py --repeats 3

Results: benchmarks/RESULTS.md ("Local loss speed").
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from kernels import local_alignment as la
from kernels.cpu import cpu_capabilities

CASES = {  # name -> (batch, unit slots, real units, regions, d, channels before the embedder)
    "word, B=16": (16, 64, 45, 400, 384, 64),
    "sentence, B=16": (16, 12, 8, 100, 384, 128),
    "word, B=32": (32, 64, 45, 400, 384, 64),
}


def _problem(batch: int, slots: int, real: int, regions: int, dim: int, channels: int, seed: int = 0):
    """Features h (B, c, M), embedder W (d, c), the embedded regions W h, units and their mask."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, channels, regions, generator=gen)
    w = torch.randn(dim, channels, generator=gen) / channels**0.5
    e = torch.randn(batch, slots, dim, generator=gen)
    lengths = torch.randint(max(1, real - 10), min(slots, real + 10) + 1, (batch,), generator=gen)
    mask = torch.arange(slots)[None, :] < lengths[:, None]
    return h, w, torch.matmul(w, h), e, mask


def _step(fn, v: torch.Tensor, e: torch.Tensor, mask: torch.Tensor, **kwargs) -> tuple[float, torch.Tensor]:
    """Seconds for forward + backward of the contrastive loss on R (regions need gradients; text is frozen)."""
    x = v.detach().clone().requires_grad_()
    if "projection" in kwargs:
        kwargs = {**kwargs, "projection": kwargs["projection"].detach().clone().requires_grad_()}
    start = time.perf_counter()
    r = fn(x, e, mask, 4.0, 5.0, **kwargs)
    labels = torch.arange(r.shape[0])
    loss = torch.nn.functional.cross_entropy(10 * r, labels) + torch.nn.functional.cross_entropy(10 * r.t(), labels)
    loss.backward()
    return time.perf_counter() - start, r.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per path (best kept), after one warm-up")
    args = ap.parse_args()
    caps = cpu_capabilities()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, native bf16: {caps.native_bf16}")
    paths = {
        "naive": (la.reference_local_similarity, {}),
        "torch fp32": (la.torch_local_similarity, {}),
        "torch bf16 context": (la.torch_local_similarity, {"matmul_dtype": torch.bfloat16}),
    }
    names = [*paths, "factored fp32"]
    print(f"{'case':16} " + " ".join(f"{name:>20}" for name in names)
          + "   fp32/bf16  naive/bf16  max|dR| bf16  fp32/fact  max|dR| fact")
    for case, shape in CASES.items():
        h, w, v, e, mask = _problem(*shape)
        runs = {name: (fn, v, kwargs) for name, (fn, kwargs) in paths.items()}
        runs["factored fp32"] = (la.torch_local_similarity, h, {"projection": w})
        best: dict[str, float] = {}
        values: dict[str, torch.Tensor] = {}
        for name, (fn, regions, kwargs) in runs.items():
            _step(fn, regions, e, mask, **kwargs)
            times = []
            for _ in range(args.repeats):
                seconds, values[name] = _step(fn, regions, e, mask, **kwargs)
                times.append(seconds)
            best[name] = min(times)
        err = float((values["torch bf16 context"] - values["torch fp32"]).abs().max())
        err_fact = float((values["factored fp32"] - values["torch fp32"]).abs().max())
        print(f"{case:16} " + " ".join(f"{best[n] * 1e3:17.1f} ms" for n in names)
              + f"   {best['torch fp32'] / best['torch bf16 context']:9.2f}"
              + f"  {best['naive'] / best['torch bf16 context']:10.2f}  {err:12.4f}"
              + f"  {best['torch fp32'] / best['factored fp32']:9.2f}  {err_fact:12.2e}")


if __name__ == "__main__":
    main()
