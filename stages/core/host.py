"""What this process may use and where it runs: usable CPU cores, visible GPUs, the project root,
the environment variable that carries the Prefect flow-run id into stages, and a child's tie to
its parent (it dies with it).

The flow, the stages and the commands ask here; nothing here imports torch: counting GPUs must
not cost a CUDA initialisation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

# Set by the Prefect flow for every stage it runs: MLflow groups the stages' runs under one
# parent run by it and tags every run with it (lineage).
FLOW_RUN_ENV = "IMAGEPIPE_FLOW_RUN_ID"
# Set by the flow when it granted the stage GPU slots on a machine that has GPUs: the number.
# The tools' telemetry, off unless the user set these: `imagepipe`, stages, Prefect's processes.
TELEMETRY_OFF = {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "ORT_DISABLE_TELEMETRY": "1",
                 "DO_NOT_TRACK": "1"}
GPUS_GRANTED_ENV = "IMAGEPIPE_GPUS_GRANTED"
# Linux's prctl option: a signal the kernel sends to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    """CPU cores this process may keep busy: its affinity (taskset, cpuset), unlike
    os.cpu_count(), and its cgroup's CPU quota (`docker run --cpus`, a Kubernetes CPU limit),
    rounded up. Without the quota a pod limited to 8 CPUs on a 64-core node ran 64 threads a
    stage and was throttled most of each period."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cpu_quota() -> float | None:
    """The CPUs this process's cgroup quota allows (quota / period, the tightest of its cgroup
    and their ancestors'), v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`); None when there is no
    quota or it cannot be read (not Linux, no cgroup file system)."""
    found = [q for version, folder in cgroup_folders("cpu")
             if (q := _quota(version, folder)) is not None]
    return min(found) if found else None


def cgroup_folders(controller: str, cgroups: Path = Path("/proc/self/cgroup"),
                   mount: Path = Path("/sys/fs/cgroup")) -> list[tuple[int, Path]]:
    """(cgroup version, folder) of this process's cgroups that may hold `controller`'s limits
    and of their ancestors, innermost first: a limit anywhere above binds too. Empty where
    /proc/self/cgroup cannot be read (not Linux). Also budget.py's (memory limits)."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[int, Path]] = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            version, bases = 2, [mount, mount / "unified"]
        elif controller in controllers.split(","):
            aliases = ["cpu,cpuacct"] if controller == "cpu" else []
            version = 1
            bases = [mount / controllers, mount / controller, *(mount / a for a in aliases)]
        else:
            continue
        for base in bases:
            folder = base / path.lstrip("/")
            found += [(version, level) for level in (folder, *folder.parents)
                      if level.is_relative_to(base)]
    return found


def _quota(version: int, folder: Path) -> float | None:
    """v2's `cpu.max` ("max" or "QUOTA PERIOD"), v1's quota and period files (-1: none)."""
    try:
        if version == 2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text()
            period = (folder / "cpu.cfs_period_us").read_text()
        q, p = int(quota), int(period)
    except (OSError, ValueError):  # "max" too
        return None
    return q / p if q > 0 and p > 0 else None


def visible_gpus() -> int:
    """NVIDIA GPUs this process can see, without importing torch.

    CUDA_VISIBLE_DEVICES, when set, is what CUDA will expose: its entries up to the first
    invalid one (CUDA's own rule: "0,-1,1" is one device; "" or "-1" none), MIG UUIDs included.
    Unset, the GPUs the driver lists under /proc (0 where there is no driver: containers without
    the NVIDIA runtime, CPU machines).
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        count = 0
        for entry in (e.strip() for e in listed.split(",")):
            if not entry or (entry.lstrip("-").isdigit() and int(entry) < 0):
                break
            count += 1
        return count
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def workspace_root(start: Path | None = None) -> Path:
    """The DVC workspace at or above `start` (default: cwd): the nearest folder holding
    dvc.yaml or .dvc/, as dvc itself looks; `start` itself when there is none. Inside a queued
    or `--temp` experiment that is the experiment's own clone: its params, dvc.lock, metrics
    and models are the ones a run there describes."""
    here = (start or Path.cwd()).resolve()
    return next((folder for folder in (here, *here.parents)
                 if (folder / "dvc.yaml").is_file() or (folder / ".dvc").is_dir()), here)


def project_root(start: Path | None = None) -> Path:
    """The project that owns the workspace at `start`: where its MLflow store (mlflow.db) and
    tracking bookkeeping live. The workspace itself, except for an experiment's clone.

    A queued (`dvc exp run --queue`) or `--temp` experiment runs in a git clone DVC makes at
    <project>/.dvc/tmp/exps/{celery,standalone}/tmpXXXX/ and throws away afterwards; there
    the answer is <project>, so its runs land in the project's own MLflow store (while they
    describe the clone's files: workspace_root). Read from the path rather than from DVC_ROOT
    (which DVC sets to <project> for such a run's stages) so a stage started by hand in that
    folder agrees.
    """
    found = workspace_root(start)
    for folder in found.parents:
        if folder.name == "exps" and folder.parent.name == "tmp" and folder.parent.parent.name == ".dvc":
            return folder.parent.parent.parent
    return found


def die_with_parent(sig: int, parent: int | None = None) -> Callable[[], None] | None:
    """A function that makes the process calling it receive `sig` when its parent dies (Linux's
    PR_SET_PDEATHSIG; None elsewhere): a stage killed with -9 must not leave its children running.

    `parent`: the pid the caller's parent should be; default this process, for a preexec_fn the
    forked child calls; a spawned child passes os.getppid() and calls it itself. When that parent
    is already gone (it died before prctl took effect) the caller exits at once, 128 + `sig`.
    The signal comes when the parent *thread* that forked ends: fork from one that outlives the
    child. libc is looked up here, before a fork: the child only calls it.
    """
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if libc_name is None:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    expected = os.getpid() if parent is None else parent

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != expected:
            os._exit(128 + int(sig))

    return arm


def env_seconds(env: str, default: float, floor: float = 1.0) -> float:
    """A duration from the environment variable `env`, at least `floor`; `default` if unset
    or not a number."""
    try:
        return max(floor, float(os.environ.get(env, default)))
    except ValueError:
        return default


def export_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set `env` in this process's environment; what it replaced, for restore_env."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back the environment variables of `saved` as they were (None: it was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
