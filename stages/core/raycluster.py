"""The Ray cluster a stage runs on: one bounded connection per stage, and exit codes for what
goes wrong on the way in.

Input: the address (RAY_ADDRESS, what `ray job submit` and KubeRay set, else the params'
`ray_address`, else none: a Ray started on this machine) and Ray's own token environment
(RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
Output: a connected driver for the duration of a `with connected(...)`.

What goes wrong, as the stage's exit codes (errors.py):
  nothing listens at the address, or it stops answering     -> Transient (75, retried)
  the cluster wants a token this driver lacks or gets wrong -> BadInput (2: a retry cannot help)
Each with one line naming the fix. Ray's own connect loop retries an address for minutes
(seen: still waiting after 120 s), so the address is probed first with a bounded TCP connect,
and ray.init runs under a deadline. Ray reads RAY_AUTH_MODE and the token when it is imported:
they come from the stage's environment, never from os.environ set later in the process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from stages.core.errors import BadInput, Transient
from stages.core.host import env_seconds

log = logging.getLogger("imagepipe.ray")
# How long one connection may take (TCP probe, then ray.init); a cluster that needs longer is
# down as far as the stage can tell, and the flow retries it (75).
CONNECT_TIMEOUT_S = env_seconds("IMAGEPIPE_RAY_CONNECT_TIMEOUT_S", 60.0)
GCS_PORT = 6379  # `ray start --head`'s default
_AUTH_FIX = ("set RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN, or "
             "RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head prints it) in the "
             "driver's environment")


@contextmanager
def connected(configured: str | None) -> Iterator[None]:
    """A driver connected to the cluster (or to a Ray started here) for the block. Already
    connected (an outer `connected`): reused, not reconnected."""
    try:
        import ray
    except ImportError:
        raise BadInput("engine ray needs Ray: pip install -e '.[ray]'") from None
    if ray.is_initialized():
        yield
        return
    where = os.environ.get("RAY_ADDRESS") or configured or None
    _check_token_env()
    if where not in (None, "auto", "local"):
        _probe(where, CONNECT_TIMEOUT_S)
    _init(where, CONNECT_TIMEOUT_S)
    try:
        yield
    finally:
        ray.shutdown()


def _check_token_env() -> None:
    """RAY_AUTH_MODE=token with no token anywhere: say so now, not as a refused connection."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).is_file() or not Path(path).read_text().strip():
            raise BadInput(f"RAY_AUTH_TOKEN_PATH={path} is missing or empty: {_AUTH_FIX}")
        return
    if not (Path.home() / ".ray" / "auth_token").is_file():
        raise BadInput(f"RAY_AUTH_MODE=token but no token is set: {_AUTH_FIX}")


def _probe(where: str, timeout_s: float) -> None:
    """A bounded TCP connect to the head, before Ray's own (minutes of) retrying."""
    try:
        url = urlsplit(where if "://" in where else f"ray://{where}")
        host, port = url.hostname, url.port or GCS_PORT
    except ValueError:  # a port that is no number
        host = None
    if not host:
        raise BadInput(f"Ray address {where!r} is not host:port")
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 10.0)):
            return
    except OSError as err:
        raise Transient(f"no Ray cluster answers at {host}:{port} ({err.strerror or err}): start "
                        "its head (`ray start --head`) or set RAY_ADDRESS / ray_address to a "
                        "running one") from None


def _init(where: str | None, timeout_s: float) -> None:
    """ray.init under a deadline, its failures mapped to exit codes."""
    import ray

    said = f"connecting to {where}" if where else "starting a local Ray"
    log.info("ray: %s", said)
    outcome: dict[str, BaseException | None] = {}

    # The project's tasks and workers import it from the workspace, on storage every node
    # mounts at the same path (no code upload).
    project = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}}

    def connect() -> None:
        try:
            ray.init(address=where, runtime_env=project, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            outcome["error"] = None
        except BaseException as err:  # noqa: BLE001 - handed to the stage's thread below
            outcome["error"] = err

    # A daemon thread: a connection still retrying at the deadline must not hold the exit.
    thread = threading.Thread(target=connect, name="ray-init", daemon=True)
    with _stderr_seen() as seen:
        thread.start()
        thread.join(timeout_s)
    if "error" not in outcome:
        raise Transient(f"Ray did not connect within {timeout_s:.0f} s ({said}): check the "
                        "head is up and reachable from here, or raise "
                        "IMAGEPIPE_RAY_CONNECT_TIMEOUT_S")
    err = outcome["error"]
    if err is None:
        return
    if type(err).__name__ == "AuthenticationError":  # token mode on, no token found here
        raise BadInput(f"Ray: {str(err).split('.')[0]}: {_AUTH_FIX}") from None
    if not isinstance(err, ConnectionError):
        raise err
    # Ray 2.60 raises only "Failed to connect" whether the token was refused or nothing
    # answered; the reason is in its C++ client's log lines on stderr.
    if "InvalidAuthToken" in seen[0] or "Unauthenticated" in seen[0]:
        raise BadInput(f"the Ray head at {where} refused this driver's token (missing or "
                       f"wrong): {_AUTH_FIX}") from None
    raise Transient(f"Ray cluster at {where}: {err}: check the head is up and reachable from "
                    "here, or set RAY_ADDRESS / ray_address to a running one") from None


@contextmanager
def _stderr_seen() -> Iterator[list[str]]:
    """What this process writes to file descriptor 2 during the block (Ray's C++ client logs
    there), passed on to the real stderr afterwards; yields a one-item list filled on exit."""
    import sys
    import tempfile

    seen = [""]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield seen
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            seen[0] = capture.read().decode(errors="replace")
            sys.stderr.write(seen[0])
