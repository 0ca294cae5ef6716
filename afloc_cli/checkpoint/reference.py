"""Import the reference's PyTorch Lightning checkpoint (`Pretrained_CXR.ckpt`) safely.

The file is a torch zip archive whose pickle holds, next to the weights, objects
of PyTorch Lightning and OmegaConf (callback states keyed by callback classes,
the `DictConfig` of the hyper-parameters). Unpickling those the ordinary way
imports their packages and may run any code the file names, so the file is read
with a restricted unpickler instead:

- `find_class` hands out only torch's tensor-rebuild functions, dtypes and a few
  builtin containers; classes of OmegaConf, Lightning, argparse and numpy become
  inert `PickledObject` stand-ins that merely record what pickle gives them;
  any other name is refused before anything is called;
- the BUILD opcode (object state) is honoured only for stand-ins and for the
  `OrderedDict` of a state dict, so a file cannot set attributes on the allowed
  functions or classes.

The stand-ins are then turned into plain data, and the weights are renamed from
the reference's torchvision ResNet / Hugging Face BERT layout onto this
project's modules. Every key is either mapped or reported with a reason.
"""

from __future__ import annotations

import io
import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch

from afloc_cli.checkpoint.io import CHECKPOINTS_HINT, looks_like_safetensors, other_format, read_head
from afloc_cli.config import RESNET_ARCHS, ImageConfig, ModelConfig, TextConfig
from afloc_cli.errors import CheckpointError
from afloc_cli.vlp.model import AflocModel, build_model

REFERENCE_INTERNAL_SIZE = 299  # the reference upsamples 224 -> 299 inside its forward pass (hard-coded there)
REFERENCE_MAX_LENGTH = 97

_TRUST_HINT = "afloc runs no code from reference checkpoints: only tensors and plain data are allowed"


# ---- restricted unpickling --------------------------------------------------------------


class RefusedPickle(pickle.UnpicklingError):
    """The file asks for something a checkpoint has no business loading."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"refused to load {what}")


class PickledObject:
    """An inert record of a pickled object whose class is never imported.

    Pickle may create it (with arguments), give it state (BUILD), items (SETITEMS)
    or elements (APPENDS); it keeps all of that as data and does nothing else.
    """

    pickled_class: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = super().__new__(cls)
        obj.__dict__.update(args=args, state=None, items={}, elements=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_class}>"


# Packages whose classes appear in Lightning checkpoints only as bookkeeping: recorded, never imported.
_STAND_IN_PACKAGES = ("omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "numpy")
_STAND_IN_NAMES = {"argparse.Namespace"}

# Python 2 names that pickle protocol 2 still writes.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_PY2_NAMES = {
    ("__builtin__", "long"): ("builtins", "int"),
    ("__builtin__", "unicode"): ("builtins", "str"),
    ("__builtin__", "xrange"): ("builtins", "range"),
}


def _plain_defaultdict(*args: Any) -> dict[Any, Any]:
    """OmegaConf's resolver cache is a defaultdict; a plain dict holds the same items."""
    return {}


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol 2 writes `bytes` as `_codecs.encode(str, 'latin1')`; allow exactly that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle("_codecs.encode with anything but (str, 'latin1')")
    return text.encode("latin1")


def _allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        f"builtins.{t.__name__}": t
        for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool, slice, range)
    }
    allowed.update(
        {
            "collections.OrderedDict": OrderedDict,
            "collections.defaultdict": _plain_defaultdict,
            "_codecs.encode": _latin1_bytes,
            "typing.Any": Any,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        }
    )
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            allowed[f"torch.{name}"] = value
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so BUILD can be guarded
    """Unpickles only allow-listed globals; see the module docstring."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._stand_ins: dict[str, type[PickledObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module, name = _PY2_NAMES.get((module, name), (_PY2_MODULES.get(module, module), name))
        dotted = f"{module}.{name}"
        if dotted in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[dotted]
        if module.split(".")[0] in _STAND_IN_PACKAGES or dotted in _STAND_IN_NAMES:
            if dotted not in self._stand_ins:
                self._stand_ins[dotted] = type(name, (PickledObject,), {"pickled_class": dotted})
            return self._stand_ins[dotted]
        raise RefusedPickle(f"`{dotted}`")

    def _guarded_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, PickledObject):
            inst.__setstate__(state)
            return
        if type(inst) is OrderedDict and isinstance(state, dict):  # a state dict's `_metadata`
            for key, value in state.items():
                if not isinstance(key, str) or key.startswith("__"):
                    raise RefusedPickle(f"attribute {key!r} on an OrderedDict")
                inst.__dict__[key] = value
            return
        raise RefusedPickle(f"object state for {type(inst).__name__} {getattr(inst, '__name__', '')}".rstrip())

    dispatch[pickle.BUILD[0]] = _guarded_build


def _restricted_load(file: BinaryIO, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# What torch.load receives as `pickle_module`: it subclasses `Unpickler` and calls `load`.
_SAFE_PICKLE = types.ModuleType("afloc_restricted_pickle")
_SAFE_PICKLE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_SAFE_PICKLE.load = _restricted_load  # type: ignore[attr-defined]
_SAFE_PICKLE.loads = _restricted_loads  # type: ignore[attr-defined]
_SAFE_PICKLE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def _find_refusal(exc: BaseException | None) -> RefusedPickle | None:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, RefusedPickle):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _unpickle_file(path: Path) -> Any:
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"unreadable zip archive: {exc}", path=path) from exc
        if any(n.endswith("constants.pkl") or n.endswith(".py") for n in names):
            # torch.load hands TorchScript archives to torch.jit.load, which runs their code.
            raise CheckpointError(
                "refused: a TorchScript archive, not a Lightning checkpoint", path=path, hint=_TRUST_HINT
            )
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError("a zip file without data.pkl: not a PyTorch checkpoint", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_zip and path.suffix != ".safetensors":
                # Memory-mapped, so the optimizer states (twice the model's size) are never read;
                # should mapping fail on some old archive, the plain read below still works.
                try:
                    return torch.load(
                        str(path), map_location="cpu", pickle_module=_SAFE_PICKLE, weights_only=False, mmap=True
                    )
                except Exception as exc:  # noqa: BLE001
                    if _find_refusal(exc) is not None:
                        raise
            # A file object: torch.load must not dispatch on the name (".safetensors").
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", pickle_module=_SAFE_PICKLE, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a checkpoint we can read"
        refusal = _find_refusal(exc)
        if refusal is not None:
            raise CheckpointError(
                f"refused: the file asks to load {refusal.what}, which a reference checkpoint never needs; "
                "nothing from it was run",
                path=path,
                hint=_TRUST_HINT,
            ) from exc
        raise CheckpointError(
            f"not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})",
            path=path,
            hint="expected the reference's Lightning .ckpt (e.g. Pretrained_CXR.ckpt)",
        ) from exc


# ---- stand-ins -> plain data ------------------------------------------------------------

_MAX_DEPTH = 64


def _plain_key(key: Any) -> Any:
    value = plain_data(key)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def plain_data(obj: Any, _depth: int = 0) -> Any:
    """Turn unpickled OmegaConf / Lightning stand-ins (and containers of them) into plain Python data.

    OmegaConf pickles a `DictConfig`/`ListConfig` as its `__dict__`, whose `_content`
    is a dict/list of child nodes (or None / a "???" / "${...}" string); a value node
    keeps its value in `_val`. Interpolations are kept as their raw strings.
    """
    if _depth > _MAX_DEPTH:
        raise CheckpointError("hyper-parameters nested too deeply (or cyclic)")
    depth = _depth + 1
    if isinstance(obj, PickledObject):
        kind = obj.pickled_class
        state = obj.state if isinstance(obj.state, dict) else {}
        if kind.startswith("omegaconf.") and "_content" in state:
            return plain_data(state["_content"], depth)
        if kind.startswith("omegaconf.") and "_val" in state:
            return plain_data(state["_val"], depth)
        if obj.items:
            return {_plain_key(k): plain_data(v, depth) for k, v in obj.items.items()}
        if obj.elements:
            return [plain_data(v, depth) for v in obj.elements]
        if state:
            return {_plain_key(k): plain_data(v, depth) for k, v in state.items()}
        return f"<{kind}>"
    if isinstance(obj, type) and issubclass(obj, PickledObject):
        return obj.pickled_class
    if isinstance(obj, dict):
        return {_plain_key(k): plain_data(v, depth) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain_data(v, depth) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else f"<tensor {tuple(obj.shape)}>"
    if obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        return obj
    return repr(obj)


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


# ---- key mapping ------------------------------------------------------------------------

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_STEM_CONV = re.compile(r"conv1\.weight")
_STEM_BN = re.compile(rf"bn1\.{_BN}")
_BLOCK_CONV = re.compile(r"layer([1-4])\.(\d+)\.conv([1-3])\.weight")
_BLOCK_BN = re.compile(rf"layer([1-4])\.(\d+)\.bn([1-3])\.{_BN}")
_SHORTCUT_CONV = re.compile(r"layer([1-4])\.(\d+)\.downsample\.0\.weight")
_SHORTCUT_BN = re.compile(rf"layer([1-4])\.(\d+)\.downsample\.1\.{_BN}")

_PROJECTIONS = {
    "img_encoder.global_embedder.weight": "image_encoder.global_embedder.weight",
    "img_encoder.global_embedder.bias": "image_encoder.global_embedder.bias",
    "img_encoder.local_embedder.weight": "image_encoder.local_embedder.weight",
    "img_encoder.local2_embedder.weight": "image_encoder.local2_embedder.weight",
}
_REBUILT_TEXT_BUFFERS = {"embeddings.position_ids", "embeddings.token_type_ids"}
# Our keys that may be absent without harm: counters and index buffers, rebuilt or unused at inference.
_DEFAULTABLE_SUFFIXES = ("num_batches_tracked", "embeddings.position_ids", "embeddings.token_type_ids")


def _map_resnet_key(sub: str) -> str | None:
    """torchvision ResNet key -> transformers `ResNetModel` key (same network, other names)."""
    if _STEM_CONV.fullmatch(sub):
        return "embedder.embedder.convolution.weight"
    if m := _STEM_BN.fullmatch(sub):
        return f"embedder.embedder.normalization.{m[1]}"
    if m := _BLOCK_CONV.fullmatch(sub):
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.weight"
    if m := _BLOCK_BN.fullmatch(sub):
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}"
    if m := _SHORTCUT_CONV.fullmatch(sub):
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.weight"
    if m := _SHORTCUT_BN.fullmatch(sub):
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.{m[3]}"
    return None


def map_reference_key(key: str) -> tuple[str | None, str]:
    """A reference key -> (our key, "") when it maps, or (None, why it is left unused)."""
    if not key.startswith("afloc."):
        return None, "outside the reference's `afloc` module"
    rest = key[len("afloc.") :]
    if rest.startswith("text_encoder.model."):
        sub = rest[len("text_encoder.model.") :]
        if sub.startswith("pooler."):
            return None, "unused (pooler not used by AFLoc)"
        if sub in _REBUILT_TEXT_BUFFERS:
            return None, "index buffer the text model rebuilds itself"
        return f"text_encoder.model.{sub}", ""
    if rest.startswith("img_encoder.model."):
        sub = rest[len("img_encoder.model.") :]
        ours = _map_resnet_key(sub)
        if ours is not None:
            return f"image_encoder.backbone.{ours}", ""
        if sub.startswith("fc."):
            return None, "classification head (fc) not used by AFLoc"
        return None, "not part of a torchvision ResNet backbone"
    if rest in _PROJECTIONS:
        return _PROJECTIONS[rest], ""
    if rest.startswith("img_encoder."):
        return None, f"image head `{rest.split('.')[1]}` is not one of AFLoc's three projections"
    return None, "not part of the AFLoc image or text encoder"


def _four(values: list[int]) -> tuple[int, int, int, int]:
    return (values[0], values[1], values[2], values[3])


# ---- the checkpoint ---------------------------------------------------------------------


@dataclass
class ReferenceCheckpoint:
    state_dict: dict[str, torch.Tensor]  # already in OUR key names
    hyper_parameters: dict[str, Any]  # plain data (from the DictConfig)
    unmatched: list[tuple[str, str]]  # (reference key, reason) left unused
    missing: list[str]  # our keys absent from the file (filled only by to_model)
    meta: dict[str, Any]  # epoch, global_step, lightning version, ...
    source_keys: dict[str, str] = field(default_factory=dict)  # our key -> reference key

    def image_config(self) -> ImageConfig:
        """The image encoder the weights describe; tensor shapes decide, hyper-parameters cross-check."""
        sd = self.state_dict
        prefix = "image_encoder.backbone."
        stem = sd.get(f"{prefix}embedder.embedder.convolution.weight")
        if stem is None:
            raise CheckpointError("no image backbone weights (afloc.img_encoder.model.conv1) in the checkpoint")
        bottleneck = f"{prefix}encoder.stages.0.layers.0.layer.2.convolution.weight" in sd
        last_conv = 2 if bottleneck else 1
        depths: list[int] = []
        widths: list[int] = []
        block = re.compile(re.escape(prefix) + r"encoder\.stages\.(\d)\.layers\.(\d+)\.")
        blocks: dict[int, set[int]] = {}
        for key in sd:
            if m := block.match(key):
                blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        for stage in range(4):
            indices = blocks.get(stage, set())
            if not indices or indices != set(range(len(indices))):
                raise CheckpointError(f"image backbone weights of layer{stage + 1} are missing or incomplete")
            out = sd.get(f"{prefix}encoder.stages.{stage}.layers.0.layer.{last_conv}.convolution.weight")
            if out is None:
                raise CheckpointError(f"image backbone layer{stage + 1} has no output convolution")
            depths.append(len(indices))
            widths.append(int(out.shape[0]))
        layer_type = "bottleneck" if bottleneck else "basic"
        candidates = [name for name, spec in RESNET_ARCHS.items() if spec["layer_type"] == layer_type]
        exact = [name for name in candidates if tuple(RESNET_ARCHS[name]["depths"]) == tuple(depths)]
        arch = exact[0] if exact else candidates[0]
        spec = RESNET_ARCHS[arch]

        named = _lookup(self.hyper_parameters, "model.vision.model_name")
        if isinstance(named, str):
            normalized = named.lower().replace("_", "").replace("-", "")
            if normalized not in RESNET_ARCHS:
                raise CheckpointError(
                    f"hyper-parameters name the image model {named!r}, which afloc does not support "
                    "(ResNet-18/34/50/101 only)"
                )
            if normalized != arch or not exact:
                raise CheckpointError(
                    f"hyper-parameters name the image model {named!r}, but the weights are a ResNet with "
                    f"{layer_type} blocks and depths {tuple(depths)}",
                    hint="the file looks inconsistent; check that it is the checkpoint you meant",
                )
        return ImageConfig(
            arch=arch,
            hidden_sizes=None if tuple(widths) == tuple(spec["hidden_sizes"]) else _four(widths),
            depths=None if exact else _four(depths),
            embedding_size=int(stem.shape[0]),
            internal_size=REFERENCE_INTERNAL_SIZE,
            internal_align_corners=True,
        )

    def text_model_name(self) -> str | None:
        """The BERT the reference was trained with (hyper-parameters `model.text.bert_type`)."""
        name = _lookup(self.hyper_parameters, "model.text.bert_type")
        return name if isinstance(name, str) and name else None


def _build_checkpoint(raw: Any, path: Path) -> ReferenceCheckpoint:
    if not isinstance(raw, dict):
        raise CheckpointError(f"not a Lightning checkpoint (the file holds a {type(raw).__name__})", path=path)
    source = raw.get("state_dict")
    if not isinstance(source, dict):
        raise CheckpointError(
            "not a Lightning checkpoint (no state_dict)",
            path=path,
            hint="expected the reference's .ckpt (e.g. Pretrained_CXR.ckpt)",
        )
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unmatched: list[tuple[str, str]] = []
    for key, value in source.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"malformed state_dict entry {key!r} ({type(value).__name__})", path=path)
        ours, reason = map_reference_key(key)
        if ours is None:
            unmatched.append((key, reason))
        elif ours in state:
            unmatched.append((key, f"duplicate of {sources[ours]}"))
        else:
            state[ours] = value
            sources[ours] = key
    if not state:
        raise CheckpointError("no AFLoc weights in the state_dict (no `afloc.` keys)", path=path)
    hyper = plain_data(raw.get("hyper_parameters") or {})
    if not isinstance(hyper, dict):
        hyper = {}
    callbacks = raw.get("callbacks")
    meta = {
        "epoch": plain_data(raw.get("epoch")),
        "global_step": plain_data(raw.get("global_step")),
        "lightning_version": plain_data(raw.get("pytorch-lightning_version")),
        "callbacks": [str(_plain_key(k)) for k in callbacks] if isinstance(callbacks, dict) else [],
        "has_optimizer_states": bool(raw.get("optimizer_states")),
        "keys": sorted(str(_plain_key(k)) for k in raw),
    }
    return ReferenceCheckpoint(state, hyper, unmatched, [], meta, sources)


def read_reference_checkpoint(path: Path | str) -> ReferenceCheckpoint:
    """Read a reference Lightning checkpoint without running pickled code; keys renamed to ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path, hint="pass the reference .ckpt file")
    head = read_head(path)
    if looks_like_safetensors(head):  # its pickle reader would say "KeyError: 208"
        raise CheckpointError("a safetensors file, not the reference's Lightning .ckpt", path=path,
                              hint="an afloc checkpoint needs no import: pass it to --checkpoint")
    what = other_format(head)
    if what:
        raise CheckpointError(f"not a checkpoint: {what}", path=path, hint=CHECKPOINTS_HINT)
    return _build_checkpoint(_unpickle_file(path), path)


# ---- onto our model ---------------------------------------------------------------------


def _grouped(items: list[tuple[str, str]], label: str, limit: int = 3) -> list[str]:
    by_reason: dict[str, list[str]] = {}
    for key, reason in items:
        by_reason.setdefault(reason, []).append(key)
    lines = []
    for reason, keys in by_reason.items():
        shown = ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
        lines.append(f"{label} {len(keys)} key(s), {reason}: {shown}")
    return lines


def to_model(
    ref: ReferenceCheckpoint, text_folder: Path | str, max_length: int = REFERENCE_MAX_LENGTH, *, strict: bool = True
) -> tuple[AflocModel, list[str]]:
    """Build our model for `ref` with the BERT shape from `text_folder` and load the weights.

    Loading is strict except for the keys reported: unused reference keys, and our
    counters/index buffers the file lacks. Other weights the file lacks raise, unless
    `strict=False`, which leaves them at initialisation and reports them.
    """
    text_folder = Path(text_folder)
    image_cfg = ref.image_config()
    last_n = _lookup(ref.hyper_parameters, "model.text.last_n_layers")
    text_cfg = TextConfig(
        model=str(text_folder),
        max_length=max_length,
        last_n_layers=last_n if isinstance(last_n, int) and not isinstance(last_n, bool) and last_n > 0 else 4,
    )
    cfg = ModelConfig(image=image_cfg, text=text_cfg)
    model = build_model(cfg, text_folder=text_folder, pretrained_text=False)
    expected = model.state_dict()

    trained_with = ref.text_model_name()
    mismatched = [
        f"{key} is {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model"
        for key, value in sorted(ref.state_dict.items(), key=lambda item: not item[0].startswith("text_encoder."))
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        # The image side is inferred from these very weights, so a mismatch means the wrong text model.
        raise CheckpointError(
            f"the checkpoint does not fit the model built with text model {text_folder}: "
            f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[0]}",
            hint=f"pass the text model it was trained with ({trained_with or 'see its hyper-parameters'})",
        )
    for key in ref.state_dict:
        if key not in expected:
            ref.unmatched.append((ref.source_keys.get(key, key), "no such weight in this model"))
    loadable = {k: v for k, v in ref.state_dict.items() if k in expected}
    ref.missing = [k for k in expected if k not in loadable]
    needed = [k for k in ref.missing if not k.endswith(_DEFAULTABLE_SUFFIXES)]
    if needed and strict:
        raise CheckpointError(
            f"the checkpoint lacks {len(needed)} weight(s) the model needs, e.g. {', '.join(needed[:3])}",
            hint="is it an AFLoc checkpoint? strict=False loads it anyway, leaving those at initialisation",
        )
    result = model.load_state_dict(loadable, strict=False)
    # BatchNorm fills in a missing num_batches_tracked itself, so torch may report fewer than we do.
    if result.unexpected_keys or not set(result.missing_keys) <= set(ref.missing):
        raise CheckpointError(f"internal error: unexpected load result {result}")

    meta = ref.meta
    spec = image_cfg.resolved()
    lines = [
        f"reference checkpoint: epoch {meta.get('epoch')}, global step {meta.get('global_step')}, "
        f"PyTorch Lightning {meta.get('lightning_version')}",
        f"image encoder: {image_cfg.arch} ({spec['layer_type']} blocks, depths {tuple(spec['depths'])}, "
        f"widths {tuple(spec['hidden_sizes'])}), input upsampled to {image_cfg.internal_size} inside",
        f"text model: {text_folder}" + (f" (trained with {trained_with})" if trained_with else ""),
        f"loaded {len(loadable)} of {len(expected)} tensors",
    ]
    word_num = _lookup(ref.hyper_parameters, "data.text.word_num")
    if isinstance(word_num, int) and word_num != max_length:
        lines.append(f"note: trained with {word_num} tokens per report, reading {max_length}")
    lines += _grouped(ref.unmatched, "not loaded:")
    lines += _grouped(
        [
            (k, "left at initialisation" if k in needed else "counters/index buffers kept at their defaults")
            for k in ref.missing
        ],
        "not in the file:",
    )
    return model.eval(), lines
