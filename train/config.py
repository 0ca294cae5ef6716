"""Training configuration: a TOML file plus `key=value` overrides, saved resolved with every checkpoint."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afloc_cli.config import ImageConfig, LossConfig, ModelConfig, TextConfig, small_config
from afloc_cli.errors import AflocError
from afloc_cli.text.data.sentences import REPORT_SAMPLING


@dataclass
class OptimConfig:
    """The reference's optimiser and schedule (SPEC.md, "Reference training defaults")."""

    lr: float = 2e-5
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-6
    step_gamma: float = 0.9  # StepLR, stepped once per epoch
    grad_clip: float = 0.25
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    text_lr: float | None = None  # the text encoder's learning rate (None: lr, as the reference)
    # Optimizer steps over which the word loss's weight rises linearly from 0 to its full value (0: full from
    # the first step, as the reference). From scratch, the word loss's noise at chance can hold the global and
    # sentence losses at chance too (RESULTS.md, "Word-loss warm-in"); easing it in lets those start first.
    word_warmup: int = 0
    # Optimizer steps before that warm-in begins, the word loss's weight 0 until then (0: it begins at once). The
    # warm-in alone still left one seed's sentence and word losses at chance for most of the schedule (RESULTS.md,
    # "The learning target on fresh seeds 6-8"): the global and sentence losses leave chance first without it.
    word_start: int = 0
    # Decay of an exponential moving average of the weights over optimizer steps (0: none). With it, the run's
    # model.safetensors holds the average; checkpoints keep the optimised weights (and the average, to resume).
    # Validation and the best-k choice use the optimised weights.
    ema_decay: float = 0.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 128  # global batch (split over ranks)
    epochs: int = 5
    max_steps: int | None = None  # stop early after this many optimizer steps
    seed: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    workers: int = 2
    checkpoint_every: int = 500  # optimizer steps
    keep_best: int = 2  # best k checkpoints by validation loss
    val_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    val_batches: int = 20
    local_chunk: int | None = None  # local-loss chunk size (None: the loss module's default)
    # "subset": each step sees a random 1..n-1 of a report's sentences, shuffled (the reference); "all": the
    # whole report
    report_sampling: str = "subset"
    freeze_text: bool = False  # the text encoder is fixed (eval mode) and its features are cached
    text_cache_mb: int = 1024  # bound on those cached features (per process)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if "," in value:
        return [_coerce(v) for v in value.split(",")]
    return value


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


PRESETS: dict[str, ModelConfig] = {
    "resnet50": ModelConfig(),
    "small": small_config(),
}


def from_dict(data: dict[str, Any]) -> TrainConfig:
    data = dict(data)
    preset = data.pop("preset", None)
    base_model = PRESETS[preset].to_dict() if preset else ModelConfig().to_dict()
    if preset is not None and preset not in PRESETS:
        raise AflocError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    model = ModelConfig.from_dict(_merge(base_model, data.pop("model", {})))
    optim_values = dict(data.pop("optim", {}))
    if "betas" in optim_values:
        optim_values["betas"] = tuple(optim_values["betas"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise AflocError(f"unknown training settings: {sorted(unknown)}")
    try:
        cfg = TrainConfig(model=model, optim=OptimConfig(**optim_values), **data)
    except TypeError as exc:
        raise AflocError(f"bad training setting: {exc}") from exc
    if cfg.report_sampling not in REPORT_SAMPLING:
        raise AflocError(f"report_sampling must be one of {', '.join(REPORT_SAMPLING)}, not {cfg.report_sampling!r}")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise AflocError(f"optim.ema_decay must be in [0, 1) (0: no weight average), not {cfg.optim.ema_decay}")
    if cfg.optim.word_warmup < 0:
        raise AflocError(f"optim.word_warmup must be >= 0 optimizer steps, not {cfg.optim.word_warmup}")
    if cfg.optim.word_start < 0:
        raise AflocError(f"optim.word_start must be >= 0 optimizer steps, not {cfg.optim.word_start}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise AflocError(f"precision must be auto, fp32, bf16 or fp16, not {cfg.precision!r}")
    return cfg


def load_config(path: Path | None, overrides: list[str] | None = None, preset: str | None = None) -> TrainConfig:
    """TOML file (optional) + `a.b=value` overrides; `preset` picks the model shape to start from."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise AflocError("config file not found", path=path) from exc
        except tomllib.TOMLDecodeError as exc:
            raise AflocError(f"invalid TOML: {exc}", path=path) from exc
    if preset is not None:
        data["preset"] = preset
    for item in overrides or []:
        if "=" not in item:
            raise AflocError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        _set(data, key.strip(), _coerce(value.strip()))
    return from_dict(data)


def with_losses(cfg: TrainConfig, losses: str | None) -> TrainConfig:
    """`--losses global,sent,word`: switch the three losses for ablations."""
    if losses is None:
        return cfg
    chosen = {s.strip() for s in losses.split(",") if s.strip()}
    bad = chosen - {"global", "sent", "word"}
    if bad or not chosen:
        raise AflocError(f"--losses takes a comma list of global, sent, word; got {losses!r}")
    loss = dataclasses.replace(
        cfg.model.loss, use_global="global" in chosen, use_sentence="sent" in chosen, use_word="word" in chosen
    )
    return dataclasses.replace(cfg, model=cfg.model.replace(loss=loss))


__all__ = ["ImageConfig", "LossConfig", "OptimConfig", "TextConfig", "TrainConfig", "load_config", "with_losses"]
