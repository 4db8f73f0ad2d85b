"""Small helpers the tests share: run a stage as DVC would, write params files."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def default_params() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(module: str, *args: str | Path, cwd: Path = REPO, timeout: float = 300
              ) -> subprocess.CompletedProcess[str]:
    """`python -m stages.MODULE ARGS` as dvc.yaml runs it; returns the finished process.

    MLflow tracking is off: these runs would land in the repo's own mlflow.db. The tracking
    tests switch it on against stores of their own.
    """
    import os

    env = {**os.environ, "IMAGEPIPE_TRACKING": "0"}
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def project_copy(dest: Path) -> Path:
    """A fresh git clone-alike of this working tree (tracked + untracked, not ignored) at dest.

    Copies the working tree rather than cloning HEAD so a test sees uncommitted work too;
    the copy gets its own git repo and first commit, as `dvc exp run` needs.
    """
    import shutil

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "test project")
    return dest


def git(cwd: Path, *args: str) -> str:
    env_args = ["-c", "user.name=imagepipe test", "-c", "user.email=test@imagepipe.invalid"]
    return subprocess.run(["git", *env_args, *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout


def dvc(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real dvc CLI from this virtualenv; raises with its output when it fails."""
    import os

    # dvc.yaml says `python`: the one of this virtualenv, as for a user who activated it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    who = {f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER")
           for key, value in (("NAME", "imagepipe test"), ("EMAIL", "test@imagepipe.invalid"))}
    env = {**os.environ, "PATH": path, **who}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def save_dataset(folder: Path, images: Any, labels: Any, split: Any, classes: list[str],
                  meta: dict[str, Any]) -> dict[str, Any]:
    """A canonical dataset in `folder` written as ingest writes one: one RowWriter shard,
    completed by write_sharded inside an atomic_dir. Returns its manifest."""
    import numpy as np

    from stages.core.dataset import RowWriter, write_sharded
    from stages.core.io import atomic_dir

    images = np.asarray(images, dtype=np.uint8)
    with atomic_dir(folder) as tmp:
        shard = RowWriter(tmp / "rows.part", images.shape[1:], capacity=len(images), hashed=True)
        shard.write(images)
        shard.close()
        manifest = write_sharded(tmp, [(shard.path, shard.digest, shard.n)], np.asarray(labels),
                                 np.asarray(split), classes, meta)
        shard.path.unlink()
    return manifest


def run_in_cgroup(found: tuple[Path, dict[str, str]] | None, code: str) -> str:
    """stdout of `python -c code` (from the repository) in a new cgroup: `found` is its folder
    and the limit files to write, None where there is no cgroup file system. Root only: the
    calling test is skipped where the cgroup cannot be made; the cgroup is removed after."""
    import os

    import pytest

    if found is None or os.geteuid() != 0:
        pytest.skip("no writable cgroup here (needs root and a cgroup file system)")
    group, settings = found
    try:
        group.mkdir()
    except OSError as err:
        pytest.skip(f"cannot make a cgroup: {err}")
    try:
        for name, value in settings.items():
            (group / name).write_text(value)
        script = f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -c \"{code}\""
        return subprocess.run(["sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                              timeout=120, check=True).stdout
    finally:
        group.rmdir()
