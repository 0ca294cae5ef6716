"""The command line as a whole: every finished command is registered, and startup stays light."""

from __future__ import annotations

import subprocess
import sys

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
