"""Prefect's temporary local API for `imagepipe run`, started before the flow so its start-up
overlaps work the run needs anyway.

Prefect would start the same server itself on the flow's first API call (its
SubprocessASGIServer: uvicorn with the server app, UI off, ephemeral services only), after
importing the server code into this process too (~2.5 s here) and with nothing to do meanwhile.
Started here, the ~7 s it takes to come up run in parallel with the DVC status check, and this
process never imports the server. The database is Prefect's usual one (PREFECT_HOME).

The server dies with this process, however it ends (kill -9 included): it gets SIGTERM through
Linux's PR_SET_PDEATHSIG (stages/core/host.die_with_parent). Start it from a thread that lives as
long as the run (the main thread): the signal fires when the thread that forked it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import prefect
from prefect.settings import get_current_settings

from flows.deploy import healthy
from stages.core.host import die_with_parent


class APIUnavailable(RuntimeError):
    """The temporary API did not come up: exit 75 (try again later), one line."""


class TemporaryAPI:
    """One uvicorn process serving the Prefect API on 127.0.0.1, stopped by `stop()`."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryAPI:
        env = {
            **os.environ,
            # What Prefect's own SubprocessASGIServer sets: no UI, ephemeral services only.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGTERM))
        return self

    def wait_ready(self, timeout_s: float) -> str:
        """Block until /health answers; raise APIUnavailable with the cause otherwise."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise APIUnavailable(f"Prefect's temporary API exited with {self.proc.returncode}")
            if healthy(self.url):
                return self.url
            time.sleep(0.1)
        self.stop()
        raise APIUnavailable(
            f"Prefect's temporary API did not answer within {timeout_s:g} s (a first start creates "
            "its database; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
