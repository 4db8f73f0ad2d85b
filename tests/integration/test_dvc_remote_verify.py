"""The README's DVC remote recipe, run for real on a folder remote: an object corrupted in the
remote is refused by `dvc pull`, not checked out into a fresh workspace with exit 0."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, dvc, git

pytestmark = pytest.mark.slow

README_FOLDER = "/mnt/shared/imagepipe-store"  # the recipe's example folder remote


def recipe_remote_commands(remote: Path) -> list[list[str]]:
    """The `dvc remote ...` lines of the README's recipe for a folder remote (S3's skipped),
    with the example folder replaced by `remote`."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Sharing data and models (DVC remotes)", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's remote recipe is gone"
    lines = [line.split("#", 1)[0].strip() for line in block[1].splitlines()]
    commands = [shlex.split(line.replace(README_FOLDER, str(remote)))
                for line in lines if line.startswith("dvc remote") and "s3://" not in line]
    assert any(str(remote) in c for c in commands), "no folder remote in the recipe"
    return [c[1:] for c in commands]


def test_a_corrupted_remote_object_is_refused_by_pull(tmp_path: Path) -> None:
    project, remote = tmp_path / "project", tmp_path / "store"
    project.mkdir()
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    data = project / "shard.npy"
    data.write_bytes(np.random.default_rng(0).bytes(256 * 1024))
    dvc(project, "add", "shard.npy")
    for args in recipe_remote_commands(remote):
        dvc(project, *args)
    dvc(project, "push")

    objects = [p for p in remote.rglob("*") if p.is_file()]
    assert len(objects) == 1, objects
    with open(objects[0], "r+b") as f:  # one bit of one byte, in the remote's only object
        f.seek(1000)
        byte = f.read(1)[0]
        f.seek(1000)
        f.write(bytes([byte ^ 1]))

    # A fresh workspace: no cache, no file; what pull brings is all there is.
    shutil.rmtree(project / ".dvc" / "cache")
    data.unlink()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    pull = subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert pull.returncode != 0, f"pull accepted a corrupted object:\n{pull.stdout}{pull.stderr}"
    assert not data.exists(), "the corrupted bytes were checked out"
