"""Eager vs compiled image-encoder throughput (images/s) at each batch size.

CPU: eager fp32 vs AOTInductor fp32. CUDA (when present): eager fp32 vs
AOTInductor fp32, and TensorRT fp16 whenever torch_tensorrt imports (the
issue's target: TensorRT fp16 >= 3x eager fp32).

Both sides run the same graph: the image encoder's deep grid and global
embedding from normalised (B, 3, S, S) frames, as `afloc localize` needs them.
Weights are random (throughput does not depend on them).

    .venv/bin/python benchmarks/compile_bench.py --models small --batch-sizes 1,8,64
    .venv/bin/python benchmarks/compile_bench.py --models small,resnet50 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from afloc_cli.compile import aoti
from afloc_cli.compile.export import (
    BatchProfile,
    ExportableImageEncoder,
    example_frames,
    export_image_encoder,
    precision_dtype,
)
from afloc_cli.config import ModelConfig, small_config
from afloc_cli.image.data.transforms import normalize
from afloc_cli.vlp.model import build_model

MODELS: dict[str, Callable[[], ModelConfig]] = {
    "small": small_config,  # ResNet-18 layout, widths 32..256, 224 px, no internal upsampling
    "resnet50": ModelConfig,  # the AFLoc default: ResNet-50, 224 px upsampled to 299 inside
}


def throughput(fn: Callable[[torch.Tensor], object], x: torch.Tensor, seconds: float, sync: bool) -> float:
    """Images per second of `fn(x)`, after one warm-up call, over at least `seconds` (and 3 calls)."""
    with torch.inference_mode():
        fn(x)
        if sync:
            torch.cuda.synchronize()
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < seconds:
            fn(x)
            calls += 1
        if sync:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return x.shape[0] * calls / elapsed


def bench_model(name: str, batch_sizes: list[int], device: torch.device, seconds: float, work: Path) -> list[dict]:
    cfg = MODELS[name]()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    encoder = model.image_encoder.to(device)
    size = cfg.preprocess.image_size
    profile = BatchProfile(min(batch_sizes), sorted(batch_sizes)[len(batch_sizes) // 2], max(batch_sizes))
    eager = ExportableImageEncoder(encoder, input_format="normalized", mean=cfg.preprocess.mean,
                                   std=cfg.preprocess.std, levels=("deep", "global")).eval()
    sync = device.type == "cuda"

    compiled: dict[str, tuple[Callable, float]] = {}
    start = time.perf_counter()
    exported = export_image_encoder(encoder, image_size=size, profile=profile, device=device)
    package = aoti.compile_package(exported.program, work / f"{name}-{device.type}.pt2")
    compiled["aoti fp32"] = (aoti.load_package(package, device), time.perf_counter() - start)
    if device.type == "cuda":
        try:
            from afloc_cli.compile import tensorrt

            start = time.perf_counter()
            exported16 = export_image_encoder(encoder, image_size=size, profile=profile, precision="fp16",
                                              device=device)
            path = tensorrt.build(exported16.program, [(exported16.input_shape, exported16.input_dtype)], profile,
                                  precision_dtype("fp16"), work / f"{name}-trt.ep")
            compiled["tensorrt fp16"] = (tensorrt.load(path, device), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not run
            print(f"tensorrt skipped: {exc}")

    rows = []
    for b in batch_sizes:
        x = normalize(example_frames(b, size, seed=b), cfg.preprocess.mean, cfg.preprocess.std)
        x = x.contiguous().to(device)
        base = throughput(eager, x, seconds, sync)
        for label, (runner, compile_s) in compiled.items():
            fast = throughput(runner, x, seconds, sync)
            rows.append({"model": name, "backend": label, "batch": b, "eager": base, "compiled": fast,
                         "speedup": fast / base, "compile_s": compile_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (torch and OpenMP)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # AOTInductor's CPU kernels use OpenMP
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"# compile_bench: torch {torch.__version__}, device {device.type} ({where})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name.strip(), batch_sizes, device, args.seconds, Path(tmp))
    header = f"| {'model':<9} | {'compiled':<13} | {'batch':>5} | {'eager fp32 img/s':>16} | " \
             f"{'compiled img/s':>14} | {'speedup':>7} | {'compile s':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['model']:<9} | {r['backend']:<13} | {r['batch']:>5} | {r['eager']:>16.1f} | "
              f"{r['compiled']:>14.1f} | {r['speedup']:>6.2f}x | {r['compile_s']:>9.1f} |")


if __name__ == "__main__":
    main()
