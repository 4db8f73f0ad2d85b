"""A training stage over many machines as Ray Train workers (`engine: ray`).

Input: the stage's rank function ("module:function(argv)", the same body its in-stage launch
runs), its argv, the training section (nodes x devices workers, restarts, dist_timeout_min) and
the Ray cluster's address (raycluster.py). Output: nothing but the exit code's exception; the
workers write the outputs (rank 0 alone) and the stage's checkpoints on the shared storage the
workspace is on, and the driver keeps the stage's one MLflow run (door.py).

Ray Train starts, places and restarts the workers (TorchTrainer, ScalingConfig, FailureConfig)
and sets up their process group (gloo on CPUs, NCCL on GPUs); each worker adopts it
(distributed.adopt) and runs the stage's own training loop. A restart resumes from the stage's
own checkpoint (checkpoint.py: same code, params, data and world size, exactly), not from a
Ray Train Checkpoint: the stage's store already is the one DVC tracks.

The exit-code contract, which Ray Train alone cannot keep (it retries every worker error
alike): a worker that meets bad input (2) or a bug (70) records that verdict in a small actor
before it fails; a restarted worker that finds a verdict stops at once, so bad input and bugs
are never trained again, and the driver raises the verdict. Workers or nodes lost (a killed
process, a peer gone mid-collective) are restarted up to `restarts` times, then 75.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from stages.core import distributed, raycluster
from stages.core.epochlog import EPOCH_LOG_ENV
from stages.core.errors import EXIT_BAD_INPUT, EXIT_BUG, BadInput, Transient, peer_lost
from stages.params import PretrainParams

log = logging.getLogger("imagepipe.raytrain")


def workers(p: PretrainParams, cluster_gpus: float) -> tuple[int, bool]:
    """(Ray Train workers, whether each takes a GPU): nodes x devices, one worker per GPU;
    `devices: auto` is the cluster's GPUs shared by the nodes (1 per node on CPUs)."""
    use_gpu = p.device == "cuda" or (p.device == "auto" and cluster_gpus > 0)
    if use_gpu and cluster_gpus < 1:
        raise BadInput("device: cuda asked for but the Ray cluster has no GPU")
    if p.devices == "auto":
        per_node = max(1, int(cluster_gpus // p.nodes)) if use_gpu else 1
    else:
        per_node = p.devices
    n = p.nodes * per_node
    if use_gpu and n > cluster_gpus:
        raise BadInput(f"nodes x devices = {n} GPU workers but the Ray cluster has "
                       f"{cluster_gpus:.0f} GPUs")
    return n, use_gpu


def fit(target: str, argv: list[str], p: PretrainParams, address: str | None, *, stage: str,
        storage: Path) -> None:
    """Run `target(argv)` on nodes x devices Ray Train workers; raise what their end means."""
    with raycluster.connected(address):
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchConfig, TorchTrainer

        n, use_gpu = workers(p, ray.cluster_resources().get("GPU", 0.0))
        backend = "nccl" if use_gpu else "gloo"
        verdict = ray.remote(num_cpus=0)(_Verdict).remote()
        # The workers never keep their own MLflow run (the driver keeps the stage's), and rank
        # 0 appends to the driver's live epoch log (shared storage).
        env = {"IMAGEPIPE_TRACKING": "0"}
        if os.environ.get(EPOCH_LOG_ENV):
            env[EPOCH_LOG_ENV] = os.environ[EPOCH_LOG_ENV]
        config = {"target": target, "argv": argv, "cwd": os.getcwd(), "backend": backend,
                  "verdict": verdict, "env": env}
        storage.mkdir(parents=True, exist_ok=True)
        name = f"{stage}-{uuid.uuid4().hex[:8]}"  # Ray Train's run folder: its marker files only
        trainer = TorchTrainer(
            _worker, train_loop_config=config,
            torch_config=TorchConfig(backend=backend, timeout_s=int(p.dist_timeout_min * 60)),
            scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=p.restarts)))
        log.info("%s: %d Ray Train worker(s) (%s), restarts %d", stage, n, backend, p.restarts)
        failed: BaseException | None = None
        try:
            trainer.fit()
        except TrainingFailedError as err:
            failed = err
        finally:
            shutil.rmtree(storage / name, ignore_errors=True)
        code, said = ray.get(verdict.get.remote())
    if code == EXIT_BAD_INPUT:
        raise BadInput(said)
    if code == EXIT_BUG:
        raise distributed.RankFailed(f"{stage}: a Ray Train worker failed: {said}")
    if failed is not None:
        raise Transient(f"{stage}: Ray Train workers lost after {p.restarts} restart(s): "
                        f"{str(failed).splitlines()[0]}")


class _Verdict:
    """The first worker's bad input (2) or bug (70) of a run: restarts stop at once on it."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.said = ""

    def set(self, code: int, said: str) -> None:
        if self.code is None:
            self.code, self.said = code, said

    def get(self) -> tuple[int | None, str]:
        return self.code, self.said


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: adopt the process group, run the stage's rank function."""
    import ray.train

    verdict = config["verdict"]
    if ray.get(verdict.get.remote())[0] is not None:
        return  # an earlier attempt met bad input or a bug: nothing to train again
    os.chdir(config["cwd"])  # the workspace, at the same path on every node
    os.environ.update(config["env"])
    ctx = ray.train.get_context()
    comm = distributed.Comm(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                            ctx.get_local_world_size(), config["backend"])
    distributed.adopt(comm)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        distributed.run_rank(comm, config["target"], config["argv"])
    except BadInput as err:
        ray.get(verdict.set.remote(EXIT_BAD_INPUT, f"rank {comm.rank}: {err}"))
        raise
    except Exception as err:
        if not (isinstance(err, Transient) or peer_lost(err)):
            ray.get(verdict.set.remote(EXIT_BUG, f"rank {comm.rank}: {type(err).__name__}: {err}"))
        raise
    finally:
        distributed.adopt(distributed.SINGLE)
