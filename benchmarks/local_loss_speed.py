"""One forward + backward of the local similarity: naive, the torch path in fp32, and with a bf16 context product.

Shapes are the CPU demo recipe's (batch 16, 160 px, small preset, frozen MiniLM,
whole reports): the word level aligns up to 64 word slots (about 45 real) with
the 20 x 20 shallow grid, the sentence level up to 12 sentence slots with the
10 x 10 deep grid, d = 384; and the same at batch 32. The naive path is
`reference_local_similarity` (everything materialised, plain autograd). The
bf16 column is what `precision=bf16` training runs on the CPU
(`matmul_dtype=torch.bfloat16`: the context product alpha·v in bf16, the
similarities and softmaxes in fp32); its error against fp32 is printed beside it.

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

CASES = {  # name -> (batch, unit slots, real units, regions, d)
    "word, B=16": (16, 64, 45, 400, 384),
    "sentence, B=16": (16, 12, 8, 100, 384),
    "word, B=32": (32, 64, 45, 400, 384),
}


def _problem(batch: int, slots: int, real: int, regions: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, dim, regions, generator=gen)
    e = torch.randn(batch, slots, dim, generator=gen)
    lengths = torch.randint(max(1, real - 10), min(slots, real + 10) + 1, (batch,), generator=gen)
    mask = torch.arange(slots)[None, :] < lengths[:, None]
    return v, e, mask


def _step(fn, v: torch.Tensor, e: torch.Tensor, mask: torch.Tensor, **kwargs) -> tuple[float, torch.Tensor]:
    """Seconds for forward + backward of the contrastive loss on R (regions need gradients; text is frozen)."""
    x = v.detach().clone().requires_grad_()
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
    print(f"{'case':16} " + " ".join(f"{name:>20}" for name in paths) + "   fp32/bf16  naive/bf16  max|dR| bf16")
    for case, shape in CASES.items():
        v, e, mask = _problem(*shape)
        best: dict[str, float] = {}
        values: dict[str, torch.Tensor] = {}
        for name, (fn, kwargs) in paths.items():
            _step(fn, v, e, mask, **kwargs)
            times = []
            for _ in range(args.repeats):
                seconds, values[name] = _step(fn, v, e, mask, **kwargs)
                times.append(seconds)
            best[name] = min(times)
        err = float((values["torch bf16 context"] - values["torch fp32"]).abs().max())
        print(f"{case:16} " + " ".join(f"{best[n] * 1e3:17.1f} ms" for n in paths)
              + f"   {best['torch fp32'] / best['torch bf16 context']:9.2f}"
              + f"  {best['naive'] / best['torch bf16 context']:10.2f}  {err:12.4f}")


if __name__ == "__main__":
    main()
