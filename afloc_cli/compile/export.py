"""Everything both backends share, up to the `torch.export` ExportedProgram.

TensorRT and AOTInductor start from the same graphs, so what a compiled engine
means (its inputs, outputs, batch range and precision) is decided once, here.

Image encoder, preprocessing contract
-------------------------------------
The input is the letterboxed square frame of `afloc localize` (PreprocessConfig:
long side to S with INTER_AREA, short side zero-padded and centred), in one of
two forms chosen at compile time:

- ``normalized`` (default): float32 ``(B, 3, S, S)``, ``(x/255 - mean)/std`` with
  the grey channel repeated three times. This is exactly what
  `LocalizationEngine` hands to `model.encode_images`, so an engine in this form
  drops into the existing pipeline.
- ``uint8``: the raw 8-bit frames ``(B, S, S)``. The normalisation above is part
  of the compiled graph, so a deployment ships 12x fewer bytes to the device and
  cannot get the constants wrong.

Outputs are float32 whatever the compute precision, in a fixed order:
``shallow`` (only when asked), ``deep`` ``(B, d, g, g)`` and ``global`` ``(B, d)``.
The batch dimension is dynamic within the profile; S is static.

Text encoder
------------
The compiled graph stops at the BERT hidden states summed over the last
`last_n_layers` layers, ``(B, L, d)`` float32 with L = `max_length`. Word,
sentence and report pooling stay in Python (`TextEncoder.forward`), so the
compiled and eager paths pool with the very same code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from afloc_cli.errors import AflocError
from afloc_cli.image.model.encoder import ImageEncoder, grid_sizes
from afloc_cli.text.model.encoder import TextEncoder

Precision = Literal["fp32", "fp16", "bf16"]
InputFormat = Literal["normalized", "uint8"]

PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INPUT_FORMATS = ("normalized", "uint8")
# encode_prompts batches prompts by 64; the compiled text encoder covers 1..64.
TEXT_MAX_BATCH = 64


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts: TensorRT's min/opt/max optimisation profile."""

    min: int
    opt: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.max

    def example_batch(self) -> int:
        """A tracing batch that does not pin the dimension: torch.export specialises sizes 0 and 1."""
        return self.min if self.static else min(max(2, self.min), self.max)

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def parse_batch_sizes(text: str) -> tuple[BatchProfile, list[int]]:
    """"1,8,64" -> profile (min 1, opt 8, max 64) and the sizes checked for parity.

    The optimum is the middle of the sorted list (for two sizes, the larger one).
    """
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise AflocError(f"--batch-sizes must be integers separated by commas, not {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise AflocError(f"--batch-sizes needs one or more sizes >= 1, not {text!r}", hint="e.g. --batch-sizes 1,8,64")
    return BatchProfile(min=sizes[0], opt=sizes[len(sizes) // 2], max=sizes[-1]), sizes


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISION_DTYPES:
        raise AflocError(f"--precision must be fp32, fp16 or bf16, not {precision!r}")
    return PRECISION_DTYPES[precision]


def _batch_dim(profile: BatchProfile) -> torch.export.Dim | None:
    return None if profile.static else torch.export.Dim("batch", min=profile.min, max=profile.max)


# ---- image encoder -----------------------------------------------------------------------------
class ExportableImageEncoder(nn.Module):
    """ImageEncoder behind the preprocessing contract above, returning a flat tuple of float32 tensors."""

    def __init__(
        self,
        encoder: ImageEncoder,
        *,
        input_format: InputFormat,
        mean: float,
        std: float,
        levels: tuple[str, ...],
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {input_format!r}")
        self.encoder = encoder
        self.input_format = input_format
        self.mean = float(mean)
        self.std = float(std)
        self.levels = levels
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_format == "uint8":
            x = (x.to(torch.float32) / 255.0 - self.mean) / self.std
            x = x.unsqueeze(1).expand(-1, 3, -1, -1)
        feats = self.encoder(x.to(self.compute_dtype), self.levels)
        by_level = {"shallow": feats.shallow, "deep": feats.deep, "global": feats.global_}
        return tuple(by_level[level].to(torch.float32) for level in self.levels)


@dataclass
class ExportedImage:
    program: torch.export.ExportedProgram
    input_shape: tuple[int, ...]  # without the batch dimension
    input_dtype: torch.dtype
    outputs: dict[str, tuple[int, ...]]  # level -> shape without the batch dimension, in output order
    profile: BatchProfile


def image_levels(shallow: bool) -> tuple[str, ...]:
    return ("shallow", "deep", "global") if shallow else ("deep", "global")


def image_input(input_format: InputFormat, image_size: int) -> tuple[tuple[int, ...], torch.dtype]:
    if input_format == "uint8":
        return (image_size, image_size), torch.uint8
    return (3, image_size, image_size), torch.float32


def image_output_shapes(encoder: ImageEncoder, image_size: int, levels: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    grids = grid_sizes(encoder.cfg, image_size)
    d = encoder.embed_dim
    return {level: (d,) if level == "global" else (d, grids[level], grids[level]) for level in levels}


def example_frames(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Deterministic uint8 frames with some structure (smooth blobs), for tracing and parity checks."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 8, 8, generator=g)
    smooth = nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (smooth[:, 0] * 255).round().to(torch.uint8)


def export_image_encoder(
    encoder: ImageEncoder,
    *,
    image_size: int,
    profile: BatchProfile,
    precision: Precision = "fp32",
    input_format: InputFormat = "normalized",
    mean: float = 0.5,
    std: float = 0.5,
    shallow: bool = False,
    device: torch.device | str = "cpu",
) -> ExportedImage:
    """Trace a copy of `encoder` (the caller's stays in fp32) with a dynamic batch dimension."""
    dtype = precision_dtype(precision)
    levels = image_levels(shallow)
    copy_ = copy.deepcopy(encoder).to(device=device, dtype=dtype).eval()
    wrapper = ExportableImageEncoder(
        copy_, input_format=input_format, mean=mean, std=std, levels=levels, compute_dtype=dtype
    ).eval()
    shape, in_dtype = image_input(input_format, image_size)
    frames = example_frames(profile.example_batch(), image_size).to(device)
    if input_format == "uint8":
        example = frames
    else:
        example = ((frames.float() / 255.0 - mean) / std).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    dim = _batch_dim(profile)
    dynamic = {"x": {0: dim}} if dim is not None else None
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic)
    return ExportedImage(program, shape, in_dtype, image_output_shapes(encoder, image_size, levels), profile)


# ---- text encoder ------------------------------------------------------------------------------
class ExportableTextEncoder(nn.Module):
    """The BERT body up to the last-n-layer sum.

    Always three inputs so the engine's signature never varies; for text models
    whose tokenizer makes no token_type_ids the third input is ignored.
    """

    def __init__(self, model: nn.Module, last_n_layers: int, with_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.last_n_layers = last_n_layers
        self.with_token_types = with_token_types

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_token_types:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[-self.last_n_layers :]).sum(0)
        return hidden.to(torch.float32)


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ExportedText:
    program: torch.export.ExportedProgram
    with_token_types: bool
    max_length: int
    hidden_size: int
    profile: BatchProfile


def text_profile() -> BatchProfile:
    return BatchProfile(min=1, opt=8, max=TEXT_MAX_BATCH)


def text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None):
    """The engine's three int64 inputs; zeros stand in for absent token types."""
    types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
    return input_ids, attention_mask, types


def export_text_encoder(
    text: TextEncoder, *, precision: Precision = "fp32", device: torch.device | str = "cpu"
) -> ExportedText:
    """Trace a copy of the BERT body over prompts padded to max_length, batch 1..64."""
    from afloc_cli.text.data.sentences import prepare_prompt

    dtype = precision_dtype(precision)
    batch = text.tokenize([prepare_prompt("Small left pleural effusion."), prepare_prompt("Cardiomegaly.")],
                          pad_to_max_length=True)
    with_types = batch.token_type_ids is not None
    args = tuple(a.to(device) for a in text_inputs(batch.input_ids, batch.attention_mask, batch.token_type_ids))
    body = copy.deepcopy(text.model).to(device=device, dtype=dtype).eval()
    wrapper = ExportableTextEncoder(body, text.cfg.last_n_layers, with_types).eval()
    profile = text_profile()
    dim = _batch_dim(profile)
    dynamic = {name: {0: dim} for name in TEXT_INPUTS}
    with torch.no_grad():
        program = torch.export.export(wrapper, args, dynamic_shapes=dynamic)
    return ExportedText(program, with_types, text.cfg.max_length, text.hidden_size, profile)
