"""`afloc compile`: the shared export, AOTInductor engines end to end, the engine folder's refusals,
and the arguments of the TensorRT call (TensorRT itself cannot run here; benchmarks/gpu_check.sh runs it).

One tiny model (ResNet-18 layout, widths 8..64, 64 px frames) keeps the single real AOTInductor
build of this module (image and text encoders, C++ compiled) to about a minute on two cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from afloc_cli.checkpoint.io import save_checkpoint
from afloc_cli.compile import aoti, tensorrt
from afloc_cli.compile import engine as engine_mod
from afloc_cli.compile.engine import CompiledImageEncoder, CompiledTextEncoder, image_metadata, load_engine
from afloc_cli.compile.export import (
    BatchProfile,
    example_frames,
    export_image_encoder,
    export_text_encoder,
    parse_batch_sizes,
)
from afloc_cli.config import ImageConfig, PreprocessConfig, small_config
from afloc_cli.errors import AflocError
from afloc_cli.image.data.transforms import normalize
from afloc_cli.vlp.inference_engine import LocalizationEngine
from afloc_cli.vlp.model import build_model

SIZE = 64
PROMPTS = ["Small left pleural effusion.", "Cardiomegaly.", "Pneumothorax"]


def cli(argv: list[str]) -> int:
    """The real command line, in process."""
    from afloc_cli.cli import run

    return run(argv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = small_config().replace(
        image=ImageConfig(arch="resnet18", hidden_sizes=(8, 16, 32, 64), embedding_size=8, internal_size=None),
        preprocess=PreprocessConfig(image_size=SIZE),
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    sha = save_checkpoint(model, path)
    return SimpleNamespace(model=model, path=path, sha=sha)


@pytest.fixture(scope="module")
def engine_dir(tiny, tmp_path_factory):
    """The one real AOTInductor build, through the command line (parity checked at 1, 3 and 8)."""
    out = tmp_path_factory.mktemp("engines") / "tiny-aoti"
    rc = cli(["compile", "--checkpoint", str(tiny.path), "--out", str(out), "--backend", "aoti",
              "--precision", "fp32", "--batch-sizes", "1,3,8", "--device", "cpu"])
    assert rc == 0
    return out


# ---- the shared export -------------------------------------------------------------------------
def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8,64") == (BatchProfile(1, 8, 64), [1, 8, 64])
    assert parse_batch_sizes("64, 1") == (BatchProfile(1, 64, 64), [1, 64])
    profile, _ = parse_batch_sizes("16")
    assert profile.static and profile.example_batch() == 16
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(AflocError):
            parse_batch_sizes(bad)


@pytest.mark.parametrize("input_format", ["normalized", "uint8"])
def test_export_has_a_dynamic_batch_and_matches_eager(tiny, input_format):
    exported = export_image_encoder(tiny.model.image_encoder, image_size=SIZE, profile=BatchProfile(1, 4, 8),
                                    input_format=input_format, shallow=True)
    assert list(exported.outputs) == ["shallow", "deep", "global"]
    batch = next(iter(exported.program.range_constraints.values()))
    assert (batch.lower, batch.upper) == (1, 8)
    module = exported.program.module()
    for b in (1, 5, 8):
        frames = example_frames(b, SIZE, seed=b)
        x = normalize(frames, 0.5, 0.5).contiguous()
        with torch.no_grad():
            got = module(frames if input_format == "uint8" else x)
            want = tiny.model.encode_images(x)
        for out, ref in zip(got, (want.shallow, want.deep, want.global_), strict=True):
            assert out.dtype == torch.float32 and out.shape[0] == b
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_outputs_are_read_in_the_engine_order(tiny):
    """metadata.json is written with sorted keys; the output order must survive that."""
    exported = export_image_encoder(tiny.model.image_encoder, image_size=SIZE, profile=BatchProfile(1, 2, 4),
                                    shallow=True)
    meta = {"backend": "aoti", "precision": "fp32", "batch_profile": exported.profile.to_dict(),
            "preprocessing": {"input_format": "normalized", "image_size": SIZE, "mean": 0.5, "std": 0.5},
            "image": image_metadata(exported, "image_encoder.pt2")}
    meta = json.loads(json.dumps(meta, sort_keys=True))
    eng = CompiledImageEncoder(exported.program.module(), meta, torch.device("cpu"), Path("e"))
    assert eng.levels == ("shallow", "deep", "global")
    frames = example_frames(2, SIZE)
    got = eng.encode_frames(frames)
    with torch.no_grad():
        want = tiny.model.encode_images(normalize(frames, 0.5, 0.5))
    for level in ("shallow", "deep", "global_"):
        torch.testing.assert_close(getattr(got, level), getattr(want, level), rtol=1e-4, atol=1e-5)


def test_text_export_keeps_the_python_pooling(tiny):
    exported = export_text_encoder(tiny.model.text_encoder)
    module = exported.program.module()
    compiled = CompiledTextEncoder(module, tiny.model.text_encoder, {"batch_profile": {"max": 2}},
                                   torch.device("cpu"))
    # 3 prompts through a max batch of 2: the chunking runs too.
    torch.testing.assert_close(compiled.encode_prompts(PROMPTS), tiny.model.encode_prompts(PROMPTS),
                               rtol=1e-4, atol=1e-5)


# ---- AOTInductor, end to end -------------------------------------------------------------------
def test_aoti_engine_matches_eager_inside_the_profile(tiny, engine_dir):
    eng = load_engine(engine_dir, tiny.sha, "cpu", text_encoder=tiny.model.text_encoder)
    assert eng.backend == "aoti" and eng.levels == ("deep", "global")
    for b in (1, 2, 3, 8):
        x = normalize(example_frames(b, SIZE, seed=10 + b), 0.5, 0.5)
        got = eng.encode_images(x, ("deep", "global"))
        with torch.no_grad():
            want = tiny.model.encode_images(x, ("deep", "global"))
        assert got.shallow is None
        torch.testing.assert_close(got.deep, want.deep, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.global_, want.global_, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eng.text.encode_prompts(PROMPTS), tiny.model.encode_prompts(PROMPTS),
                               rtol=1e-4, atol=1e-4)


def test_localization_engine_runs_on_the_compiled_model(tiny, engine_dir):
    """The wiring `afloc localize --engine` uses: LocalizationEngine(engine.bind(model), ...)."""
    cpu = torch.device("cpu")
    compiled = load_engine(engine_dir, tiny.sha, cpu, text_encoder=tiny.model.text_encoder)
    frames = example_frames(3, SIZE, seed=7)
    want = LocalizationEngine(tiny.model, PROMPTS, device=cpu)(frames)
    got = LocalizationEngine(compiled.bind(tiny.model), PROMPTS, device=cpu)(frames)  # type: ignore[arg-type]
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    with pytest.raises(AflocError, match="no shallow level"):
        LocalizationEngine(compiled.bind(tiny.model), PROMPTS, device=cpu, level="shallow")(frames)  # type: ignore[arg-type]


def test_metadata_says_what_was_compiled(tiny, engine_dir):
    meta = json.loads((engine_dir / "metadata.json").read_text())
    assert meta["format"] == "afloc-engine" and meta["backend"] == "aoti" and meta["device"] == "cpu"
    assert meta["checkpoint"]["sha256"] == tiny.sha
    assert meta["precision"] == "fp32"
    assert meta["batch_profile"] == {"min": 1, "opt": 3, "max": 8} and meta["batch_sizes"] == [1, 3, 8]
    pre = meta["preprocessing"]
    assert (pre["input_format"], pre["image_size"], pre["mean"], pre["std"]) == ("normalized", SIZE, 0.5, 0.5)
    assert meta["image"]["input"] == {"name": "x", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32"}
    d = tiny.model.embed_dim
    assert meta["image"]["outputs"] == [{"level": "deep", "shape": ["batch", d, 4, 4]},
                                        {"level": "global", "shape": ["batch", d]}]
    assert meta["text"]["output"] == ["batch", 97, d]
    assert meta["versions"]["torch"] == torch.__version__
    assert {"torch_tensorrt", "tensorrt", "afloc"} <= set(meta["versions"])
    assert meta["parity"]["ok"] and [r["batch"] for r in meta["parity"]["image"]] == [1, 3, 8]
    assert all(r["min_cosine"] > 0.9999 for r in meta["parity"]["image"])
    assert meta["model_config"]["preprocess"]["image_size"] == SIZE
    assert sorted(p.name for p in engine_dir.iterdir()) == ["image_encoder.pt2", "metadata.json", "text_encoder.pt2"]
    assert not list(engine_dir.parent.glob(".*partial*"))


def test_refuses_another_checkpoint_torch_or_device(tiny, engine_dir, monkeypatch):
    with pytest.raises(AflocError, match="compiled from checkpoint"):
        load_engine(engine_dir, "f" * 64, "cpu")
    with pytest.raises(AflocError, match="compiled for cpu"):
        load_engine(engine_dir, tiny.sha, "cuda")
    monkeypatch.setattr(engine_mod, "current_versions", lambda: {"torch": "9.1.0", "afloc": "x"})
    with pytest.raises(AflocError, match="compiled with torch"):
        load_engine(engine_dir, tiny.sha, "cpu")


def test_refuses_a_batch_outside_the_profile(tiny, engine_dir):
    eng = load_engine(engine_dir, tiny.sha, "cpu")
    with pytest.raises(AflocError, match="outside this engine's batch profile 1..8"):
        eng.encode_images(normalize(example_frames(9, SIZE), 0.5, 0.5), ("deep", "global"))
    with pytest.raises(AflocError, match="--batch-size 8 or less"):
        eng.check_batch_size(16)
    with pytest.raises(AflocError, match=r"must be \(B, 3, 64, 64\)"):
        eng.encode_images(normalize(example_frames(2, SIZE), 0.5, 0.5)[:, :1], ("deep", "global"))


def test_batches_below_the_minimum_are_padded(tiny):
    calls = []

    def runner(x):
        calls.append(x.shape[0])
        return [x.mean((1, 2, 3))[:, None, None, None].expand(-1, 2, 4, 4), x.mean((1, 2, 3))[:, None]]

    meta = {"backend": "aoti", "precision": "fp32", "batch_profile": {"min": 4, "opt": 4, "max": 8},
            "preprocessing": {"input_format": "normalized", "image_size": SIZE, "mean": 0.5, "std": 0.5},
            "image": {"outputs": [{"level": "deep"}, {"level": "global"}]}}
    eng = CompiledImageEncoder(runner, meta, torch.device("cpu"), Path("e"))
    feats = eng.encode_frames(example_frames(3, SIZE))
    assert calls == [4] and feats.deep.shape == (3, 2, 4, 4) and feats.global_.shape == (3, 1)


# ---- the command line --------------------------------------------------------------------------
def test_tensorrt_backend_here_is_one_line(tiny, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    rc = cli(["compile", "--checkpoint", str(tiny.path), "--out", str(tmp_path / "e"), "--backend", "tensorrt"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == ("afloc: error: --backend tensorrt needs an NVIDIA GPU with torch-tensorrt installed "
                   "(pip install afloc[tensorrt])")
    assert not (tmp_path / "e").exists()


def test_usage_errors(tiny, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    ck = str(tiny.path)
    assert cli(["compile", "--checkpoint", ck, "--out", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["compile", "--checkpoint", ck, "--out", str(tmp_path / "e"), "--backend", "onnx"]) == 2
    assert cli(["compile", "--checkpoint", ck, "--out", str(tmp_path / "e"), "--precision", "fp16",
                "--device", "cpu"]) == 2
    assert cli(["compile", "--checkpoint", ck, "--out", str(tmp_path / "e"), "--batch-sizes", "0"]) == 2
    assert not (tmp_path / "e").exists()


def test_parity_failure_exits_non_zero_and_keeps_nothing(tiny, tmp_path, monkeypatch, capsys):
    """A compiled graph that drifts (simulated: no C++ here) leaves the old engine as it was."""
    programs: dict[str, torch.export.ExportedProgram] = {}

    def fake_compile(program, path):
        programs[str(path)] = program
        path.write_bytes(b"not a real package")
        return path

    def fake_load(path, device):
        module = programs[str(path)].module()
        return lambda x: [o + 0.5 * o.abs().max() * torch.randn_like(o) for o in module(x)]

    monkeypatch.setattr(aoti, "compile_package", fake_compile)
    monkeypatch.setattr(aoti, "load_package", fake_load)
    monkeypatch.setenv("AFLOC_CHECKPOINT", str(tiny.path))  # --checkpoint from the environment
    out = tmp_path / "engine"
    out.mkdir()
    (out / "metadata.json").write_text("{}")  # a previous engine that --overwrite would replace
    rc = cli(["compile", "--out", str(out), "--batch-sizes", "1,2", "--no-text", "--overwrite", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 4
    assert "NO" in captured.err and "nothing was written" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert [p.name for p in out.iterdir()] == ["metadata.json"] and (out / "metadata.json").read_text() == "{}"


# ---- TensorRT: the arguments of the call, against a stand-in torch_tensorrt --------------------
def _fake_torch_tensorrt(signature: str) -> tuple[ModuleType, dict]:
    seen: dict = {}

    class Input:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    def compile_explicit(exported_program, inputs=None, *, arg_inputs=None, use_explicit_typing=False,
                         enabled_precisions=None, **kwargs):
        seen["compile"] = {"program": exported_program, "arg_inputs": arg_inputs,
                           "use_explicit_typing": use_explicit_typing, "enabled_precisions": enabled_precisions}
        return "trt-graph-module"

    def compile_weak(exported_program, inputs=None, *, arg_inputs=None, enabled_precisions=None, **kwargs):
        seen["compile"] = {"program": exported_program, "arg_inputs": arg_inputs,
                           "enabled_precisions": enabled_precisions, **kwargs}
        return "trt-graph-module"

    def compile_strong(exported_program, inputs=None, *, arg_inputs=None, **kwargs):
        seen["compile"] = {"program": exported_program, "arg_inputs": arg_inputs, **kwargs}
        return "trt-graph-module"

    def save(module, file_path, *, output_format="exported_program", arg_inputs=None, **kwargs):
        seen["save"] = {"module": module, "file_path": file_path, "output_format": output_format,
                        "arg_inputs": arg_inputs, **kwargs}

    fake = ModuleType("torch_tensorrt")
    fake.Input = Input  # type: ignore[attr-defined]
    fake.save = save  # type: ignore[attr-defined]
    fake.dynamo = SimpleNamespace(  # type: ignore[attr-defined]
        compile={"explicit": compile_explicit, "weak": compile_weak, "strong": compile_strong}[signature]
    )
    fake.__version__ = "2.14.0"  # type: ignore[attr-defined]
    return fake, seen


@pytest.mark.parametrize("signature", ["explicit", "weak", "strong"])
def test_tensorrt_call_arguments(tmp_path, monkeypatch, signature):
    fake, seen = _fake_torch_tensorrt(signature)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    program = object()
    path = tensorrt.build(program, [((3, 224, 224), torch.float32)], BatchProfile(1, 8, 64), torch.float16,
                          tmp_path / "image_encoder.ep")
    assert path == tmp_path / "image_encoder.ep"
    call = seen["compile"]
    assert call["program"] is program
    (spec,) = call["arg_inputs"]
    assert spec.kwargs == {"min_shape": (1, 3, 224, 224), "opt_shape": (8, 3, 224, 224),
                           "max_shape": (64, 3, 224, 224), "dtype": torch.float32}
    if signature == "explicit":  # TensorRT builds the fp16 graph as typed; precisions must stay {fp32}
        assert call["use_explicit_typing"] is True and call["enabled_precisions"] is None
    elif signature == "weak":
        assert call["enabled_precisions"] == {torch.float16}
    else:
        assert set(call) == {"program", "arg_inputs"}
    saved = seen["save"]
    assert saved["module"] == "trt-graph-module" and saved["file_path"] == str(path)
    assert saved["output_format"] == "exported_program" and saved["arg_inputs"] is call["arg_inputs"]


def test_tensorrt_static_profile_and_text_inputs(tmp_path, monkeypatch):
    fake, seen = _fake_torch_tensorrt("strong")
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tensorrt.build(object(), [((97,), torch.int64)] * 3, BatchProfile(4, 4, 4), torch.float32, tmp_path / "t.ep")
    assert [s.kwargs for s in seen["compile"]["arg_inputs"]] == [{"shape": (4, 97), "dtype": torch.int64}] * 3


def test_tensorrt_refused_without_cuda_or_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AflocError) as info:
        tensorrt.require_tensorrt()
    assert str(info.value) == tensorrt.INSTALL_MESSAGE
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails
    with pytest.raises(AflocError, match="pip install afloc"):
        tensorrt.require_tensorrt()


def test_localize_cli_with_engine_matches_eager(tiny, engine_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from afloc_cli.heatmaps.store import HeatmapFile

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (50, 40 + i), dtype=np.uint8)).save(folder / f"{i}.png")
    common = [str(folder), "--prompt", "left pleural effusion", "--checkpoint", str(tiny.path),
              "--workers", "0", "--batch-size", "2", "--device", "cpu"]
    assert cli(["localize", *common, "--out", str(tmp_path / "eager.h5")]) == 0
    assert cli(["localize", *common, "--engine", str(engine_dir), "--out", str(tmp_path / "aoti.h5")]) == 0
    with HeatmapFile.open(tmp_path / "eager.h5") as a, HeatmapFile.open(tmp_path / "aoti.h5") as b:
        for i in range(4):
            np.testing.assert_allclose(a.maps(i), b.maps(i), rtol=2e-2, atol=2e-2)
    # A batch size beyond the engine's profile is refused before any work.
    assert cli(["localize", *common[:-4], "--batch-size", "64", "--device", "cpu", "--engine", str(engine_dir),
                "--out", str(tmp_path / "big.h5")]) == 2
