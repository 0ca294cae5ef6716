"""The one atomic writer: all or nothing, nothing stray left, no temporary shared between writers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from afloc_cli.atomic import write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "summary.csv"
    target.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
    write_atomic(target, lambda tmp: tmp.write_text("new\n"), fsync=True)
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_each_write_has_its_own_temporary(tmp_path: Path) -> None:
    seen: list[Path] = []
    for _ in range(2):
        write_atomic(tmp_path / "t.csv", lambda tmp: (seen.append(tmp), tmp.write_text("x")))
    assert seen[0] != seen[1] and all(p.parent == tmp_path and p.name.startswith(".t.csv.") for p in seen)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_a_new_file_gets_the_umask_mode_not_0600(tmp_path: Path, umask_027: None) -> None:
    """mkstemp's 0600 once survived the rename: tables and checkpoints were private, the .h5 beside them was not."""
    target = tmp_path / "scores.csv"
    write_atomic(target, lambda tmp: tmp.write_text("x\n"), fsync=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    os.umask(0o002)
    write_atomic(tmp_path / "other.csv", lambda tmp: tmp.write_text("x\n"))
    assert stat.S_IMODE((tmp_path / "other.csv").stat().st_mode) == 0o664


def test_a_writer_that_makes_its_own_private_file_still_gives_the_umask_mode(tmp_path: Path, umask_027: None) -> None:
    """safetensors' save_file replaces the temporary with a 0600 file of its own: checkpoints stayed private."""

    def private_writer(tmp: Path) -> None:
        tmp.unlink()
        tmp.write_text("x\n")
        tmp.chmod(0o600)

    write_atomic(tmp_path / "model.safetensors", private_writer)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o640


def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask_027: None) -> None:
    """--overwrite must not undo a chmod that shared (or restricted) a result."""
    for mode in (0o644, 0o600):
        target = tmp_path / f"summary{mode:o}.csv"
        target.write_text("old\n")
        target.chmod(mode)
        write_atomic(target, lambda tmp: tmp.write_text("new\n"))
        assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == mode
