"""The heat-map store: schema round trip, refusals, crash safety under SIGKILL, shard merging."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.store import (
    AsyncHeatmapWriter,
    HeatmapFile,
    HeatmapWriter,
    ImageRecord,
    content_differences,
    equal_contents,
    merge,
)

REPO = Path(__file__).resolve().parents[1]
CREATED = "2024-05-01T12:00:00+00:00"
PROMPTS = ["pleural effusion", "pneumothorax", "cardiomegaly"]
GRID = 7
ATTRS: dict[str, Any] = {
    "checkpoint_sha256": "ab" * 32,
    "model_config": json.dumps({"image": {"arch": "resnet50"}}),
    "preprocessing": json.dumps({"size": 224}),
    "heatmap_config": json.dumps({"sigma": 1.5}),
    "level": "deep",
    "afloc_version": "0.1.0",
}

# The producer both the killed child processes and the in-test resumes run. Data depend only on
# the image's global index, so any split into batches must give the same file.
PRODUCER = r'''
import json, os, sys, time
from pathlib import Path
import numpy as np
from afloc_cli.heatmaps.store import AsyncHeatmapWriter, HeatmapWriter, ImageRecord

def image(g, n_prompts, grid):
    rng = np.random.default_rng(g)
    return rng.standard_normal((n_prompts, grid, grid)) * 4, rng.standard_normal(n_prompts)

def record(path, g):
    h, w = 1000 + g, 800 + 3 * g
    rh, rw = (224, int(w * 224 / h)) if h >= w else (int(h * 224 / w), 224)
    lb = {"height": h, "width": w, "size": 224, "resized_height": rh, "resized_width": rw,
          "pad_top": (224 - rh) // 2, "pad_left": (224 - rw) // 2}
    return ImageRecord(path=path, height=h, width=w, letterbox=lb,
                       reader={"window": [40.0, 400.0], "inverted": g % 2 == 1, "syntax": "1.2.840.10008.1.2.1"})

def produce(cfg):
    n_total, fail = cfg["n_total"], set(cfg.get("fail", []))
    indices = cfg.get("indices") or list(range(n_total))
    paths = [f"/data/cxr/{g:05d}.dcm" for g in indices]
    prompts, grid, batch = cfg["prompts"], cfg["grid"], cfg["batch"]
    writer = HeatmapWriter(Path(cfg["out"]), paths=paths, indices=indices, prompts=prompts, grid=grid,
                           attrs=cfg["attrs"], resume=cfg.get("resume", False), overwrite=False,
                           created=cfg.get("created"))
    with AsyncHeatmapWriter(writer, max_pending=2) as sink:
        done = sink.done_indices()
        todo = [i for i in range(len(paths)) if i not in done]
        print("READY", len(done), flush=True)
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            ok = [i for i in chunk if indices[i] not in fail]
            for i in chunk:
                if indices[i] in fail:
                    sink.write_failure(i, ImageRecord(path=paths[i], height=0, width=0, letterbox={}, reader={},
                                                      status="failed", error=f"{paths[i]}: cannot decode"))
            data = [image(indices[i], len(prompts), grid) for i in ok]
            maps = np.stack([d[0] for d in data]).astype(np.float32)
            scores = np.stack([d[1] for d in data]).astype(np.float32)
            sink.write_batch(ok, maps, scores, [record(paths[i], indices[i]) for i in ok])
            if cfg.get("flush", True):
                sink.flush()
            print("BATCH", start, flush=True)
            time.sleep(cfg.get("sleep", 0.0))
        sink.finalize()
    print("DONE", flush=True)

def install_stall(out, stall):
    """Hang (to be SIGKILLed) around the k-th journal rename or the final rename."""
    real_replace = os.replace
    seen = {"batches": 0}
    kind, _, when = stall.partition(":")

    def replace(src, dst):
        dst_s = str(dst)
        hit = False
        if dst_s.endswith(".npz"):
            seen["batches"] += 1
            hit = kind == f"batch{seen['batches']}"
        elif dst_s == out:
            hit = kind == "final"
        if hit and when == "before":
            print("STALL", flush=True)
            time.sleep(120)
        real_replace(src, dst)
        if hit and when == "after":
            print("STALL", flush=True)
            time.sleep(120)

    os.replace = replace

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    if cfg.get("stall"):
        install_stall(cfg["out"], cfg["stall"])
    produce(cfg)
'''


@pytest.fixture(scope="module")
def producer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("producer") / "producer.py"
    script.write_text(PRODUCER)
    return script


def config(out: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"out": str(out), "n_total": 30, "fail": [5, 17], "prompts": PROMPTS, "grid": GRID,
                           "batch": 6, "attrs": ATTRS, "created": CREATED}
    cfg.update(extra)
    return cfg


def produce(producer: Path, cfg: dict[str, Any]) -> None:
    """Run the producer in this process (the resume "in the test")."""
    runpy.run_path(str(producer), run_name="producer")["produce"](cfg)


def spawn(producer: Path, cfg: dict[str, Any]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(producer), json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def kill_at(proc: subprocess.Popen[str], marker: str, count: int = 1, delay: float = 0.0) -> None:
    """SIGKILL the child `delay` seconds after it has printed `marker` `count` times."""
    assert proc.stdout is not None
    seen = 0
    while seen < count:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError(f"child ended before {marker} x{count}: {proc.stderr.read() if proc.stderr else ''}")
        seen += line.startswith(marker)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL or (delay and proc.returncode == 0)


@pytest.fixture(scope="module")
def reference(producer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "ref.h5"
    produce(producer, config(out))
    return out


def make_record(path: str, height: int = 20, width: int = 10) -> ImageRecord:
    lb = {"height": height, "width": width, "size": 224, "resized_height": 224, "resized_width": 112,
          "pad_top": 0, "pad_left": 56}
    return ImageRecord(path=path, height=height, width=width, letterbox=lb, reader={"window": None})


def small_writer(out: Path, n: int = 4, **kw: Any) -> HeatmapWriter:
    args: dict[str, Any] = {"paths": [f"p{i}.png" for i in range(n)], "prompts": ["a", "b"], "grid": 3,
                            "attrs": ATTRS, "resume": False, "overwrite": False}
    args.update(kw)
    return HeatmapWriter(out, **args)


def fill(writer: HeatmapWriter, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = writer.n_images
    writer.write_batch(list(range(n)), rng.standard_normal((n, 2, 3, 3)), rng.standard_normal((n, 2)),
                       [make_record(f"p{i}.png") for i in range(n)])


# ---------------------------------------------------------------------------------------------
def test_round_trip_schema(reference: Path) -> None:
    with HeatmapFile.open(reference) as hf:
        assert hf.prompts == PROMPTS and hf.n_images == 30 and hf.grid == GRID
        assert hf.paths[3] == "/data/cxr/00003.dcm" and hf.find("/data/cxr/00003.dcm") == 3
        for key, value in ATTRS.items():
            assert hf.attrs[key] == value
        assert hf.attrs["schema_version"] == 1 and hf.attrs["n_images"] == 30 and hf.attrs["n_prompts"] == 3
        assert hf.attrs["grid"] == GRID and hf.attrs["created"] == CREATED
        rng = np.random.default_rng(4)
        maps, scores = rng.standard_normal((3, GRID, GRID)) * 4, rng.standard_normal(3)
        np.testing.assert_array_equal(hf.raw(4, 1), maps[1].astype(np.float16).astype(np.float32))
        assert hf.raw(4, 1).dtype == np.float32 and hf.maps(4).shape == (3, GRID, GRID)
        np.testing.assert_array_equal(hf.scores()[4], scores.astype(np.float32))
        rec = hf.record(4)
        assert rec.status == "ok" and rec.error == "" and (rec.height, rec.width) == (1004, 812)
        assert rec.letterbox["size"] == 224 and rec.letterbox["height"] == 1004
        assert rec.reader == {"window": [40.0, 400.0], "inverted": False, "syntax": "1.2.840.10008.1.2.1"}
        with pytest.raises(IndexError):
            hf.raw(30, 0)
    with h5py.File(reference, "r") as f:
        heat = f["heatmaps"]
        assert heat.dtype == np.float16 and heat.shape == (30, 3, GRID, GRID)
        assert heat.chunks == (1, 3, GRID, GRID) and heat.compression == "gzip"
        assert f["scores"].dtype == np.float32 and f["scores"].shape == (30, 3)
        assert list(f["index"][()]) == list(range(30))
        for name in ("path", "height", "width", "lb_size", "lb_resized_height", "lb_resized_width", "lb_pad_top",
                     "lb_pad_left", "reader", "status", "error"):
            assert f[name].shape == (30,)
    assert not reference.with_name(reference.name + ".partial").exists()


def test_failures_recorded(reference: Path) -> None:
    with HeatmapFile.open(reference) as hf:
        failed = hf.failures()
        assert [r.path for r in failed] == ["/data/cxr/00005.dcm", "/data/cxr/00017.dcm"]
        assert all(r.status == "failed" and "cannot decode" in r.error and r.letterbox == {} for r in failed)
        assert np.isnan(hf.raw(5, 0)).all() and np.isnan(hf.scores()[17]).all()
        assert not np.isnan(hf.scores()[6]).any()


def test_two_runs_are_byte_identical(producer: Path, reference: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.h5"
    produce(producer, config(again, batch=11))  # another batch split, same data
    assert equal_contents(reference, again)
    assert reference.read_bytes() == again.read_bytes()  # `created` was given, so even the bytes agree
    other_time = tmp_path / "other_time.h5"
    produce(producer, config(other_time, created=None))
    assert equal_contents(reference, other_time)
    assert content_differences(reference, other_time, ignore_attrs=()) == [
        f"/ attribute 'created': {CREATED!r} != {HeatmapFile.open(other_time).attrs['created']!r}"
    ]


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    w = small_writer(out)
    fill(w)
    w.finalize()
    assert w.finalize() == out  # idempotent
    with pytest.raises(AflocError, match="exists.*--overwrite or --resume"):
        small_writer(out)
    w2 = small_writer(out, overwrite=True)
    fill(w2, seed=1)
    w2.finalize()
    with HeatmapFile.open(out) as hf:
        assert hf.raw(0, 0)[0, 0] == np.float16(np.random.default_rng(1).standard_normal((4, 2, 3, 3))[0, 0, 0, 0])
    with pytest.raises(AflocError, match="contradict"):
        small_writer(out, overwrite=True, resume=True)


def test_incomplete_finalize_and_interrupted_journal(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    w = small_writer(out)
    w.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])
    with pytest.raises(AflocError, match="3 of 4 images have no result"):
        w.finalize()
    with pytest.raises(AflocError, match="another afloc run"):
        small_writer(out, resume=True)
    w.close()
    with pytest.raises(AflocError, match="interrupted run"):
        small_writer(out)
    w2 = small_writer(out, resume=True)
    assert w2.done_indices() == {0}
    w2.close()


def test_bad_batches_rejected(tmp_path: Path) -> None:
    w = small_writer(tmp_path / "x.h5")
    with pytest.raises(ValueError, match="heatmaps shape"):
        w.write_batch([0], np.zeros((1, 2, 4, 4)), np.zeros((1, 2)), [make_record("p0.png")])
    with pytest.raises(ValueError, match="expected 'p1.png'"):
        w.write_batch([1], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])
    w.close()


def test_resume_refuses_changed_run(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    w = small_writer(out)
    w.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])
    w.close()
    with pytest.raises(AflocError, match="prompts differ"):
        small_writer(out, resume=True, prompts=["a", "c"])
    with pytest.raises(AflocError, match="checkpoint"):
        small_writer(out, resume=True, attrs={**ATTRS, "checkpoint_sha256": "cd" * 32})
    with pytest.raises(AflocError, match="heatmap_config"):
        small_writer(out, resume=True, attrs={**ATTRS, "heatmap_config": "{}"})
    with pytest.raises(AflocError, match="input paths"):
        small_writer(out, resume=True, paths=["q0.png", "p1.png", "p2.png", "p3.png"])
    w2 = small_writer(out, resume=True)
    fill(w2)
    w2.finalize()
    # Resuming a finished file is a no-op, but only for the same run.
    w3 = small_writer(out, resume=True)
    assert w3.done_indices() == {0, 1, 2, 3} and w3.finalize() == out
    with pytest.raises(AflocError, match="prompts differ"):
        small_writer(out, resume=True, prompts=["b", "a"])


def test_a_run_begun_before_inputs_sha256_still_resumes(tmp_path: Path) -> None:
    """Files of an afloc that did not record the input list's hash resume under one that does; two hashes that
    differ still refuse (the run's files changed between the runs)."""
    out = tmp_path / "x.h5"
    w = small_writer(out)  # the older writer: no inputs_sha256
    w.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])
    w.close()
    w2 = small_writer(out, resume=True, attrs={**ATTRS, "inputs_sha256": "ab" * 32})
    assert w2.done_indices() == {0}
    w2.close()
    hashed = tmp_path / "y.h5"
    w = small_writer(hashed, attrs={**ATTRS, "inputs_sha256": "ab" * 32})
    w.close()
    with pytest.raises(AflocError, match="input list"):
        small_writer(hashed, resume=True, attrs={**ATTRS, "inputs_sha256": "cd" * 32})


# ---------------------------------------------------------------------------------------------
# Crash safety: SIGKILL a writing child at chosen moments, resume, compare with the reference.
@pytest.mark.parametrize(
    ("kills", "expect", "done"),
    [
        ([{"marker": "READY"}], None, 0),  # before any batch
        ([{"marker": "BATCH", "count": 2}], None, 12),  # between batches
        # journal renames: 1 = failure of image 5, 2 = images 0-4, 3 = images 6-11, 4 = failure of image 17
        ([{"stall": "batch3:before"}], "batch-tmp", 6),  # batch file written and fsynced, not yet renamed
        ([{"stall": "batch4:after"}], None, 13),  # renamed, nothing more
        ([{"stall": "final:before"}], "final-tmp", 30),  # the final file built but not renamed
        ([{"stall": "final:after"}], "final-and-journal", 30),  # renamed, journal not yet removed
        ([{"marker": "BATCH", "count": 1}, {"stall": "batch3:before"}], None, 13),  # killed twice
        ([{"delay": 0.25, "batch": 2, "flush": False, "sleep": 0.03}], None, None),  # wherever it happens to be
    ],
    ids=["start", "between", "mid-batch", "after-batch", "mid-finalize", "after-finalize", "twice", "timed"],
)
def test_resume_after_sigkill(producer: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              kills: list[dict[str, Any]], expect: str | None, done: int | None) -> None:
    out = tmp_path / "run.h5"
    journal = out.with_name(out.name + ".partial")
    for k, kill in enumerate(kills):
        extra = {key: v for key, v in kill.items() if key in ("stall", "batch", "flush")}
        proc = spawn(producer, config(out, resume=k > 0, sleep=kill.get("sleep", 0.05), **extra))
        if "stall" in kill:
            kill_at(proc, "STALL")
        elif "delay" in kill:
            kill_at(proc, "READY", delay=kill["delay"])  # start the clock once the child is running
        else:
            kill_at(proc, kill["marker"], kill.get("count", 1))
    if expect == "batch-tmp":
        assert list(journal.glob(".*.npz.tmp")) and not out.exists()
    elif expect == "final-tmp":
        assert list(tmp_path.glob(".run.h5.tmp-*")) and not out.exists()
    elif expect == "final-and-journal":
        assert out.exists() and journal.exists()
    capsys.readouterr()
    produce(producer, config(out, resume=True))
    if done is not None:
        assert capsys.readouterr().out.startswith(f"READY {done}\n")
    assert not journal.exists() and not list(tmp_path.glob(".run.h5*"))
    assert content_differences(reference, out) == []
    assert out.read_bytes() == reference.read_bytes()


# ---------------------------------------------------------------------------------------------
def run_shards(producer: Path, folder: Path, n_shards: int, **extra: Any) -> list[Path]:
    outs = []
    for k in range(n_shards):
        out = folder / f"shard{k}.h5"
        produce(producer, config(out, indices=list(range(k, 30, n_shards)), **extra))
        outs.append(out)
    return outs


def test_merged_shards_equal_single_run(producer: Path, reference: Path, tmp_path: Path) -> None:
    shards = run_shards(producer, tmp_path, 3)
    with HeatmapFile.open(shards[1]) as hf:
        assert hf.n_images == 10 and list(hf.indices) == list(range(1, 30, 3))
    merged = merge([shards[2], shards[0], shards[1]], tmp_path / "merged.h5")
    assert content_differences(reference, merged) == []
    assert merged.read_bytes() == reference.read_bytes()
    with pytest.raises(AflocError, match="exists"):
        merge(shards, merged)
    merge(shards, merged, overwrite=True)
    with pytest.raises(AflocError, match="image index 1 is missing"):
        merge([shards[0], shards[2]], tmp_path / "gap.h5")
    partial = merge([shards[0], shards[2]], tmp_path / "gap.h5", allow_gaps=True)
    with HeatmapFile.open(partial) as hf:
        assert hf.n_images == 20 and list(hf.indices[:3]) == [0, 2, 3]
    with pytest.raises(AflocError, match="also in"):
        merge([shards[0], shards[0], shards[1], shards[2]], tmp_path / "dup.h5")


def test_merge_refuses_other_runs(producer: Path, tmp_path: Path) -> None:
    base = run_shards(producer, tmp_path, 2)
    (tmp_path / "ck").mkdir()
    (tmp_path / "pr").mkdir()
    other_ckpt = run_shards(producer, tmp_path / "ck", 2, attrs={**ATTRS, "checkpoint_sha256": "ff" * 32})
    other_prompts = run_shards(producer, tmp_path / "pr", 2, prompts=["a", "b", "c"])
    with pytest.raises(AflocError, match=r"ck/shard1.h5.*different checkpoint"):
        merge([base[0], other_ckpt[1]], tmp_path / "m.h5")
    with pytest.raises(AflocError, match=r"pr/shard1.h5.*different prompts"):
        merge([base[0], other_prompts[1]], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_async_writer_raises_thread_error(tmp_path: Path) -> None:
    w = small_writer(tmp_path / "x.h5")
    calls = {"n": 0}

    def broken(*args: Any) -> None:
        calls["n"] += 1
        raise OSError("No space left on device")

    w.write_batch = broken  # type: ignore[method-assign]
    sink = AsyncHeatmapWriter(w, max_pending=1)
    sink.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])
    with pytest.raises(OSError, match="No space left"):
        for _ in range(50):  # the queue keeps draining, so this never blocks
            sink.write_batch([1], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p1.png")])
            time.sleep(0.01)
    with pytest.raises(OSError, match="No space left"):
        sink.finalize()
    sink.close()
    assert calls["n"] == 1

    # ... and at the end of the with block when nothing else was called
    w2 = small_writer(tmp_path / "y.h5")
    w2.write_batch = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="No space left"), AsyncHeatmapWriter(w2) as sink2:
        sink2.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])


def test_async_writer_keeps_queued_work_on_error_in_caller(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError, match="inference crashed"), AsyncHeatmapWriter(small_writer(out)) as sink:
        sink.write_batch([0, 1], np.zeros((2, 2, 3, 3)), np.zeros((2, 2)), [make_record("p0.png"),
                                                                              make_record("p1.png")])
        raise RuntimeError("inference crashed")
    w = small_writer(out, resume=True)  # the journal lock was released and the batch kept
    assert w.done_indices() == {0, 1}
    w.close()


def test_equal_contents_sees_differences(reference: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.h5"
    copy.write_bytes(reference.read_bytes())
    assert equal_contents(reference, copy)
    with h5py.File(copy, "r+") as f:
        f["scores"][0, 0] = 123.0
        f.attrs["level"] = "fused"
    diffs = content_differences(reference, copy)
    assert any("scores" in d for d in diffs) and any("level" in d for d in diffs)
    assert not equal_contents(reference, copy)


def test_reader_refuses_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(AflocError, match="not found"):
        HeatmapFile.open(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(AflocError, match="not a readable HDF5"):
        HeatmapFile.open(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(AflocError, match="not an afloc heat-map file"):
        HeatmapFile.open(tmp_path / "other.h5")


def test_empty_shard(tmp_path: Path) -> None:
    out = small_writer(tmp_path / "empty.h5", n=0).finalize()
    with HeatmapFile.open(out) as hf:
        assert hf.n_images == 0 and hf.scores().shape == (0, 2) and hf.failures() == []


def test_prompt_embeddings_round_trip_resume_and_merge(tmp_path: Path) -> None:
    """The text-side vectors travel with the maps: stored, kept across a resume, carried through a merge."""
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    with pytest.raises(ValueError, match="prompt_embeddings shape"):
        small_writer(tmp_path / "bad.h5", prompt_embeddings=np.zeros((3, 3)))
    w = small_writer(tmp_path / "plain.h5")
    fill(w)
    with HeatmapFile.open(w.finalize()) as hf:
        assert hf.prompt_embeddings() is None  # files without them (older ones too) read as before

    # Interrupted after one batch; the resume recomputes slightly different vectors (another thread
    # count): the file keeps the ones the first batch was computed against.
    out = tmp_path / "resumed.h5"
    first = small_writer(out, prompt_embeddings=vectors)
    first.write_batch([0, 1], np.zeros((2, 2, 3, 3)), np.zeros((2, 2)), [make_record("p0.png"), make_record("p1.png")])
    first.close()
    again = small_writer(out, resume=True, prompt_embeddings=vectors + 1e-7)
    again.write_batch([2, 3], np.zeros((2, 2, 3, 3)), np.zeros((2, 2)), [make_record("p2.png"), make_record("p3.png")])
    with HeatmapFile.open(again.finalize()) as hf:
        assert np.array_equal(hf.prompt_embeddings(), vectors)

    shards = []
    for k, shift in enumerate((0.0, 1e-7, 1.0)):
        s = small_writer(tmp_path / f"s{k}.h5", paths=[f"q{k}.png"], indices=[k], prompt_embeddings=vectors + shift)
        s.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record(f"q{k}.png")])
        shards.append(s.finalize())
    with HeatmapFile.open(merge(shards[:2], tmp_path / "merged.h5", allow_gaps=True)) as hf:
        assert np.array_equal(hf.prompt_embeddings(), vectors)
    with pytest.raises(AflocError, match="prompt embeddings differ"):
        merge(shards, tmp_path / "refused.h5")
    w = small_writer(tmp_path / "bare.h5", paths=["q3.png"], indices=[3])
    w.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("q3.png")])
    with HeatmapFile.open(merge([shards[0], w.finalize()], tmp_path / "mixed.h5", allow_gaps=True)) as hf:
        assert hf.prompt_embeddings() is None


def test_path_that_is_not_utf8_is_stored_exactly(tmp_path: Path) -> None:
    """Linux gives a Latin-1 file name as surrogate escapes; finalize used to crash on it after the whole run."""
    name = os.fsdecode(b"M\xfcller.png")  # 'M\udcfcller.png'
    w = small_writer(tmp_path / "x.h5", paths=["p0.png", name])
    w.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])
    w.write_failure(1, ImageRecord(path=name, height=0, width=0, letterbox={}, reader={"notes": [name]},
                                   error=f"{name}: not an image"))
    out = w.finalize()
    with HeatmapFile.open(out) as hf:
        assert hf.paths == ["p0.png", name] and hf.find(name) == 1
        rec = hf.record(1)
        assert rec.path == name and rec.error == f"{name}: not an image" and rec.reader == {"notes": [name]}
    with h5py.File(out, "r") as f:
        assert f["path"][1] == b"M\xfcller.png"  # the file system's own bytes
    merged = merge([out], tmp_path / "m.h5")
    assert equal_contents(out, merged)
    with HeatmapFile.open(merged) as hf:
        assert hf.paths[1] == name


def test_a_journal_still_being_written_is_not_called_interrupted(tmp_path: Path) -> None:
    """Two torchrun ranks given one --out: the second must hear that a run is writing there, not that one died."""
    out = tmp_path / "x.h5"
    first = small_writer(out)
    with pytest.raises(AflocError, match="another afloc run is writing this output") as caught:
        small_writer(out)
    assert "interrupted" not in str(caught.value)
    first.close()
    with pytest.raises(AflocError, match="an interrupted run left its journal here"):
        small_writer(out)


def test_fresh_run_takes_the_lock_before_touching_a_journal(tmp_path: Path) -> None:
    """A run that has made its journal but not yet its manifest must not lose it to a second fresh run."""
    out = tmp_path / "x.h5"
    first = small_writer(out)
    (first.journal / "manifest.json").unlink()  # the window between mkdir and the manifest's rename
    (first.journal / "00000001.npz").write_bytes(b"first run's batch")
    with pytest.raises(AflocError, match="another afloc run is writing"):
        small_writer(out)
    with pytest.raises(AflocError, match="another afloc run is writing"):
        small_writer(out, overwrite=True)
    assert (first.journal / "00000001.npz").read_bytes() == b"first run's batch"
    first.close()
    second = small_writer(out)  # once it is released, a journal without a manifest is a fresh start
    assert sorted(p.name for p in second.journal.iterdir()) == ["lock", "manifest.json"]
    fill(second)
    second.finalize()
    assert not second.journal.exists()


def test_merge_refuses_shards_that_repeat_a_path(tmp_path: Path) -> None:
    """Shards of two input lists (a file landed between the jobs) would put one image in twice."""
    a = small_writer(tmp_path / "a.h5", paths=["img1.png"], indices=[0])
    a.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("img1.png")])
    b = small_writer(tmp_path / "b.h5", paths=["img1.png"], indices=[1])
    b.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("img1.png")])
    with pytest.raises(AflocError, match=r"b\.h5: image img1\.png is also in .*a\.h5.*different input lists"):
        merge([a.finalize(), b.finalize()], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def _shard(out: Path, indices: list[int], n_inputs: int | None) -> Path:
    """A finished shard over images `q{g}.png`; `n_inputs` None writes a file as afloc did before it."""
    attrs = ATTRS if n_inputs is None else {**ATTRS, "n_inputs": n_inputs}
    w = small_writer(out, paths=[f"q{g}.png" for g in indices], indices=indices, attrs=attrs)
    if indices:
        w.write_batch(list(range(len(indices))), np.zeros((len(indices), 2, 3, 3)), np.zeros((len(indices), 2)),
                      [make_record(f"q{g}.png") for g in indices])
    return w.finalize()


def test_merge_refuses_a_missing_last_shard(tmp_path: Path) -> None:
    """Shards 0 and 1 of 4 over 3 images hold indices 0 and 1 only: image 2 (shard 2) used to vanish silently."""
    shards = [_shard(tmp_path / f"s{k}.h5", list(range(k, 3, 4)), 3) for k in range(4)]
    for subset in ([0, 1], [0, 1, 3], [1, 0]):
        with pytest.raises(AflocError, match=r"image index 2 is missing \(1 of the run's 3 .*--allow-gaps"):
            merge([shards[k] for k in subset], tmp_path / "m.h5")
        assert not (tmp_path / "m.h5").exists()
    with HeatmapFile.open(merge(shards, tmp_path / "all.h5")) as hf:
        assert list(hf.indices) == [0, 1, 2] and hf.attrs["n_inputs"] == 3
    with HeatmapFile.open(merge(shards[:2], tmp_path / "some.h5", allow_gaps=True)) as hf:
        assert list(hf.indices) == [0, 1]
    # A file written before n_inputs first: the count is still read from the file that has it.
    old = _shard(tmp_path / "old0.h5", [0], None)
    with pytest.raises(AflocError, match="image index 2 is missing"):
        merge([old, shards[1]], tmp_path / "m.h5")
    with pytest.raises(AflocError, match=r"s1\.h5: made with a different number of inputs .* than .*old4\.h5"):
        merge([old, _shard(tmp_path / "old4.h5", [3], 4), shards[1]], tmp_path / "m.h5")
    # Files that predate it all merge as before: only gaps below the highest index are seen.
    with HeatmapFile.open(merge([old, _shard(tmp_path / "old1.h5", [1], None)], tmp_path / "old.h5")) as hf:
        assert list(hf.indices) == [0, 1] and "n_inputs" not in hf.attrs


def test_a_run_begun_before_n_inputs_still_resumes(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    w = small_writer(out)  # the older writer: no n_inputs
    w.write_batch([0], np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), [make_record("p0.png")])
    w.close()
    w2 = small_writer(out, resume=True, attrs={**ATTRS, "n_inputs": 4})
    assert w2.done_indices() == {0}
    w2.close()


def _damage_chunk(src: Path, dst: Path, row: int) -> Path:
    """A copy of `src` whose /heatmaps chunk of `row` is overwritten: bit rot, or a bad copy."""
    with h5py.File(src, "r") as f:
        info = f["heatmaps"].id.get_chunk_info(row)
    data = bytearray(src.read_bytes())
    data[info.byte_offset:info.byte_offset + info.size] = b"\xab" * info.size
    dst.write_bytes(bytes(data))
    return dst


def test_open_errors_are_one_line_and_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "folder.h5").mkdir()
    with pytest.raises(AflocError, match=r"folder\.h5: is a folder, not a heat-map file") as info:
        HeatmapFile.open(tmp_path / "folder.h5")
    assert "\n" not in str(info.value)

    def multiline(*args: Any, **kwargs: Any) -> None:
        raise OSError("Unable to open (time = Thu\n, errno = 5)")

    (tmp_path / "any.h5").write_bytes(b"x")
    monkeypatch.setattr(h5py, "File", multiline)
    with pytest.raises(AflocError, match=r"any\.h5: not a readable HDF5 file \(Unable to open \(time = Thu , errno"):
        HeatmapFile.open(tmp_path / "any.h5")


def test_a_damaged_chunk_is_named_with_its_file(tmp_path: Path) -> None:
    """h5py says only "filter returned failure during read": with many shards, which file?"""
    w = small_writer(tmp_path / "good.h5")
    fill(w)
    damaged = _damage_chunk(w.finalize(), tmp_path / "damaged.h5", 1)
    with HeatmapFile.open(damaged) as hf:
        assert hf.maps(0).shape == (2, 3, 3)  # the other chunks still read
        with pytest.raises(AflocError, match=r"damaged\.h5: cannot read /heatmaps\[1\]: .*filter.* — the file is "
                                             "damaged") as info:
            hf.maps(1)
        assert "\n" not in str(info.value)
        with pytest.raises(AflocError, match=r"damaged\.h5: cannot read /heatmaps\[1, 0\]"):
            hf.raw(1, 0)
    with pytest.raises(AflocError, match=r"damaged\.h5: cannot read /heatmaps\[1\]"):
        merge([damaged], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists() and not list(tmp_path.glob(".m.h5*"))


def test_a_file_missing_a_dataset_says_which(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "noprompts.h5", "w") as f:  # afloc-looking, but cut short
        f.attrs["schema_version"] = 1
        f.attrs["grid"] = 3
        f["heatmaps"] = np.zeros((1, 1, 3, 3), np.float16)
    with pytest.raises(AflocError, match=r"noprompts\.h5: not a complete afloc heat-map file: no /prompts, /scores"):
        HeatmapFile.open(tmp_path / "noprompts.h5")
    w = small_writer(tmp_path / "good.h5")
    fill(w)
    copy = tmp_path / "nogrid.h5"
    copy.write_bytes(w.finalize().read_bytes())
    with h5py.File(copy, "r+") as f:
        del f.attrs["grid"]
    with pytest.raises(AflocError, match=r"nogrid\.h5: not a complete afloc heat-map file: no grid attribute"):
        HeatmapFile.open(copy)
