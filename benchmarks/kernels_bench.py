"""Kernel and encoder throughput as ratios measured in one run, against this machine's own ceiling.

    python benchmarks/kernels_bench.py [--quick] [--compile] [--json out.json]

Sections (one table at the end):
- machine ceiling: large fp32 and bf16 matmul FLOP/s, memory bandwidth from a large copy;
- image encoder (ResNet-50, 224 input upsampled to 299 inside as the reference):
  images/s and the fraction of the matmul ceiling, FLOPs per image counted with
  torch.utils.flop_counter for this input size; eager fp32 vs the fast path;
- localize end to end (uint8 frames -> heat maps in the 224 frame), fast vs eager fp32;
- fused localization (maps + min/max + min-max + image scores) vs the naive torch
  composition, and its bandwidth as a fraction of the copy bandwidth;
- local alignment (GLoRIA local scores + symmetric CE, forward + backward), fused vs
  naive, time and peak memory: on the CPU the sentence level at B = 32, 64 and the
  word level at B = 32 (and 64 without --quick); on CUDA the word level at B = 32,
  64 (and 128 without --quick) and the sentence level at 128. On the CPU each case
  runs in its own process and peak memory is the peak RSS (reset just before the
  step) minus the RSS before it; on CUDA it is max_memory_allocated above the inputs.
Timings are the minimum over repetitions (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from afloc_cli.config import ImageConfig  # noqa: E402
from afloc_cli.image.data.transforms import normalize  # noqa: E402
from afloc_cli.image.model.encoder import ImageEncoder  # noqa: E402
from afloc_cli.vlp.heatmap import frame_maps  # noqa: E402
from kernels import cpu, dispatch  # noqa: E402
from kernels import local_alignment as la  # noqa: E402
from kernels.localization import reference_localization  # noqa: E402

LEVELS = {  # (units T, regions M, dim d) of the two local levels at the reference sizes
    "sentences": (12, 19 * 19, 768),
    "words": (97, 38 * 38, 768),
}


@dataclass
class Row:
    section: str
    name: str
    value: str
    ratio: str = ""
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, reps: int, min_time: float = 0.0) -> float:
    """Minimum seconds per call over `reps` calls (at least `min_time` in all), after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    start = time.perf_counter()
    n = 0
    while n < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def timeit_many(fns: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, float]:
    """Like timeit for several candidates, interleaved round-robin so that load changes hit all alike."""
    for fn in fns.values():
        fn()
        _sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB/s"


def _tflops(x: float) -> str:
    return f"{x / 1e12:.3f} TFLOP/s"


def machine(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    else:
        caps = cpu.cpu_capabilities()
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
                model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        parts.insert(0, f"{model}, {torch.get_num_threads()} threads, ISA {caps.isa}, "
                        f"native bf16: {caps.native_bf16}, AMX: {caps.amx_bf16}")  # fmt: skip
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        parts.append(f"load average {load:.1f}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------


def ceiling(device: torch.device, quick: bool, rows: list[Row]) -> dict[str, float]:
    # Best of several large products: the ceiling must not be understated by one disturbed call.
    n = (8192 if not quick else 4096) if device.type == "cuda" else 3072
    reps = 4 if quick else 8
    peaks: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = timeit(lambda a=a, b=b: a @ b, device, reps)
        peaks[name] = 2 * n**3 / t
        rows.append(Row("ceiling", f"matmul {name} {n}^3", _tflops(peaks[name])))
    size = 1 << 28 if device.type == "cuda" else 1 << 26  # floats: 1 GiB / 256 MiB, far beyond the caches
    x = torch.empty(size, device=device).normal_()
    y = torch.empty_like(x)
    t = timeit(lambda x=x, y=y: y.copy_(x), device, reps)
    peaks["bandwidth"] = 2 * x.numel() * 4 / t
    rows.append(Row("ceiling", f"copy {x.numel() * 4 >> 20} MiB (read + write)", _gb(peaks["bandwidth"])))
    del x, y
    return peaks


def flops_per_image(encoder: ImageEncoder, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder.cpu().float()(x)
    return float(counter.get_total_flops())


def encoder_section(device: torch.device, quick: bool, use_compile: bool, peaks: dict[str, float],
                    rows: list[Row]) -> None:  # fmt: skip
    size = 224
    cfg = ImageConfig(arch="resnet50")  # reference: 224 letterbox, upsampled to 299 inside
    torch.manual_seed(0)
    encoder = ImageEncoder(cfg, 768).eval()
    flops = flops_per_image(encoder, size)
    rows.append(Row("encoder", f"ResNet-50 FLOPs/image at {size} (-> {cfg.internal_size})", f"{flops / 1e9:.2f} GFLOP"))
    batch = (64 if not quick else 32) if device.type == "cuda" else (4 if quick else 8)
    reps = 2 if quick else 4
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    eager = encoder.to(device)
    variants: list[tuple[str, Callable[[torch.Tensor], object], str]] = []
    variants.append(("eager fp32", lambda x: eager(x), "fp32"))
    fold32 = cpu.prepare_encoder(eager, precision="fp32", channels_last=True)
    variants.append(("folded + channels-last fp32", fold32, "fp32"))
    if device.type == "cuda":
        fast = cpu.FastImageEncoder(
            cpu.fold_conv_bn(eager).to(memory_format=torch.channels_last).to(torch.bfloat16),
            torch.bfloat16, True, "cuda bf16",
        )  # fmt: skip
        variants.append(("folded + channels-last bf16", fast, "bf16"))
    else:
        dtype, reason = cpu.resolve_precision("auto")
        if dtype == torch.bfloat16:
            fast = cpu.prepare_encoder(eager, precision="bf16", channels_last=True)
            variants.append(("folded + channels-last bf16", fast, "bf16"))
        else:
            rows.append(Row("encoder", "bf16", "skipped", note=reason))
    if use_compile:
        name, best, kind = variants[-1]
        assert isinstance(best, cpu.FastImageEncoder)
        compiled = cpu.FastImageEncoder(best.encoder, best.dtype, True, best.reason).with_compile()
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        _sync(device)
        rows.append(Row("encoder", f"torch.compile of the {kind} fast encoder", f"{time.perf_counter() - t0:.0f} s",
                        note="first call (compilation), not in the timings below"))  # fmt: skip
        variants.append((f"{name} + torch.compile", compiled, kind))
    with torch.inference_mode():
        times = timeit_many({name: (lambda fn=fn: fn(x)) for name, fn, _ in variants}, device, reps)
    base = None
    for name, _, kind in variants:
        ips = batch / times[name]
        base = base or ips
        achieved = ips * flops
        rows.append(Row("encoder", f"{name}, batch {batch}", f"{ips:.1f} img/s",
                        f"{ips / base:.2f}x eager; {achieved / peaks[kind]:.0%} of {kind} matmul peak",
                        "target >= 60% of bf16 peak" if kind == "bf16" else ""))  # fmt: skip


def localize_section(device: torch.device, quick: bool, rows: list[Row]) -> None:
    """uint8 frames -> heat maps in the 224 frame, P prompts: the inference hot path."""
    size, n_prompts = 224, 4
    batch = 32 if device.type == "cuda" else (4 if quick else 8)
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageConfig(arch="resnet50"), 768).eval().to(device)
    frames = torch.randint(0, 256, (batch, size, size), dtype=torch.uint8, device=device)
    prompts = torch.randn(n_prompts, 768, device=device)

    def eager() -> torch.Tensor:
        with torch.inference_mode():
            f = encoder(normalize(frames).contiguous(), ("deep", "global"))
            return frame_maps(reference_localization(f.deep.float(), prompts, "dot")[0], size)

    if device.type == "cuda":
        fast_enc = cpu.FastImageEncoder(
            cpu.fold_conv_bn(encoder).to(memory_format=torch.channels_last).to(torch.bfloat16),
            torch.bfloat16, True, "cuda bf16",
        )  # fmt: skip
    else:
        fast_enc = cpu.prepare_encoder(encoder, precision="auto", channels_last=True)

    def fast() -> torch.Tensor:
        with torch.inference_mode():
            f = fast_enc(normalize(frames), ("deep", "global"))
            maps, _ = dispatch.localization_maps(f.deep, prompts, "dot", global_=f.global_)
            return frame_maps(maps, size)

    reps = 2 if quick else 4
    times = timeit_many({"eager": eager, "fast": fast}, device, reps)
    t_eager, t_fast = times["eager"], times["fast"]
    label = "bf16" if fast_enc.dtype == torch.bfloat16 else "fp32"
    name = f"end to end, eager fp32, batch {batch}, {n_prompts} prompts"
    rows.append(Row("localize", name, f"{batch / t_eager:.1f} img/s"))
    rows.append(Row("localize", f"end to end, fast {label}", f"{batch / t_fast:.1f} img/s",
                    f"{t_eager / t_fast:.2f}x eager fp32", "target >= 2x"))  # fmt: skip


def naive_localization(grid: torch.Tensor, prompts: torch.Tensor, mode: str, global_: torch.Tensor) -> tuple:
    """The composition the engine used before kernels/: einsum, separate min/max, min-max, scores."""
    maps, _ = reference_localization(grid.float(), prompts, mode)  # einsum (cosine: normalised copies)
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values.unsqueeze(-1)
    hi = flat.max(-1, keepdim=True).values.unsqueeze(-1)
    out = (maps - lo) / (hi - lo).clamp(min=1e-12) * 2 - 1
    scores = F.normalize(global_.float(), dim=1) @ F.normalize(prompts, dim=1).T
    return out, scores


def localization_section(device: torch.device, quick: bool, peaks: dict[str, float], rows: list[Row]) -> None:
    batch = 256 if device.type == "cuda" else 64
    n_prompts, dim, g = 8, 768, 19
    reps = 5 if quick else 10
    torch.manual_seed(0)
    prompts = torch.randn(n_prompts, dim, device=device)
    glob = torch.randn(batch, dim, device=device)
    backend = dispatch.resolve_backend(prompts)
    for layout in ("channels-last", "NCHW"):
        grid = torch.randn(batch, dim, g, g, device=device)
        if layout == "channels-last":
            grid = grid.contiguous(memory_format=torch.channels_last)
        for mode in ("dot", "cosine"):
            times = timeit_many({
                "naive": lambda grid=grid, mode=mode: naive_localization(grid, prompts, mode, glob),
                "fast": lambda grid=grid, mode=mode: dispatch.localization_maps(
                    grid, prompts, mode, global_=glob, normalize=True),
            }, device, reps)  # fmt: skip
            t_naive, t_fast = times["naive"], times["fast"]
            bw = grid.numel() * grid.element_size() / t_fast
            target = "target >= 3x (CPU)" if device.type == "cpu" else "target >= 70% of HBM bandwidth"
            rows.append(Row("localization", f"{backend} {mode}, {layout} ({batch}x{dim}x{g}x{g}, P={n_prompts})",
                            f"{t_fast * 1e3:.2f} ms",
                            f"{t_naive / t_fast:.2f}x naive; {bw / peaks['bandwidth']:.0%} of copy bandwidth",
                            target))  # fmt: skip


def _alignment_inputs(b: int, level: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    n_units, n_reg, dim = LEVELS[level]
    gen = torch.Generator().manual_seed(0)
    regions = torch.randn(b, dim, n_reg, generator=gen).to(device).requires_grad_()
    units = torch.randn(b, n_units, dim, generator=gen).to(device).requires_grad_()
    lengths = torch.randint(2, n_units + 1, (b,), generator=gen)
    mask = (torch.arange(n_units)[None, :] < lengths[:, None]).to(device)
    return regions, units, mask


def _alignment_step(impl: str, regions: torch.Tensor, units: torch.Tensor, mask: torch.Tensor) -> None:
    if impl == "naive":
        scores = la.reference_local_similarity(regions, units, mask)
    else:
        scores = dispatch.local_similarity(regions, units, mask)
    labels = torch.arange(scores.shape[0], device=scores.device)
    loss = F.cross_entropy(10 * scores, labels) + F.cross_entropy(10 * scores.T, labels)
    loss.backward()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux clear_refs 5) and return the current RSS.

    ru_maxrss would not do: Linux carries it across exec, so a worker would inherit
    the parent benchmark's peak.
    """
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    return _proc_status_bytes("VmRSS")


def alignment_worker(impl: str, b: int, level: str, reps: int) -> dict[str, float]:
    """One case in this process (CPU): peak-RSS growth of one step, then the step's best time."""
    device = torch.device("cpu")
    regions, units, mask = _alignment_inputs(b, level, device)
    before = _reset_peak_rss()
    t0 = time.perf_counter()
    _alignment_step(impl, regions, units, mask)
    first = time.perf_counter() - t0
    peak = _proc_status_bytes("VmHWM") - before
    best = first
    for _ in range(reps - 1):
        regions.grad = units.grad = None
        t0 = time.perf_counter()
        _alignment_step(impl, regions, units, mask)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "peak_bytes": float(peak)}


def _run_case(impl: str, b: int, level: str, device: torch.device, reps: int) -> dict[str, float] | str:
    if device.type == "cuda":
        regions, units, mask = _alignment_inputs(b, level, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            t = timeit(lambda: _alignment_step(impl, regions, units, mask), device, reps)
        except torch.OutOfMemoryError:
            return "out of memory"
        return {"seconds": t, "peak_bytes": float(torch.cuda.max_memory_allocated(device) - base)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, str(b), level, str(reps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return f"failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alignment_cases(device: torch.device, quick: bool) -> list[tuple[str, int, int]]:
    """(level, batch, repetitions): the word level is the one whose attention gets large."""
    if device.type == "cuda":
        sizes = (32, 64) if quick else (32, 64, 128)
        return [("words", b, 3) for b in sizes] + [("sentences", 128, 3)]
    cases = [("sentences", 32, 2), ("sentences", 64, 2), ("words", 32, 1)]
    return cases if quick else [*cases, ("words", 64, 1)]


def alignment_section(device: torch.device, quick: bool, rows: list[Row]) -> None:
    fused_name = dispatch.resolve_backend(torch.zeros(1, device=device))
    for level, b, reps in alignment_cases(device, quick):
        n_units, n_reg, dim = LEVELS[level]
        naive = _run_case("naive", b, level, device, reps)
        fused = _run_case("fused", b, level, device, reps)
        label = f"{level} (T={n_units}, M={n_reg}, d={dim}), B={b}, fwd+bwd"
        if isinstance(fused, str):
            rows.append(Row("local alignment", f"{fused_name} {label}", fused))
            continue
        ratio = note = ""
        if isinstance(naive, str):
            note = f"naive: {naive}"
        else:
            ratio = (f"{naive['seconds'] / fused['seconds']:.2f}x naive speed; "
                     f"{fused['peak_bytes'] / max(naive['peak_bytes'], 1):.2f}x naive memory")  # fmt: skip
            note = f"naive {naive['seconds']:.2f} s, {naive['peak_bytes'] / 2**20:.0f} MiB"
        value = f"{fused['seconds']:.2f} s, {fused['peak_bytes'] / 2**20:.0f} MiB"
        rows.append(Row("local alignment", f"{fused_name} {label}", value, ratio, note))


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def print_table(title: str, rows: list[Row]) -> None:
    headers = ("section", "measurement", "value", "ratio", "note")
    cells = [headers] + [(r.section, r.name, r.value, r.ratio, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    print(title)
    for k, line in enumerate(cells):
        print(" | ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip())
        if k == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the encoder (slow)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per usable core)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, b, level, reps = args.worker
        print(json.dumps(alignment_worker(impl, int(b), level, int(reps))))
        return 0

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    if device.type == "cpu":
        cpu.configure_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rows: list[Row] = []
    extra = os.environ.get("AFLOC_TESTS_SUMMARY")
    if extra:
        rows.append(Row("tests", "tests/test_kernels.py", extra))
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop)  # `timeout` still gets the rows measured so far
    try:
        peaks = ceiling(device, args.quick, rows)
        if "encoder" not in skip:
            encoder_section(device, args.quick, args.compile, peaks, rows)
        if "localize" not in skip:
            localize_section(device, args.quick, rows)
        if "localization" not in skip:
            localization_section(device, args.quick, peaks, rows)
        if "alignment" not in skip:
            alignment_section(device, args.quick, rows)
    except _Stopped:
        rows.append(Row("stopped", "SIGTERM (time limit)", "remaining sections not measured"))
    mode = "quick" if args.quick else "full"
    title = f"kernels_bench ({mode}, {time.perf_counter() - start:.0f} s): {machine(device)}"
    print_table(title, rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device), "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
