"""Atomic writes: old or new, never half; readable by others like any ordinary output."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.io import atomic_dir, atomic_path, write_json


def test_files_and_folders_are_readable_by_others(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "ds") as folder:
        (folder / "x").write_text("x")
    assert (tmp_path / "m.json").stat().st_mode & 0o044 == 0o044
    assert (tmp_path / "ds").stat().st_mode & 0o055 == 0o055


def test_a_failed_write_leaves_the_previous_output(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "m.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "m.json").read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_a_failed_folder_leaves_the_previous_one(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "ds") as folder:
        (folder / "old").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "ds") as folder:
        (folder / "new").write_text("2")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
