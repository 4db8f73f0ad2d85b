"""A model or checkpoint write that finds no room: torch's zip writer raises RuntimeError
("unexpected pos"), which the door maps to 70, a bug. It is DiskFull (75, one line naming the
folder) for a full disk, and names the file-size limit when that is what was hit."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO

WRITE = textwrap.dedent("""
    import sys, torch
    from stages.core.door import run_stage
    from stages.core.io import save_torch
    sys.exit(run_stage("t", lambda: save_torch({"x": torch.zeros(400_000)}, sys.argv[1]),
                       track=False))
""")


def _write(target: Path, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", WRITE, str(target)], cwd=REPO, text=True,
                          capture_output=True, timeout=120, preexec_fn=lower if limit else None)


def test_a_file_size_limit_is_named_and_transient(tmp_path: Path) -> None:
    done = _write(tmp_path / "model.pt", limit=200_000)
    assert done.returncode == 75, done.stderr
    assert "file-size limit (RLIMIT_FSIZE" in done.stderr and "200,000 bytes" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_a_torch_write_is_disk_full(small_disk: Path) -> None:
    done = _write(small_disk / "checkpoint.pt")
    assert done.returncode == 75, done.stderr
    assert f"disk full: {small_disk}" in done.stderr and "Traceback" not in done.stderr
    assert list(small_disk.iterdir()) == []
