"""How many bytes of a data set a stage may keep resident: the resident-vs-streamed decision.

Input: the device, the training processes on this machine, the splits' sizes. Output: a
`Budget` each split takes from (stages/core/stream.py `batches`), so a stage's train and
validation splits are counted together against one measure of the free memory.

Free memory on a CPU is the smaller of the kernel's MemAvailable (psutil's `available`) and
the room left under this process's cgroup memory limits (v2 `memory.max` - `memory.current`,
v1 `memory.limit_in_bytes` - `memory.usage_in_bytes`, the tightest of its cgroup and their
ancestors'): a container limited to a few GiB on a host with hundreds free otherwise made sets
resident that the kernel's OOM killer then ended. The ranks of one machine share it, so each
counts 1/ranks of it. On CUDA, the device's own free memory (each rank has its device).
"""

from __future__ import annotations

from pathlib import Path

import psutil
import torch

from stages.core.host import cgroup_folders

# Share of the free memory that resident sets may take: the rest is for the model, its
# activations and everything else on the machine.
RESIDENT_SHARE = 0.5
_V1_UNLIMITED = 1 << 60  # v1 writes "no limit" as a page-rounded 2**63 - 1


def cgroup_room(cgroups: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")
                ) -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroups and their
    ancestors (v2 or v1); None where there is no limit or none can be read."""
    names = {2: ("memory.max", "memory.current"),
             1: ("memory.limit_in_bytes", "memory.usage_in_bytes")}
    rooms = [r for version, folder in cgroup_folders("memory", cgroups, mount)
             if (r := _room(folder, *names[version])) is not None]
    return min(rooms) if rooms else None


def _room(folder: Path, limit_name: str, usage_name: str) -> int | None:
    try:
        limit = (folder / limit_name).read_text().strip()
        if limit == "max" or int(limit) >= _V1_UNLIMITED:
            return None
        return max(int(limit) - int((folder / usage_name).read_text().strip()), 0)
    except (OSError, ValueError):
        return None


def host_free_bytes(cgroups: Path = Path("/proc/self/cgroup"),
                    mount: Path = Path("/sys/fs/cgroup")) -> int:
    """min(MemAvailable, the cgroup's room): what this machine's processes may still use."""
    room = cgroup_room(cgroups, mount)
    available = int(psutil.virtual_memory().available)
    return available if room is None else min(available, room)


class Budget:
    """Bytes this process may still make resident, measured once and shared by a stage's
    splits. `ranks`: the training processes on this machine sharing host memory (CPU)."""

    def __init__(self, device: torch.device, ranks: int = 1, free: int | None = None) -> None:
        if free is None:  # where a resident set would go: the GPU's, or this machine's
            free = (int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda"
                    else host_free_bytes())
        shared = ranks if device.type != "cuda" else 1
        self.left = int(RESIDENT_SHARE * free) // max(shared, 1)

    def take(self, nbytes: int) -> bool:
        """Whether `nbytes` fit in what is left; if so they are counted as taken."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def give(self, nbytes: int) -> None:
        """Return bytes taken for a copy that then failed."""
        self.left += nbytes
