"""The command line as a whole: every finished command is registered, and startup stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from afloc_cli.cli import app, run

COMMANDS = {"localize", "scores", "export", "merge", "benchmark", "synth", "prepare", "pretrain", "compile",
            "demo", "inspect", "import-reference"}


def test_every_command_is_registered_and_has_help(capsys):
    names = {c.name for c in app.registered_commands}
    assert names == COMMANDS
    for name in sorted(names):
        assert run([name, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out


def test_help_does_not_import_torch():
    """`afloc --help` and usage errors must be instant: heavy libraries load inside the commands."""
    code = "import sys; import afloc_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'polars', 'h5py') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_and_unknown_command(capsys):
    assert run(["--version"]) == 0
    assert "afloc" in capsys.readouterr().out
    assert run(["no-such-command"]) == 2


def test_cli_reference_is_in_sync():
    """docs/cli.md is generated from the app: regenerate it with `python -m afloc_cli.cli_reference`."""
    from pathlib import Path

    from afloc_cli.cli_reference import render

    committed = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/cli.md is stale: run `python -m afloc_cli.cli_reference > docs/cli.md`"


def test_cli_reference_does_not_depend_on_the_machine():
    """A default computed from the CPU count at import made docs/cli.md (and the sync test) differ per machine."""
    code = ("import os\nos.cpu_count = lambda: 64\nfrom afloc_cli.cli_reference import render\n"
            "print(render(), end='')\n")
    rendered = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    committed = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    assert rendered == committed


def _help_pages() -> dict[str, str]:
    """Every command's `--help` as a user's terminal shows it, wide enough that no help text wraps."""
    code = ("import sys\nfrom afloc_cli.cli import run\nfor name in sys.argv[1:]:\n"
            "    print('=====', name)\n    run([name, '--help'])\n")
    env = dict(os.environ, TERMINAL_WIDTH="4000", NO_COLOR="1", _TYPER_FORCE_DISABLE_TERMINAL="1")
    env.pop("FORCE_COLOR", None)
    out = subprocess.run([sys.executable, "-c", code, *sorted(COMMANDS)], capture_output=True, text=True,
                         check=True, env=env).stdout
    pages = {}
    for chunk in out.split("===== ")[1:]:
        name, _, page = chunk.partition("\n")
        pages[name] = page
    return pages


def _reference_sections() -> dict[str, tuple[str, list[str]]]:
    """docs/cli.md per command: its usage line and the help cell of every row of its table."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = {}
    for section in text.split("\n## afloc ")[1:]:
        name, _, body = section.partition("\n")
        usage = next(line.strip("`") for line in body.splitlines() if line.startswith("`afloc "))
        cells = [re.split(r"(?<!\\)\|", line)[3].strip().replace("\\|", "|")
                 for line in body.splitlines() if line.startswith("| `")]
        sections[name] = (usage, cells)
    return sections


def test_cli_reference_is_what_help_shows():
    """docs/cli.md against the terminal: the same usage lines, every help text whole (no markup eating
    `[prompt, ...]`), and flags shown without a value type (`--json`, not `--json <bool>`)."""
    pages = _help_pages()
    sections = _reference_sections()
    assert set(sections) == COMMANDS == set(pages)
    for name, (usage, cells) in sections.items():
        page = pages[name]
        flat = " ".join(page.replace("│", " ").split())
        assert f"Usage: {usage}" in page, (name, usage)
        for cell in cells:
            assert " ".join(cell.split()) in flat, (name, cell)
        assert "<bool>" not in page, name


def test_help_texts_are_not_eaten_by_markup():
    """Typer renders help as Rich markup: a literal `[word ...]` must be escaped (`\\[`) or it vanishes."""
    import typer.main

    from afloc_cli.cli_reference import shown

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
        for text in texts:
            assert "".join(shown(text).split()) == "".join(text.replace("\\[", "[").split()), (name, text)


# ---- output paths and shards, with a real (tiny) model ----------------------------------------------


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 50), dtype=np.uint8)).save(path)
    return path


def _localize(args: list[str], ckpt: Path) -> int:
    return run(["localize", *args, "--prompt", "Cardiomegaly", "--checkpoint", str(ckpt), "--workers", "0"])


def test_merge_refuses_shards_of_different_input_lists(tmp_path, tiny_checkpoint, capsys):
    """A file that lands in the folder between shard jobs shifts every index: merging them mixed images up."""
    folder = tmp_path / "in"
    for i in range(1, 5):
        _png(folder / f"img{i}.png", i)
    assert _localize([str(folder), "--out", str(tmp_path / "s0.h5"), "--shard", "0/2"], tiny_checkpoint) == 0
    _png(folder / "img0.png", 9)
    assert _localize([str(folder), "--out", str(tmp_path / "s1.h5"), "--shard", "1/2"], tiny_checkpoint) == 0
    capsys.readouterr()
    assert run(["merge", str(tmp_path / "s0.h5"), str(tmp_path / "s1.h5"), "--out", str(tmp_path / "m.h5")]) == 2
    err = capsys.readouterr().err
    assert "s1.h5: made with a different input list" in err and "s0.h5" in err and "Traceback" not in err
    assert not (tmp_path / "m.h5").exists()


def test_merge_refuses_a_run_whose_last_shard_is_missing(tmp_path, tiny_checkpoint, capsys):
    """3 images in 4 shards: shards 0 and 1 hold indices 0 and 1, and merging them alone used to succeed."""
    folder = tmp_path / "in"
    for i in range(3):
        _png(folder / f"img{i}.png", i)
    shards = [tmp_path / f"s{k}.h5" for k in range(2)]
    for k, shard in enumerate(shards):
        assert _localize([str(folder), "--out", str(shard), "--shard", f"{k}/4"], tiny_checkpoint) == 0
    from afloc_cli.heatmaps.store import HeatmapFile

    with HeatmapFile.open(shards[0]) as hf:
        assert hf.attrs["n_inputs"] == 3
    capsys.readouterr()
    assert run(["merge", *map(str, shards), "--out", str(tmp_path / "m.h5")]) == 2
    _one_line_error(capsys, "image index 2 is missing", "--allow-gaps")
    assert not (tmp_path / "m.h5").exists()
    assert run(["merge", *map(str, shards), "--out", str(tmp_path / "m.h5"), "--allow-gaps"]) == 0


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("afloc: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def test_unwritable_outputs_are_refused_up_front_on_one_line(tmp_path, tiny_checkpoint, capsys):
    image = _png(tmp_path / "in" / "a.png")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    assert _localize([str(image), "--out", str(tmp_path / "outdir"), "--overwrite"], tiny_checkpoint) == 2
    _one_line_error(capsys, "outdir: is a folder")
    assert not (tmp_path / "outdir.partial").exists()  # refused before any work
    out = tmp_path / "o.h5"
    assert _localize([str(image), "--out", str(out), "--overlays", str(tmp_path / "afile")], tiny_checkpoint) == 2
    _one_line_error(capsys, "afile: is a file, not a folder")
    assert not (tmp_path / "o.h5.partial").exists()
    assert _localize([str(image), "--out", str(out)], tiny_checkpoint) == 0
    capsys.readouterr()

    assert run(["merge", str(out), "--out", str(tmp_path / "nodir" / "m.h5")]) == 2
    _one_line_error(capsys, "nodir: output folder does not exist")
    assert run(["merge", str(out), "--out", str(tmp_path / "outdir"), "--overwrite"]) == 2
    _one_line_error(capsys, "outdir: is a folder")
    for kind in ("--npy", "--png", "--chexlocalize"):
        assert run(["export", str(out), kind, str(tmp_path / "afile")]) == 2
        _one_line_error(capsys, "afile: is a file, not a folder")
    assert run(["scores", str(out), "--out", str(tmp_path / "afile" / "s.csv")]) == 2
    _one_line_error(capsys, "afile: is a file, not a folder")
    assert run(["scores", str(out), "--out", str(tmp_path / "outdir.csv")]) == 0
    assert run(["scores", str(out), "--out", str(tmp_path / "outdir")]) == 2  # suffix first
    capsys.readouterr()


def test_disk_full_is_one_line_and_the_journal_resumes(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import errno

    from afloc_cli.heatmaps import store
    from afloc_cli.vlp import overlay

    folder = tmp_path / "in"
    for i in range(4):
        _png(folder / f"img{i}.png", i)
    out = tmp_path / "o.h5"
    args = [str(folder), "--out", str(out), "--batch-size", "2"]
    real_write = store._write_atomic
    calls = {"n": 0}

    def full_after_one_batch(target, write):
        if target.name.endswith(".npz"):
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(target.with_name(".x.tmp")))
        real_write(target, write)

    monkeypatch.setattr(store, "_write_atomic", full_after_one_batch)
    assert _localize(args, tiny_checkpoint) == 2
    _one_line_error(capsys, "No space left on device", "--resume")
    monkeypatch.setattr(store, "_write_atomic", real_write)

    def full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(overlay, "write_png", full)  # a write the store does not own still gives one line
    assert _localize([*args, "--resume", "--overlays", str(tmp_path / "ov")], tiny_checkpoint) == 2
    _one_line_error(capsys, "ov/", "No space left on device")
    monkeypatch.undo()
    assert _localize([*args, "--resume"], tiny_checkpoint) == 0
    assert "4 already done" in capsys.readouterr().err  # the overlay failure kept its batch too
    from afloc_cli.heatmaps.store import HeatmapFile

    with HeatmapFile.open(out) as hf:
        assert hf.n_images == 4 and not hf.failures()


def test_localize_refuses_to_write_over_one_of_its_inputs(tmp_path, tiny_checkpoint, capsys):
    """--overwrite replaces a previous output, never a radiograph: it used to turn scan.png into HDF5."""
    scan = _png(tmp_path / "victim" / "scan.png")
    before = scan.read_bytes()
    assert _localize([str(scan), "--out", str(scan), "--overwrite"], tiny_checkpoint) == 2
    _one_line_error(capsys, "scan.png: the output is also one of the input images")
    assert scan.read_bytes() == before
    # A folder walk leaves --out out of its inputs, so the image is not an input there; it is still no output.
    _png(tmp_path / "victim" / "other.png")
    assert _localize([str(tmp_path / "victim"), "--out", str(scan), "--overwrite"], tiny_checkpoint) == 2
    _one_line_error(capsys, "scan.png: the output exists and is not a heat-map file")
    assert scan.read_bytes() == before


def test_chexlocalize_export_refuses_images_that_share_an_id(tmp_path, tiny_checkpoint, capsys):
    """Its id is the last three path parts: two roots with one layout used to overwrite each other's maps."""
    a = _png(tmp_path / "siteA" / "p1" / "s1" / "view1.png", 1)
    b = _png(tmp_path / "siteB" / "p1" / "s1" / "view1.png", 2)
    out = tmp_path / "cx.h5"
    assert _localize([str(tmp_path / "siteA"), str(tmp_path / "siteB"), "--out", str(out)], tiny_checkpoint) == 0
    capsys.readouterr()
    assert run(["export", str(out), "--chexlocalize", str(tmp_path / "cx")]) == 2
    _one_line_error(capsys, f"{a} and {b} get the same cheXlocalize image id 'p1_s1_view1'")
    assert not list((tmp_path / "cx").glob("*.pkl"))


# ---- heat-map files made by the store directly (no model): what scores, export and merge say -----------------
def _heatmap_file(out: Path, names: list[str], failed: tuple[int, ...] = (), prompts: int = 3) -> Path:
    """A finished file over images `names` (20 x 10 pixels), with the rows in `failed` unreadable."""
    from afloc_cli.heatmaps.store import HeatmapWriter, ImageRecord

    lb = {"height": 20, "width": 10, "size": 224, "resized_height": 224, "resized_width": 112, "pad_top": 0,
          "pad_left": 56}
    w = HeatmapWriter(out, paths=names, prompts=[f"finding {p}" for p in range(prompts)], grid=3,
                      attrs={"checkpoint_sha256": "0" * 64})
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        if i in failed:
            w.write_failure(i, ImageRecord(path=name, height=0, width=0, letterbox={}, reader={}, error="unreadable"))
        else:
            w.write_batch([i], rng.standard_normal((1, prompts, 3, 3)), rng.standard_normal((1, prompts)),
                          [ImageRecord(path=name, height=20, width=10, letterbox=lb, reader={})])
    return w.finalize()


def test_heatmap_read_errors_are_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "folder.h5").mkdir()
    assert run(["scores", str(tmp_path / "folder.h5"), "--out", str(tmp_path / "s.csv")]) == 2
    _one_line_error(capsys, "folder.h5: is a folder")
    good = _heatmap_file(tmp_path / "good.h5", ["a.png", "b.png"])
    with h5py.File(good, "r") as f:
        info = f["heatmaps"].id.get_chunk_info(1)
    data = bytearray(good.read_bytes())
    data[info.byte_offset:info.byte_offset + info.size] = b"\xab" * info.size
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(bytes(data))
    for argv in (["scores", str(damaged), "--out", str(tmp_path / "s.csv")],
                 ["export", str(damaged), "--npy", str(tmp_path / "npy")],
                 ["merge", str(damaged), "--out", str(tmp_path / "m.h5")]):
        assert run(argv) == 2
        _one_line_error(capsys, f"{damaged}: cannot read /heatmaps[1]", "filter returned failure")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "m.h5").exists()


def test_scores_json_counts_failed_images_not_rows(tmp_path, capsys):
    """One unreadable image with 3 prompts is 1 failed image (localize's own count), not 3."""
    import json

    hm = _heatmap_file(tmp_path / "run.h5", ["a.png", "broken.png"], failed=(1,), prompts=3)
    capsys.readouterr()
    assert run(["scores", str(hm), "--out", str(tmp_path / "s.csv"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 6 and summary["failed_images"] == 1


def test_scores_table_suffix_is_case_insensitive(tmp_path):
    import polars as pl

    hm = _heatmap_file(tmp_path / "run.h5", ["a.png"], prompts=2)
    assert run(["scores", str(hm), "--out", str(tmp_path / "S.CSV")]) == 0
    assert pl.read_csv(tmp_path / "S.CSV").height == 2
    assert run(["scores", str(hm), "--out", str(tmp_path / "S.Parquet")]) == 0
    assert pl.read_parquet(tmp_path / "S.Parquet").height == 2


def test_export_refuses_a_bad_readout_before_making_its_folder(tmp_path, capsys):
    hm = _heatmap_file(tmp_path / "run.h5", ["a.png"], prompts=2)
    capsys.readouterr()
    for kind in ("--png", "--npy", "--chexlocalize"):
        assert run(["export", str(hm), kind, str(tmp_path / "maps"), "--readout", "bogus"]) == 2
        _one_line_error(capsys, "readout must be reference or contrast, not 'bogus'")
        assert not (tmp_path / "maps").exists()


def test_an_unfinished_runs_output_says_to_resume(tmp_path, capsys):
    """OUT.h5 is not there yet, but its journal OUT.h5.partial/ is: say so, not just 'not found'."""
    from afloc_cli.heatmaps.store import HeatmapWriter

    out = tmp_path / "run.h5"
    HeatmapWriter(out, paths=["a.png"], prompts=["a"], grid=3, attrs={"checkpoint_sha256": "0"}).close()
    assert (tmp_path / "run.h5.partial").is_dir() and not out.exists()
    capsys.readouterr()
    for argv in (["scores", str(out), "--out", str(tmp_path / "s.csv")],
                 ["export", str(out), "--npy", str(tmp_path / "npy")],
                 ["merge", str(out), "--out", str(tmp_path / "m.h5")]):
        assert run(argv) == 2
        _one_line_error(capsys, f"{out}: heat-map file not found: its run has not finished", "run.h5.partial",
                        "afloc localize command with --resume")
    assert run(["scores", str(tmp_path / "none.h5"), "--out", str(tmp_path / "s.csv")]) == 2
    line = _one_line_error(capsys, "none.h5: heat-map file not found")
    assert "--resume" not in line


def test_export_npy_names_change_only_the_final_suffix(tmp_path):
    hm = _heatmap_file(tmp_path / "run.h5", ["in/scan.png.dcm"], prompts=1)
    assert run(["export", str(hm), "--npy", str(tmp_path / "npy")]) == 0
    assert [p.name for p in (tmp_path / "npy").iterdir()] == ["000000_scan.png__p000_finding-0.npy"]
    assert run(["export", str(hm), "--png", str(tmp_path / "png")]) == 0
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["000000_scan.png__p000_finding-0.png"]


def test_every_command_takes_json(tmp_path, corpus, tiny_checkpoint, capsys):
    """The README says every command takes --json for a machine-readable summary on stdout."""
    import json

    import typer.main

    group = typer.main.get_command(app)
    lacking = sorted(name for name, command in group.commands.items()
                     if not any("--json" in p.opts for p in command.params))
    assert lacking == []
    capsys.readouterr()
    assert run(["synth", str(tmp_path / "s"), "--n", "3", "--seed", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["images"].values()) == 3 and summary["seed"] == 1
    assert Path(summary["files"]["boxes"]).is_file()
    args = ["benchmark", "synthetic", "--root", str(corpus), "--checkpoint", str(tiny_checkpoint), "--split", "test",
            "--bootstrap", "0", "--workers", "0", "--limit", "4", "--out", str(tmp_path / "b")]
    assert run([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"]["dataset"] == "synthetic" and result["summary"]
    assert run([*args, "--json", "--format", "csv"]) == 2
    assert "--json and --format csv contradict" in capsys.readouterr().err
