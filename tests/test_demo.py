"""`afloc demo --quick`: the whole chain a new user runs first, end to end, offline."""

from __future__ import annotations

import json
import math

from afloc_cli.cli import run
from afloc_cli.heatmaps.store import HeatmapFile


def test_quick_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run(["demo", "--quick", "--out", str(out), "--workers", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (out / "run" / "model.safetensors").is_file() and (out / "demo.json").is_file()
    with HeatmapFile.open(out / "test_heatmaps.h5") as hf:
        assert hf.attrs["readout"] == "contrast" and hf.n_prompts == 7 and hf.n_images > 0
    for readout in ("reference", "contrast"):
        for key in ("readouts", "untrained"):  # the trained model and the same model before training
            values = report[key][readout]
            assert set(values) == {"miou", "dice", "cnr", "pointing", "auroc"}
            assert all(v is not None and math.isfinite(v) for v in values.values()), values
        assert (out / "benchmark" / readout / "summary.csv").is_file()
        protocol = json.loads((out / "benchmark" / readout / "protocol.json").read_text())
        assert protocol["readout"] == readout
