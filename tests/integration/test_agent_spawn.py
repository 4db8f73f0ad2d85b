"""Tracking agents checked the instant they are spawned: right after the spawn the child's
/proc/PID/cmdline can still be empty (exec not finished), which the check used to read as "not
our agent", so a stage gave up on it after a few ms ("did not answer within 30 s"). Each of
several real agents, each of its own key (as two codes or environments make), must read as
"starting" or "running", never "gone"; the same pid asked about another key is "gone"."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from stages.core.tracking.channel import agent_state, agents_dir, code_key, socket_path
from stages.core.tracking.remote import _spawn

pytestmark = pytest.mark.slow


def test_many_agents_each_read_as_ours_the_instant_they_are_spawned() -> None:
    keys = [code_key(env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:////nowhere/{i}.db"})
            for i in range(12)]
    assert len(set(keys)) == len(keys)  # each environment its own agent: none swaps another's
    procs, states = [], []
    try:
        for key in keys:
            proc = _spawn(key)
            procs.append(proc)
            states.append(agent_state(proc.pid, key))  # at once: before exec may have finished
        seen_later = [agent_state(p.pid, k) for p, k in zip(procs, keys, strict=True)]
        other = agent_state(procs[0].pid, keys[1])
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for key in keys:
            for path in (socket_path(key), agents_dir() / f"{key}.log"):
                path.unlink(missing_ok=True)
    print(f"states at spawn: {states}")
    assert set(states) <= {"starting", "running"}, states
    assert set(seen_later) <= {"starting", "running"}, seen_later
    assert other == "gone" or other == "starting"  # another key's agent is never ours once exec'd
