"""A stage's run kept by the tracking agent: the stage process never imports MLflow.

Importing mlflow and opening its store cost ~2.5 s of the ~2.6 s tracking added to each stage
(measured: `python -m benchmarks tracking`). One agent per project code (agent.py) pays that once
and keeps the runs of every stage that asks: the stage connects to its Unix socket, sends
"start" (the stage name, the project root, its environment, what only the stage can see: the
device and which pipeline run it belongs to) and later "finish" (the exit code and the body's
Registration), and relays what the agent logged. The agent is started by the first stage that
needs it (or ahead of time by the flow: `prewarm`) and exits after IMAGEPIPE_TRACKING_AGENT_IDLE_S
seconds (default 60) with no stage connected, or when its code folder is gone.

The same StageRun does the work inside the agent, so the contract is unchanged: tracking never
stops a body; a store failure after a successful body is exit 75 (2 for refused credentials).
A stage that dies mid-run drops its connection and the agent ends the run FAILED at once. When
the agent cannot be reached the stage tracks in-process as before (start_stage_run);
IMAGEPIPE_TRACKING_AGENT=0 always does.

Inputs: the socket folder <tmp>/imagepipe-<uid> (mode 0700: only this user). Output: a run
handle with the StageRun interface the stage door uses (`finish`, `finished`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.core.errors import EXIT_TRANSIENT, BadInput, Transient
from stages.core.host import restore_env

log = logging.getLogger("imagepipe.tracking")

AGENT_ENV = "IMAGEPIPE_TRACKING_AGENT"  # 0/off: track in the stage's own process
IDLE_ENV = "IMAGEPIPE_TRACKING_AGENT_IDLE_S"
DEFAULT_IDLE_S = 60.0
SPAWN_WAIT_S = 30.0  # the agent binds its socket before it imports mlflow: this is generous
CODE = Path(__file__).resolve().parents[3]  # the folder `stages` is imported from


class AgentUnavailable(Exception):
    """No agent could be reached before anything was sent: track in-process instead."""


def agent_enabled() -> bool:
    return os.environ.get(AGENT_ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


def idle_s() -> float:
    try:
        return max(1.0, float(os.environ.get(IDLE_ENV, DEFAULT_IDLE_S)))
    except ValueError:
        return DEFAULT_IDLE_S


def agents_dir() -> Path:
    """<tmp>/imagepipe-<uid>, this user's only: a folder someone else made there (or opened to
    others) is refused, since a socket in it could hand runs and pickles to another user."""
    folder = Path(tempfile.gettempdir()) / f"imagepipe-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or folder.is_symlink():
        raise AgentUnavailable(f"{folder} is not this user's alone (owner {st.st_uid}, mode "
                               f"{st.st_mode & 0o777:o}): not using a tracking agent")
    return folder


def code_key(code: Path = CODE) -> str:
    """Which agent serves this code: the interpreter, the code folder and the size and mtime of
    every source file it may run (stages/, and commands/ for the verbs of `call`): an edited
    stagerun.py or registry.py must not be served by a stale agent."""
    h = hashlib.sha256(f"{sys.executable}\0{code}".encode())
    files = [*(code / "stages").rglob("*.py"), *(code / "commands").glob("*.py")]
    for path in sorted(files):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path.relative_to(code)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


def socket_path(key: str | None = None) -> Path:
    return agents_dir() / f"{key or code_key()}.sock"


# ------------------------------------------------------------------ framing (both sides)

def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!I", len(data)) + data)


def receive(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the other side closed the connection."""
    head = _exactly(sock, 4)
    if head is None:
        return None
    body = _exactly(sock, struct.unpack("!I", head)[0])
    if body is None:
        return None
    # Same user only (the folder is 0700, the socket the agent's): pickle is trusted here.
    message: dict[str, Any] = pickle.loads(body)  # noqa: S301
    return message


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ reaching the agent

def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _spawn(key: str) -> int:
    """Start the agent for this code, detached: its own session (a stage's process group
    being killed does not kill it) and no inherited stdout/stderr (DVC and Prefect wait for
    those pipes to close). Returns its pid."""
    folder = agents_dir()
    with open(folder / f"{key}.log", "ab") as logfile:
        return subprocess.Popen(
            [sys.executable, "-m", "stages.core.tracking.agent", key, str(CODE)], cwd=CODE,
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, start_new_session=True,
            close_fds=True).pid


def _is_agent(pid: int) -> bool:
    """Whether `pid` is a running tracking agent (not an exited, unreaped one; not a process
    that reused its pid). Where /proc is missing, whether the pid exists."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.parent.is_dir() and Path("/proc/self").exists():
        with contextlib.suppress(OSError):
            return b"stages.core.tracking.agent" in proc.read_bytes()
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def connect_agent(wait: bool = True) -> socket.socket | None:
    """A connection to this code's agent, starting it if none runs; None (with `wait` False)
    when it was only started. AgentUnavailable when it cannot be reached."""
    key = code_key()
    path = socket_path(key)
    sock = _connect(path)
    if sock is not None:
        return sock
    with open(agents_dir() / f"{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one spawn when several stages start at once
        lock.seek(0)
        spawned = lock.read().strip()
        # The agent recorded last may be starting (the flow's prewarm: its socket comes in a
        # moment) or exiting (it has removed its socket): wait until one or the other.
        sock = _await(path, int(spawned) if spawned.isdigit() else None)
        if sock is not None:
            return sock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead agent's socket
        try:
            pid = _spawn(key)
        except OSError as err:
            raise AgentUnavailable(f"cannot start the tracking agent: {err}") from err
        lock.seek(0)
        lock.truncate()
        lock.write(str(pid))
        lock.flush()
        if not wait:
            return None
        sock = _await(path, pid)
    if sock is None:
        raise AgentUnavailable(f"the tracking agent did not answer within {SPAWN_WAIT_S:.0f} s "
                               f"(its log: {agents_dir() / (key + '.log')})")
    return sock


def _await(path: Path, pid: int | None) -> socket.socket | None:
    """A connection to `path` once it answers; None as soon as agent `pid` is gone (or at
    once without one), or after SPAWN_WAIT_S."""
    deadline = time.monotonic() + SPAWN_WAIT_S
    while True:
        sock = _connect(path)
        if sock is not None:
            return sock
        if pid is None or not _is_agent(pid) or time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def prewarm() -> None:
    """Start the agent now if none runs (the flow does, before its first stage), without
    waiting: its mlflow import then overlaps DVC's own start-up."""
    if not agent_enabled():
        return
    with contextlib.suppress(AgentUnavailable, OSError):
        sock = connect_agent(wait=False)
        if sock is not None:
            sock.close()


def stop_agents(under: Path | None = None) -> int:
    """Stop the agents of this user (only those serving code under `under`); how many."""
    stopped = 0
    try:
        folder = agents_dir()
    except AgentUnavailable:
        return 0
    for path in sorted(folder.glob("*.sock")):
        sock = _connect(path)
        if sock is None:
            continue
        with sock:
            try:
                send(sock, {"op": "stop", "under": str(under) if under else None})
                reply = receive(sock) or {}
            except OSError:
                continue
        stopped += bool(reply.get("stopping"))
    return stopped


# ------------------------------------------------------------------ the stage's side

def _local_facts() -> dict[str, Any]:
    """What only the stage's own process can tell: its pipeline group (its dvc ancestor), its
    device (what CUDA this process sees) and itself as the run's owner (journal.py)."""
    from stages.core.lineage import device_name
    from stages.core.tracking.grouping import group_key
    from stages.core.tracking.journal import owner

    return {"group": group_key(), "tags": {"device": device_name()}, "owner": owner()}


class RemoteStageRun:
    """The stage door's handle on a run kept by the agent (StageRun's interface)."""

    def __init__(self, sock: socket.socket, env: dict[str, str]) -> None:
        self.sock = sock
        self.finished = False
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

    @classmethod
    def start(cls, stage: str, root: Path) -> RemoteStageRun:
        sock = connect_agent()
        assert sock is not None
        try:
            send(sock, {"op": "start", "stage": stage, "root": str(root), "cwd": os.getcwd(),
                        "env": dict(os.environ), "local": _local_facts()})
            reply = receive(sock)
        except OSError as err:  # an agent that was exiting (idle) as this stage connected
            reply = None
            detail = str(err)
        else:
            detail = "connection closed"
        if reply is None:
            # Nothing came back: track in-process. Had the agent opened the run before it
            # died, its journal entry gets it ended FAILED by the next run (journal.py).
            sock.close()
            raise AgentUnavailable(f"the tracking agent did not answer ({detail})")
        _relay(reply)
        run = cls(sock, reply.get("env") or {})
        run.failure = reply.get("failed")
        return run

    failure: tuple[int, str] | None = None

    def finish(self, code: int, outcome: object = None) -> int:
        self.finished = True
        self._restore_env()
        try:
            send(self.sock, {"op": "finish", "code": code, "outcome": outcome,
                             "cwd": os.getcwd(), "env": dict(os.environ)})
            reply = receive(self.sock)
        except OSError:
            reply = None
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
        if reply is None:
            print("tracking failed: the tracking agent died while closing the run; the "
                  "stage's outputs were written", file=sys.stderr)
            return EXIT_TRANSIENT if code == 0 else code
        _relay(reply)
        return int(reply["code"])

    def _restore_env(self) -> None:
        restore_env(self._saved_env)


def _relay(reply: dict[str, Any]) -> None:
    """What the agent logged and printed for this stage, in the stage's own stderr."""
    for name, level, message in reply.get("logs") or []:
        logging.getLogger(name).log(level, "%s", message)
    text = reply.get("stderr") or ""
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


# ------------------------------------------------------------------ a verb run by the agent

# What `call` may ask the agent to run ("module:function" under the code folder it serves).
CALLABLE = frozenset({"commands.registry:promote"})


def call(target: str, local: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """local(*args, **kwargs), run by this code's tracking agent when tracking is on and one can
    be reached, else here. The agent has mlflow imported and its store open: `imagepipe promote`
    right after a pipeline run is ~0.5 s there instead of ~5 s in a new process (most of that the
    import). Arguments and result cross a pickle; relative paths are read from the caller's folder
    (the agent applies it, and the caller's environment). BadInput and Transient come back as
    themselves; anything else raised there is a RuntimeError here, its traceback relayed."""
    from stages.core.tracking.store import tracking_enabled

    if not (agent_enabled() and tracking_enabled()) or target not in CALLABLE:
        return local(*args, **kwargs)
    try:
        sock = connect_agent()
    except (AgentUnavailable, OSError) as err:
        log.info("%s; running %s in this process", err, target)
        return local(*args, **kwargs)
    assert sock is not None
    with sock:
        try:
            send(sock, {"op": "call", "target": target, "args": args, "kwargs": kwargs,
                        "cwd": os.getcwd(), "env": dict(os.environ)})
            reply = receive(sock)
        except OSError:
            reply = None
    if reply is None:  # an agent exiting (idle) as we connected: nothing was done there
        return local(*args, **kwargs)
    _relay(reply)
    raised = reply.get("raised")
    if raised:
        kind, text = raised
        raise {"BadInput": BadInput, "Transient": Transient}.get(kind, RuntimeError)(text)
    return reply.get("result")


def start_stage_run(stage: str) -> Any:
    """The run of `stage` (None when tracking is off or dvc.yaml has no such stage): kept by the
    agent, or in this process when the agent is switched off or cannot be reached."""
    from stages.core.host import project_root
    from stages.core.tracking.declared import stage_decl
    from stages.core.tracking.store import tracking_enabled

    root = project_root()
    if not tracking_enabled() or stage_decl(root, stage) is None:
        return None
    if agent_enabled():
        try:
            return RemoteStageRun.start(stage, root)
        except AgentUnavailable as err:
            log.warning("%s; tracking in this process instead", err)
    from stages.core.tracking.stagerun import StageRun

    return StageRun.start(stage)
