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
from pathlib import Path

import prefect
from prefect.settings import get_current_settings

from flows.deploy import wait_healthy
from flows.orphans import kill_group
from stages.core.errors import Transient
from stages.core.host import die_with_parent


def start() -> tuple[subprocess.Popen[bytes], str]:
    """uvicorn serving the Prefect API on a free port of 127.0.0.1, in a process group of its
    own (orphans.kill_group stops it); returns the process and the API's URL."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {
        **os.environ,
        # What Prefect's own SubprocessASGIServer sets: no UI, ephemeral services only.
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, process_group=0,
        preexec_fn=die_with_parent(signal.SIGTERM))
    return proc, f"http://127.0.0.1:{port}/api"


def ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> str:
    """`url` once /health answers; else the server is stopped and Transient (exit 75: try again
    later) says why in one line."""
    try:
        wait_healthy(url, proc, timeout_s)
    except RuntimeError:
        code = proc.poll()
        kill_group(proc, grace_s=10.0)
        if code is not None:  # it died: waiting longer would not have helped
            raise Transient(f"Prefect's temporary API exited with {code} before it answered"
                            ) from None
        raise Transient(
            f"Prefect's temporary API did not answer within {timeout_s:g} s (still starting; a "
            "first start creates its database: raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        ) from None
    return url
