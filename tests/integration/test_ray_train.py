"""pretrain as Ray Train workers (`engine: ray`) on a real two-node Ray cluster on 127.0.0.1
(raykit.py: token auth on, one CPU per node, so the two gloo workers sit on different nodes):
the same weights as the in-stage launch and, without BatchNorm, as one process within 1e-5;
a worker killed mid-run restarts from the stage's checkpoint and ends bit-identical, or is 75
with no restarts left; bad input in the workers is 2 at once, never trained again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from stages.core import distributed
from tests.helpers import REPO, default_params, write_params
from tests.integration.raykit import Cluster, two_nodes
from tests.integration.test_distributed import (
    assert_ranks_equal_one_process,
    assert_same_weights,
    stage_args,
    train_tiny,
)
from tests.unit.test_train import write_dataset

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_nodes(cpus_per_node=1) as c:
        yield c


def params(folder: Path, name: str, **changes: object) -> Path:
    raw = default_params()
    raw["pretrain"] = {"epochs": 3, "width": 8, "batch_size": 32, "lr": 0.05, "dropout": 0.2,
                       "crop_padding": 1, "hflip": True, "checkpoint_every_steps": 2,
                       "device": "cpu", "devices": 1, "nodes": 2, "engine": "ray", **changes}
    return write_params(folder / f"{name}.yaml", raw)


def driver(cluster: Cluster) -> dict[str, str]:
    """The driver's environment as the README's recipe sets it (before Ray is imported)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**clean, **cluster.driver_env(), "IMAGEPIPE_TRACKING": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def pretrain(cluster: Cluster, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "stages.pretrain", *args], cwd=REPO,
                            env=driver(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset (480 train images: 15 steps of 32 per epoch) and one uninterrupted Ray run."""
    root = tmp_path_factory.mktemp("raytrain")
    write_dataset(root / "data", ["a", "b", "c"], {"train": 160, "val": 8}, size=8)
    code, out = finish(pretrain(cluster, stage_args(params(root, "ray"), root / "data", root / "ray")))
    assert code == 0, out[-3000:]
    return root, root / "ray"


def test_two_workers_on_two_nodes_equal_the_in_stage_launch(cluster: Cluster,
                                                            reference: tuple[Path, Path]) -> None:
    root, ray_out = reference
    local = params(root, "local", engine="local", devices=2, nodes=1)
    done = subprocess.run([sys.executable, "-m", "stages.pretrain",
                           *stage_args(local, root / "data", root / "local")], cwd=REPO,
                          env={**os.environ, "IMAGEPIPE_TRACKING": "0"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_weights(root / "local", ray_out)
    assert json.loads((ray_out / "m.json").read_text())["world_size"] == 2
    assert cluster.nodes_that_ran("RayTrainWorker") == 2  # one worker on each node


def fit_in_child(cluster: Cluster, target: str, argv: list[str], folder: Path, restarts: int
                 ) -> subprocess.CompletedProcess[str]:
    """raytrain.fit(target, argv) on 2 CPU workers behind the stage door, in a driver process
    of its own (Ray reads the token when imported); returns it finished."""
    fit = ("import sys, json; from pathlib import Path; from stages.core import raytrain; "
           "from stages.core.door import run_stage; from stages.params import PretrainParams; "
           "sys.exit(run_stage('tiny', lambda: raytrain.fit(sys.argv[1], json.loads(sys.argv[2]), "
           "PretrainParams(device='cpu', devices=1, nodes=2, engine='ray', "
           "restarts=int(sys.argv[4])), None, stage='tiny', "
           "storage=Path(sys.argv[3]) / '.ray-train'), track=False))")
    return subprocess.run([sys.executable, "-c", fit, target, json.dumps(argv), str(folder),
                           str(restarts)], cwd=REPO, env=driver(cluster), capture_output=True,
                          text=True, timeout=300)


def test_two_ray_train_workers_equal_one_process_within_1e_5(cluster: Cluster, tmp_path: Path) -> None:
    """20 SGD steps of a global batch of 32, no BatchNorm: Ray Train's 2 x 16 (gloo) against
    one process's 32 (tests/integration/test_distributed.py's train_tiny, run by both)."""
    single = tmp_path / "single"
    single.mkdir()
    train_tiny([str(single), "plain"])
    done = fit_in_child(cluster, "tests.integration.test_distributed:train_tiny",
                        [str(tmp_path), "plain"], tmp_path, restarts=0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_ranks_equal_one_process(single, tmp_path)


def bug_on_rank_1(argv: list[str]) -> None:
    """Say this worker started (a file in argv[0]); rank 1 then raises a bug while rank 0
    waits for it in a collective, as in a step."""
    rank = distributed.current().rank
    (Path(argv[0]) / f"start-{rank}-{time.monotonic_ns()}").touch()
    if rank == 1:
        raise RuntimeError("simulated bug")
    torch.distributed.barrier()


def test_a_bug_in_a_worker_is_70_and_never_trained_again(cluster: Cluster, tmp_path: Path) -> None:
    done = fit_in_child(cluster, "tests.integration.test_ray_train:bug_on_rank_1", [str(tmp_path)],
                        tmp_path, restarts=3)
    assert done.returncode == 70, done.stderr[-3000:]
    assert "rank 1: RuntimeError: simulated bug" in done.stderr
    assert len(list(tmp_path.glob("start-*"))) == 2  # one attempt: the restart stopped at once


def kill_a_worker_mid_run(cluster: Cluster, checkpoint: Path, proc: subprocess.Popen[str]) -> None:
    """Once the first checkpoint is written, SIGKILL the training worker on the joining node
    (found among the processes of that node's `ray start` session)."""
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(p.pid) == cluster.sessions[1] and \
                    "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                os.kill(p.pid, signal.SIGKILL)
                return
        except (ProcessLookupError, psutil.Error):
            continue
    raise AssertionError("no training worker to kill: the run ended first")


def test_a_worker_killed_mid_run_restarts_and_ends_bit_identical(cluster: Cluster,
                                                                 reference: tuple[Path, Path]) -> None:
    root, ray_out = reference
    args = stage_args(params(root, "ray"), root / "data", root / "killed")
    proc = pretrain(cluster, args)
    kill_a_worker_mid_run(cluster, root / "killed" / "ck" / "pretrain.pt", proc)
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert cluster.nodes_that_ran("resuming from") >= 1, "the restart did not resume"
    assert_same_weights(ray_out, root / "killed")


def test_a_worker_killed_with_no_restarts_left_is_75(cluster: Cluster,
                                                      reference: tuple[Path, Path]) -> None:
    root, _ = reference
    args = stage_args(params(root, "norestart", restarts=0), root / "data", root / "lost")
    proc = pretrain(cluster, args)
    kill_a_worker_mid_run(cluster, root / "lost" / "ck" / "pretrain.pt", proc)
    code, out = finish(proc)
    assert code == 75, out[-3000:]
    assert "Ray Train workers lost after 0 restart(s)" in out


def test_bad_input_in_the_workers_is_2_and_never_retried(cluster: Cluster,
                                                          reference: tuple[Path, Path]) -> None:
    root, _ = reference
    args = stage_args(params(root, "odd", batch_size=31, restarts=5), root / "data", root / "odd")
    start = time.monotonic()
    code, out = finish(pretrain(cluster, args))
    assert code == 2, out[-3000:]
    assert "pretrain.batch_size: 31 is not divisible by the 2 training processes" in out
    assert not (root / "odd" / "m.pt").exists()
    assert time.monotonic() - start < 120  # not five restarts of the same mistake
