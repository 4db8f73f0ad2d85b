"""How a stage and the tracking agent talk: where the agent's socket lives, which agent serves
which code and tracking environment, and one connection with every wait bounded.

Framing and authentication are multiprocessing.connection's (length-prefixed pickles, an HMAC
challenge on a per-user key), over a Unix socket this module opens itself: the library's
Client and Listener have no timeout on connect or on the handshake, and a stopped agent (or a
stopped stage, seen from the agent) must cost the other side seconds, never a hang.

Inputs: <tmp>/imagepipe-<uid>/ (mode 0700: this user's only; a folder that is not, or a plain
file at its path, is AgentUnavailable / OSError for the caller to fall back on) and its
agent.key; the environment. Outputs: Connection objects, replies, AgentUnavailable /
AgentStalled naming what happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import struct
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

CODE = Path(__file__).resolve().parents[3]  # the folder `stages` is imported from
HANDSHAKE_S = 5.0  # a listening agent answers the handshake in milliseconds: 5 s means stopped
SEND_S = 30.0  # a reply of logs is a few kB; a peer that takes this long to read is stopped
KEY_CHARS = 20  # an agent's key (code_key): hex digits
SUN_PATH_MAX = 107  # the longest path a Unix socket binds to on Linux (108 bytes with its NUL)

# The environment an agent's runs read from the process (the store, its credentials, the
# pipeline and experiment a run belongs to): part of the agent's key, so an agent serves only
# stages that agree on all of it and never swaps its process-wide environment per request.
_ENV_PREFIXES = ("MLFLOW_", "IMAGEPIPE_", "DVC_EXP_", "AWS_", "AZURE_", "GOOGLE_")
_ENV_NAMES = frozenset({"HOME", "PYTHONPATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                        "http_proxy", "https_proxy", "no_proxy", "REQUESTS_CA_BUNDLE",
                        "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"})
# ...except what a stage sets for itself while its body runs.
_PER_STAGE = frozenset({"MLFLOW_RUN_ID", "IMAGEPIPE_EPOCH_LOG", "IMAGEPIPE_GPUS_GRANTED"})


class AgentUnavailable(Exception):
    """No agent could be used before anything was done there: track in-process instead."""


class AgentStalled(AgentUnavailable):
    """The agent took the request and then did not answer in time (stopped or wedged)."""


def agents_dir() -> Path:
    """<tmp>/imagepipe-<uid>: the agents' sockets, key, locks and logs. When a long TMPDIR
    (pytest's, a CI runner's) would make a socket path longer than a Unix socket address holds
    (107 bytes on Linux: bind fails with "AF_UNIX path too long"), a folder in /tmp named
    after it instead, so two TMPDIRs never share an agent. This user's only: a folder someone
    else made there (or opened to others) is refused, since a socket in it could hand runs and
    pickles to another user."""
    folder = Path(tempfile.gettempdir()) / f"imagepipe-{os.getuid()}"
    if len(os.fsencode(folder / f"{'0' * KEY_CHARS}.sock")) > SUN_PATH_MAX:
        tag = hashlib.sha256(os.fsencode(folder)).hexdigest()[:12]
        folder = Path("/tmp") / f"imagepipe-{os.getuid()}-{tag}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or folder.is_symlink():
        raise AgentUnavailable(f"{folder} is not this user's alone (owner {st.st_uid}, mode "
                               f"{st.st_mode & 0o777:o}): not using a tracking agent")
    return folder


def code_key(env: dict[str, str] | None = None) -> str:
    """Which agent serves this stage: the interpreter, the code folder, the size and mtime of
    every source file it may run (an edited stagerun.py must not be served by a stale agent)
    and the tracking environment (`env`, default this process's: _ENV_PREFIXES, _ENV_NAMES)."""
    h = hashlib.sha256(f"{sys.executable}\0{CODE}".encode())
    for key, value in sorted((os.environ if env is None else env).items()):
        if (key.startswith(_ENV_PREFIXES) or key in _ENV_NAMES) and key not in _PER_STAGE:
            h.update(f"{key}={value}\0".encode())
    files = [*(CODE / "stages").rglob("*.py"), *(CODE / "commands").glob("*.py")]
    for path in sorted(files):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path.relative_to(CODE)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:KEY_CHARS]


def socket_path(key: str) -> Path:
    return agents_dir() / f"{key}.sock"


def auth_key() -> bytes:
    """This user's key for the handshake, made once (written aside, then linked into place: a
    reader never sees half a key)."""
    folder = agents_dir()
    path = folder / "agent.key"
    if not path.exists():
        tmp = folder / f".agent.key.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        tmp.unlink()
    return path.read_bytes()


def _kernel_timeouts(conn: Connection | socket.socket, receive_s: float, send_s: float) -> None:
    """SO_RCVTIMEO / SO_SNDTIMEO on a blocking socket: a read or write that waits longer fails
    with an OSError instead of blocking for good (0: no limit)."""
    fd = conn.fileno()
    with socket.socket(fileno=os.dup(fd)) as s:
        for opt, seconds in ((socket.SO_RCVTIMEO, receive_s), (socket.SO_SNDTIMEO, send_s)):
            s.setsockopt(socket.SOL_SOCKET, opt,
                         struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))


def dial(path: Path) -> Connection | None:
    """An authenticated connection to the agent at `path`; None when none listens there (no
    socket, a stale one, or an agent closing as we came). AgentUnavailable when one listens but
    does not complete the handshake within HANDSHAKE_S (stopped or wedged)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HANDSHAKE_S)
    try:
        sock.connect(str(path))
    except TimeoutError:
        sock.close()
        raise AgentUnavailable(f"the tracking agent at {path} did not accept a connection "
                               f"within {HANDSHAKE_S:.0f} s (stopped or overloaded)") from None
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)  # blocking again; the kernel's timeouts bound each read and write
    conn = Connection(sock.detach())
    try:  # the HMAC challenge both ways, as multiprocessing.connection.Client: answer first
        _kernel_timeouts(conn, HANDSHAKE_S, HANDSHAKE_S)
        answer_challenge(conn, auth_key())
        deliver_challenge(conn, auth_key())
    except (EOFError, ConnectionError):
        conn.close()
        return None
    except OSError as err:
        conn.close()
        raise AgentUnavailable(f"the tracking agent at {path} did not answer the handshake "
                               f"within {HANDSHAKE_S:.0f} s (stopped or wedged): {err}") from None
    except Exception as err:  # noqa: BLE001 - AuthenticationError: another key, not our agent
        conn.close()
        raise AgentUnavailable(f"the tracking agent at {path} failed the handshake: {err}"
                               ) from None
    _kernel_timeouts(conn, SEND_S, SEND_S)  # reads only follow a poll that saw data
    return conn


def accept(sock: socket.socket) -> Connection | None:
    """The agent's side of `dial`, in the connection's own thread; None if the stage did not
    complete the handshake within HANDSHAKE_S (a stopped stage costs only its own thread)."""
    sock.settimeout(None)
    conn = Connection(sock.detach())
    try:  # as multiprocessing.connection.Listener: challenge first
        _kernel_timeouts(conn, HANDSHAKE_S, HANDSHAKE_S)
        deliver_challenge(conn, auth_key())
        answer_challenge(conn, auth_key())
        _kernel_timeouts(conn, 0, SEND_S)  # a stage holds its connection for its whole body
    except Exception:  # noqa: BLE001 - any handshake failure: drop this connection only
        conn.close()
        return None
    return conn


def peer_pid(conn: Connection) -> int | None:
    """The pid of the process at the other end (the kernel's SO_PEERCRED): the agent's, for
    telling a stopped agent from a slow one while a request waits."""
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0] or None


def agent_state(pid: int, key: str | None = None) -> str:
    """'running', 'starting' (exec'd moments ago: no command line yet), 'stopped' (SIGSTOP,
    a debugger), or 'gone' (exited, a zombie, or a reused pid running something else,
    including another code's agent when `key` is given)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        status = proc.status()
        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return "gone"
        cmdline = " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.Error:  # another user's process, say: not ours to judge
        return "running"
    if not cmdline:  # right after the spawn, before exec has filled it in
        return "starting"
    if "stages.core.tracking.agent" not in cmdline or (key is not None and key not in cmdline):
        return "gone"
    return "stopped" if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP) else "running"


def request(conn: Connection, message: dict[str, Any], budget_s: float) -> dict[str, Any] | None:
    """Send `message`, wait for the reply. None when the agent closed the connection (it died);
    AgentStalled after `budget_s` without a reply, or sooner when the agent stays stopped for
    HANDSHAKE_S."""
    pid = peer_pid(conn)
    try:
        conn.send(message)
    except BlockingIOError:  # SO_SNDTIMEO: the agent stopped reading
        raise AgentStalled(f"the tracking agent did not take the {message.get('op')!r} "
                           f"request within {SEND_S:.0f} s") from None
    except OSError:
        return None
    deadline = time.monotonic() + budget_s
    stopped_since: float | None = None
    while not conn.poll(0.25):
        now = time.monotonic()
        stopped = pid is not None and agent_state(pid) == "stopped"
        stopped_since = (stopped_since or now) if stopped else None
        if stopped_since is not None and now - stopped_since > HANDSHAKE_S:
            raise AgentStalled(f"the tracking agent (pid {pid}) is stopped (SIGSTOP or a "
                               f"debugger) with the {message.get('op')!r} request unanswered")
        if now > deadline:
            raise AgentStalled(f"the tracking agent{f' (pid {pid})' if pid else ''} did not "
                               f"answer {message.get('op')!r} within {budget_s:.0f} s")
    try:
        reply: dict[str, Any] = conn.recv()
    except (EOFError, OSError):
        return None
    return reply
