"""The launch plan of a training stage on this machine: how many processes, and how long a
collective waits for the others. Several machines train as Ray Train workers instead
(pretrain.engine: ray, raytrain.py).

Input: a training section of params.yaml (device, devices, dist_timeout_min).
Output: a Plan, or None for one process (no launch at all). distributed.py launches it.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.errors import BadInput
from stages.core.host import visible_gpus
from stages.params import TrainParams


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
