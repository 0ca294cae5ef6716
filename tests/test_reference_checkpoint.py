"""Importing the reference's Lightning checkpoint: safe unpickling, complete key accounting, exact weights.

The files are built here the way PyTorch Lightning 1.1 wrote `Pretrained_CXR.ckpt`:
a dict with a state dict under `afloc.`, an OmegaConf `DictConfig` of the
hyper-parameters, callback states keyed by a callback class, optimizer and
scheduler states. The image weights use torchvision's ResNet names, written out
by hand below, so the importer's renaming is checked against an independent
layout, and a functional ResNet forward pass written from those names checks the
imported model's features.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from afloc_cli.checkpoint.reference import (
    ReferenceCheckpoint,
    map_reference_key,
    read_reference_checkpoint,
    to_model,
)
from afloc_cli.config import ImageConfig
from afloc_cli.errors import CheckpointError

omegaconf = pytest.importorskip("omegaconf")
transformers = pytest.importorskip("transformers")

BERT_NAME = "emilyalsentzer/Bio_ClinicalBERT"
TEXT_DIM = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ---- building reference-style files -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory, text_folder) -> Path:
    """A random 4-layer, 16-wide BERT with the packaged model's tokenizer: fast, and offline."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=TEXT_DIM,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (Path(text_folder) / name).is_file():
            shutil.copy(Path(text_folder) / name, folder / name)
    return folder


def reference_bert_state(folder: Path) -> dict[str, torch.Tensor]:
    """BERT weights as the reference stored them: with the pooler and the position_ids buffer."""
    torch.manual_seed(1)
    bert = transformers.BertModel(transformers.BertConfig.from_pretrained(folder), add_pooling_layer=True)
    state = dict(bert.state_dict())
    state["embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings).unsqueeze(0)
    return state


def _bn(state: dict[str, torch.Tensor], prefix: str, channels: int) -> None:
    state[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(channels)
    state[f"{prefix}.bias"] = 0.1 * torch.randn(channels)
    state[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels)
    state[f"{prefix}.running_var"] = 0.5 + torch.rand(channels)
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(1234)


def _conv(out: int, inp: int, k: int) -> torch.Tensor:
    return torch.randn(out, inp, k, k) / math.sqrt(inp * k * k)


def torchvision_resnet_state(block: str, depths, widths, stem: int) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys and shapes, written out by hand (no torchvision needed)."""
    torch.manual_seed(2)
    state: dict[str, torch.Tensor] = {"conv1.weight": _conv(stem, 3, 7)}
    _bn(state, "bn1", stem)
    inplanes = stem
    for k, (depth, out) in enumerate(zip(depths, widths, strict=True), start=1):
        for i in range(depth):
            p = f"layer{k}.{i}"
            if block == "basic":
                state[f"{p}.conv1.weight"] = _conv(out, inplanes, 3)
                _bn(state, f"{p}.bn1", out)
                state[f"{p}.conv2.weight"] = _conv(out, out, 3)
                _bn(state, f"{p}.bn2", out)
            else:
                width = out // 4
                state[f"{p}.conv1.weight"] = _conv(width, inplanes, 1)
                _bn(state, f"{p}.bn1", width)
                state[f"{p}.conv2.weight"] = _conv(width, width, 3)
                _bn(state, f"{p}.bn2", width)
                state[f"{p}.conv3.weight"] = _conv(out, width, 1)
                _bn(state, f"{p}.bn3", out)
            stride = 2 if (k > 1 and i == 0) else 1
            if stride != 1 or inplanes != out:
                state[f"{p}.downsample.0.weight"] = _conv(out, inplanes, 1)
                _bn(state, f"{p}.downsample.1", out)
            inplanes = out
    return state


def reference_state(block: str, depths, widths, stem: int, bert: dict[str, torch.Tensor]) -> OrderedDict:
    """The full `afloc.` state dict, including heads AFLoc does not use."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in torchvision_resnet_state(block, depths, widths, stem).items():
        state[f"afloc.img_encoder.model.{key}"] = value
    torch.manual_seed(3)
    c2, c3, c4 = widths[1:]
    state["afloc.img_encoder.global_embedder.weight"] = torch.randn(TEXT_DIM, c4) / math.sqrt(c4)
    state["afloc.img_encoder.global_embedder.bias"] = 0.1 * torch.randn(TEXT_DIM)
    state["afloc.img_encoder.local_embedder.weight"] = torch.randn(TEXT_DIM, c3, 1, 1) / math.sqrt(c3)
    state["afloc.img_encoder.local2_embedder.weight"] = torch.randn(TEXT_DIM, c2, 1, 1) / math.sqrt(c2)
    state["afloc.img_encoder.local_f_embedder.weight"] = torch.randn(TEXT_DIM, c4, 1, 1)
    state["afloc.img_encoder.model.fc.weight"] = torch.randn(3, c4)
    for key, value in bert.items():
        state[f"afloc.text_encoder.model.{key}"] = value
    return state


def reference_hparams(model_name: str | None) -> dict:
    vision: dict = {"freeze_cnn": False, "pretrained": True}
    if model_name is not None:
        vision["model_name"] = model_name
    return {
        "experiment_name": "AFLoc_pretrain",
        "trial_name": None,
        "run_name": "${experiment_name}_run",
        "model": {
            "afloc": {"temp1": 4.0, "temp2": 5.0, "temp3": 10.0, "use_local_word_loss": True},
            "vision": vision,
            "text": {"bert_type": BERT_NAME, "last_n_layers": 4, "embedding_dim": TEXT_DIM},
        },
        "data": {"dataset": ["mimic"], "text": {"word_num": 97}, "image": {"imsize": 256}},
        "train": {"optimizer": {"name": "Adam", "weight_decay": 1e-6}, "seeds": [1, 2]},
    }


FAKE_LIGHTNING = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")


def save_lightning_file(path: Path, state: OrderedDict, hparams: dict, extra: dict | None = None) -> None:
    """torch.save a dict shaped like Lightning 1.1's, with a real DictConfig and a class-keyed callback.

    Lightning's callback class comes from a throwaway module that is removed again,
    so the file can only be read without importing it.
    """
    added = [name for name in FAKE_LIGHTNING if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    module = sys.modules[FAKE_LIGHTNING[-1]]
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": FAKE_LIGHTNING[-1]})
    module.ModelCheckpoint = model_checkpoint  # type: ignore[attr-defined]
    try:
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.Adam([param], lr=2e-5, betas=(0.5, 0.999), weight_decay=1e-6)
        param.sum().backward()
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        checkpoint = {
            "epoch": 4,
            "global_step": 8610,
            "pytorch-lightning_version": "1.1.8",
            "callbacks": {
                model_checkpoint: {
                    "monitor": "val_loss",
                    "best_model_score": torch.tensor(1.2345),
                    "best_model_path": "/data/ckpt/epoch=4.ckpt",
                    "dirpath": "./data/ckpt",
                }
            },
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
            "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 17},
            "state_dict": state,
            "hparams_name": "cfg",
            "hyper_parameters": omegaconf.OmegaConf.create(hparams),
            "hparams_type": omegaconf.DictConfig,
        }
        checkpoint.update(extra or {})
        torch.save(checkpoint, path)
    finally:
        for name in added:
            del sys.modules[name]


BASIC = ("basic", (2, 2, 2, 2), (8, 16, 32, 64), 8, "resnet_18")
BOTTLENECK = ("bottleneck", (1, 1, 1, 1), (16, 32, 64, 128), 8, None)


@pytest.fixture(scope="module")
def bert_state(tiny_bert_folder) -> dict[str, torch.Tensor]:
    return reference_bert_state(tiny_bert_folder)


@pytest.fixture(scope="module", params=[BASIC, BOTTLENECK], ids=["basic", "bottleneck"])
def reference_file(request, tmp_path_factory, bert_state):
    block, depths, widths, stem, name = request.param
    state = reference_state(block, depths, widths, stem, bert_state)
    path = tmp_path_factory.mktemp("ref") / "Pretrained_CXR.ckpt"
    save_lightning_file(path, state, reference_hparams(name))
    return path, state, request.param


# ---- hand-made reference forward pass ---------------------------------------------------


def hand_made_features(state: OrderedDict, x: torch.Tensor, block: str, depths) -> dict[str, torch.Tensor]:
    """The reference's ResNet forward, written directly from torchvision's key names."""
    sd = {k[len("afloc.img_encoder.") :]: v for k, v in state.items() if k.startswith("afloc.img_encoder.")}

    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(
            h,
            sd[f"model.{p}.running_mean"],
            sd[f"model.{p}.running_var"],
            sd[f"model.{p}.weight"],
            sd[f"model.{p}.bias"],
            training=False,
            eps=1e-5,
        )

    def conv(h: torch.Tensor, p: str, stride: int = 1) -> torch.Tensor:
        w = sd[f"model.{p}.weight"]
        return F.conv2d(h, w, stride=stride, padding=w.shape[-1] // 2)

    h = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=True)
    h = F.max_pool2d(F.relu(bn(F.conv2d(h, sd["model.conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    stages = []
    for k, depth in enumerate(depths, start=1):
        for i in range(depth):
            p, stride = f"layer{k}.{i}", (2 if k > 1 and i == 0 else 1)
            if block == "basic":
                out = F.relu(bn(conv(h, f"{p}.conv1", stride), f"{p}.bn1"))
                out = bn(conv(out, f"{p}.conv2"), f"{p}.bn2")
            else:
                out = F.relu(bn(conv(h, f"{p}.conv1"), f"{p}.bn1"))
                out = F.relu(bn(conv(out, f"{p}.conv2", stride), f"{p}.bn2"))
                out = bn(conv(out, f"{p}.conv3"), f"{p}.bn3")
            shortcut = h
            if f"model.{p}.downsample.0.weight" in sd:
                shortcut = bn(F.conv2d(h, sd[f"model.{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            h = F.relu(out + shortcut)
        stages.append(h)
    return {
        "shallow": F.conv2d(stages[1], sd["local2_embedder.weight"]),
        "deep": F.conv2d(stages[2], sd["local_embedder.weight"]),
        "global_": F.linear(stages[3].mean(dim=(2, 3)), sd["global_embedder.weight"], sd["global_embedder.bias"]),
    }


# ---- tests ------------------------------------------------------------------------------


def test_key_mapping_against_hand_written_names():
    stem = "image_encoder.backbone.embedder.embedder."
    stages = "image_encoder.backbone.encoder.stages."
    bert, text = "afloc.text_encoder.model.", "text_encoder.model."
    expected = {
        "afloc.img_encoder.model.conv1.weight": stem + "convolution.weight",
        "afloc.img_encoder.model.bn1.num_batches_tracked": stem + "normalization.num_batches_tracked",
        "afloc.img_encoder.model.layer1.0.conv1.weight": stages + "0.layers.0.layer.0.convolution.weight",
        "afloc.img_encoder.model.layer2.1.conv2.weight": stages + "1.layers.1.layer.1.convolution.weight",
        "afloc.img_encoder.model.layer4.2.bn3.weight": stages + "3.layers.2.layer.2.normalization.weight",
        "afloc.img_encoder.model.layer3.5.bn1.running_mean": stages + "2.layers.5.layer.0.normalization.running_mean",
        "afloc.img_encoder.model.layer3.0.downsample.0.weight": stages + "2.layers.0.shortcut.convolution.weight",
        "afloc.img_encoder.model.layer3.0.downsample.1.running_var": stages
        + "2.layers.0.shortcut.normalization.running_var",
        "afloc.img_encoder.global_embedder.bias": "image_encoder.global_embedder.bias",
        "afloc.img_encoder.local_embedder.weight": "image_encoder.local_embedder.weight",
        "afloc.img_encoder.local2_embedder.weight": "image_encoder.local2_embedder.weight",
        bert + "encoder.layer.3.attention.self.query.weight": text + "encoder.layer.3.attention.self.query.weight",
        bert + "embeddings.word_embeddings.weight": text + "embeddings.word_embeddings.weight",
    }
    for reference, ours in expected.items():
        assert map_reference_key(reference) == (ours, ""), reference
    unused = {
        "afloc.text_encoder.model.pooler.dense.weight": "unused (pooler not used by AFLoc)",
        "afloc.text_encoder.model.embeddings.position_ids": "rebuilds",
        "afloc.img_encoder.model.fc.weight": "fc",
        "afloc.img_encoder.local_f_embedder.weight": "local_f_embedder",
        "afloc.img_encoder.model.layer5.0.conv1.weight": "ResNet",
        "model.conv1.weight": "outside",
    }
    for reference, reason in unused.items():
        ours, why = map_reference_key(reference)
        assert ours is None and reason in why, reference


def test_reads_lightning_file_without_importing_lightning_or_omegaconf(reference_file, monkeypatch):
    path, state, (_, _, _, _, name) = reference_file
    for module in [m for m in sys.modules if m == "omegaconf" or m.startswith("omegaconf.")] + list(FAKE_LIGHTNING):
        monkeypatch.setitem(sys.modules, module, None)  # any import of these now fails
    ref = read_reference_checkpoint(path)

    assert ref.hyper_parameters == reference_hparams(name)  # interpolations kept as written
    assert ref.text_model_name() == BERT_NAME
    assert ref.meta["epoch"] == 4 and ref.meta["global_step"] == 8610
    assert ref.meta["lightning_version"] == "1.1.8"
    assert ref.meta["callbacks"] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert ref.meta["has_optimizer_states"]

    # Every reference key is either mapped (exactly once) or reported with a reason.
    mapped = set(ref.source_keys.values())
    reported = {key for key, _ in ref.unmatched}
    assert mapped | reported == set(state) and not mapped & reported
    assert len(ref.source_keys) == len(ref.state_dict)
    for ours, reference in ref.source_keys.items():
        assert ref.state_dict[ours] is not None and torch.equal(ref.state_dict[ours], state[reference])
    reasons = dict(ref.unmatched)
    assert reasons["afloc.text_encoder.model.pooler.dense.weight"] == "unused (pooler not used by AFLoc)"
    assert "local_f_embedder" in reasons["afloc.img_encoder.local_f_embedder.weight"]
    assert "fc" in reasons["afloc.img_encoder.model.fc.weight"]
    assert "afloc.text_encoder.model.embeddings.position_ids" in reasons
    assert ref.missing == []


def test_image_config_is_inferred_from_shapes(reference_file):
    path, _, (block, depths, widths, stem, _) = reference_file
    cfg = read_reference_checkpoint(path).image_config()
    if block == "basic":
        assert cfg == ImageConfig(
            arch="resnet18", hidden_sizes=widths, depths=None, embedding_size=stem, internal_size=299
        )
    else:
        assert cfg == ImageConfig(
            arch="resnet50", hidden_sizes=widths, depths=depths, embedding_size=stem, internal_size=299
        )


def test_standard_widths_need_no_override(bert_state):
    image = torchvision_resnet_state("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64)
    state = {map_reference_key(f"afloc.img_encoder.model.{k}")[0]: v for k, v in image.items()}
    ref = ReferenceCheckpoint(state, {"model": {"vision": {"model_name": "resnet_34"}}}, [], [], {})
    assert ref.image_config() == ImageConfig(arch="resnet34", embedding_size=64, internal_size=299)


def test_imported_model_matches_hand_made_reference(reference_file, tiny_bert_folder, bert_state):
    path, state, (block, depths, *_) = reference_file
    ref = read_reference_checkpoint(path)
    model, report = to_model(ref, tiny_bert_folder)

    assert not model.training
    assert model.cfg.text.max_length == 97 and model.cfg.image.internal_size == 299
    # Nothing the model needs is missing; every tensor it holds came from the file.
    assert ref.missing == []
    ours = model.state_dict()
    assert set(ours) == set(ref.state_dict)
    for key, value in bert_state.items():
        if key.startswith("pooler.") or key == "embeddings.position_ids":
            continue
        torch.testing.assert_close(ours[f"text_encoder.model.{key}"], value, rtol=0, atol=0)

    torch.manual_seed(4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        got = model.encode_images(x)
        want = hand_made_features(state, x, block, depths)
    for level in ("shallow", "deep", "global_"):
        torch.testing.assert_close(getattr(got, level), want[level], rtol=1e-4, atol=1e-5)
    assert got.deep.shape[-1] == 19 and got.shallow.shape[-1] == 38

    text = "\n".join(report)
    assert "epoch 4" in text and "1.1.8" in text and BERT_NAME in text
    assert "pooler not used by AFLoc" in text and "local_f_embedder" in text and "fc" in text
    with torch.no_grad():
        assert model.encode_prompts(["small left pleural effusion"]).shape == (1, TEXT_DIM)


def test_hyper_parameters_contradicting_the_weights(tmp_path, bert_state):
    block, depths, widths, stem, _ = BASIC
    path = tmp_path / "odd.ckpt"
    save_lightning_file(path, reference_state(block, depths, widths, stem, bert_state), reference_hparams("resnet_50"))
    ref = read_reference_checkpoint(path)
    with pytest.raises(CheckpointError, match="resnet_50"):
        ref.image_config()


def test_wrong_text_model_is_named(reference_file, text_folder):
    ref = read_reference_checkpoint(reference_file[0])
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        to_model(ref, text_folder)  # the 384-wide packaged MiniLM, not the 16-wide BERT of the file
    assert BERT_NAME in str(info.value)


def test_missing_weights_raise_unless_lenient(tmp_path, bert_state, tiny_bert_folder):
    block, depths, widths, stem, name = BASIC
    state = reference_state(block, depths, widths, stem, bert_state)
    del state["afloc.img_encoder.local2_embedder.weight"]
    del state["afloc.img_encoder.model.bn1.num_batches_tracked"]
    path = tmp_path / "partial.ckpt"
    save_lightning_file(path, state, reference_hparams(name))

    with pytest.raises(CheckpointError, match="local2_embedder"):
        to_model(read_reference_checkpoint(path), tiny_bert_folder)
    ref = read_reference_checkpoint(path)
    model, report = to_model(ref, tiny_bert_folder, strict=False)
    assert set(ref.missing) == {
        "image_encoder.local2_embedder.weight",
        "image_encoder.backbone.embedder.embedder.normalization.num_batches_tracked",
    }
    assert any("local2_embedder" in line and "initialisation" in line for line in report)
    assert any("num_batches_tracked" in line and "defaults" in line for line in report)


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_without_running(tmp_path, bert_state):
    marker = tmp_path / "pwned"
    block, depths, widths, stem, name = BASIC
    state = reference_state(block, depths, widths, stem, bert_state)

    as_zip = tmp_path / "zip.ckpt"
    torch.save({"state_dict": state, "payload": _RunsCode(marker)}, as_zip)
    as_legacy = tmp_path / "legacy.ckpt"
    torch.save(_RunsCode(marker), as_legacy, _use_new_zipfile_serialization=False)
    in_callbacks = tmp_path / "callbacks.ckpt"
    save_lightning_file(in_callbacks, state, reference_hparams(name), extra={"callbacks": {"x": _RunsCode(marker)}})

    for path in (as_zip, as_legacy, in_callbacks):
        with pytest.raises(CheckpointError, match="refused.*system") as info:
            read_reference_checkpoint(path)
        assert info.value.hint and "no code" in info.value.hint
    assert not marker.exists()


def test_object_state_on_allowed_functions_is_refused(tmp_path):
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD (None, {"__defaults__": ()}):
    # an ordinary unpickler would setattr on the function.
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    path = tmp_path / "build.ckpt"
    path.write_bytes(payload)
    before = torch._utils._rebuild_tensor_v2.__defaults__
    with pytest.raises(CheckpointError, match="refused"):
        read_reference_checkpoint(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_reference_checkpoint(tmp_path / "nope.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("just some text\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_reference_checkpoint(text)
    plain_zip = tmp_path / "plain.ckpt"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="data.pkl"):
        read_reference_checkpoint(plain_zip)
    tensor_only = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_reference_checkpoint(tensor_only)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="no AFLoc weights"):
        read_reference_checkpoint(foreign)
    suffix = tmp_path / "named.safetensors"  # torch.load must not dispatch on the name
    torch.save(torch.zeros(3), suffix)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_reference_checkpoint(suffix)
    # Read as pickles, these were "not a readable PyTorch checkpoint (KeyError: 56)": say what they are.
    real_safetensors = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(real_safetensors))
    with pytest.raises(CheckpointError, match="a safetensors file, not the reference's Lightning .ckpt"):
        read_reference_checkpoint(real_safetensors)
    heat_maps = tmp_path / "run.h5"
    with h5py.File(heat_maps, "w") as f:
        f["x"] = [1]
    with pytest.raises(CheckpointError, match="not a checkpoint: an HDF5 file"):
        read_reference_checkpoint(heat_maps)


def test_load_any_imports_a_reference_file(reference_file, tiny_bert_folder):
    from afloc_cli.checkpoint.loader import load_any

    loaded = load_any(reference_file[0], text_model=str(tiny_bert_folder))
    assert loaded.kind == "reference"
    assert any("pooler" in note for note in loaded.notes)


def test_import_reference_and_inspect_cli(reference_file, tiny_bert_folder, tmp_path, capsys, monkeypatch):
    import json

    from afloc_cli.checkpoint.io import load_checkpoint
    from afloc_cli.cli import run

    src = reference_file[0]
    assert run(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"].startswith("reference")
    assert any("pooler" in line for line in info["unmatched_keys"])
    # The table, in an 80-column pipe, shows the unmatched key names in full.
    monkeypatch.setenv("COLUMNS", "80")
    assert run(["inspect", str(src)]) == 0
    assert "afloc.text_encoder.model.pooler.dense.weight: unused (pooler not used by AFLoc)" in capsys.readouterr().out

    out = tmp_path / "imported.safetensors"
    assert run(["import-reference", str(src), "--text-model", str(tiny_bert_folder), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.is_file() and len(summary["sha256"]) == 64
    model = load_checkpoint(out)
    ours = model.state_dict()
    for key, value in reference_file[1].items():
        if key.startswith("afloc.img_encoder.local_embedder"):
            torch.testing.assert_close(ours["image_encoder.local_embedder.weight"], value)
    # A second import refuses to overwrite.
    assert run(["import-reference", str(src), "--text-model", str(tiny_bert_folder), "--out", str(out)]) == 2
    # Without --text-model and without the named BERT in the local cache: one line that says to pass it.
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    assert run(["import-reference", str(src), "--out", str(tmp_path / "other.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --text-model FOLDER" in err and BERT_NAME in err


def test_import_reference_checks_out_before_converting(reference_file, tiny_bert_folder, tmp_path, capsys, monkeypatch):
    """--out X.ckpt --overwrite once replaced the input it converted; --out FOLDER failed only at the end."""
    import afloc_cli.checkpoint.reference as reference
    from afloc_cli.cli import run

    src = tmp_path / "Pretrained_CXR.ckpt"
    shutil.copy(reference_file[0], src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr(reference, "to_model", lambda *a, **k: pytest.fail("converted before checking --out"))
    cases = [(src, "the output is the input"), (tmp_path / "sub" / ".." / src.name, "the output is the input"),
             (tmp_path / "sub", "is a folder")]
    for out, why in cases:
        code = run(["import-reference", str(src), "--text-model", str(tiny_bert_folder), "--out", str(out),
                    "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and why in err and f"{out}: " in err, err
    assert src.read_bytes() == before
