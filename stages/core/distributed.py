"""Training over several processes of this machine: the launch, and what a rank needs to talk
to the others (several machines train as Ray Train workers: raytrain.py, which adopts a Comm).

Input: a training section of params.yaml (device, devices, dist_timeout_min) and the rank
function to run. Output: an exit code; a peer lost mid-collective, or one that stays away past
the plan's timeout, is 75 (door.py, errors.peer_lost), never 70.

Why elastic_launch from inside the stage rather than `torchrun` in dvc.yaml: torchrun reports
any failed rank as exit 1 (a rank's 2 "bad input" or 75 "retry" is lost) and, with restarts,
reruns bad input. Here each rank runs the stage's body behind the stage door, writes the exit
code it means to a small file, and exits with it; the parent combines the codes (`combine`).

One process never comes here (`plan` returns None).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from stages.core.epochlog import EPOCH_LOG_ENV
from stages.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_TRANSIENT,
    BadInput,
    Terminated,
    Transient,
)
from stages.core.host import die_with_parent, visible_gpus
from stages.params import TrainParams

log = logging.getLogger("imagepipe.distributed")

# Which rank's code the stage reports when ranks disagree: the cause beats its consequences.
# A rank that fails makes its peers see a lost peer (75, door.py) or be terminated by the
# agent (143): so bad input, then a bug, then a transient failure; a rank killed by a signal
# (no code written) is the cause whatever its peers then said (combine).
PRIORITY = (EXIT_BAD_INPUT, EXIT_BUG, EXIT_TRANSIENT, EXIT_INTERRUPTED, EXIT_TERMINATED)


@dataclass(frozen=True)
class Comm:
    """This process's place among the training processes; rank 0 writes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64: the same sums in any order of arrival)."""
        if self.world == 1:
            return [float(v) for v in values]
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else "cpu"
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]


SINGLE = Comm()
_current = SINGLE


def current() -> Comm:
    """The Comm of this process: SINGLE unless `join` (or `adopt`) ran here."""
    return _current


def adopt(comm: Comm) -> None:
    """Make `comm` this process's (`join`'s, or a process group Ray Train started)."""
    global _current
    _current = comm


def world_fingerprint(p: TrainParams, comm: Comm, section: str) -> dict[str, Any]:
    """A checkpoint fingerprint's part about the section and the processes: the world size and
    per-rank batch, not how they were asked for (devices: auto or 2 alike)."""
    if p.batch_size % comm.world:
        raise BadInput(f"{section}.batch_size: {p.batch_size} is not divisible by the "
                       f"{comm.world} training processes (batch_size is the global batch)")
    skip = {"checkpoint_every_steps", "devices", "nodes", "dist_timeout_min", "engine",
            "restarts"}
    return {section: p.model_dump(exclude=skip), "world_size": comm.world,
            "rank_batch": p.batch_size // comm.world}


@dataclass(frozen=True)
class Plan:
    nproc: int
    backend: str  # the process group's: nccl on CUDA, gloo on the CPU
    timeout_s: float  # a collective's wait for the others (dist_timeout_min)


def plan(p: TrainParams) -> Plan | None:
    """How to launch the stage's processes: `devices` of them, auto = every visible GPU (1 on a
    CPU); None for one process (no launch at all)."""
    gpus = 0 if p.device == "cpu" else visible_gpus()
    if p.devices != "auto" and p.devices > gpus and (p.device == "cuda" or gpus):
        # (device auto on a machine without GPUs runs CPU ranks)
        raise BadInput(f"devices: {p.devices} asked for but {gpus} GPU(s) are visible; use auto "
                       f"or at most {gpus}")
    nproc = max(gpus, 1) if p.devices == "auto" else p.devices
    if nproc == 1:
        return None
    return Plan(nproc, "nccl" if gpus else "gloo", p.dist_timeout_min * 60)


def launch(pl: Plan, target: str, argv: list[str]) -> int:
    """Run `target` ("module:function(argv) -> exit code") on the plan's processes; return the
    stage's exit code, whichever rank failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log.info("launching %d process(es) on this machine (%s)", pl.nproc, pl.backend)
    # torchrun --standalone's rendezvous: a free port on this machine, a run id of its own.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=pl.nproc,
                          run_id=uuid.uuid4().hex, rdzv_endpoint="localhost:0",
                          rdzv_backend="c10d", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    with tempfile.TemporaryDirectory(prefix="imagepipe-ranks-") as codes:
        failures: dict[int, int] = {}
        try:
            elastic_launch(config, _rank_entry)(pl.backend, target, argv, codes, pl.timeout_s)
        except ChildFailedError as err:
            failures = {int(rank): int(f.exitcode) for rank, f in err.failures.items()}
        except SignalException as err:
            log.warning("the launch got %s: its processes were stopped", err.sigval.name)
            return EXIT_INTERRUPTED if err.sigval == signal.SIGINT else EXIT_TERMINATED
        except Exception as err:  # noqa: BLE001 - rendezvous and agent errors
            log.error("the launch failed: %s: %s", type(err).__name__, err)
            return EXIT_TRANSIENT
        written = {int(f.name.removeprefix("rank")): int(f.read_text() or EXIT_BUG)
                   for f in Path(codes).glob("rank*")}
    return combine(written, failures)


def combine(written: dict[int, int], failures: dict[int, int]) -> int:
    """The stage's exit code from the codes ranks wrote and the exit codes the agent saw.

    A rank that failed without writing one died by a signal (exit < 0: transient, as the
    contract says) or before its door ran (a bug)."""
    codes = set(written.values())
    unwritten = [exitcode for rank, exitcode in failures.items() if rank not in written]
    if any(exitcode < 0 for exitcode in unwritten) and EXIT_BAD_INPUT not in codes:
        return EXIT_TRANSIENT
    if unwritten:
        codes.add(EXIT_BUG)
    return next((code for code in PRIORITY if code in codes),
                EXIT_BUG if codes - {EXIT_OK} else EXIT_OK)


class RankFailed(Exception):
    """A training process failed with a bug (its traceback is above in the log)."""


def raise_for(code: int, stage: str) -> None:
    """Re-raise a launch's exit code in the parent, so that its stage door maps it back."""
    if code != EXIT_OK:
        kind = {EXIT_BAD_INPUT: BadInput, EXIT_TRANSIENT: Transient,
                EXIT_INTERRUPTED: KeyboardInterrupt, EXIT_TERMINATED: Terminated}
        raise kind.get(code, RankFailed)(f"{stage}: a training process failed (its message is above)")


def join(backend: str, timeout_s: float) -> Comm:
    """Join the process group torch elastic set up in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); make this process's Comm the current one.

    `timeout_s`: how long a collective waits for the others before it fails (exit 75 then,
    door.py)."""
    local = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    adopt(Comm(dist.get_rank(), dist.get_world_size(), local,
               int(os.environ.get("LOCAL_WORLD_SIZE", "1")), backend))
    log.debug("rank %d of %d", _current.rank, _current.world)
    return _current


def run_rank(comm: Comm, target: str, argv: list[str]) -> Any:
    """`target(argv)` ("module:function") on this rank, in-stage launch or Ray Train worker.
    One log and one set of live MLflow curves, not one per rank: the others log warnings only
    and keep no tracking run or live curve (core/epochlog.py) of their own."""
    if not comm.is_main:
        logging.getLogger("imagepipe").setLevel(logging.WARNING)
        os.environ["IMAGEPIPE_TRACKING"] = "0"
        os.environ.pop(EPOCH_LOG_ENV, None)
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(argv)


def _rank_entry(backend: str, target: str, argv: list[str], codes: str, timeout_s: float
                ) -> int:
    """One rank: join, run the stage's rank function, write its exit code, exit with it.

    The code file is named by the rank, as the agent reports failures."""
    # SIGKILL when the launching process dies: a stage killed with -9 must not leave ranks
    # writing checkpoints behind it.
    arm = die_with_parent(signal.SIGKILL, os.getppid())
    if arm is not None:
        arm()
    rank = int(os.environ.get("RANK", "0"))
    code = EXIT_BUG
    try:
        try:
            comm = join(backend, timeout_s)
        except Exception as err:  # noqa: BLE001 - a peer or the store unreachable
            print(f"rank {rank}: could not join the others: {type(err).__name__}: {err}",
                  file=sys.stderr)
            code = EXIT_TRANSIENT
        else:
            code = int(run_rank(comm, target, argv))
    finally:
        (Path(codes) / f"rank{rank}").write_text(str(code))
    if code != EXIT_OK:
        # No orderly goodbye: a peer may be waiting in a collective that will never complete.
        sys.stderr.flush()
        os._exit(code)
    dist.destroy_process_group()
    return code
