"""The tracking agent: one long-lived process per project code that keeps the MLflow runs of
the stages that connect to it (remote.py says why and how they talk).

`python -m stages.core.tracking.agent KEY CODE_DIR` (remote.py starts it): binds
<tmp>/imagepipe-<uid>/KEY.sock first, so stages can connect at once, then imports mlflow and
everything a run needs while they wait. Each connection is one stage's run: "start" opens it
with the stage's own environment and working folder applied (one request at a time: the
environment is process-wide), "finish" closes it, a dropped connection ends it FAILED; "call"
runs one of remote.CALLABLE (`imagepipe promote`) the same way. Exits
after the idle time with no stage connected, when its code folder is gone, or on "stop".
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
from pathlib import Path
from typing import Any

from stages.core.errors import BadInput, Transient
from stages.core.tracking.remote import CALLABLE, agents_dir, idle_s, receive, send

log = logging.getLogger("imagepipe.tracking.agent")


class _Capture(logging.Handler):
    """The log records of one request, sent back for the stage to print as its own."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


class Agent:
    def __init__(self, key: str, code: Path) -> None:
        self.key, self.code = key, code
        self.path = agents_dir() / f"{key}.sock"
        self.lock = threading.Lock()  # env, cwd and mlflow's fluent API are process-wide
        self.connected = 0
        self.last_seen = time.monotonic()
        self.stopping = threading.Event()
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
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                if self._should_exit():
                    break
                continue
            with self.lock:
                self.connected += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        # The path first (a stage arriving now starts a new agent), then the socket.
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self.inode:  # still ours, not a successor's
                self.path.unlink()
        self.server.close()

    def _should_exit(self) -> bool:
        if not (self.code / "stages").is_dir():
            log.info("code folder %s is gone: exiting", self.code)
            return True
        if not self.path.exists():
            log.info("socket removed: exiting")
            return True
        with self.lock:
            idle = self.connected == 0 and time.monotonic() - self.last_seen > idle_s()
        return idle

    def _handle(self, conn: socket.socket) -> None:
        run: Any = None
        try:
            with conn:
                while True:
                    message = receive(conn)
                    if message is None:
                        break
                    op = message.get("op")
                    if op == "start":
                        run, reply = self._locked(self._start, message)
                    elif op == "finish" and run is not None:
                        reply = self._locked(self._finish, run, message)[1]
                        run = None
                    elif op == "call":
                        reply = self._locked(self._call, message)[1]
                    elif op == "stop":
                        under = message.get("under")
                        stop = under is None or self.code.is_relative_to(under)
                        if stop:
                            self.stopping.set()
                        reply = {"stopping": stop}
                    else:
                        reply = {"pid": os.getpid(), "code": str(self.code)}
                    send(conn, reply)
        except OSError:
            pass
        finally:
            if run is not None and not run.finished:  # the stage died with its run open
                with self.lock, contextlib.suppress(Exception):
                    run._end_quietly()
                log.warning("a stage dropped its connection: run %s ended FAILED", run.run_id)
            with self.lock:
                self.connected -= 1
                self.last_seen = time.monotonic()

    def _locked(self, fn: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
        """fn(*args) with the stage's environment and folder applied, its logs and stderr
        captured into the reply."""
        message = args[-1]
        capture, err = _Capture(), io.StringIO()
        with self.lock:
            os.environ.clear()
            os.environ.update(message.get("env") or {})
            with contextlib.suppress(OSError):
                os.chdir(message.get("cwd") or self.code)
            root_logger = logging.getLogger("imagepipe")
            root_logger.addHandler(capture)
            try:
                with contextlib.redirect_stderr(err):
                    result, reply = fn(*args)
            finally:
                root_logger.removeHandler(capture)
        reply.update(logs=capture.records, stderr=err.getvalue())
        return result, reply

    def _start(self, message: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from stages.core.epochlog import EPOCH_LOG_ENV
        from stages.core.host import workspace_root
        from stages.core.lineage import git_commit
        from stages.core.tracking.stagerun import RUN_ID_ENV, StageRun

        git_commit.cache_clear()  # HEAD moves between stages: never a stale commit
        run = StageRun.start(message["stage"], local=message.get("local"),
                             root=Path(message["root"]),
                             workspace=workspace_root(Path(message.get("cwd") or self.code)))
        if run is None:
            return None, {"env": {}, "failed": None}
        env = {k: os.environ[k] for k in (RUN_ID_ENV, EPOCH_LOG_ENV) if k in os.environ}
        return run, {"env": env, "failed": run.failure}

    def _finish(self, run: Any, message: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return None, {"code": run.finish(int(message["code"]), message.get("outcome"))}


    def _call(self, message: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """One of remote.CALLABLE with the caller's arguments; what it raised, as (kind, text)."""
        target = message.get("target")
        if target not in CALLABLE:
            return None, {"raised": ("BadInput", f"the tracking agent does not run {target!r}")}
        module, name = str(target).split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
            return None, {"result": fn(*message.get("args", ()), **message.get("kwargs", {}))}
        except BadInput as err:
            return None, {"raised": ("BadInput", str(err))}
        except Transient as err:
            return None, {"raised": ("Transient", str(err))}
        except Exception as err:  # a bug: its traceback goes back with the reply's stderr
            traceback.print_exc()
            return None, {"raised": ("bug", f"in the tracking agent: {type(err).__name__}: "
                                            f"{err}")}


def _warm() -> None:
    """What every run needs, imported once (the point of the agent)."""
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import stages.core.tracking.register  # noqa: F401
    import stages.core.tracking.stagerun  # noqa: F401


def main(argv: list[str]) -> int:
    key, code = argv[0], Path(argv[1])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(key, code)
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
