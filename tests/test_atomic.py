"""The one atomic writer: all or nothing, nothing stray left, no temporary shared between writers."""

from __future__ import annotations

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
