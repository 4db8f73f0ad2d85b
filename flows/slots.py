"""GPU slots: a training stage holds as many as it trains on (its `devices`) for its whole run,
so no two stages share a GPU.

Two layers, because they fail differently:
* a lock file per GPU on this machine (`flock`): the kernel frees it when its holder dies, even
  by `kill -9`, and its index says which GPU the stage gets (CUDA_VISIBLE_DEVICES);
* against a real Prefect server, also the global concurrency limit `gpu`: it spans machines,
  shows in the UI, and the server's repossessor frees the slot of a run that died. A temporary
  local API runs no repossessor (Prefect starts only a few services there), so a slot leaked by
  a killed run would block training there for good: on that API the lock files alone guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from stages.core.host import GPUS_GRANTED_ENV, visible_gpus

POLL_S = 2.0


def gpu_slots() -> int:
    """IMAGEPIPE_GPU_SLOTS, else the GPUs this process can see (CUDA_VISIBLE_DEVICES, else the
    driver's list; no torch import), else 1: a CPU machine still runs one training at a time."""
    if os.environ.get("IMAGEPIPE_GPU_SLOTS"):
        return max(1, int(os.environ["IMAGEPIPE_GPU_SLOTS"]))
    return max(1, visible_gpus())


def lock_dir() -> Path:
    """Machine-wide (every user's runs share the GPUs): IMAGEPIPE_GPU_LOCK_DIR or /tmp/...."""
    path = Path(os.environ.get("IMAGEPIPE_GPU_LOCK_DIR")
                or Path(tempfile.gettempdir()) / "imagepipe-gpu-slots")
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            path.chmod(0o1777)  # like /tmp: anyone may lock, nobody may delete others' files
    return path


@contextlib.contextmanager
def local_gpu_slots(slots: int, want: int, on_wait: Callable[[str], None]) -> Iterator[list[int]]:
    """Hold `want` of the `slots` lock files at once; yield their indices. All or none: a stage
    that holds some while it waits for more could deadlock with another doing the same. Waits
    (polling) while fewer than `want` are free."""
    folder = lock_dir()
    waited = False
    while True:
        with contextlib.ExitStack() as held:  # closing a lock file releases its lock
            indices: list[int] = []
            for index in range(slots):
                # Read-only is enough for flock, and works on a file another user created.
                fd = os.open(folder / f"slot-{index}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                held.callback(os.close, fd)
                indices.append(index)
                if len(indices) == want:
                    yield indices
                    return
        if not waited:
            on_wait(f"{want} of the {slots} GPU slot(s) of this machine are not free ({folder}); "
                    "waiting")
            waited = True
        time.sleep(POLL_S)


def device_env(indices: list[int], slots: int) -> dict[str, str]:
    """The env that points a stage at the slots it holds. CUDA_VISIBLE_DEVICES only on a machine
    with several GPUs, so a single-GPU or CPU setup is left exactly as the user configured it;
    where this machine has any GPU, the count granted: a stage that then finds CUDA not loading
    fails (exit 2) instead of training on the CPU for hours."""
    env = {GPUS_GRANTED_ENV: str(len(indices))} if visible_gpus() > 0 else {}
    if slots >= 2:
        listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(listed[i] if i < len(listed) else str(i)
                                               for i in indices)
    return env
