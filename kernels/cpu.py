"""CPU fast path for inference: bf16 where the CPU computes it natively, channels-last, folded batch norm.

- bf16 only pays on CPUs with native bf16 dot products (AVX512_BF16 or AMX_BF16);
  elsewhere oneDNN emulates it and fp32 is faster, so "auto" falls back to fp32
  and says why.
- Channels-last is the layout oneDNN's convolutions run in; NCHW inputs are
  reordered at every layer otherwise.
- Folding each batch norm into the convolution before it (eval statistics) drops
  one full read and write of every activation map.
- torch.compile: on this project's ResNet-50 (bf16, channels-last, folded) it gave
  about +15% images/s on an AVX512_BF16 CPU, for ~20 s of compilation with a warm
  Inductor cache (minutes cold). It pays only over thousands of images, so
  `compile="auto"` compiles only when the caller expects at least
  COMPILE_MIN_IMAGES images (re-measure with benchmarks/kernels_bench.py --compile).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers.models.resnet.modeling_resnet import ResNetConvLayer, ResNetShortCut

from afloc_cli.config import ImageConfig
from afloc_cli.image.model.encoder import LEVELS, ImageEncoder, ImageFeatures

Precision = Literal["auto", "bf16", "fp32"]
COMPILE_MIN_IMAGES = 5000  # break-even of ~20-60 s compile at ~15 ms saved per ResNet-50 image


@dataclass(frozen=True)
class CpuCapabilities:
    isa: str  # torch's dispatch level, e.g. "AVX2", "AVX512"
    avx512_bf16: bool
    amx_bf16: bool
    usable_cores: int

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_capabilities() -> CpuCapabilities:
    """What this CPU offers, from /proc/cpuinfo, with torch's own ISA level as the fallback."""
    isa = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    amx = "amx_bf16" in flags or (not flags and "AMX" in isa.upper())
    avx512_bf16 = "avx512_bf16" in flags or amx
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return CpuCapabilities(isa=isa, avx512_bf16=avx512_bf16, amx_bf16=amx, usable_cores=cores)


def resolve_precision(precision: Precision = "auto") -> tuple[torch.dtype, str]:
    """The dtype to run in and why: bf16 only where the CPU has native bf16 and oneDNN can use it."""
    if precision == "fp32":
        return torch.float32, "fp32 requested"
    if precision not in ("auto", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; expected auto, bf16 or fp32")
    caps = cpu_capabilities()
    if not caps.native_bf16:
        return torch.float32, f"no native bf16 on this CPU (ISA {caps.isa}); running fp32"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32, "oneDNN bf16 unavailable in this torch build; running fp32"
    kind = "AMX" if caps.amx_bf16 else "AVX512_BF16"
    return torch.bfloat16, f"native bf16 ({kind})"


def configure_threads(num_threads: int | None = None) -> int:
    """One intra-op thread per usable core (the affinity mask, not the machine), one inter-op thread."""
    n = num_threads or cpu_capabilities().usable_cores
    torch.set_num_threads(n)
    # Raises once set or once parallel work has started: then keep what is there.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def _denormals_flushed() -> bool:
    """Whether the FPU flushes subnormals now (torch has a setter but no getter)."""
    return float(torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item()) == 0.0


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero for the block, then restore the previous mode.

    Subnormals made CPU training step times swing about 3x in our measurements;
    the mode is process-global FPU state, so it is scoped rather than left on for
    whatever the process runs next (it breaks code that needs IEEE subnormals).
    """
    was = _denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def fold_conv_bn(encoder: ImageEncoder) -> ImageEncoder:
    """A copy of the encoder in eval mode with every batch norm folded into its convolution.

    Each `ResNetConvLayer` and `ResNetShortCut` of the transformers ResNet holds
    `.convolution` then `.normalization`; the fold uses the running statistics,
    so the copy is for inference only. The original is left untouched.
    """
    folded = copy.deepcopy(encoder).eval()
    count = 0
    for module in folded.modules():
        if isinstance(module, (ResNetConvLayer, ResNetShortCut)) and isinstance(module.normalization, nn.BatchNorm2d):
            module.convolution = fuse_conv_bn_eval(module.convolution, module.normalization)
            module.normalization = nn.Identity()
            count += 1
    if count == 0:
        raise ValueError("no convolution + batch-norm pairs found to fold")
    return folded


class FastImageEncoder(nn.Module):
    """An inference-only image encoder: folded, channels-last, bf16 where native; float32 features out."""

    def __init__(self, encoder: ImageEncoder, dtype: torch.dtype, channels_last: bool, reason: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.dtype = dtype
        self.channels_last = channels_last
        self.reason = reason
        self._forward = encoder.forward

    @property
    def cfg(self) -> ImageConfig:
        return self.encoder.cfg

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def with_compile(self, **kwargs: Any) -> FastImageEncoder:
        """Route forward through torch.compile (worth it only where the benchmark says so)."""
        self._forward = torch.compile(self.encoder, **kwargs)
        return self

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, levels: Collection[str] = LEVELS) -> ImageFeatures:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self._forward(x, tuple(levels))
        return ImageFeatures(
            shallow=None if f.shallow is None else f.shallow.float(),
            deep=None if f.deep is None else f.deep.float(),
            global_=None if f.global_ is None else f.global_.float(),
        )


def prepare_encoder(
    encoder: ImageEncoder,
    *,
    precision: Precision = "auto",
    channels_last: bool = True,
    fold: bool = True,
    compile: bool | Literal["auto"] = False,
    expected_images: int = 0,
) -> FastImageEncoder:
    """A fast inference copy of `encoder` for the CPU (the original is not modified).

    compile="auto" compiles when expected_images >= COMPILE_MIN_IMAGES.
    """
    dtype, reason = resolve_precision(precision)
    model = fold_conv_bn(encoder) if fold else copy.deepcopy(encoder).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    fast = FastImageEncoder(model, dtype, channels_last, reason)
    if compile == "auto":
        compile = expected_images >= COMPILE_MIN_IMAGES
    return fast.with_compile() if compile else fast


__all__ = [
    "COMPILE_MIN_IMAGES",
    "CpuCapabilities",
    "FastImageEncoder",
    "configure_threads",
    "cpu_capabilities",
    "fold_conv_bn",
    "prepare_encoder",
    "resolve_precision",
]
