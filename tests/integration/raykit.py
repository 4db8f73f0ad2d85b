"""A real Ray cluster of two nodes on 127.0.0.1 for the Ray tests: two `ray start --block`
processes (a head and a joining node, each its own raylet, object store and temp dir), token
authentication on as Ray 2.60's head has it, stopped by killing the process groups the test
started (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Cluster:
    address: str
    token: str
    temp_dirs: tuple[Path, ...]
    cpus_per_node: int
    sessions: tuple[int, ...] = ()  # each node's `ray start` session: its processes' sid

    def driver_env(self) -> dict[str, str]:
        """What a driver needs (the README's recipe): the address, token mode and the token."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def nodes_that_ran(self, name: str) -> int:
        """How many nodes have a worker log naming `name` (a task's function, a line a stage
        logged): where it ran."""
        ran = 0
        for temp in self.temp_dirs:
            logs = [p for pattern in ("worker-*.out", "worker-*.err", "python-core-worker-*.log")
                    for p in temp.glob(f"session_*/logs/{pattern}")]
            ran += any(name in p.read_text(errors="replace") for p in logs)
        return ran


def _start(args: list[str], env: dict[str, str], temp: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([RAY, "start", "--block", "--temp-dir", str(temp),
                             "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for_nodes(cluster: Cluster, n: int, procs: list[subprocess.Popen[bytes]]) -> None:
    probe = ("import ray,sys; ray.init(log_to_driver=False); "
             f"sys.exit(0 if len([x for x in ray.nodes() if x['Alive']]) >= {n} else 1)")
    env = {**os.environ, **cluster.driver_env()}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a `ray start` exited early")
        try:  # the head's port first: a ray.init before the head is up retries for minutes
            socket.create_connection(("127.0.0.1", int(cluster.address.split(":")[1])), 1).close()
            if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              timeout=60).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {n} nodes")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each process group this kit started, SIGKILL to what outlives 10 s."""
    for proc in reversed(procs):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in reversed(procs):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def two_nodes(cpus_per_node: int = 1) -> Iterator[Cluster]:
    """A head and one joining node on 127.0.0.1, token auth on; stopped on the way out."""
    token = secrets.token_hex(32)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    # Short temp dirs: Ray's unix socket paths must stay under 107 characters.
    temps = (Path(tempfile.mkdtemp(prefix="rh")), Path(tempfile.mkdtemp(prefix="rw")))
    procs: list[subprocess.Popen[bytes]] = []
    cluster = Cluster(f"127.0.0.1:{port}", token, temps, cpus_per_node)
    try:
        procs.append(_start(["--head", "--port", str(port), "--num-cpus", str(cpus_per_node),
                             "--include-dashboard", "false",
                             "--dashboard-agent-listen-port", str(free_port())], env, temps[0]))
        procs.append(_start(["--address", cluster.address, "--num-cpus", str(cpus_per_node),
                             "--dashboard-agent-listen-port", str(free_port())], env, temps[1]))
        cluster = replace(cluster, sessions=tuple(p.pid for p in procs))
        _wait_for_nodes(cluster, 2, procs)
        yield cluster
    finally:
        stop(procs)
