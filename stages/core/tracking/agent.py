"""The tracking agent: one long-lived process per project code and tracking environment that
keeps the MLflow runs of the stages that connect to it (remote.py says why and when it exits,
channel.py how they talk).

`python -m stages.core.tracking.agent KEY CODE_DIR` binds its socket first, so stages can
connect at once, then imports mlflow and everything a run needs while they wait. Each
connection is one stage's run, served by a thread of its own: "start" opens it, "finish"
closes it, a dropped connection ends it FAILED; "call" runs one of agentcall.CALLABLE. Its
socket removed (or its code folder) drains it: no new stage reaches it, the ones it serves
finish as usual, then it exits. No request swaps the process's environment (the one its key
names) or its folder: the live-curve threads of other runs log all the while. What a request
logs and prints goes back in its reply.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import BadInput, Transient
from stages.core.host import env_seconds
from stages.core.tracking.agentcall import CALLABLE
from stages.core.tracking.channel import accept, agents_dir, socket_path
from stages.core.tracking.remote import DEFAULT_IDLE_S, IDLE_ENV

log = logging.getLogger("imagepipe.tracking.agent")


class _Streams(io.TextIOBase):
    """The agent's sys.stderr: what a request's thread prints and logs goes into that request's
    reply, anything else to the agent's log (contextlib.redirect_stderr is process-wide)."""

    def __init__(self, default: Any) -> None:
        self.default = default
        self.buffers: dict[int, io.StringIO] = {}
        # Log records of a request's thread, as the stage door prints its own (door.py).
        handler = logging.StreamHandler(self)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.addFilter(lambda record: record.thread in self.buffers)
        logging.getLogger("imagepipe").addHandler(handler)

    def write(self, text: str) -> int:
        return int(self.buffers.get(threading.get_ident(), self.default).write(text))

    def flush(self) -> None:
        self.default.flush()

    @contextlib.contextmanager
    def capture(self) -> Iterator[io.StringIO]:
        me, buf = threading.get_ident(), io.StringIO()
        self.buffers[me] = buf
        try:
            yield buf
        finally:
            self.buffers.pop(me, None)


class Agent:
    def __init__(self, key: str, code: Path, streams: _Streams) -> None:
        self.code = code
        self.path = socket_path(key)
        self.streams = streams
        self.counts = threading.Lock()  # `connected` and `last_seen`
        # Runs open and close one at a time: the store's first touch, and registration's use
        # of mlflow's process-wide (fluent) tracking URI. Promotions and live curves go on.
        self.opening = threading.Lock()
        self.connected = 0
        self.last_seen = time.monotonic()
        self.draining = threading.Event()  # socket or code gone: no new stages, exit when done
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.inode = -1

    def bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.inode = self.path.stat().st_ino
        self.server.listen(64)
        self.server.settimeout(1.0)

    def serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except TimeoutError:
                if self._should_exit():
                    break
                continue
            with self.counts:
                self.connected += 1
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()
        self._unlink()
        self.server.close()

    def _unlink(self) -> None:
        """The socket's path, if it is still ours (not a successor's): a stage arriving after
        this starts a new agent."""
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self.inode:
                self.path.unlink()

    def _should_exit(self) -> bool:
        with self.counts:
            busy, quiet = self.connected, time.monotonic() - self.last_seen
        if self.draining.is_set():
            return busy == 0
        if not (self.code / "stages").is_dir():
            log.info("code folder %s is gone: exiting once %d stage(s) are done", self.code,
                     busy)
            self.draining.set()
        elif not self.path.exists():
            log.info("socket removed: exiting once %d stage(s) are done", busy)
            self.draining.set()
        return busy == 0 and (self.draining.is_set()
                              or quiet > env_seconds(IDLE_ENV, DEFAULT_IDLE_S))

    def _handle(self, sock: socket.socket) -> None:
        run: Any = None
        conn = accept(sock)
        try:
            while conn is not None:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                run, reply = self._answer(run, message)
                conn.send(reply)
        except OSError:
            pass
        finally:
            if conn is not None:
                conn.close()
            if run is not None and not run.finished:  # the stage died with its run open
                with contextlib.suppress(Exception):
                    run._end_quietly()
                log.warning("a stage dropped its connection: run %s ended FAILED", run.run_id)
            with self.counts:
                self.connected -= 1
                self.last_seen = time.monotonic()

    def _answer(self, run: Any, message: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(this connection's run after `message`, the reply, with what this thread printed
        and logged meanwhile)."""
        op = message.get("op")
        if op == "finish" and run is None:  # tracking off, no such stage: the body's code stands
            return None, {"code": int(message["code"])}
        with self.streams.capture() as err:
            if op == "start" and run is None:
                with self.opening:
                    run, reply = self._start(message)
            elif op == "finish":
                with self.opening:
                    reply = {"code": run.finish(int(message["code"]), message.get("outcome"))}
                run = None
            elif op == "call":
                reply = self._call(message)
            else:
                state = "open" if run else "not open"
                reply = {"raised": ("BadInput", f"the tracking agent cannot take {op!r} here "
                                               f"(a run is {state})")}
        return run, {**reply, "stderr": err.getvalue()}

    def _start(self, message: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from stages.core.host import workspace_root
        from stages.core.lineage import git_commit
        from stages.core.tracking.stagerun import StageRun

        git_commit.cache_clear()  # HEAD moves between stages: never a stale commit
        run = StageRun.start(message["stage"], message["stage_facts"],
                             root=Path(message["root"]),
                             workspace=workspace_root(Path(message["cwd"])))
        if run is None:
            return None, {"env": {}, "failed": None}
        return run, {"env": run.env, "failed": run.failure,
                     "run_id": run.run_id, "parent_id": run.parent_id, "tags": run.tags}

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        """One of agentcall.CALLABLE with the caller's arguments; what it raised, as (kind, text)."""
        target = message.get("target")
        if target not in CALLABLE:
            return {"raised": ("BadInput", f"the tracking agent does not run {target!r}")}
        module, name = str(target).split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
            return {"result": fn(*message.get("args", ()), **message.get("kwargs", {}))}
        except (BadInput, Transient) as err:
            return {"raised": ("BadInput" if isinstance(err, BadInput) else "Transient", str(err))}
        except Exception as err:  # noqa: BLE001 - a bug: its traceback goes back with the reply's stderr
            traceback.print_exc()
            return {"raised": ("bug", f"in the tracking agent: {type(err).__name__}: {err}")}


def _warm() -> None:
    """What every run needs, imported once (the point of the agent)."""
    import mlflow
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import stages.core.tracking.register
    import stages.core.tracking.stagerun  # noqa: F401


def main(argv: list[str]) -> int:
    key, code = argv[0], Path(argv[1])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    streams = _Streams(sys.stderr)
    sys.stderr = streams
    agent = Agent(key, code, streams)
    try:
        agent.bind()
    except OSError as err:
        log.info("cannot bind %s: %s", agent.path, err)
        return 1
    log.info("agent %s for %s listening (pid %d)", key, code, os.getpid())
    threading.Thread(target=_warm, daemon=True).start()
    logging.captureWarnings(True)  # Python warnings and thread failures go to the log too
    threading.excepthook = lambda a: log.error(
        "thread %s failed", a.thread.name if a.thread else "?",
        exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    agent.serve()
    log.info("agent %s exits", key)
    _drop_log_if_quiet(agents_dir() / f"{key}.log")
    return 0


def _drop_log_if_quiet(path: Path) -> None:
    """No log file left per code version unless it holds something worth reading (a warning,
    an error or a traceback, of this agent or an earlier one for the same code)."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace")
        if not any(mark in text for mark in (" WARNING ", " ERROR ", "Traceback")):
            path.unlink()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
