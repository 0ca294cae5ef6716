"""Peak memory and time of one forward + backward of the local loss: chunked (train.losses) vs naive.

The naive version is the direct vectorised one that materialises the whole
B × B × T × M attention. Each case runs in a fresh subprocess, and its peak is
that process's ru_maxrss high-water mark minus the value read just before the
step (inputs already built, kernels already warmed up on a tiny problem), so
one case cannot inherit another's allocations. A naive case whose estimated peak
does not fit comfortably in the memory available is not run: its peak is
extrapolated as measured(B0) · (B / B0)² from the largest naive case measured
(its memory is dominated by B²-sized tensors), and the table says so.

Usage: python benchmarks/local_loss_memory.py [--quick] [--batches 32 64 128] [--chunk N] [--threads 2]
The default run is CPU-bound (the chunked B = 128 step alone is about 28 TFLOP):
roughly 10 minutes on two idle cores, 18 when other jobs shared them; --quick
about 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _naive_loss(regions, units, mask, temp1=4.0, temp2=5.0, temp3=10.0):
    """The whole batch at once: every (image, text, unit, region) attention weight is alive together."""
    import torch
    import torch.nn.functional as F

    v = regions.flatten(2)  # (B, d, M)
    s = torch.einsum("jtd,idm->ijtm", units, v).masked_fill(~mask[None, :, :, None], float("-inf"))
    alpha = torch.softmax(temp1 * torch.softmax(s, dim=2), dim=3)  # words, then regions
    ctx = torch.einsum("ijtm,idm->ijtd", alpha, v)
    e = units.unsqueeze(0)
    cos = (ctx * e).sum(-1) / (ctx.norm(dim=-1) * e.norm(dim=-1)).clamp_min(1e-8)
    r = (temp2 * cos).masked_fill(~mask[None], float("-inf")).logsumexp(dim=2)
    labels = torch.arange(r.shape[0])
    return F.cross_entropy(temp3 * r, labels) + F.cross_entropy(temp3 * r.t(), labels)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(impl: str, b: int, t: int, h: int, w: int, d: int, chunk: int | None, threads: int, cap: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from train.losses import default_chunk_size, local_loss

    torch.set_num_threads(threads)
    fn = _naive_loss if impl == "naive" else (lambda r, u, m: local_loss(r, u, m, chunk_size=chunk))

    # Warm up kernels and lazily loaded libraries on a tiny problem so the baseline already holds them.
    r0 = torch.randn(2, 8, 3, 3, requires_grad=True)
    u0 = torch.randn(2, 4, 8, requires_grad=True)
    fn(r0, u0, torch.ones(2, 4, dtype=torch.bool)).backward()

    g = torch.Generator().manual_seed(0)
    regions = torch.randn(b, d, h, w, generator=g).requires_grad_(True)
    units = torch.randn(b, t, d, generator=g).requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.bool)  # every unit real: the worst case for memory
    if cap:  # refuse to grow past the cap rather than push a shared machine into swap or the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + cap, resource.RLIM_INFINITY))
    base = _maxrss_bytes()
    start = time.perf_counter()
    try:
        loss = fn(regions, units, mask)
        loss.backward()
    except (RuntimeError, MemoryError) as err:
        return {"ok": False, "error": str(err).splitlines()[0][:200]}
    seconds = time.perf_counter() - start
    used_chunk = chunk or default_chunk_size(b, b, t, h * w)
    return {"ok": True, "peak": _maxrss_bytes() - base, "seconds": seconds, "loss": float(loss),
            "chunk": b if impl == "naive" else used_chunk}


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _run_case(impl: str, b: int, args: argparse.Namespace, cap: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(b), str(args.units), str(args.grid), str(args.grid),
           str(args.dim), str(args.chunk or 0), str(args.threads), str(cap)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _naive_tensor_floor(b: int, t: int, m: int, d: int) -> int:
    """Bytes the naive backward must keep at once: the two softmax outputs (B²TM each) and ctx (B²Td), fp32."""
    return 4 * (2 * b * b * t * m + b * b * t * d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batches 8 16 32 (about a minute)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--units", type=int, default=97, help="T: text units (97 words)")
    parser.add_argument("--grid", type=int, default=38, help="regions grid side (38 → M = 1444)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--chunk", type=int, default=None, help="texts per chunk (default: the loss's default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    batches = args.batches or ([8, 16, 32] if args.quick else [32, 64, 128])
    t, m, d = args.units, args.grid * args.grid, args.dim

    import torch

    avail = _mem_available()
    print(f"# local loss, forward + backward, fp32 on CPU: T={t} units (all real), M={args.grid}x{args.grid}={m} "
          f"regions, d={d}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, MemAvailable {avail / GIB:.1f} GiB at start")
    print("# peak = ru_maxrss of a fresh subprocess minus its value just before the step (inputs built)")
    cap = int(0.6 * avail)
    started = time.perf_counter()
    rows = []
    naive_ref: tuple[int, int] | None = None  # (B, measured peak) of the largest naive case that ran
    for b in batches:
        chunked = _run_case("chunked", b, args, 0)
        floor = _naive_tensor_floor(b, t, m, d)
        guess = naive_ref[1] * (b / naive_ref[0]) ** 2 if naive_ref else 2.5 * floor
        if guess < cap:
            naive = _run_case("naive", b, args, cap)
        else:
            naive = {"ok": False, "error": f"not run: estimated {guess / GIB:.1f} GiB > cap {cap / GIB:.1f} GiB"}
        if naive["ok"]:
            naive_ref = (b, naive["peak"])
            naive_peak, how = naive["peak"], "measured"
        elif naive_ref:
            naive_peak, how = int(naive_ref[1] * (b / naive_ref[0]) ** 2), f"extrapolated from B={naive_ref[0]}"
        else:
            naive_peak, how = floor, "tensor-size floor"
        rows.append((b, chunked, naive, naive_peak, how, floor))
        print(f"# B={b} done: chunked {chunked}, naive {naive}", flush=True)

    print()
    print("| B | chunk | chunked peak GiB | chunked s/step | naive peak GiB | naive | naive s/step "
          "| naive floor GiB | chunked / naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, chunked, naive, naive_peak, how, floor in rows:
        if not chunked["ok"]:
            print(f"| {b} | - | failed: {chunked['error']} | | | | | | |")
            continue
        naive_s = f"{naive['seconds']:.1f}" if naive["ok"] else "-"
        print(f"| {b} | {chunked['chunk']} | {chunked['peak'] / GIB:.2f} | {chunked['seconds']:.1f} | "
              f"{naive_peak / GIB:.2f} | {how} | {naive_s} | {floor / GIB:.2f} | {chunked['peak'] / naive_peak:.3f} |")
    same = [(r[1]["loss"], r[2]["loss"]) for r in rows if r[1]["ok"] and r[2]["ok"]]
    if same:
        print("\nloss chunked vs naive where both ran: " + ", ".join(f"{a:.6f} / {b:.6f}" for a, b in same))
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, b, t, h, w, d, chunk, threads, cap = sys.argv[2], *map(int, sys.argv[3:11])
        print(json.dumps(_child(impl, b, t, h, w, d, chunk or None, threads, cap)))
    else:
        main()
