"""`afloc localize` and the files around it: orientation, prompts, exit codes, resume, shards, tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from afloc_cli.cli import run
from afloc_cli.config import small_config
from afloc_cli.errors import AflocError
from afloc_cli.heatmaps.store import HeatmapFile, content_differences
from afloc_cli.image.data.transforms import Letterbox
from afloc_cli.localize.inputs import collect_inputs, parse_shard, shard_indices, shard_output
from afloc_cli.localize.runner import run_localize
from afloc_cli.text.inference_engine import parse_prompts
from afloc_cli.vlp.heatmap import original_map


# ---- an oracle engine: the map is the image itself, pooled to the grid ---------------------------
class OracleEngine:
    """Brightness as 'similarity': whatever the pipeline does to geometry shows in where the peak lands."""

    def __init__(self, grid: int = 19, size: int = 224) -> None:
        self.grid, self.image_size, self.level, self.precision = grid, size, "deep", "fp32"
        self.cfg = small_config()

    def __call__(self, frames: torch.Tensor):
        pooled = F.adaptive_avg_pool2d(frames.float().unsqueeze(1), self.grid)
        maps = torch.cat([pooled, -pooled], dim=1)  # prompt 0: bright, prompt 1: dark
        return type("Out", (), {"maps": maps, "scores": maps.mean((-2, -1))})()


def test_orientation_non_square_peak_lands_in_original_pixels(tmp_path):
    h, w = 300, 520  # wide
    img = np.full((h, w), 30, np.uint8)
    row, col = 70, 400  # upper right
    img[row - 25 : row + 25, col - 25 : col + 25] = 250
    path = tmp_path / "wide.png"
    Image.fromarray(img).save(path)
    tall = np.full((w, h), 30, np.uint8)
    tall[400 - 25 : 400 + 25, 70 - 25 : 70 + 25] = 250  # the same spot transposed, in a tall image
    Image.fromarray(tall).save(tmp_path / "tall.png")
    out = tmp_path / "o.h5"
    summary = run_localize(OracleEngine(), paths=[path, tmp_path / "tall.png"], indices=[0, 1],
                           prompts=["bright", "dark"], out=out, checkpoint_sha256="0" * 64, workers=0)
    assert summary.done == 2 and summary.failed == 0
    with HeatmapFile.open(out) as hf:
        for i, (er, ec) in enumerate([(row, col), (400, 70)]):
            rec = hf.record(i)
            heat = original_map(torch.from_numpy(hf.raw(i, 0)), Letterbox(**rec.letterbox)).numpy()
            assert heat.shape == ((h, w) if i == 0 else (w, h))
            r, c = np.unravel_index(int(np.nanargmax(heat)), heat.shape)
            assert abs(r - er) <= 20 and abs(c - ec) <= 20, (i, r, c)


# ---- prompts and inputs ------------------------------------------------------------------------
def test_prompt_file_rules(tmp_path):
    lines = ["# findings", "", "  left pleural effusion ", "pneumothorax", "left pleural effusion", "# x"]
    parsed = parse_prompts(lines, "p.txt")
    assert parsed.prompts == ["left pleural effusion", "pneumothorax"]
    assert len(parsed.notes) == 1 and "duplicate" in parsed.notes[0] and "p.txt:5" in parsed.notes[0]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("opacit\xe9\n".encode("latin-1"))
    from afloc_cli.text.inference_engine import read_prompts_file

    with pytest.raises(AflocError, match="not UTF-8"):
        read_prompts_file(bad)


def test_inputs_folders_lists_and_dicom_without_extension(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/2.png", "a/1.png", "a/b/3.jpg"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"")
    dicom_like = tmp_path / "a" / "IM0001"
    dicom_like.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    found = collect_inputs([tmp_path / "a"]).paths
    assert [p.name for p in found] == ["1.png", "2.png", "IM0001", "3.jpg"]
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\na/1.png,x\na/b/3.jpg,y\n")
    assert [p.name for p in collect_inputs([listing, tmp_path / "a" / "1.png"]).paths] == ["1.png", "3.jpg"]
    with pytest.raises(AflocError, match="no such file"):
        collect_inputs([tmp_path / "missing"])


def test_csv_list_header_is_recognised_or_refused(tmp_path):
    """A header row is never read as an image path: a known column is used, an unknown header is an error."""
    for name in ("1.png", "2.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    listing = tmp_path / "list.csv"
    listing.write_text("Image,report\n1.png,x\n2.png,y\n")  # any capitals
    assert [p.name for p in collect_inputs([listing]).paths] == ["1.png", "2.png"]
    listing.write_text("report,FILE_PATH\nx,1.png\n")
    assert [p.name for p in collect_inputs([listing]).paths] == ["1.png"]
    listing.write_text("1.png,x\n2.png,y\n")  # no header: the first column, first row included
    assert [p.name for p in collect_inputs([listing]).paths] == ["1.png", "2.png"]
    listing.write_text("study,report\n1.png,x\n")
    with pytest.raises(AflocError) as caught:
        collect_inputs([listing])
    message = str(caught.value)
    assert message.startswith(f"{listing}: no path column in the header (study, report)")
    assert "path, image_path, image, file, filename, file_path" in message and "\n" not in message


def test_localize_refuses_an_unknown_csv_header_before_any_work(tmp_path, tiny_checkpoint, capsys):
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "a.png")
    listing = tmp_path / "list.csv"
    listing.write_text("study,report\na.png,x\n")
    out = tmp_path / "o.h5"
    capsys.readouterr()
    assert _localize([str(listing), "--prompt", "left effusion", "--out", str(out)], tiny_checkpoint) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"afloc: error: {listing}: no path column"), err
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_walk_sniffs_dicoms_named_by_uid(tmp_path):
    """PACS exports name files by SOP Instance UID: `.123` is not an extension, the DICM magic decides."""
    magic = b"\0" * 128 + b"DICM" + b"\0" * 16
    (tmp_path / "1.2.840.113619.2.55.3.123").write_bytes(magic)
    (tmp_path / "IM.0001.IMA").write_bytes(magic)
    (tmp_path / "1.2.840.113619.2.55.3.124").write_bytes(b"\0" * 200)  # a number-named file that is no DICOM
    (tmp_path / "report.txt").write_text("not an image")
    os.mkfifo(tmp_path / "2.25.1")  # never opened: a FIFO would block the walk
    found = collect_inputs([tmp_path]).paths
    assert [p.name for p in found] == ["1.2.840.113619.2.55.3.123", "IM.0001.IMA"]


def test_walk_leaves_out_dicomdir_with_a_note(tmp_path):
    """A DICOM media export's DICOMDIR is an index without pixels, whether named DICOMDIR or not."""
    from dicom_factory import write_dicom
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    ids = {"PatientID": "P1", "PatientName": "X", "StudyInstanceUID": "1.2.3", "StudyDate": "20200101",
           "StudyTime": "1200", "StudyID": "1", "AccessionNumber": "1", "SeriesInstanceUID": "1.2.3.4",
           "SeriesNumber": 1, "Modality": "CR", "SOPInstanceUID": "1.2.3.4.5", "InstanceNumber": 1}
    image = write_dicom(tmp_path / "x.dcm", np.zeros((8, 8), np.uint16), extra=ids)
    fs = FileSet()
    fs.add(dcmread(image))
    fs.write(tmp_path / "export")
    (tmp_path / "export" / "1.2.3.4").write_bytes((tmp_path / "export" / "DICOMDIR").read_bytes())  # renamed index
    collected = collect_inputs([tmp_path / "export"])
    assert [p.name for p in collected.paths] == ["IM000000"]
    assert collected.notes == ["left out 2 DICOMDIR file(s): the index of a DICOM media export, not a radiograph"]


def test_walk_follows_symlinked_folders_once(tmp_path):
    """A cohort assembled from links is walked in full; a link back up the tree does not loop."""
    png = tmp_path / "src.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cohort" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere" / "outside.png").write_bytes(png.read_bytes())
    (tmp_path / "cohort" / "sub" / "inside.png").write_bytes(png.read_bytes())
    (tmp_path / "cohort" / "study_link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "cohort" / "sub" / "loop").symlink_to(tmp_path / "cohort", target_is_directory=True)
    (tmp_path / "cohort" / "twin").symlink_to(tmp_path / "cohort" / "sub", target_is_directory=True)
    found = collect_inputs([tmp_path / "cohort"]).paths
    assert [p.relative_to(tmp_path / "cohort").as_posix() for p in found] == ["study_link/outside.png",
                                                                            "sub/inside.png"]


def test_walk_unreadable_folder_is_an_error(tmp_path, monkeypatch):
    """os.walk drops a folder it cannot list unless told otherwise: name it instead of skipping it."""
    (tmp_path / "a" / "locked").mkdir(parents=True)
    scandir = os.scandir

    def refuse(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(AflocError, match="locked: cannot read the folder \\(Permission denied\\)"):
        collect_inputs([tmp_path / "a"])


def test_walk_leaves_out_the_runs_own_outputs(tmp_path):
    (tmp_path / "in" / "overlays").mkdir(parents=True)
    for name in ("in/a.png", "in/overlays/a__p000.png", "in/maps.png.partial/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "in" / "maps.png").write_bytes((tmp_path / "in" / "a.png").read_bytes())
    own = [tmp_path / "in" / "maps.png", tmp_path / "in" / "maps.png.partial", tmp_path / "in" / "overlays"]
    collected = collect_inputs([tmp_path / "in"], exclude=own)
    assert [p.name for p in collected.paths] == ["a.png"]
    assert len(collected.notes) == 1 and "own outputs" in collected.notes[0]
    assert all(str(p) in collected.notes[0] for p in own)


def test_command_line_prompts_are_taken_as_given():
    """Only prompt files have comments: `--prompt "#2 rib fracture"` is a finding."""
    from afloc_cli.commands.localize import _prompts

    assert _prompts(None, ["#2 rib fracture", "left effusion"]).prompts == ["#2 rib fracture", "left effusion"]
    assert parse_prompts(["# comment", "left effusion"], "p.txt").prompts == ["left effusion"]


def test_prompt_file_splits_on_line_breaks_only(tmp_path):
    """Form feed, U+0085 and U+2028 are not line ends: splitlines() would make two prompts of one."""
    from afloc_cli.text.inference_engine import read_prompts_file

    path = tmp_path / "p.txt"
    path.write_bytes("left\x0ceffusion\r\nlung\x85nodule\rrib\u2028fracture\n\nleft\x0ceffusion\n".encode())
    parsed = read_prompts_file(path)
    assert parsed.prompts == ["left\x0ceffusion", "lung\x85nodule", "rib\u2028fracture"]
    assert len(parsed.notes) == 1 and f"{path}:5: duplicate of line 1" in parsed.notes[0]


def test_shards():
    assert parse_shard("1/3") == (1, 3)
    assert parse_shard("auto", {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    with pytest.raises(AflocError):
        parse_shard("4/4")
    parts = [shard_indices(10, (k, 3)) for k in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))


def test_shard_output_fills_rank_and_refuses_one_file_for_all_ranks():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2"}
    assert shard_output(Path("part-{rank}.h5"), "auto", (1, 2), torchrun) == Path("part-1.h5")
    assert shard_output(Path("/o/{rank}/part-{rank}.h5"), "3/4", (3, 4), {}) == Path("/o/3/part-3.h5")
    assert shard_output(Path("part-7.h5"), "auto", (0, 8), {"SLURM_ARRAY_TASK_ID": "7"}) == Path("part-7.h5")
    assert shard_output(Path("all.h5"), "auto", (0, 1), {"RANK": "0", "WORLD_SIZE": "1"}) == Path("all.h5")
    with pytest.raises(AflocError, match=r"every rank gets the same --out all.h5 .*put \{rank\} in it"):
        shard_output(Path("all.h5"), "auto", (1, 2), torchrun)
    with pytest.raises(AflocError, match=r"\{rank\} is filled only when sharding"):
        shard_output(Path("part-{rank}.h5"), None, None, torchrun)


# ---- the command, with a real (tiny) model --------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def _localize(args: list[str], ckpt: Path) -> int:
    return run(["localize", *args, "--checkpoint", str(ckpt), "--workers", "0", "--batch-size", "3"])


def test_localize_cli_exit_codes_and_json(tmp_path, tiny_checkpoint, image_folder, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("left effusion\nright pneumothorax\n")
    out = tmp_path / "ok.h5"
    assert _localize([str(image_folder), "--prompts", str(prompts), "--out", str(out), "--json"], tiny_checkpoint) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["done"] == 10 and summary["failed"] == 0 and summary["prompts"] == 2
    with HeatmapFile.open(out) as hf:
        assert hf.prompts == ["left effusion", "right pneumothorax"]
        assert hf.attrs["checkpoint_sha256"] == summary["checkpoint_sha256"]
        assert hf.raw(0, 0).shape == (hf.grid, hf.grid)
        stored = hf.prompt_embeddings()
    # The file keeps the vectors the maps were computed against (prompt ensembles are scored from them).
    from afloc_cli.checkpoint.io import load_checkpoint

    with torch.inference_mode():
        expected = load_checkpoint(tiny_checkpoint).encode_prompts(["left effusion", "right pneumothorax"])
    assert stored is not None and np.allclose(stored, expected.numpy(), atol=1e-6)
    # Refuses to overwrite; usage errors exit 2.
    assert _localize([str(image_folder), "--prompt", "x y", "--out", str(out)], tiny_checkpoint) == 2
    # A broken file: exit 3, the run goes on, the failure is recorded with its reason.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(broken / "good.png")
    out2 = tmp_path / "some-failed.h5"
    assert _localize([str(broken), "--prompt", "left effusion", "--out", str(out2)], tiny_checkpoint) == 3
    with HeatmapFile.open(out2) as hf:
        failures = hf.failures()
        assert len(failures) == 1 and "bad.png" in failures[0].path and failures[0].error
    # --strict stops at the first failure.
    assert _localize([str(broken), "--prompt", "left effusion", "--out", str(tmp_path / "s.h5"), "--strict"],
                     tiny_checkpoint) != 0
    # Missing checkpoint: one line, exit 2.
    capsys.readouterr()
    assert run(["localize", str(image_folder), "--prompt", "a b", "--out", str(tmp_path / "x.h5"),
                "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_shard_auto_under_torchrun_writes_one_file_per_rank(tmp_path, tiny_checkpoint, image_folder, capsys,
                                                            monkeypatch):
    """torchrun gives every rank the same --out: refused before any work unless {rank} makes one file per rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = [str(image_folder), "--prompt", "left effusion", "--shard", "auto"]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert _localize([*args, "--out", str(tmp_path / "all.h5")], tiny_checkpoint) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "every rank gets the same --out" in err[0] and "{rank}" in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, no journal
    parts = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert _localize([*args, "--out", str(tmp_path / "part-{rank}.h5")], tiny_checkpoint) == 0
        parts.append(tmp_path / f"part-{rank}.h5")
        with HeatmapFile.open(parts[-1]) as hf:
            assert hf.n_images == 5 and hf.attrs["n_inputs"] == 10
    assert run(["merge", *map(str, parts), "--out", str(tmp_path / "all.h5")]) == 0
    with HeatmapFile.open(tmp_path / "all.h5") as hf:
        assert hf.n_images == 10


@pytest.mark.parametrize("folder", ["scan[red]", "cr[/b]"])
def test_paths_print_as_they_are_one_line_per_failure(tmp_path, tiny_checkpoint, capsys, folder):
    """Square brackets in a path are not console markup: `[red]` must not vanish and `[/b]` must not crash."""
    broken = tmp_path / folder / ("a-very-long-folder-name-" * 4)
    broken.mkdir(parents=True)
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(broken / "good.png")
    out = tmp_path / folder / "maps.h5"
    capsys.readouterr()
    assert _localize([str(broken), "--prompt", "left effusion", "--out", str(out)], tiny_checkpoint) == 3
    lines = capsys.readouterr().err.splitlines()
    assert f"failed: {broken / 'bad.png'}" in "\n".join(lines)
    failed = [line for line in lines if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith(f"failed: {broken / 'bad.png'}: ")  # the whole message, one line
    assert any(f"-> {out} (1 failed" in line for line in lines)


def test_failure_with_a_newline_in_its_name_stays_one_line(tmp_path, tiny_checkpoint, capsys):
    broken = tmp_path / "in"
    broken.mkdir()
    (broken / "bad\nname.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(broken / "good.png")
    capsys.readouterr()
    assert _localize([str(broken), "--prompt", "left effusion", "--out", str(tmp_path / "o.h5")], tiny_checkpoint) == 3
    lines = capsys.readouterr().err.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("failed: ")]
    assert len(failed) == 1 and lines[failed[0]].startswith(f"failed: {broken}/bad\\nname.png: ")
    assert failed[0] == len(lines) - 1  # nothing of the message spills onto a line of its own


def test_overlays_inside_the_input_folder_are_not_inputs_on_a_rerun(tmp_path, tiny_checkpoint, capsys):
    """Overlays written into an input folder must not become radiographs (or make a resume refuse) next time."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "a.png")
    args = [str(folder), "--prompt", "left effusion", "--overlays", str(folder / "overlays"), "--json"]
    assert _localize([*args, "--out", str(folder / "maps.h5")], tiny_checkpoint) == 0
    assert len(list((folder / "overlays").glob("*.png"))) == 1
    capsys.readouterr()
    assert _localize([*args, "--out", str(folder / "maps.h5"), "--overwrite"], tiny_checkpoint) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["done"] == 1
    assert f"note: left out this run's own outputs found in the input folders: {folder / 'overlays'}" in captured.err


def test_shards_merged_equal_single_run_and_scores_tables(tmp_path, tiny_checkpoint, image_folder):
    args = [str(image_folder), "--prompt", "left effusion", "--prompt", "cardiomegaly"]
    single = tmp_path / "single.h5"
    assert _localize([*args, "--out", str(single)], tiny_checkpoint) == 0
    shards = []
    for k in range(3):
        shards.append(tmp_path / f"shard{k}.h5")
        assert _localize([*args, "--out", str(shards[-1]), "--shard", f"{k}/3"], tiny_checkpoint) == 0
    merged = tmp_path / "merged.h5"
    assert run(["merge", *map(str, reversed(shards)), "--out", str(merged)]) == 0
    assert_equal_but_rounding(single, merged)
    # Tables: same inputs, same bytes.
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(["scores", str(single), "--out", str(a)]) == 0
    assert run(["scores", str(merged), "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    table = pl.read_csv(a)
    assert table.height == 20 and set(table.columns) >= {"path", "prompt", "score", "peak_row", "peak_col"}
    assert (table["peak_row"] >= 0).all() and (table["peak_col"] < 50).all()
    pq1, pq2 = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert run(["scores", str(single), "--out", str(pq1)]) == 0
    assert run(["scores", str(single), "--out", str(pq2)]) == 0
    assert pq1.read_bytes() == pq2.read_bytes()


def assert_equal_but_rounding(a: Path, b: Path) -> None:
    """What docs/heatmaps.md promises across batch sizes, shards and resumes: the same file but for the rounding
    of the values, scores within 1e-6 and maps within one float16 step."""
    values = ("/heatmaps: values differ", "/scores: values differ")
    assert [d for d in content_differences(a, b) if not d.startswith(values)] == []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        scores_a, scores_b = fa["scores"][()], fb["scores"][()]
        maps_a, maps_b = fa["heatmaps"][()], fb["heatmaps"][()]
    assert np.array_equal(np.isnan(scores_a), np.isnan(scores_b)) and np.array_equal(np.isnan(maps_a), np.isnan(maps_b))
    assert np.nanmax(np.abs(scores_a - scores_b)) <= 1e-6
    step = np.spacing(np.maximum(np.abs(maps_a), np.abs(maps_b)))  # float16 spacing at each value
    assert np.all(np.abs(maps_a.astype(np.float32) - maps_b.astype(np.float32)) <= step, where=~np.isnan(maps_a))


def test_batch_size_shards_and_a_resume_with_another_batch_size_agree_to_rounding(
        tmp_path, tiny_checkpoint, image_folder, monkeypatch):
    """Batch composition changes BLAS rounding: the file is the same but for the last bits of the values. A resume
    with another --batch-size is accepted (a run out of GPU memory goes on with smaller batches)."""
    from afloc_cli.vlp.inference_engine import LocalizationEngine

    args = [str(image_folder), "--prompt", "left effusion", "--prompt", "cardiomegaly", "--checkpoint",
            str(tiny_checkpoint), "--workers", "0"]
    ref = tmp_path / "ref.h5"
    assert run(["localize", *args, "--out", str(ref), "--batch-size", "1"]) == 0
    other = tmp_path / "bs4.h5"
    assert run(["localize", *args, "--out", str(other), "--batch-size", "4"]) == 0
    assert_equal_but_rounding(ref, other)
    shards = [tmp_path / f"s{k}.h5" for k in range(2)]
    for k, shard in enumerate(shards):
        assert run(["localize", *args, "--out", str(shard), "--batch-size", "4", "--shard", f"{k}/2"]) == 0
    assert run(["merge", *map(str, shards), "--out", str(tmp_path / "merged.h5")]) == 0
    assert_equal_but_rounding(ref, tmp_path / "merged.h5")

    forward, calls = LocalizationEngine.__call__, {"n": 0}

    def interrupted(self, frames):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, frames)

    resumed = tmp_path / "resumed.h5"
    monkeypatch.setattr(LocalizationEngine, "__call__", interrupted)
    assert run(["localize", *args, "--out", str(resumed), "--batch-size", "2"]) == 130
    monkeypatch.setattr(LocalizationEngine, "__call__", forward)
    assert not resumed.exists() and len(list(Path(f"{resumed}.partial").glob("*.npz"))) == 2
    assert run(["localize", *args, "--out", str(resumed), "--batch-size", "5", "--resume"]) == 0
    assert_equal_but_rounding(ref, resumed)


def test_export_npy_png_chexlocalize(tmp_path, tiny_checkpoint, image_folder):
    out = tmp_path / "e.h5"
    assert _localize([str(image_folder / "img03.png"), "--prompt", "left effusion", "--out", str(out)],
                     tiny_checkpoint) == 0
    assert run(["export", str(out), "--npy", str(tmp_path / "npy")]) == 0
    (npy,) = list((tmp_path / "npy").glob("*.npy"))
    assert np.load(npy).shape == (43, 50)
    assert run(["export", str(out), "--png", str(tmp_path / "png")]) == 0
    (png,) = list((tmp_path / "png").glob("*.png"))
    assert np.array(Image.open(png)).shape == (43, 50)
    assert run(["export", str(out), "--chexlocalize", str(tmp_path / "cx")]) == 2  # no cheXlocalize task
    task_file = tmp_path / "t.h5"
    assert _localize([str(image_folder / "img03.png"), "--prompt", "Findings suggesting pleural effusion.",
                      "--out", str(task_file)], tiny_checkpoint) == 0
    assert run(["export", str(task_file), "--chexlocalize", str(tmp_path / "cx")]) == 0
    assert run(["export", str(task_file), "--npy", str(tmp_path / "npy2")]) == 0
    import pickle

    import torch.nn.functional as F

    (pkl,) = list((tmp_path / "cx").glob("*_map.pkl"))
    assert pkl.name.endswith("_Pleural Effusion_map.pkl")
    blob = pickle.loads(pkl.read_bytes())
    assert set(blob) == {"map", "prob", "task", "gt", "cxr_img", "cxr_dims"}
    assert blob["cxr_dims"] == (50, 43) and blob["map"].dim() == 4 and blob["task"] == "Pleural Effusion"
    # read as cheXlocalize reads it: resized to (h, w) it is afloc's own map at original size
    w, h = blob["cxr_dims"]
    resized = F.interpolate(blob["map"], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    (npy2,) = list((tmp_path / "npy2").glob("*.npy"))
    np.testing.assert_allclose(resized, np.load(npy2), atol=1e-5)


def test_overlays(tmp_path, tiny_checkpoint, image_folder):
    out = tmp_path / "ov.h5"
    assert _localize([str(image_folder / "img01.png"), "--prompt", "left effusion", "--out", str(out),
                      "--overlays", str(tmp_path / "ov")], tiny_checkpoint) == 0
    (png,) = list((tmp_path / "ov").glob("*.png"))
    assert np.array(Image.open(png)).shape == (41, 50, 3)


def test_contrast_readout_recorded_and_applied(tmp_path, tiny_checkpoint, image_folder, capsys):
    from afloc_cli.vlp.heatmap import contrast_maps

    one = tmp_path / "one.h5"
    capsys.readouterr()
    assert _localize([str(image_folder), "--prompt", "left effusion", "--readout", "contrast", "--out", str(one)],
                     tiny_checkpoint) == 2  # refused before any work: one prompt has nothing to contrast with
    assert "two or more prompts" in capsys.readouterr().err and not one.exists()
    args = [str(image_folder / "img02.png"), "--prompt", "left effusion", "--prompt", "cardiomegaly",
            "--prompt", "right pneumothorax"]
    ref, con = tmp_path / "ref.h5", tmp_path / "con.h5"
    assert _localize([*args, "--out", str(ref)], tiny_checkpoint) == 0
    assert _localize([*args, "--out", str(con), "--readout", "contrast", "--overlays", str(tmp_path / "ov")],
                     tiny_checkpoint) == 0
    with HeatmapFile.open(ref) as a, HeatmapFile.open(con) as b:
        assert a.attrs["readout"] == "reference" and b.attrs["readout"] == "contrast"
        np.testing.assert_array_equal(a.maps(0), b.maps(0))  # the file keeps the raw maps either way
        raw, lb = torch.from_numpy(a.maps(0)), Letterbox(**a.record(0).letterbox)
    # Readers follow the file's readout; --readout overrides it.
    for h5, flag, want in ((con, [], "contrast"), (ref, ["--readout", "contrast"], "contrast"),
                           (con, ["--readout", "reference"], "reference")):
        folder = tmp_path / f"npy-{h5.stem}-{want}"
        assert run(["export", str(h5), "--npy", str(folder), *flag]) == 0
        grids = contrast_maps(raw) if want == "contrast" else raw
        for p in range(3):
            (npy,) = list(folder.glob(f"*__p{p:03d}_*.npy"))
            expected = original_map(grids[p], lb, 1.5, 0).numpy()
            np.testing.assert_allclose(np.load(npy), expected, atol=1e-5, equal_nan=True)
    assert len(list((tmp_path / "ov").glob("*.png"))) == 3
    a_csv, b_csv = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(["scores", str(con), "--out", str(a_csv)]) == 0
    assert run(["scores", str(ref), "--out", str(b_csv), "--readout", "contrast"]) == 0
    assert a_csv.read_text() == b_csv.read_text()


# The child localizes three batches, then hangs in the fourth (the async writer
# still journals the first three): the SIGKILL always lands mid-run, however fast
# the machine is. It runs on one thread as the test process does (conftest): fp32
# reductions split over other thread counts differ in the last bits.
_CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
from afloc_cli.cli import run
from afloc_cli.vlp.inference_engine import LocalizationEngine
calls = 0
forward = LocalizationEngine.__call__
def slow(self, frames):
    global calls
    calls += 1
    if calls > 3:
        time.sleep(3600)
    return forward(self, frames)
LocalizationEngine.__call__ = slow
sys.exit(run(sys.argv[1:]))
"""


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_checkpoint, image_folder):
    args = [str(image_folder), "--prompt", "left effusion", "--checkpoint", str(tiny_checkpoint),
            "--workers", "0", "--batch-size", "1"]
    ref = tmp_path / "ref.h5"
    assert run(["localize", *args, "--out", str(ref)]) == 0
    out = tmp_path / "killed.h5"
    journal = Path(str(out) + ".partial")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    child = subprocess.Popen([sys.executable, "-c", _CHILD, "localize", *args, "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Generous: on a loaded 2-core machine the child's imports alone have taken over two minutes.
    deadline = time.time() + 900
    while time.time() < deadline and child.poll() is None and len(list(journal.glob("*.npz"))) < 3:
        time.sleep(0.05)
    assert child.poll() is None, "the child finished or died before it could be killed mid-run"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and journal.exists()
    assert run(["localize", *args, "--out", str(out), "--resume"]) == 0
    assert content_differences(ref, out) == []
    assert not journal.exists()


def test_bf16_on_cpu_matches_fp32(tmp_path, tiny_checkpoint, image_folder):
    """--precision bf16 runs the folded bf16 encoder (or falls back to fp32 with a note): maps agree."""
    args = [str(image_folder / "img05.png"), str(image_folder / "img06.png"), "--prompt", "left effusion",
            "--device", "cpu"]
    assert _localize([*args, "--out", str(tmp_path / "fp32.h5")], tiny_checkpoint) == 0
    assert _localize([*args, "--precision", "bf16", "--out", str(tmp_path / "bf16.h5")], tiny_checkpoint) == 0
    with HeatmapFile.open(tmp_path / "fp32.h5") as a, HeatmapFile.open(tmp_path / "bf16.h5") as b:
        x, y = a.maps(0).ravel(), b.maps(0).ravel()
        cosine = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
        assert cosine > 0.99
        assert b.attrs["precision"] == "bf16"


def test_fused_map_weighs_the_min_maxed_levels_and_the_file_records_the_weight(tmp_path, tiny_checkpoint,
                                                                              image_folder):
    """--level fused: the config's shallow weight times the min-max'd shallow map plus the rest times the
    min-max'd deep map (upsampled to the shallow grid); an engine's own weight is what its file records."""
    from afloc_cli.checkpoint.io import load_checkpoint
    from afloc_cli.vlp.inference_engine import LocalizationEngine
    from kernels.dispatch import localization_maps

    model = load_checkpoint(tiny_checkpoint)
    assert model.cfg.heatmap.fused_shallow_weight == 0.75
    prompts = ["left effusion", "cardiomegaly", "right upper nodule"]
    frames = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    cpu = torch.device("cpu")
    feats = LocalizationEngine(model, prompts, device=cpu, level="fused").features(frames)
    emb = LocalizationEngine(model, prompts, device=cpu).prompt_embeddings
    shallow, _ = localization_maps(feats.shallow.float(), emb, "dot", normalize=True)
    deep, _ = localization_maps(feats.deep.float(), emb, "dot", normalize=True)
    deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
    assert not torch.allclose(shallow, deep, atol=1e-3)  # else any weight would pass
    for weight in (None, 0.5, 1.0, 0.0):
        engine = LocalizationEngine(model, prompts, device=cpu, level="fused", fused_shallow_weight=weight)
        w = 0.75 if weight is None else weight
        torch.testing.assert_close(engine(frames).maps, w * shallow + (1 - w) * deep, rtol=1e-4, atol=1e-5)
    with pytest.raises(AflocError, match=r"\[0, 1\]"):
        LocalizationEngine(model, prompts, device=cpu, level="fused", fused_shallow_weight=1.5)

    from afloc_cli.localize.runner import run_attrs

    recorded = json.loads(run_attrs(LocalizationEngine(model, prompts, device=cpu, level="fused",
                                                       fused_shallow_weight=0.5), "sha")["heatmap_config"])
    assert recorded["fused_shallow_weight"] == 0.5 and recorded["level"] == "fused"
    out = tmp_path / "fused.h5"
    assert _localize([str(image_folder / "img03.png"), "--prompt", "left effusion", "--prompt", "cardiomegaly",
                      "--level", "fused", "--out", str(out)], tiny_checkpoint) == 0
    with h5py.File(out) as f:
        assert json.loads(f.attrs["heatmap_config"])["fused_shallow_weight"] == 0.75
