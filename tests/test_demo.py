"""`afloc demo --quick`: the whole chain a new user runs first, end to end, offline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from afloc_cli.cli import run
from afloc_cli.heatmaps.store import HeatmapFile


def test_quick_demo_writes_every_output(tmp_path, capsys, monkeypatch):
    import afloc_cli.demo as demo

    monkeypatch.setattr(demo, "cpu_training_precision", lambda: "fp32")  # as on a CPU without native bf16
    out = tmp_path / "demo"
    assert run(["demo", "--quick", "--out", str(out), "--workers", "0", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "no native bf16, so training runs in fp32" in " ".join(captured.err.split())  # said, not silent
    assert (out / "run" / "model.safetensors").is_file() and (out / "demo.json").is_file()
    with HeatmapFile.open(out / "test_heatmaps.h5") as hf:
        assert hf.attrs["readout"] == "contrast" and hf.n_prompts == 7 and hf.n_images > 0
    for readout in ("reference", "contrast"):
        for key in ("readouts", "fused", "untrained"):  # trained (deep and fused maps), the model before training
            values = report[key][readout]
            assert set(values) == {"miou", "dice", "cnr", "pointing", "auroc"}
            assert all(v is not None and math.isfinite(v) for v in values.values()), values
        assert (out / "benchmark" / readout / "summary.csv").is_file()
        protocol = json.loads((out / "benchmark" / readout / "protocol.json").read_text())
        assert protocol["readout"] == readout
        for row in ("readouts", "fused"):  # every trained row judged against the untrained row, same readout
            checks = report["targets"][row][readout]
            assert set(checks) == {"auroc", "pointing", "miou", "pointing_over_untrained"}
            gain = report[row][readout]["pointing"] - report["untrained"][readout]["pointing"]
            assert math.isclose(checks["pointing_over_untrained"]["value"], gain)
            assert all(c["met"] == (c["value"] >= c["threshold"]) for c in checks.values())
    assert report["judged"] == ["fused", "contrast"]


def test_demo_targets_verdict():
    from afloc_cli.demo import judge_targets, unmet

    untrained = {"miou": 0.05, "dice": 0.1, "cnr": 0.0, "pointing": 0.10, "auroc": 0.5}
    good = {"miou": 0.2, "dice": 0.3, "cnr": 1.5, "pointing": 0.5, "auroc": 0.8}  # thresholds count as met
    assert unmet(judge_targets(good, untrained)) == []
    assert unmet(judge_targets({**good, "pointing": 0.24}, untrained)) == ["pointing 0.240 < 0.4",
                                                                          "pointing_over_untrained 0.140 < 0.15"]
    assert unmet(judge_targets(good, {**untrained, "pointing": 0.36})) == ["pointing_over_untrained 0.140 < 0.15"]
    assert unmet(judge_targets({**good, "auroc": None}, untrained)) == ["auroc n/a < 0.8"]
    assert unmet(judge_targets({**good, "miou": float("nan")}, untrained)) == ["miou nan < 0.2"]


def _run_script(cmd: list[str], cwd: Path) -> None:
    """Run a benchmark script; on failure, show the tail of what it printed (CI keeps only the assertion)."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, f"exit {done.returncode}: {' '.join(cmd[1:])}\n{done.stderr[-4000:]}"


def test_learning_benchmark_quick_chain_and_rescoring(tmp_path):
    """benchmarks/learning.py end to end on a tiny budget, then --reuse-runs re-scores without training."""
    import polars as pl

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "learning"
    cmd = [sys.executable, str(repo / "benchmarks" / "learning.py"), "--out", str(out), "--quick", "--seeds", "1",
           "--first-seed", "2", "--bootstrap", "5", "--workers", "0"]
    _run_script(cmd, repo)
    table = pl.read_csv(out / "per_seed.csv")
    rows = set(table["row"])
    assert rows == {"full (global+sentence+word)", "global+sentence (GLoRIA-like)", "global only (ConVIRT-like)",
                    "full, shallow map (words)", "full, fused map", "full, fused map, equal weights",
                    "global+sentence, fused map", "global+sentence, fused map, equal weights", "untrained",
                    "random maps"}
    assert set(table["readout"]) == {"reference", "contrast"} and set(table["seed"]) == {2}
    held_out = json.loads((out / "learning.json").read_text())["corpus"]["held_out_kind"]
    assert table.filter(pl.col("held_out"))["kind"].unique().to_list() == [held_out]
    model = out / "runs" / "global-sent-word-seed2" / "model.safetensors"
    before = model.stat().st_mtime_ns
    _run_script([*cmd, "--reuse-runs"], repo)
    assert model.stat().st_mtime_ns == before  # not trained again
    runs = json.loads((out / "learning.json").read_text())["runs"]
    assert all(r["train_s"] is None and r["steps"] == 2 for r in runs)
    assert pl.read_csv(out / "per_seed.csv").height == table.height
    # The same runs scored serially and by two worker processes, one thread each (thread counts change the
    # last bits of the products): the same table, row for row.
    _run_script([*cmd, "--reuse-runs", "--threads", "1"], repo)
    serial = pl.read_csv(out / "per_seed.csv")
    _run_script([*cmd, "--reuse-runs", "--jobs", "2", "--threads", "1"], repo)
    assert pl.read_csv(out / "per_seed.csv").equals(serial)
    # Another recipe's runs are refused before any work, on one line naming the run and the setting.
    refused = subprocess.run([*cmd, "--reuse-runs", "--set", "model.loss.weight_sentence=3.0"], capture_output=True,
                             text=True, cwd=repo)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().startswith("--reuse-runs: ") and len(refused.stderr.strip().splitlines()) == 1
    assert "-seed2: trained under other settings: model.loss.weight_sentence 1.0 (run) vs 3.0 (now)" in refused.stderr
    assert pl.read_csv(out / "per_seed.csv").equals(serial) and model.stat().st_mtime_ns == before


def test_demo_seeds_quick_chain(tmp_path):
    """benchmarks/demo_seeds.py end to end on the demo's --quick plan: every row judged on every seed."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "seeds"
    _run_script([sys.executable, str(repo / "benchmarks" / "demo_seeds.py"), "--out", str(out), "--quick",
                 "--seeds", "2", "--first-seed", "3", "--workers", "0", "--threads", "1",
                 "--set", "optim.ema_decay=0.5"], repo)
    meta = json.loads((out / "demo_seeds.json").read_text())
    assert [r["seed"] for r in meta["seeds"]] == [3, 4] and all(r["steps"] == 4 for r in meta["seeds"])
    for r in meta["seeds"]:
        assert set(r["targets"]) == {"readouts", "fused"}
        assert set(r["table"]) == {"readouts", "fused", "untrained"}
        assert Path(r["checkpoint"]) == out / "runs" / f"seed{r['seed']}" / "model.safetensors"  # the average
    table = (out / "demo_seeds.md").read_text()
    assert "| fused map, contrast (judged) |" in table and table.count(" of 2 |") == 4
    # The same runs on their optimised weights, without training again, then the two compared seed by seed.
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "runs").symlink_to(out / "runs")
    _run_script([sys.executable, str(repo / "benchmarks" / "demo_seeds.py"), "--out", str(raw), "--quick",
                 "--seeds", "2", "--first-seed", "3", "--workers", "0", "--threads", "1", "--reuse-runs",
                 "--weights", "optimised"], repo)
    again = json.loads((raw / "demo_seeds.json").read_text())
    assert again["weights"] == "optimised" and all(r["train_s"] is None for r in again["seeds"])
    for r in again["seeds"]:
        assert Path(r["checkpoint"]) == raw / "runs" / f"seed{r['seed']}" / "checkpoints" / "step-0000004" / \
            "model.safetensors"
    shown = subprocess.run([sys.executable, str(repo / "benchmarks" / "demo_seeds.py"), "--compare",
                            str(raw / "demo_seeds.json"), str(out / "demo_seeds.json")],
                           cwd=repo, capture_output=True, text=True, check=True).stdout
    assert shown.count("\n| 3 | ") == 1 and shown.count("\n| 4 | ") == 1 and "of 2 seeds" in shown
    # Their averaged weights, though, belong to optim.ema_decay=0.5: without it, the runs are refused.
    refused = subprocess.run([sys.executable, str(repo / "benchmarks" / "demo_seeds.py"), "--out", str(raw),
                              "--quick", "--seeds", "2", "--first-seed", "3", "--workers", "0", "--threads", "1",
                              "--reuse-runs"], cwd=repo, capture_output=True, text=True)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "seed3: trained under other settings: optim.ema_decay 0.5 (run)" in refused.stderr


def _bench_script(name: str, monkeypatch):
    """A benchmarks/ script imported as a module (they are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"{name}_bench", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_closest_call_is_the_smallest_margin(monkeypatch):
    from afloc_cli.demo import judge_targets

    module = _bench_script("demo_seeds", monkeypatch)

    trained = {"auroc": 0.88, "pointing": 0.45, "miou": 0.26}
    margin, which = module.closest_call(judge_targets(trained, {"pointing": 0.02}))
    assert which == "pointing" and margin == pytest.approx(0.05)
    margin, which = module.closest_call(judge_targets({**trained, "auroc": 0.79}, {"pointing": 0.02}))
    assert which == "auroc" and margin == pytest.approx(-0.01)
    assert module.closest_call(judge_targets({**trained, "auroc": None}, {"pointing": 0.0}))[0] == -math.inf


def test_learning_budget_with_more_training_images_keeps_steps_and_final_rate(monkeypatch):
    """--train-images: val and test keep their sizes, the step count and the last learning rate stay put."""
    from collections import Counter

    from afloc_cli.synth import SynthConfig
    from afloc_cli.synth.corpus import assign_splits

    learning = _bench_script("learning", monkeypatch)

    default = learning.budget(False)
    assert default.n_images == 2000 and default.plan.epochs == 28
    assert Counter(assign_splits(SynthConfig(n=2000, fractions=default.fractions))) == {
        "train": 1400, "val": 200, "test": 400}
    base_steps = default.plan.epochs * math.ceil(1400 / default.plan.batch_size)
    for train in (2800, 5600, 3000):
        b = learning.budget(False, train_images=train)
        splits = Counter(assign_splits(SynthConfig(n=b.n_images, fractions=b.fractions)))
        assert splits == {"train": train, "val": 200, "test": 400}
        steps = b.plan.epochs * math.ceil(train / b.plan.batch_size)
        assert abs(steps - base_steps) / base_steps < 0.08, (train, steps)
        gamma = float(next(o for o in reversed(b.plan.overrides) if o.startswith("optim.step_gamma="))
                      .split("=")[1])
        assert gamma ** b.plan.epochs == pytest.approx(0.9**14, rel=0.01)
        assert "optim.word_warmup=600" in b.plan.overrides and "optim.word_start=500" in b.plan.overrides
        assert "model.loss.weight_sentence=2.0" in b.plan.overrides
    with pytest.raises(SystemExit, match="--train-images"):
        learning.budget(False, train_images=4)


def test_learning_budget_trains_the_sentence_loss_at_weight_2_in_every_row_that_has_it(monkeypatch):
    """The GLoRIA-like row gets the full model's sentence weight, so the two differ by the word level alone."""
    from afloc_cli.demo import training_config

    learning = _bench_script("learning", monkeypatch)
    plan = learning.budget(False).plan
    for losses in learning.VARIANTS.values():
        loss = training_config(plan, losses=losses).model.loss
        assert (loss.use_sentence, loss.weight_sentence) == ("sent" in losses, 2.0)
        assert (loss.weight_global, loss.weight_word) == (1.0, 1.0)
    given = learning.budget(False, overrides=("model.loss.weight_sentence=1.0",)).plan  # --set still wins
    assert training_config(given, losses="global,sent,word").model.loss.weight_sentence == 1.0


def test_learning_verdict_needs_the_full_row_above_every_ablation_rows_upper_edge(monkeypatch):
    """"Beyond the spread" of every ablation: the full row's mean - sd against the highest mean + sd of any
    ablation row, which need not be the row with the highest mean."""
    import polars as pl

    learning = _bench_script("learning", monkeypatch)

    def row(name: str, pointing: float, sd: float) -> dict:
        return {"row": name, "readout": "contrast", "kind": "macro (seen kinds)", "held_out": False, "seeds": 3,
                **{m: 0.3 for m in learning.METRICS}, **{f"{m}_sd": 0.0 for m in learning.METRICS},
                "pointing": pointing, "pointing_sd": sd}

    def verdicts(ablation_rows: list[dict]) -> list[str]:
        table = pl.DataFrame([row("full, fused map", 0.80, 0.02), *ablation_rows])
        lines = [line for line in learning.verdict(table).splitlines() if "| pointing |" in line]
        return [line.rsplit("|", 2)[-2].strip() for line in lines]

    steady = row(learning.ABLATION_FUSED, 0.72, 0.01)
    assert verdicts([steady]) == ["yes"]  # 0.78 > 0.73
    wide = row(learning.ABLATION_FUSED_EQUAL, 0.70, 0.09)  # lower mean, upper edge 0.79
    assert verdicts([steady, wide]) == ["no"]
    assert learning.ABLATION_FUSED_EQUAL in learning.verdict(pl.DataFrame([row("full, fused map", 0.8, 0.02),
                                                                           steady, wide]))
