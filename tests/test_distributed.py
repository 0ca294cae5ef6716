"""DDP with gathered embeddings: 2 gloo ranks give the loss and gradients of one process on the global batch."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from afloc_cli.config import ImageConfig, PreprocessConfig, small_config
from afloc_cli.text.data.sentences import prepare_report
from afloc_cli.text.model.encoder import TextEncoder
from afloc_cli.vlp.model import build_model
from train.config import TrainConfig, with_losses
from train.data import prepare_cache
from train.distributed import DistInfo
from train.loop import _Forward, compute_losses, levels_for

REPORTS = [
    "There is a small left pleural effusion. The heart size is normal.",
    "Right upper lobe opacity. No pneumothorax is seen. Mild cardiomegaly.",
    "Large right pneumothorax.",
    "The lungs are clear. No effusion. Heart size normal.",
]
_TOKENIZE = TextEncoder.tokenize
WATCH = ("image_encoder.global_embedder.weight", "image_encoder.local_embedder.weight",
         "image_encoder.local2_embedder.weight", "text_encoder.model.encoder.layer.5.output.dense.weight")


def _padded_to_max_length() -> Callable:
    """Pad every batch to max_length, on both sides of the comparison.

    Padding to the batch's longest text is the same computation up to fp32
    reduction order (test_text_encoder checks that), but a rank's longest text
    differs from the whole batch's, and the word-level loss amplifies that
    rounding past this test's 1e-4: the test is about gathering, so it fixes
    the padding.
    """
    return functools.partialmethod(_TOKENIZE, pad_to_max_length=True)


FULL = "global,sent,word"


def _setup(losses: str) -> tuple[TrainConfig, nn.Module, torch.Tensor, list]:
    cfg = with_losses(TrainConfig(model=small_config().replace(
        image=ImageConfig(arch="resnet18", hidden_sizes=(8, 16, 32, 64), embedding_size=8, internal_size=None),
        preprocess=PreprocessConfig(image_size=64)), batch_size=4, precision="fp32"), losses)
    torch.manual_seed(0)
    random.seed(0)
    model = build_model(cfg.model)
    model.eval()  # BatchNorm on running statistics and no dropout: the comparison is about the losses
    frames = torch.randint(0, 255, (4, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    texts = [prepare_report(r) for r in REPORTS]
    return cfg, model, frames, texts


def _worker(rank: int, world: int, init_file: str, out: str, losses: str, steps: int,
            word_scales: tuple[float, ...] = ()) -> None:
    """`steps` optimizer-free steps of `losses` under DDP on this rank's half of the batch (step i's word loss
    scaled by word_scales[i], 1 past its end); saves the last step's losses and the watched gradients (None
    where a parameter got none)."""
    TextEncoder.tokenize = _padded_to_max_length()  # this process is the worker's own
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg, model, frames, texts = _setup(losses)
    forward = nn.parallel.DistributedDataParallel(_Forward(model, levels_for(cfg)), find_unused_parameters=True)
    per = len(texts) // world
    part = slice(rank * per, (rank + 1) * per)
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        result = compute_losses(forward, model, frames[part], texts[part], cfg, DistInfo(rank, world, 0),
                                torch.device("cpu"), "fp32",
                                word_scale=word_scales[step] if step < len(word_scales) else 1.0)
        result["total"].backward()
    params = dict(model.named_parameters())
    torch.save({"losses": {k: v.detach() for k, v in result.items()}, "grads": {k: params[k].grad for k in WATCH}},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _one_process(losses: str, word_scale: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, nn.Parameter]]:
    """The same losses on the whole batch in this process, backpropagated: (losses, parameters)."""
    cfg, model, frames, texts = _setup(losses)
    result = compute_losses(_Forward(model, levels_for(cfg)), model, frames, texts, cfg, DistInfo(),
                            torch.device("cpu"), "fp32", word_scale=word_scale)
    result["total"].backward()
    return result, dict(model.named_parameters())


def _spawn(tmp_path: Path, losses: str, steps: int, word_scales: tuple[float, ...] = ()) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), losses, steps, word_scales), nprocs=2,
             join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_two_gloo_ranks_equal_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(TextEncoder, "tokenize", _padded_to_max_length())
    losses, params = _one_process(FULL)
    for got in _spawn(tmp_path, FULL, steps=1):
        for key in ("global", "sentence", "word", "total"):
            torch.testing.assert_close(got["losses"][key], losses[key].detach(), rtol=1e-5, atol=1e-6)
        for key in WATCH:
            torch.testing.assert_close(got["grads"][key], params[key].grad, rtol=1e-4, atol=1e-7, msg=key)


def test_two_gloo_ranks_train_an_ablation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two steps of the GLoRIA-like ablation (no word loss) under DDP give one process's loss and gradients,
    and the word level's embedder gets none."""
    monkeypatch.setattr(TextEncoder, "tokenize", _padded_to_max_length())
    losses, params = _one_process("global,sent")
    assert params["image_encoder.local2_embedder.weight"].grad is None
    for got in _spawn(tmp_path, "global,sent", steps=2):
        torch.testing.assert_close(got["losses"]["total"], losses["total"].detach(), rtol=1e-5, atol=1e-6)
        for key in WATCH:
            want = params[key].grad
            if want is None:
                assert got["grads"][key] is None or not bool(got["grads"][key].any()), key
            else:
                torch.testing.assert_close(got["grads"][key], want, rtol=1e-4, atol=1e-7, msg=key)


def test_two_gloo_ranks_across_the_word_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """optim.word_start under DDP: a step whose word loss is only logged (no graph through the word level's
    embedder), then one with it, as a run crosses its start; the ranks agree with one process on the second."""
    monkeypatch.setattr(TextEncoder, "tokenize", _padded_to_max_length())
    held, held_params = _one_process(FULL, word_scale=0.0)
    assert not held["word"].requires_grad and held_params["image_encoder.local2_embedder.weight"].grad is None
    losses, params = _one_process(FULL, word_scale=0.5)
    for got in _spawn(tmp_path, FULL, steps=2, word_scales=(0.0, 0.5)):
        torch.testing.assert_close(got["losses"]["total"], losses["total"].detach(), rtol=1e-5, atol=1e-6)
        for key in WATCH:
            torch.testing.assert_close(got["grads"][key], params[key].grad, rtol=1e-4, atol=1e-7, msg=key)


def _tiny_corpus(root: Path, n: int = 10) -> Path:
    """Ten small image-report pairs (eight to train on): their manifest."""
    rng = np.random.default_rng(0)
    rows = ["image_path,report,split"]
    for i in range(n):
        Image.fromarray((rng.random((48, 40)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,\"{REPORTS[i % len(REPORTS)]}\",{'val' if i >= 8 else 'train'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _tiny_cache(root: Path, n: int = 10) -> Path:
    """The tiny corpus, prepared at 64 px."""
    prepare_cache(_tiny_corpus(root, n), root / "cache", size=64, workers=0)
    return root / "cache"


SETTINGS = ["preset=small", "model.image.hidden_sizes=8,16,32,64", "model.image.embedding_size=8",
            "model.preprocess.image_size=64", "batch_size=4", "workers=0", "checkpoint_every=1",
            "precision=fp32", "epochs=2", "max_steps=2", "val_every=0"]
ROOT = str(Path(__file__).resolve().parent.parent)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_torchrun_pretrain_writes_one_metrics_file_and_resumes(tmp_path: Path):
    """`torchrun -m afloc_cli pretrain` on 2 gloo ranks: only rank 0 writes metrics.csv (one header) and says
    what it trained, and --resume of the run continues it."""
    cache = _tiny_cache(tmp_path)
    run = tmp_path / "run"
    command = [*TORCHRUN, "-m", "afloc_cli", "pretrain", str(cache), "--out", str(run), "--device", "cpu"]

    def torchrun(*args: str) -> str:
        done = subprocess.run([*command, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    out = torchrun(*sum((["--set", s] for s in SETTINGS), []))
    assert out.count("trained 2 steps") == 1, out
    assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()] == ["step", "1", "2"]
    out = torchrun("--resume", "--set", "max_steps=4")
    assert out.count("trained 4 steps") == 1 and out.count("resumed from") == 1, out
    steps = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()]
    assert steps == ["step", "1", "2", "3", "4"]


# `afloc`, with prepare_cache counting its calls (one line per call: the caller's rank) in $PREPARE_LOG.
COUNTING_AFLOC = """
import os, sys
import train.data
from afloc_cli.cli import run
real = train.data.prepare_cache
def counted(*args, **kwargs):
    with open(os.environ["PREPARE_LOG"], "a") as log:
        log.write(os.environ["RANK"] + "\\n")
    return real(*args, **kwargs)
train.data.prepare_cache = counted
sys.exit(run(sys.argv[1:]))
"""


def _torchrun_pretrain_corpus(tmp_path: Path, corpus: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`torchrun afloc pretrain CORPUS` on 2 gloo ranks: the run, and the ranks that called prepare_cache."""
    (tmp_path / "afloc_counting.py").write_text(COUNTING_AFLOC)
    log = tmp_path / "prepared.log"
    command = [*TORCHRUN, str(tmp_path / "afloc_counting.py"), "pretrain", str(corpus), "--out", str(tmp_path / "run"),
               "--device", "cpu", *sum((["--set", s] for s in SETTINGS), [])]
    done = subprocess.run(command, env={**ENV, "PREPARE_LOG": str(log)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return done, log.read_text().split() if log.is_file() else []


def test_torchrun_pretrain_of_a_corpus_prepares_it_once(tmp_path: Path):
    """Given a corpus, not a cache, only rank 0 prepares OUT/cache (on the storage every rank shares); the other
    rank waits for it, and both then train on it."""
    done, prepared_by = _torchrun_pretrain_corpus(tmp_path, _tiny_corpus(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert prepared_by == ["0"], out
    assert out.count("preparing ") == 1 and out.count("trained 2 steps") == 1, out
    assert (tmp_path / "run" / "cache" / "meta.json").is_file()


def test_torchrun_pretrain_stops_every_rank_when_preparing_fails(tmp_path: Path):
    """If rank 0 cannot prepare the cache, the other rank does not wait forever: it stops with one line."""
    (tmp_path / "manifest.csv").write_text("no,such,columns\n1,2,3\n")
    done, prepared_by = _torchrun_pretrain_corpus(tmp_path, tmp_path / "manifest.csv")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert prepared_by == ["0"], out
    assert out.count("rank 0 failed to prepare the cache: ") == 1, out
