"""The launch plan of a training stage: how many processes on this machine, how many machines,
where they meet (the rendezvous endpoint and a run id no other run shares) and how long a
collective waits for the others.

Input: a training section of params.yaml (devices, nodes, rdzv_endpoint, dist_timeout_min) and
torch elastic's environment (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_RDZV_ENDPOINT,
PET_RDZV_BACKEND, PET_RDZV_ID, PET_LOCAL_ADDR), the flow-run id.
Output: a Plan, or None for one process on one machine (no launch at all). distributed.py
launches it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from stages.core.errors import BadInput
from stages.core.host import FLOW_RUN_ENV, visible_gpus
from stages.params import TrainParams


@dataclass(frozen=True)
class Plan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    endpoint: str
    rdzv_backend: str
    run_id: str
    backend: str  # the process group's: nccl on CUDA, gloo on the CPU
    ranked: bool = False  # node_rank was given (PET_NODE_RANK), not assumed
    local_addr: str | None = None  # this machine's address for the rendezvous (PET_LOCAL_ADDR)
    timeout_s: float = 300.0  # a collective's wait for the others (dist_timeout_min)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"{name}={value!r} is not a whole number") from None


def resolve_devices(p: TrainParams) -> int:
    """Processes on this machine: `devices`, with auto = every visible GPU (1 on a CPU)."""
    gpus = 0 if p.device == "cpu" else visible_gpus()
    if p.devices == "auto":
        return max(gpus, 1)
    if p.devices > gpus and (p.device == "cuda" or gpus):  # auto on a CPU machine: CPU ranks
        raise BadInput(f"devices: {p.devices} asked for but {gpus} GPU(s) are visible; use auto "
                       f"or at most {gpus}")
    return p.devices


def plan(p: TrainParams, stage: str) -> Plan | None:
    """How to launch `stage`; None for one process on one machine (no launch at all).

    torch elastic's PET_* variables (a Kubernetes Job's) win over params: they describe the
    machine the process is on; params describe the experiment."""
    nproc = _env_int("PET_NPROC_PER_NODE") or resolve_devices(p)
    nnodes = _env_int("PET_NNODES") or p.nodes
    if nproc * nnodes == 1:
        return None
    given = _env_int("PET_NODE_RANK")
    node_rank = given or 0
    endpoint = os.environ.get("PET_RDZV_ENDPOINT") or p.rdzv_endpoint
    if not endpoint:
        if nnodes > 1:
            raise BadInput(f"{stage}.nodes: {nnodes} machines need a rendezvous: set "
                           f"{stage}.rdzv_endpoint (host:port of node 0) or PET_RDZV_ENDPOINT")
        endpoint = "localhost:0"  # torchrun --standalone's: a free port on this machine
    cuda = p.device != "cpu" and visible_gpus() > 0
    run_id = os.environ.get("PET_RDZV_ID") or _rdzv_id(stage, nnodes)
    return Plan(nproc, nnodes, node_rank, endpoint, os.environ.get("PET_RDZV_BACKEND", "c10d"),
                run_id, "nccl" if cuda else "gloo", given is not None,
                os.environ.get("PET_LOCAL_ADDR") or None, p.dist_timeout_min * 60)


def _rdzv_id(stage: str, nnodes: int) -> str:
    """The rendezvous id without PET_RDZV_ID: one machine's own; for several, the flow run's
    (the same on every machine of the run, another for the next run). A fixed id would let two
    runs on one endpoint join each other's machines."""
    if nnodes == 1:
        return uuid.uuid4().hex
    flow = os.environ.get(FLOW_RUN_ENV)
    if flow:
        return f"imagepipe-{stage}-{flow}"
    raise BadInput(f"{stage}.nodes: {nnodes} machines need a rendezvous id that they share and "
                   "no other run uses: set PET_RDZV_ID, the same on every machine of this run "
                   "(a new one per run, e.g. from uuidgen)")
