"""The engine folder: building it (export -> compile -> parity -> atomic rename) and loading it for localize.

Layout of ENGINE_DIR::

    metadata.json           what was compiled, from which checkpoint, for which shapes, and how well it matched
    image_encoder.pt2|.ep   AOTInductor package | TensorRT ExportedProgram
    text_encoder.pt2|.ep    the same for the text encoder (absent with --no-text)

An engine is only usable with the checkpoint it was compiled from (sha256), on
the torch (and torch-tensorrt, TensorRT) release that compiled it, on the same
kind of device, for batches within its profile. `load_engine` refuses anything
else with a message that says what to do, rather than running a mismatched
graph that would produce plausible but wrong heat maps.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from afloc_cli import __version__
from afloc_cli.compile import aoti, tensorrt
from afloc_cli.compile.export import (
    TEXT_INPUTS,
    BatchProfile,
    ExportedImage,
    example_frames,
    export_image_encoder,
    export_text_encoder,
    image_input,
    precision_dtype,
    text_inputs,
)
from afloc_cli.errors import AflocError
from afloc_cli.image.data.transforms import normalize
from afloc_cli.image.model.encoder import ImageFeatures
from afloc_cli.text.data.sentences import prepare_prompt
from afloc_cli.text.model.encoder import TextEncoder
from afloc_cli.vlp.model import AflocModel
from kernels.dispatch import localization_maps

FORMAT = "afloc-engine"
FORMAT_VERSION = 1
METADATA = "metadata.json"
BACKENDS = ("aoti", "tensorrt")
SUFFIXES = {"aoti": aoti.SUFFIX, "tensorrt": tensorrt.SUFFIX}
PARITY_PROMPTS = (
    "Small left pleural effusion.",
    "Cardiomegaly.",
    "Right upper lobe pneumonia. No pneumothorax.",
)


class ParityError(AflocError):
    """The compiled engine disagrees with the eager model beyond the tolerance: nothing is kept."""

    exit_code = 4


@dataclass(frozen=True)
class Tolerance:
    """What "the same heat maps" means at each precision (compiled vs eager fp32)."""

    min_cosine: float  # of every heat map (and prompt embedding), flattened, compiled vs eager
    max_rel_diff: float  # largest |compiled - eager| over the maps, over the largest |eager|
    max_score_diff: float  # image-level cosine scores, absolute


# fp32 leaves room for TF32 in TensorRT's fp32 kernels; fp16/bf16 for their 10/7-bit mantissas.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.9999, max_rel_diff=1e-2, max_score_diff=2e-3),
    "fp16": Tolerance(min_cosine=0.999, max_rel_diff=5e-2, max_score_diff=1e-2),
    "bf16": Tolerance(min_cosine=0.995, max_rel_diff=1e-1, max_score_diff=3e-2),
}


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13): the part of a version an engine is bound to."""
    parts = version.split("+")[0].split(".")
    out = []
    for part in parts[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def current_versions() -> dict[str, str | None]:
    return {
        "afloc": __version__,
        "torch": torch.__version__,
        **tensorrt.versions(),
        "python": platform.python_version(),
    }


# ---- loading -----------------------------------------------------------------------------------
def read_metadata(engine_dir: Path) -> dict[str, Any]:
    path = Path(engine_dir) / METADATA
    if not path.is_file():
        raise AflocError("not an afloc engine folder (no metadata.json)", path=engine_dir,
                         hint="build one with `afloc compile --checkpoint CKPT --out DIR`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AflocError(f"unreadable engine metadata: {exc}", path=path) from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise AflocError(f"unsupported engine format {meta.get('format')!r} v{meta.get('format_version')}",
                         path=engine_dir, hint="rebuild it with this afloc's `afloc compile`")
    return meta


def check_compatible(meta: dict[str, Any], engine_dir: Path, checkpoint_sha256: str, device: torch.device) -> None:
    """Refuse an engine built from another checkpoint, by other library releases, or for another device."""
    rebuild = "rebuild it: afloc compile --checkpoint CKPT --out DIR --overwrite"
    built_from = meta["checkpoint"]["sha256"]
    if built_from != checkpoint_sha256:
        raise AflocError(
            f"engine was compiled from checkpoint {built_from[:12]}..., not this one ({checkpoint_sha256[:12]}...)",
            path=engine_dir, hint=f"pass the checkpoint it was built from, or {rebuild}",
        )
    if meta["device"] != device.type:
        raise AflocError(f"engine was compiled for {meta['device']}, not {device.type}",
                         path=engine_dir, hint=f"use --device {meta['device']}, or rebuild it on this device")
    built, here = meta["versions"], current_versions()
    if _release(built["torch"]) != _release(here["torch"] or ""):
        raise AflocError(f"engine was compiled with torch {built['torch']}, this is torch {here['torch']}",
                         path=engine_dir, hint=rebuild)
    if meta["backend"] == "tensorrt":
        tensorrt.require_tensorrt()
        for name in ("torch_tensorrt", "tensorrt"):
            if built.get(name) and _release(built[name]) != _release(here.get(name) or ""):
                raise AflocError(f"engine was compiled with {name} {built[name]}, this machine has {here.get(name)}",
                                 path=engine_dir, hint=rebuild)


def _as_list(result: Any) -> list[torch.Tensor]:
    """Engines return a bare tensor for one output and a list or tuple for several."""
    return [result] if isinstance(result, torch.Tensor) else list(result)


class CompiledImageEncoder:
    """A compiled image encoder with the call `LocalizationEngine` makes: `encode_images(x, levels)`."""

    def __init__(self, runner: Callable[..., Any], meta: dict[str, Any], device: torch.device, path: Path) -> None:
        self.runner = runner
        self.meta = meta
        self.device = device
        self.path = path
        pre = meta["preprocessing"]
        self.backend: str = meta["backend"]
        self.precision: str = meta["precision"]
        self.input_format: str = pre["input_format"]
        self.image_size: int = int(pre["image_size"])
        self.mean, self.std = float(pre["mean"]), float(pre["std"])
        self.profile = BatchProfile(**meta["batch_profile"])
        self.levels: tuple[str, ...] = tuple(o["level"] for o in meta["image"]["outputs"])  # in output order
        self.input_shape, self.input_dtype = image_input(self.input_format, self.image_size)  # type: ignore[arg-type]
        self.text: CompiledTextEncoder | None = None

    def check_batch_size(self, n: int) -> None:
        """Fail fast (before a long run) on a batch the engine cannot take."""
        if n > self.profile.max or n < 1:
            raise AflocError(
                f"a batch of {n} images is outside this engine's batch profile "
                f"{self.profile.min}..{self.profile.max}",
                path=self.path,
                hint=f"use --batch-size {self.profile.max} or less, or rebuild with a larger --batch-sizes",
            )

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw engine call: inputs in the engine's own format -> {level: float32 output}.

        Batches below the profile's minimum are zero-padded and cut back, so the
        short last batch of a run always works; batches above it are refused.
        """
        n = int(x.shape[0])
        self.check_batch_size(n)
        if tuple(x.shape[1:]) != self.input_shape:
            raise AflocError(f"engine input must be (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}", path=self.path)
        x = x.to(self.device, self.input_dtype).contiguous()
        if n < self.profile.min:
            x = torch.cat([x, x.new_zeros(self.profile.min - n, *self.input_shape)])
        with torch.inference_mode():
            outputs = _as_list(self.runner(x))
        return {level: out[:n].float() for level, out in zip(self.levels, outputs, strict=True)}

    def _require(self, levels: Collection[str]) -> None:
        missing = [lv for lv in levels if lv not in self.levels]
        if missing:
            raise AflocError(f"this engine has no {'/'.join(missing)} level (it has {', '.join(self.levels)})",
                             path=self.path, hint="rebuild it with --shallow")

    @staticmethod
    def _features(out: dict[str, torch.Tensor], levels: Collection[str]) -> ImageFeatures:
        return ImageFeatures(
            shallow=out["shallow"] if "shallow" in levels else None,
            deep=out["deep"] if "deep" in levels else None,
            global_=out["global"] if "global" in levels else None,
        )

    def encode_images(self, x: torch.Tensor, levels: Collection[str] | None = None) -> ImageFeatures:
        """x: (B, 3, S, S) normalised, as LocalizationEngine passes it (engines of --input-format normalized).

        `levels` defaults to every level the engine has (the eager default, all three, may not be there).
        """
        levels = self.levels if levels is None else tuple(levels)
        if self.input_format != "normalized":
            raise AflocError("this engine takes uint8 frames, not normalised images", path=self.path,
                             hint="call encode_frames, or rebuild it with --input-format normalized for localize")
        self._require(levels)
        return self._features(self.run(x), levels)

    def encode_frames(self, frames: torch.Tensor, levels: Collection[str] | None = None) -> ImageFeatures:
        """frames: (B, S, S) uint8 letterboxed, whatever the engine's input format."""
        levels = self.levels if levels is None else tuple(levels)
        self._require(levels)
        x = frames if self.input_format == "uint8" else normalize(frames, self.mean, self.std)
        return self._features(self.run(x), levels)

    def bind(self, model: AflocModel) -> EngineModel:
        """The model LocalizationEngine should be given: this engine for images, the rest from `model`."""
        if model.cfg.preprocess.image_size != self.image_size:
            raise AflocError(
                f"engine was compiled for {self.image_size}px frames, the checkpoint letterboxes to "
                f"{model.cfg.preprocess.image_size}px", path=self.path,
                hint="rebuild it without --image-size (the checkpoint's size is the default)",
            )
        return EngineModel(self, model)


class _CompiledHiddenStates:
    """Stands in for the Hugging Face model inside a TextEncoder.

    It returns the compiled last-n-layer sum as the only "hidden state", so
    TextEncoder.forward's `stack(hidden_states[-n:]).sum(0)` passes it through
    and the word/sentence/report pooling is the eager code itself.
    """

    def __init__(self, runner: Callable[..., Any], config: Any, device: torch.device) -> None:
        self.runner = runner
        self.config = config
        self.device = device

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = True,
    ) -> SimpleNamespace:
        args = [a.to(self.device).contiguous() for a in text_inputs(input_ids, attention_mask, token_type_ids)]
        with torch.inference_mode():
            hidden = _as_list(self.runner(*args))[0]
        return SimpleNamespace(hidden_states=(hidden.float(),))


class CompiledTextEncoder:
    """Prompts -> report embeddings through the compiled BERT body and the shared Python pooling."""

    def __init__(self, runner: Callable[..., Any], eager: TextEncoder, meta: dict[str, Any], device: torch.device):
        self.device = device
        self.max_batch = int(meta["batch_profile"]["max"])
        self.encoder = TextEncoder(eager.cfg, _CompiledHiddenStates(runner, eager.model.config, device),  # type: ignore[arg-type]
                                   eager.tokenizer)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        prepared = [prepare_prompt(p) for p in prompts]
        chunks = []
        for i in range(0, len(prepared), self.max_batch):
            batch = self.encoder.tokenize(prepared[i : i + self.max_batch], pad_to_max_length=True).to(self.device)
            with torch.inference_mode():
                chunks.append(self.encoder(batch).report)
        return torch.cat(chunks) if chunks else torch.empty(0, self.encoder.hidden_size)


class EngineModel:
    """What LocalizationEngine uses of an AflocModel (cfg, to, eval, encode_images, encode_prompts), compiled."""

    def __init__(self, image: CompiledImageEncoder, model: AflocModel) -> None:
        self.image = image
        self.model = model
        self.cfg = model.cfg
        self.text_encoder = model.text_encoder
        self.compiled_text = image.text

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def to(self, device: torch.device | str) -> EngineModel:
        return self  # the engine is bound to its device; eager prompts are moved by the caller

    def eval(self) -> EngineModel:
        self.model.eval()
        return self

    def encode_images(self, x: torch.Tensor, levels: Collection[str] | None = None) -> ImageFeatures:
        return self.image.encode_images(x, levels)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        if self.compiled_text is not None:
            return self.compiled_text.encode_prompts(prompts)
        return self.model.encode_prompts(prompts, batch_size)


def _load_runner(backend: str, path: Path, device: torch.device) -> Callable[..., Any]:
    if not path.is_file():
        raise AflocError("engine file missing", path=path, hint="rebuild the engine with `afloc compile`")
    return aoti.load_package(path, device) if backend == "aoti" else tensorrt.load(path, device)


def load_engine(
    engine_dir: Path | str,
    checkpoint_sha256: str,
    device: torch.device | str,
    *,
    text_encoder: TextEncoder | None = None,
) -> CompiledImageEncoder:
    """Open ENGINE_DIR for `localize`, refusing a mismatch (see the module docstring).

    With `text_encoder` (the eager one of the same checkpoint, for its tokenizer)
    and a compiled text encoder in the folder, prompts go through it too.
    """
    engine_dir = Path(engine_dir)
    device = torch.device(device)
    meta = read_metadata(engine_dir)
    check_compatible(meta, engine_dir, checkpoint_sha256, device)
    image = CompiledImageEncoder(
        _load_runner(meta["backend"], engine_dir / meta["image"]["file"], device), meta, device, engine_dir
    )
    if text_encoder is not None and meta.get("text"):
        runner = _load_runner(meta["backend"], engine_dir / meta["text"]["file"], device)
        image.text = CompiledTextEncoder(runner, text_encoder, meta["text"], device)
    return image


# ---- parity ------------------------------------------------------------------------------------
def _compare(eager: torch.Tensor, compiled: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference, and the smallest cosine over the last two dims (or the last one)."""
    flat_e = eager.flatten(-2) if eager.dim() >= 3 else eager
    flat_c = compiled.flatten(-2) if compiled.dim() >= 3 else compiled
    cos = F.cosine_similarity(flat_e.double(), flat_c.double(), dim=-1)
    diff = (eager - compiled).abs().max().item()
    scale = eager.abs().max().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-12), "min_cosine": cos.min().item()}


@torch.no_grad()
def check_parity(
    model: AflocModel,
    engine: CompiledImageEncoder,
    batch_sizes: Sequence[int],
    tolerance: Tolerance,
    *,
    eager_chunk: int = 16,
) -> dict[str, Any]:
    """Eager fp32 vs the engine on sample frames: the heat maps (and scores) of a few prompts."""
    device = engine.device
    model = model.to(device).eval()
    prompts = model.encode_prompts(list(PARITY_PROMPTS)).float().to(device)
    mode = model.cfg.heatmap.similarity
    local = [lv for lv in engine.levels if lv != "global"]
    directions = F.normalize(prompts, dim=1)
    rows = []
    for b in batch_sizes:
        frames = example_frames(b, engine.image_size, seed=b)
        compiled = engine.encode_frames(frames, engine.levels)
        chunks = [
            model.encode_images(normalize(frames[i : i + eager_chunk], engine.mean, engine.std).to(device),
                                engine.levels)
            for i in range(0, b, eager_chunk)
        ]
        row: dict[str, Any] = {"batch": b, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "min_cosine": 1.0}
        for level in local:
            eager_maps = torch.cat([localization_maps(getattr(c, level).float(), prompts, mode)[0] for c in chunks])
            stats = _compare(eager_maps, localization_maps(getattr(compiled, level).float(), prompts, mode)[0])
            row["max_abs_diff"] = max(row["max_abs_diff"], stats["max_abs_diff"])
            row["max_rel_diff"] = max(row["max_rel_diff"], stats["max_rel_diff"])
            row["min_cosine"] = min(row["min_cosine"], stats["min_cosine"])
        eager_global = torch.cat([c.global_.float() for c in chunks])
        scores_e = F.normalize(eager_global, dim=1) @ directions.T
        scores_c = F.normalize(compiled.global_, dim=1) @ directions.T
        row["score_max_abs_diff"] = (scores_e - scores_c).abs().max().item()
        row["ok"] = (
            row["min_cosine"] >= tolerance.min_cosine
            and row["max_rel_diff"] <= tolerance.max_rel_diff
            and row["score_max_abs_diff"] <= tolerance.max_score_diff
        )
        rows.append(row)
    report: dict[str, Any] = {"tolerance": asdict(tolerance), "image": rows, "text": None}
    if engine.text is not None:
        eager_text = prompts
        got_text = engine.text.encode_prompts(list(PARITY_PROMPTS)).float().to(device)
        text = _compare(eager_text, got_text)
        text["ok"] = text["min_cosine"] >= tolerance.min_cosine and text["max_rel_diff"] <= tolerance.max_rel_diff
        report["text"] = text
    report["ok"] = all(r["ok"] for r in rows) and (report["text"] is None or report["text"]["ok"])
    return report


def format_parity(report: dict[str, Any]) -> list[str]:
    tol = report["tolerance"]
    lines = [
        f"parity vs eager fp32 (tolerance: heat-map cosine >= {tol['min_cosine']}, "
        f"max |diff| <= {tol['max_rel_diff']:g} x max |eager|, scores within {tol['max_score_diff']:g})",
        f"{'batch':>6} {'max|diff|':>11} {'rel':>9} {'min cos':>10} {'score diff':>11}  ok",
    ]
    for r in report["image"]:
        lines.append(f"{r['batch']:>6} {r['max_abs_diff']:>11.3e} {r['max_rel_diff']:>9.2e} "
                     f"{r['min_cosine']:>10.6f} {r['score_max_abs_diff']:>11.3e}  {'yes' if r['ok'] else 'NO'}")
    if report["text"] is not None:
        t = report["text"]
        lines.append(f"{'text':>6} {t['max_abs_diff']:>11.3e} {t['max_rel_diff']:>9.2e} "
                     f"{t['min_cosine']:>10.6f} {'':>11}  {'yes' if t['ok'] else 'NO'}")
    return lines


# ---- building ----------------------------------------------------------------------------------
@dataclass
class BuildOptions:
    backend: str = "aoti"
    precision: str = "fp32"
    profile: BatchProfile = BatchProfile(1, 8, 64)
    batch_sizes: tuple[int, ...] = (1, 8, 64)  # checked for parity
    image_size: int | None = None  # None: the checkpoint's own
    input_format: str = "normalized"
    shallow: bool = False
    text: bool = True
    device: str = "auto"  # aoti only: auto, cpu or cuda; tensorrt is always cuda


def resolve_build_device(options: BuildOptions) -> torch.device:
    if options.backend not in BACKENDS:
        raise AflocError(f"--backend must be tensorrt or aoti, not {options.backend!r}")
    precision_dtype(options.precision)
    if options.input_format not in ("normalized", "uint8"):
        raise AflocError(f"--input-format must be normalized or uint8, not {options.input_format!r}")
    if options.backend == "tensorrt":
        tensorrt.require_tensorrt()
        if options.device not in ("auto", "cuda") and not options.device.startswith("cuda"):
            raise AflocError("--backend tensorrt runs on cuda only", hint="drop --device or pass --device cuda")
        return torch.device("cuda" if options.device == "auto" else options.device)
    if options.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif options.device == "cpu" or options.device.startswith("cuda"):
        device = torch.device(options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise AflocError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    else:
        raise AflocError(f"unknown device {options.device!r}", hint="use auto, cpu or cuda")
    if device.type == "cpu" and options.precision == "fp16":
        raise AflocError("--precision fp16 is for GPUs", hint="use bf16 or fp32 on the CPU")
    return device


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output we may not write or replace, before any expensive work."""
    parent = out.parent if out.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise AflocError("output folder is not writable", path=parent)
    if not out.exists():
        return
    if not overwrite:
        raise AflocError("engine folder exists", path=out, hint="use --overwrite to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / METADATA).is_file()):
        raise AflocError("exists and is not an afloc engine folder; refusing to replace it", path=out)


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder in; an old engine is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def image_metadata(exported: ExportedImage, file: str) -> dict[str, Any]:
    return {
        "file": file,
        "input": {"name": "x", "shape": ["batch", *exported.input_shape],
                  "dtype": str(exported.input_dtype).removeprefix("torch.")},
        # a list, not a mapping: its order is the engine's output order (metadata.json keys are sorted)
        "outputs": [{"level": level, "shape": ["batch", *shape]} for level, shape in exported.outputs.items()],
    }


def build_engine(
    model: AflocModel,
    *,
    checkpoint_sha256: str,
    checkpoint_path: Path,
    out: Path,
    options: BuildOptions,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Compile `model` into ENGINE_DIR `out`; return its metadata. On any failure nothing is left behind."""
    device = resolve_build_device(options)
    check_out(out, overwrite)
    cfg = model.cfg
    image_size = options.image_size or cfg.preprocess.image_size
    suffix = SUFFIXES[options.backend]
    dtype = precision_dtype(options.precision)
    model = model.to(device).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        exported = export_image_encoder(
            model.image_encoder, image_size=image_size, profile=options.profile, precision=options.precision,  # type: ignore[arg-type]
            input_format=options.input_format, mean=cfg.preprocess.mean, std=cfg.preprocess.std,  # type: ignore[arg-type]
            shallow=options.shallow, device=device,
        )
        log(f"exported the image encoder ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        image_file = "image_encoder" + suffix
        if options.backend == "aoti":
            aoti.compile_package(exported.program, tmp / image_file)
        else:
            tensorrt.build(exported.program, [(exported.input_shape, exported.input_dtype)], options.profile,
                           dtype, tmp / image_file)
        log(f"compiled the image encoder with {options.backend} ({time.perf_counter() - t0:.1f} s)")

        text_meta = None
        if options.text:
            t0 = time.perf_counter()
            text = export_text_encoder(model.text_encoder, precision=options.precision, device=device)  # type: ignore[arg-type]
            text_file = "text_encoder" + suffix
            if options.backend == "aoti":
                aoti.compile_package(text.program, tmp / text_file)
            else:
                shape = ((text.max_length,), torch.int64)
                tensorrt.build(text.program, [shape] * len(TEXT_INPUTS), text.profile, dtype, tmp / text_file)
            log(f"compiled the text encoder ({time.perf_counter() - t0:.1f} s)")
            text_meta = {
                "file": text_file,
                "inputs": {name: ["batch", text.max_length] for name in TEXT_INPUTS},
                "input_dtype": "int64",
                "output": ["batch", text.max_length, text.hidden_size],
                "output_meaning": f"sum of the last {model.text_encoder.cfg.last_n_layers} BERT layers' hidden states",
                "with_token_types": text.with_token_types,
                "max_length": text.max_length,
                "batch_profile": text.profile.to_dict(),
            }

        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": options.backend,
            "precision": options.precision,
            "device": device.type,
            "checkpoint": {"sha256": checkpoint_sha256, "path": str(checkpoint_path)},
            "model_config": cfg.to_dict(),
            "preprocessing": {
                "input_format": options.input_format,
                "image_size": image_size,
                "letterbox": f"long side to {image_size} px ({cfg.preprocess.interpolation}), "
                             "short side zero-padded and centred",
                "mean": cfg.preprocess.mean,
                "std": cfg.preprocess.std,
                "contract": (
                    "uint8 (B, S, S) letterboxed frames" if options.input_format == "uint8" else
                    "float32 (B, 3, S, S) = (frame/255 - mean)/std, grey repeated to 3 channels"
                ),
            },
            "batch_profile": options.profile.to_dict(),
            "batch_sizes": list(options.batch_sizes),
            "image": image_metadata(exported, image_file),
            "text": text_meta,
            "versions": current_versions(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")

        t0 = time.perf_counter()
        engine = load_engine(tmp, checkpoint_sha256, device, text_encoder=model.text_encoder)
        tolerance = TOLERANCES[options.precision]
        report = check_parity(model, engine, options.batch_sizes, tolerance)
        for line in format_parity(report):
            log(line)
        log(f"parity checked ({time.perf_counter() - t0:.1f} s)")
        if not report["ok"]:
            raise ParityError(
                f"compiled engine differs from the eager model beyond the {options.precision} tolerance; "
                "nothing was written",
                path=out, hint="try --precision fp32, or report it with the table above",
            )
        meta["parity"] = report
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        del engine
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
