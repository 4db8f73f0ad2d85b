"""Children die with the flow process: `kill -9` of `imagepipe run` must not leave the Prefect
API server, `dvc repro` or a stage running.

Linux's PR_SET_PDEATHSIG sends a signal to a child when its parent dies, but only to that child
(not to DVC's own children): stages/core/host.die_with_parent for a direct child (the temporary
API server, the training ranks); `guarded` here for a whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

# The group leader `run_killable` starts: it runs the command in its own process group and, when
# the flow process dies (its PDEATHSIG, SIGTERM, arrives and its parent is no longer the flow),
# terminates the whole group (DVC, the shell, the stage, its workers), then kills what is left
# after the grace. A SIGTERM from kill_group (the flow alive) reaches the whole group already
# and is not repeated. Inline, under `python -I -c`: it starts in ~20 ms, importing nothing of
# the project. Exit code: the command's (128 + N when a signal N ended it).
_GUARD = """
import os, signal, subprocess, sys, time
flow, grace, cmd = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
def others():
    me, group = os.getpid(), os.getpgrp()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(pid) != me and int(stat[2]) == group and stat[0] != "Z":
            yield int(pid)
def orphaned(signum, frame):
    if os.getppid() == flow:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(True for _ in others()):
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, orphaned)
if os.getppid() != flow:
    orphaned(signal.SIGTERM, None)
code = subprocess.Popen(cmd).wait()  # a handled signal does not end the wait (PEP 475)
sys.exit(code if code >= 0 else 128 - code)
"""


def guarded(cmd: Sequence[str], grace_s: float) -> list[str]:
    """`cmd` under the guard above (Linux), so its process group dies with this process."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-I", "-c", _GUARD, str(os.getpid()), f"{grace_s:g}", *cmd]


def kill_group(proc: subprocess.Popen[Any] | int, grace_s: float) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL whatever is left: after `grace_s`,
    or at once when the leader has gone (what is left then is a child that ignored SIGTERM).
    `proc` may be a bare pid: a server or worker that `make deploy` started and recorded."""
    pid = proc if isinstance(proc, int) else proc.pid
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        if _ended(proc, wait_s):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            return


def _ended(proc: subprocess.Popen[Any] | int, timeout_s: float) -> bool:
    if not isinstance(proc, int):
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout_s  # not our child: no wait(), ask whether it is there
    while True:
        try:
            os.kill(proc, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
