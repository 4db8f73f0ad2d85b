"""A stage's run kept by the tracking agent: the stage process never imports MLflow.

Importing mlflow and opening its store cost ~2.5 s of the ~2.6 s tracking added to each stage
(measured: `python -m benchmarks tracking`). One agent per project code and tracking
environment (agent.py; channel.py says how they talk) pays that once and keeps the runs of
every stage that asks: the stage connects to its Unix socket, sends "start" (the stage name,
the project root, what only the stage can see: the device and which pipeline run it belongs
to) and later "finish" (the exit code and the body's Registration), and relays what the agent
logged. The agent is started by the first stage that needs it (or ahead of time by the flow:
`prewarm`) and exits after IMAGEPIPE_TRACKING_AGENT_IDLE_S seconds (default 60) with no stage
connected, or once its stages are done when its code folder or its socket is removed.

The same StageRun does the work inside the agent, so the contract is unchanged: tracking never
stops a body; a store failure after a successful body is exit 75 (2 for refused credentials).
Every wait on the agent is bounded (channel.py): an agent that cannot be reached, is stopped
or does not answer "start" in time leaves the stage tracking in its own process; one that dies
while the stage runs has the stage's run reopened and finished in the stage's process (same
run id); one stopped while it closes the run makes the stage exit 75, saying so. A stage that
dies mid-run drops its connection and the agent ends the run FAILED at once.
IMAGEPIPE_TRACKING_AGENT=0 always tracks in-process.

Inputs: the socket folder <tmp>/imagepipe-<uid> (mode 0700: only this user). Output: a run
handle with the StageRun interface the stage door uses (`finish`, `finished`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path, PurePath
from typing import Any

from stages.core.errors import EXIT_TRANSIENT
from stages.core.host import env_seconds, export_env, restore_env
from stages.core.tracking.channel import (
    CODE,
    AgentStalled,
    AgentUnavailable,
    agent_state,
    agents_dir,
    code_key,
    dial,
    peer_pid,
    request,
    socket_path,
)

log = logging.getLogger("imagepipe.tracking")

AGENT_ENV = "IMAGEPIPE_TRACKING_AGENT"  # 0/off: track in the stage's own process
IDLE_ENV = "IMAGEPIPE_TRACKING_AGENT_IDLE_S"
FINISH_ENV = "IMAGEPIPE_TRACKING_AGENT_FINISH_S"
DEFAULT_IDLE_S = 60.0
SPAWN_WAIT_S = 30.0  # the agent binds its socket before it imports mlflow: this is generous
# "start" in a fresh agent waits for its mlflow import and the store's bounded retries (~10 s).
START_WAIT_S = 60.0
# "finish" logs the outputs and registers a model (uploads, each call with its own retries);
# a stopped agent is seen within channel.HANDSHAKE_S whatever this says.
DEFAULT_FINISH_S = 900.0


def agent_enabled() -> bool:
    return os.environ.get(AGENT_ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


# ------------------------------------------------------------------ reaching the agent

def _spawn(key: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the agent for this code, detached: its own session (a stage's process group
    being killed does not kill it) and no inherited stdout/stderr (DVC and Prefect wait for
    those pipes to close). Its environment is the one its key names (this process's, or the
    stages' the flow will start: `env`)."""
    with open(agents_dir() / f"{key}.log", "ab") as logfile:
        return subprocess.Popen(
            [sys.executable, "-m", "stages.core.tracking.agent", key, str(CODE)], cwd=CODE,
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, start_new_session=True,
            close_fds=True, env=env)


def connect_agent(wait: bool = True, env: dict[str, str] | None = None) -> Connection | None:
    """A connection to the agent for this code and environment (`env`, default this
    process's), starting it if none runs; None (with `wait` False) when it was only started.
    AgentUnavailable (saying what happened) when none can be used."""
    key = code_key(env=env)
    path = socket_path(key)
    conn = dial(path)
    if conn is not None:
        return conn
    with open(agents_dir() / f"{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one spawn when several stages start at once
        lock.seek(0)
        spawned = lock.read().strip()
        # The agent recorded last may be starting (the flow's prewarm: its socket comes in a
        # moment) or exiting (it has removed its socket): wait until one or the other. A pid
        # that is no longer this key's agent (reused, another code's agent) is not waited on.
        recorded = int(spawned) if spawned.isdigit() else None
        conn = _await(path, lambda: recorded is not None
                      and agent_state(recorded, key) in ("running", "starting"))
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead agent's socket
        try:
            proc = _spawn(key, env)
        except OSError as err:
            raise AgentUnavailable(f"cannot start the tracking agent: {err}") from err
        lock.seek(0)
        lock.truncate()
        lock.write(str(proc.pid))
        lock.flush()
        if not wait:
            return None
        conn = _await(path, lambda: proc.poll() is None)
    if conn is not None:
        return conn
    what = (f"exited with code {proc.returncode}" if proc.poll() is not None
            else f"did not listen within {SPAWN_WAIT_S:.0f} s")
    raise AgentUnavailable(f"the tracking agent (pid {proc.pid}) {what} (its log: "
                           f"{agents_dir() / (key + '.log')})")


def _await(path: Path, alive: Callable[[], bool]) -> Connection | None:
    """A connection to `path` once it answers; None as soon as `alive()` says the agent that
    would bind it is gone, or after SPAWN_WAIT_S."""
    deadline = time.monotonic() + SPAWN_WAIT_S
    while True:
        conn = dial(path)
        if conn is not None or not alive() or time.monotonic() > deadline:
            return conn
        time.sleep(0.02)


def prewarm(env: dict[str, str] | None = None) -> None:
    """Start the agent for the stages that will run with `env` now, if none runs (the flow
    does, before its first stage), without waiting: its mlflow import then overlaps DVC's own
    start-up."""
    if not agent_enabled():
        return
    with contextlib.suppress(AgentUnavailable, OSError):
        conn = connect_agent(wait=False, env=env)
        if conn is not None:
            conn.close()


# ------------------------------------------------------------------ the stage's side

def _stage_facts() -> dict[str, Any]:
    """What only the stage's own process can tell: its pipeline group (its dvc ancestor), its
    device (what CUDA this process sees) and itself as the run's owner (journal.py)."""
    from stages.core.lineage import device_name
    from stages.core.tracking.grouping import group_key
    from stages.core.tracking.journal import owner

    return {"group": group_key(), "tags": {"device": device_name()}, "owner": owner()}


class RemoteStageRun:
    """The stage door's handle on a run kept by the agent (StageRun's interface)."""

    def __init__(self, stage: str, root: Path, stage_facts: dict[str, Any], conn: Connection,
                 opened: dict[str, Any]) -> None:
        self.stage, self.root, self.stage_facts = stage, root, stage_facts
        self.conn, self.pid = conn, peer_pid(conn)
        self.opened = opened  # the agent's reply to "start": what reopening the run needs
        self.finished = False
        self._closing = threading.Event()
        self._saved_env = export_env(opened.get("env") or {})
        threading.Thread(target=self._watch, name="tracking-agent-watch", daemon=True).start()

    @classmethod
    def start(cls, stage: str, root: Path, stage_facts: dict[str, Any]) -> RemoteStageRun:
        conn = connect_agent()
        assert conn is not None
        try:
            # cwd: the workspace the run describes (a queued experiment's own clone).
            reply = request(conn, {"op": "start", "stage": stage, "root": str(root),
                                   "cwd": os.getcwd(), "stage_facts": stage_facts},
                            START_WAIT_S)
            if reply is None:  # had the agent opened the run, the journal ends it (journal.py)
                raise AgentUnavailable("the tracking agent closed the connection before it "
                                       "answered 'start' (it exited or was killed)")
        except AgentUnavailable:
            conn.close()  # the agent, if it wakes, sees the stage gone and ends the run FAILED
            raise
        relay(reply)
        return cls(stage, root, stage_facts, conn, reply)

    def _watch(self) -> None:
        """The agent sends nothing while the body runs: anything readable before "finish" is
        the connection closing, i.e. the agent died. Say so now, not only at the end."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.poll(None)
        if not self._closing.is_set():
            print(f"{self.stage}: the tracking agent (pid {self.pid}) died while the stage ran; "
                  f"its run {self.opened.get('run_id')} is finished in this process when the "
                  "stage ends", file=sys.stderr, flush=True)

    def finish(self, code: int, outcome: object = None) -> int:
        self.finished = True
        self._closing.set()
        restore_env(self._saved_env)
        try:
            reply = request(self.conn, {"op": "finish", "code": code,
                                        "outcome": _absolute_paths(outcome)},
                            env_seconds(FINISH_ENV, DEFAULT_FINISH_S))
        except AgentStalled as err:
            # It may yet wake and finish the run itself: finishing it here too would log it
            # twice. The outputs are written; the flow retries.
            print(f"{self.stage}: tracking failed: {err}; the stage's outputs were written, "
                  "its run is left to the agent", file=sys.stderr)
            return EXIT_TRANSIENT if code == 0 else code
        finally:
            with contextlib.suppress(OSError):
                self.conn.close()
        if reply is None:
            print(f"{self.stage}: the tracking agent (pid {self.pid}) died before it closed "
                  f"the run; finishing run {self.opened.get('run_id')} in this process",
                  file=sys.stderr, flush=True)
            from stages.core.tracking.stagerun import StageRun

            # The run the agent opened (same run id, parent and tags), else a new one.
            run = StageRun.start(self.stage, self.stage_facts, root=self.root,
                                 reopen=self.opened if self.opened.get("run_id") else None)
            return code if run is None else run.finish(code, outcome)  # None: not a stage now
        relay(reply)
        return int(reply["code"])


def relay(reply: dict[str, Any]) -> None:
    """What the agent logged and printed for this stage, in the stage's own stderr."""
    text = reply.get("stderr") or ""
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def _absolute_paths(outcome: object) -> object:
    """What the body returned (export's Registration), its relative paths made the stage's:
    the agent works in a folder of its own."""
    if not dataclasses.is_dataclass(outcome) or isinstance(outcome, type):
        return outcome
    changes = {f.name: absolute(getattr(outcome, f.name)) for f in dataclasses.fields(outcome)
               if isinstance(getattr(outcome, f.name), PurePath)}
    return dataclasses.replace(outcome, **changes) if changes else outcome


def absolute(value: Any) -> Any:
    return Path.cwd() / value if isinstance(value, Path) and not value.is_absolute() else value


def start_stage_run(stage: str) -> Any:
    """The run of `stage` (None when tracking is off or dvc.yaml has no such stage): kept by the
    agent, or in this process when the agent is switched off or cannot be reached."""
    from stages.core.host import project_root
    from stages.core.tracking.declared import stage_decl
    from stages.core.tracking.store import tracking_enabled

    root = project_root()
    if not tracking_enabled() or stage_decl(root, stage) is None:
        return None
    facts = _stage_facts()  # a walk up the process tree: once, whoever keeps the run
    if agent_enabled():
        try:
            return RemoteStageRun.start(stage, root, facts)
        except (AgentUnavailable, OSError) as err:  # OSError: the agents' folder (see call)
            log.warning("%s; tracking in this process instead", err)
    from stages.core.tracking.stagerun import StageRun

    run = StageRun.start(stage, facts)
    if run is not None:
        run.export()
    return run
