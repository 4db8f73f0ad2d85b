"""project_root(): the nearest DVC project, and the real one from DVC's temporary experiment
workspaces (where a queued experiment's stages run and must find the project's mlflow.db).
die_with_parent(): a child, forked (preexec_fn) or spawned (a training rank), dies with its
parent, real processes and signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.core.host import die_with_parent, project_root, workspace_root
from tests.helpers import REPO, run_in_cgroup

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "stages" / "core").mkdir(parents=True)
    return root


def test_nearest_project_at_or_above(project: Path) -> None:
    assert project_root(project) == project.resolve()
    assert project_root(project / "stages" / "core") == project.resolve()


def test_no_project_answers_the_start(tmp_path: Path) -> None:
    assert project_root(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("queue", ["celery", "standalone"])
def test_experiment_workspace_answers_the_real_project(project: Path, queue: str) -> None:
    # The layout of dvc/repo/experiments/queue/{celery,tempdir}.py: a git clone of the project
    # (dvc.yaml and .dvc/ included) in <project>/.dvc/tmp/exps/<queue>/tmpXXXX.
    workspace = project / ".dvc" / "tmp" / "exps" / queue / "tmpab12cd"
    (workspace / ".dvc").mkdir(parents=True)
    (workspace / "dvc.yaml").write_text("stages: {}\n")
    (workspace / "stages").mkdir()
    assert project_root(workspace) == project.resolve()
    assert project_root(workspace / "stages") == project.resolve()
    # ... while the files a run there describes are the experiment's own.
    assert workspace_root(workspace / "stages") == workspace.resolve()
    assert workspace_root(project / "stages") == project.resolve()


def test_project_in_a_git_subfolder_inside_a_workspace(project: Path) -> None:
    # A DVC project in a monorepo's subfolder: the clone holds the whole git repo, and the
    # project is the subfolder of the original, not of the clone.
    sub = project / "ml"
    (sub / ".dvc").mkdir(parents=True)
    workspace_sub = sub / ".dvc" / "tmp" / "exps" / "celery" / "tmpx" / "ml"
    (workspace_sub / ".dvc").mkdir(parents=True)
    assert project_root(workspace_sub) == sub.resolve()


def test_a_folder_merely_named_exps_is_not_a_workspace(tmp_path: Path) -> None:
    root = tmp_path / "tmp" / "exps" / "proj"
    (root / ".dvc").mkdir(parents=True)
    assert project_root(root) == root.resolve()



# A spawned child arms itself, as a training rank does (stages/core/distributed.py).
SPAWNED = ("import os, signal, sys, time; from stages.core.host import die_with_parent; "
           "die_with_parent(signal.SIGKILL, int(sys.argv[1]) or os.getppid())(); "
           "print(os.getpid(), flush=True); time.sleep(60)")


def gone(pid: int) -> bool:
    """Ended (a zombie counts: nothing reaps orphans in some containers)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@linux
def test_a_spawned_child_dies_with_its_parent() -> None:
    # parent: python that starts the child and sleeps; killed with -9, no handler runs.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
         f"'-c', {SPAWNED!r}, '0']); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not gone(child)
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child), f"child {child} outlived its parent"


@linux
def test_a_child_whose_parent_died_before_it_armed_exits_at_once() -> None:
    # Its parent is this process, not pid 1: as if the expected one had died and it was adopted.
    done = subprocess.run([sys.executable, "-c", SPAWNED, "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGKILL and done.stdout == ""


@linux
def test_a_forked_child_gets_the_signal_from_a_preexec_fn() -> None:
    arm = die_with_parent(signal.SIGTERM)
    assert arm is not None
    child = subprocess.run([sys.executable, "-c", "print('armed')"], preexec_fn=arm,
                           capture_output=True, text=True, timeout=60)
    # Its parent is the one expected (this process): it runs; the kill -9 of a flow process
    # with such children is tests/integration/test_hardening_procs.py's.
    assert (child.returncode, child.stdout) == (0, "armed\n")


def _cpu_cgroup(name: str) -> tuple[Path, dict[str, str]] | None:
    """A new cgroup this test may limit (root only): v2 where the cpu controller is on, else v1's
    cpu hierarchy; with the files that set a quota of half a CPU."""
    v2 = Path("/sys/fs/cgroup")
    if "cpu" in (v2 / "cgroup.controllers").read_text().split() if (
            v2 / "cgroup.controllers").is_file() else False:
        return v2 / name, {"cpu.max": "50000 100000"}
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").is_file():
        return v1 / name, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}
    return None


def test_a_cpu_quota_caps_the_cores_a_child_counts(tmp_path: Path) -> None:
    """A child in a cgroup allowed half a CPU counts 1 core, whatever its affinity (2 here):
    what `docker run --cpus 0.5` or a Kubernetes limit of 500m gives a stage."""
    import os

    out = run_in_cgroup(_cpu_cgroup(f"imagepipe-test-{os.getpid()}"),
                        "from stages.core.host import usable_cores, cpu_quota; "
                        "print(usable_cores(), cpu_quota())")
    assert out.split() == ["1", "0.5"]
