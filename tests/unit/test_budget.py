"""The resident-vs-streamed decision (stages/core/budget.py, stream.batches): train and val
counted together against min(cgroup room, MemAvailable), each CPU rank its share, and the
streaming reader as the fallback when the resident copy itself runs out of memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from stages.core import budget
from stages.core.budget import Budget, cgroup_room, host_free_bytes
from stages.core.devicedata import DeviceBatches
from stages.core.stream import StreamBatches, batches
from tests.helpers import REPO, run_in_cgroup

CPU = torch.device("cpu")
GIB = 1 << 30


def fake_host(tmp_path: Path, v2: dict[str, tuple[str, str]], v1: dict[str, tuple[str, str]],
              available_kib: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A /proc/self/cgroup and a cgroup mount in files: per level of the hierarchy ("" is the
    root), (limit, usage) as the kernel writes them; psutil's MemAvailable told."""
    mount = tmp_path / "cgroup"
    mount.mkdir(parents=True)
    for base, levels, names in ((mount, v2, ("memory.max", "memory.current")),
                                (mount / "memory", v1, ("memory.limit_in_bytes",
                                                        "memory.usage_in_bytes"))):
        for level, values in levels.items():
            folder = base / level
            folder.mkdir(parents=True, exist_ok=True)
            for name, value in zip(names, values, strict=True):
                (folder / name).write_text(value + "\n")
    (tmp_path / "cgroup.txt").write_text("4:memory:/pod/box\n0::/pod/box\n")
    monkeypatch.setattr(budget.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=available_kib * 1024))
    return {"cgroups": tmp_path / "cgroup.txt", "mount": mount}


def test_free_memory_is_the_tightest_of_meminfo_and_every_cgroup_level(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container limited to 4 GiB (2 used) on a host with 64 GiB available has 2 GiB: the
    pod's v2 limit, not the host's; v1's "no limit" (2**63 rounded) and "max" are no limit."""
    host = fake_host(tmp_path, v2={"": ("max", "0"), "pod": (str(4 * GIB), str(2 * GIB)),
                                   "pod/box": ("max", str(2 * GIB))},
                     v1={"pod/box": ("9223372036854771712", "5")}, available_kib=64 << 20,
                     monkeypatch=monkeypatch)
    assert cgroup_room(host["cgroups"], host["mount"]) == 2 * GIB
    assert host_free_bytes(**host) == 2 * GIB
    host = fake_host(tmp_path / "v1", v2={}, v1={"pod/box": (str(8 * GIB), str(GIB))},
                     available_kib=3 << 20, monkeypatch=monkeypatch)
    assert host_free_bytes(**host) == 3 * GIB  # MemAvailable is tighter here
    host = fake_host(tmp_path / "none", v2={}, v1={}, available_kib=1 << 20,
                     monkeypatch=monkeypatch)
    assert cgroup_room(host["cgroups"], host["mount"]) is None
    assert host_free_bytes(**host) == GIB


def _memory_cgroup(name: str) -> tuple[Path, dict[str, str]] | None:
    """A new memory cgroup this test may limit (root only): v2 where the memory controller is
    on, else v1's; with the file that limits it to 768 MiB."""
    limit = str(768 << 20)
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.subtree_control").is_file() and "memory" in (
            v2 / "cgroup.subtree_control").read_text().split():
        return v2 / name, {"memory.max": limit}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if base.is_dir():
                return base / name, {"memory.limit_in_bytes": limit}
    return None


def test_a_child_in_a_memory_limited_cgroup_budgets_from_its_limit() -> None:
    """A real cgroup limited to 768 MiB (torch imported takes about 300), on a machine with more
    available: the child counts at most 768 MiB, so a 400 MB set (budget: half) streams."""
    out = run_in_cgroup(_memory_cgroup(f"imagepipe-test-{os.getpid()}"),
                        "from stages.core.budget import Budget, host_free_bytes; import torch; "
                        "print(host_free_bytes(), Budget(torch.device('cpu')).take(400_000_000))")
    assert host_free_bytes() > 1 << 30  # the machine has more: the limit is what counts
    free, fits = out.split()
    assert int(free) <= 768 << 20 and fits == "False"


def _kw(**more: Any) -> dict[str, Any]:
    return {"device": CPU, "mean": [0.5], "std": [0.2], "batch_size": 10, **more}


def test_train_and_val_are_counted_together_and_ranks_share_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """64 images of 10 x 10 (6400 bytes) and 36 (3600). Half of 20000 free holds both; half of
    16000 holds train, then val streams; two CPU ranks on the machine: 4000 each, both stream."""
    images = np.zeros((100, 10, 10, 1), np.uint8)
    labels = np.zeros(100, np.int64)
    train_idx, val_idx = np.arange(64), np.arange(64, 100)

    def pair(budget: Budget) -> tuple[bool, bool]:
        tr = batches(images, labels, train_idx, train=True, budget=budget, **_kw())
        va = batches(images, labels, val_idx, train=False, budget=budget, **_kw())
        return tr.resident, va.resident

    assert pair(Budget(CPU, free=20_000)) == (True, True)
    assert pair(Budget(CPU, free=16_000)) == (True, False)
    assert pair(Budget(CPU, ranks=2, free=16_000)) == (False, True)  # val (3600) fits alone
    assert pair(Budget(CPU, ranks=4, free=16_000)) == (False, False)
    assert Budget(torch.device("cuda"), ranks=4, free=16_000).left == 8_000  # own device each


_OUT_OF_MEMORY_CHILD = """
import resource, sys
import numpy as np, torch
from stages.core.budget import Budget
from stages.core.stream import batches
images = np.lib.format.open_memmap(sys.argv[1], mode="w+", dtype=np.uint8,
                                   shape=(2000, 256, 256, 3))   # 393 MB, sparse on disk
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (150 << 20), resource.RLIM_INFINITY))
b = batches(images, np.zeros(2000, np.int64), np.arange(2000), device=torch.device("cpu"),
            mean=[0.5] * 3, std=[0.2] * 3, batch_size=8, train=False,
            budget=Budget(torch.device("cpu"), free=1 << 40))  # told it fits: the copy fails
x, _ = next(iter(b.epoch(0)))
print(type(b).__name__, b.resident, tuple(x.shape))
"""


def test_a_resident_copy_out_of_memory_falls_back_to_the_streaming_reader(tmp_path: Path) -> None:
    """A real MemoryError (address space limited below the set's size in a child) while the
    set is copied: the split is streamed by stream.py's reader, not the synchronous memmap."""
    out = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_CHILD, str(tmp_path / "x.npy")],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["StreamBatches", "False", "(8,", "3,", "256,", "256)"]


def test_a_split_that_fits_is_still_resident_by_default() -> None:
    b = batches(np.zeros((20, 4, 4, 1), np.uint8), np.zeros(20, np.int64), np.arange(20),
                train=False, **_kw())
    assert type(b) is DeviceBatches and b.resident
    assert not isinstance(b, StreamBatches)
