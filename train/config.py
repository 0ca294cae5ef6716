"""Training configuration: a TOML file plus `key=value` overrides, saved resolved with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afloc_cli.config import RESNET_ARCHS, ImageConfig, LossConfig, ModelConfig, TextConfig, small_config
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
    # The share of the word loss's gradient that reaches the image backbone below the word level's embedder
    # (1: all of it, as the reference; 0: none, so the word loss trains only the shallow level's embedder and the
    # backbone trains as without it). The word loss reshaping the shared layers degraded the sentence level's deep
    # map on two of three seeds; on one, 0 kept the deep map but left the word level's map far weaker and 0.1
    # kept neither (RESULTS.md, "Fused-map weights, and the word loss's share of the backbone").
    word_backbone_grad: float = 1.0
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


class SettingError(AflocError):
    """A bad training setting. `key` is its dotted name, so that `load_config` can name the TOML file when the
    value came from there rather than from a `--set`."""

    def __init__(self, message: str, *, key: str, path: str | Path | None = None, hint: str | None = None) -> None:
        super().__init__(message, path=path, hint=hint)
        self.key = key


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
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise SettingError(f"cannot set {dotted}: {where} is a setting, not a section", key=where)
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

_BAD = object()  # _convert's "this value does not fit the type"


def _convert(value: Any, hint: Any) -> Any:
    """`value` as a field of type `hint` holds it (a TOML/--set list becomes a tuple, an int a float), or _BAD."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            out = _convert(value, arg)
            if out is not _BAD:
                return out
        return _BAD
    if origin is typing.Literal:
        return value if isinstance(value, str) and value in typing.get_args(hint) else _BAD
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            return _BAD
        items = [_convert(v, a) for v, a in zip(value, args, strict=True)]
        return _BAD if any(item is _BAD for item in items) else tuple(items)
    if hint is type(None):
        return None if value is None else _BAD
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    raise TypeError(f"no settings check for the type {hint!r}")  # a new field type: teach _convert it


def _describe(hint: Any) -> str:
    """What a setting of type `hint` takes, for the error message."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return f"{len(args)} comma-separated values, each {_describe(args[0])}"
    names = {type(None): "none", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def _build(kind: type, values: Any, prefix: str) -> Any:
    """The dataclass `kind` from a settings table: every key one of its fields, every value of the field's type
    (checked here, so that `batch_size=abc` is a one-line error and not a TypeError deep in training)."""
    if not isinstance(values, dict):
        key = prefix.rstrip(".")
        raise SettingError(f"{key} is a section of settings, not a value ({values!r})", key=key)
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise SettingError(f"unknown training settings: {', '.join(prefix + k for k in unknown)}",
                           key=prefix + unknown[0])
    hints = typing.get_type_hints(kind)
    args: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            args[name] = _build(hint, value, f"{prefix}{name}.")
            continue
        converted = _convert(value, hint)
        if converted is _BAD:
            raise SettingError(f"{prefix}{name} must be {_describe(hint)}, not {value!r}", key=prefix + name)
        args[name] = converted
    try:
        return kind(**args)
    except ValueError as exc:  # the dataclass's own check (__post_init__), e.g. heatmap.fused_shallow_weight
        key = prefix.rstrip(".") or kind.__name__
        raise SettingError(str(exc), key=key) from None


def _preset_model(preset: Any) -> ModelConfig:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise SettingError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}", key="preset")
    return PRESETS[preset]


def _check_ranges(cfg: TrainConfig) -> None:
    """Values of the right type that training would still trip over."""
    at_least = [
        ("batch_size", cfg.batch_size, 1), ("epochs", cfg.epochs, 0), ("max_steps", cfg.max_steps, 1),
        ("workers", cfg.workers, 0), ("checkpoint_every", cfg.checkpoint_every, 0), ("keep_best", cfg.keep_best, 0),
        ("val_every", cfg.val_every, 0), ("val_batches", cfg.val_batches, 0), ("local_chunk", cfg.local_chunk, 1),
        ("text_cache_mb", cfg.text_cache_mb, 0), ("optim.accumulate", cfg.optim.accumulate, 1),
        ("optim.word_warmup", cfg.optim.word_warmup, 0), ("optim.word_start", cfg.optim.word_start, 0),
        ("optim.lr", cfg.optim.lr, 0.0), ("optim.text_lr", cfg.optim.text_lr, 0.0),
        ("optim.weight_decay", cfg.optim.weight_decay, 0.0),
    ]
    for key, value, low in at_least:
        if value is not None and value < low:
            unit = " optimizer steps" if key.startswith("optim.word_") else ""
            raise SettingError(f"{key} must be >= {low}{unit}, not {value}", key=key)
    if not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise SettingError(f"optim.betas must both be in [0, 1), not {list(cfg.optim.betas)}", key="optim.betas")
    if cfg.report_sampling not in REPORT_SAMPLING:
        raise SettingError(f"report_sampling must be one of {', '.join(REPORT_SAMPLING)}, "
                           f"not {cfg.report_sampling!r}", key="report_sampling")
    if not 0.0 <= cfg.optim.word_backbone_grad <= 1.0:
        raise SettingError("optim.word_backbone_grad must be in [0, 1] (the share of the word loss's gradient the "
                           f"backbone gets), not {cfg.optim.word_backbone_grad}", key="optim.word_backbone_grad")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise SettingError(f"optim.ema_decay must be in [0, 1) (0: no weight average), not {cfg.optim.ema_decay}",
                           key="optim.ema_decay")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise SettingError(f"precision must be auto, fp32, bf16 or fp16, not {cfg.precision!r}", key="precision")
    if cfg.model.image.arch not in RESNET_ARCHS:
        raise SettingError(f"unknown model.image.arch {cfg.model.image.arch!r}; expected one of "
                           f"{sorted(RESNET_ARCHS)}", key="model.image.arch")


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A checked TrainConfig from a settings tree; `preset` names the model section's starting point."""
    data = dict(data)
    preset = data.pop("preset", None)
    base_model = (_preset_model(preset) if preset is not None else ModelConfig()).to_dict()
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise SettingError(f"model is a section of settings, not a value ({model!r})", key="model")
    data["model"] = _merge(base_model, model)
    cfg: TrainConfig = _build(TrainConfig, data, "")
    _check_ranges(cfg)
    return cfg


@dataclass
class Settings:
    """What one command line gave: the TOML file's settings with the `--set` overrides and `--preset` on top."""

    data: dict[str, Any]
    path: Path | None = None  # the TOML file, if any
    given_keys: set[str] = field(default_factory=set)  # the dotted keys given on the command line

    def resolve(self, data: dict[str, Any] | None = None) -> TrainConfig:
        """from_dict(data or self.data); a bad setting read from the TOML file names that file."""
        try:
            return from_dict(self.data if data is None else data)
        except SettingError as exc:
            if self.path is None or exc.path is not None or self._from_command_line(exc.key):
                raise
            raise SettingError(exc.message, key=exc.key, path=self.path, hint=exc.hint) from None

    def _from_command_line(self, key: str) -> bool:
        return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in self.given_keys)


def read_settings(path: Path | None, overrides: list[str] | None = None, preset: str | None = None) -> Settings:
    """TOML file (optional) + `a.b=value` overrides; `preset` picks the model shape to start from."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise AflocError("config file not found", path=path) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AflocError(f"invalid TOML: {exc}", path=path) from exc
    given: set[str] = set()
    if preset is not None:
        data["preset"] = preset
        given.add("preset")
    for item in overrides or []:
        if "=" not in item:
            raise AflocError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        _set(data, key.strip(), _coerce(value.strip()))
        given.add(key.strip())
    return Settings(data, path, given)


def load_config(path: Path | None, overrides: list[str] | None = None, preset: str | None = None) -> TrainConfig:
    """TOML file (optional) + `a.b=value` overrides; `preset` picks the model shape to start from."""
    return read_settings(path, overrides, preset).resolve()


# The settings a --resume may change. None of them changes what an optimizer step computes, so the resumed run
# is still the run it continues, bit for bit, as a straight run with the new values would have been:
# - epochs, max_steps: where the run stops. The schedule (StepLR, the word loss's warm-in) counts epochs and
#   steps from the start and never looks at the total, so a run extended this way equals one planned longer;
# - workers: how many processes load batches (every sample is a function of seed, epoch and item);
# - checkpoint_every, keep_best: how often checkpoints are written and how many of the best are kept.
# Anything else (the model, the optimizer, the batch, the seed, precision, validation, the losses) would make
# the rest of the run a different run while the restored optimizer state and metrics.csv carry on the old one.
CHANGEABLE_ON_RESUME = frozenset({"epochs", "max_steps", "workers", "checkpoint_every", "keep_best"})


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}, tuples as lists (as config.json holds them)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def differences(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The dotted settings whose values differ: {key: (old, new)}."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    return {key: (a[key], b.get(key)) for key in a if a[key] != b.get(key)}


def read_saved_config(folder: Path) -> TrainConfig:
    """The resolved config a checkpoint folder was saved with (its config.json)."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AflocError("the checkpoint has no config.json", path=folder,
                         hint="this run cannot be resumed; start a new --out") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AflocError(f"unreadable saved config: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise AflocError("the saved config is not a table of settings", path=path)
    try:
        return from_dict(data)
    except AflocError as exc:
        raise AflocError(f"the saved config is not valid here: {exc.message}", path=path) from None


def config_for_resume(saved: TrainConfig, settings: Settings, losses: str | None, *, source: Path) -> TrainConfig:
    """The config a --resume trains with: the run's saved one, with any settings given on the command line.

    A setting not given keeps its saved value, so `--resume` alone continues the run as it was started. One given
    again with its saved value is fine. One given with another value is refused, naming the keys, unless it is in
    CHANGEABLE_ON_RESUME: silently taking it would train the rest of the run differently from what its restored
    optimizer state and its checkpoints say (or fail on the weights, for another model shape).
    """
    given = dict(settings.data)
    base = saved.to_dict()
    if "preset" in given:  # a preset names the whole model section again, as it does for a new run
        base["model"] = _preset_model(given.pop("preset")).to_dict()
    cfg = with_losses(settings.resolve(_merge(base, given)), losses)
    refused = {k: v for k, v in differences(saved, cfg).items() if k not in CHANGEABLE_ON_RESUME}
    if refused:
        shown = "; ".join(f"{key} {old!r} (given {new!r})" for key, (old, new) in list(refused.items())[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise AflocError(
            f"--resume: the run was trained with other settings: {shown}{more}", path=source,
            hint="leave them out to continue with the run's own settings (only "
            f"{', '.join(sorted(CHANGEABLE_ON_RESUME))} may change on resume), or start a new --out",
        )
    return cfg


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


__all__ = ["CHANGEABLE_ON_RESUME", "ImageConfig", "LossConfig", "OptimConfig", "SettingError", "Settings", "TextConfig",
           "TrainConfig", "config_for_resume", "differences", "load_config", "read_saved_config", "read_settings",
           "with_losses"]
