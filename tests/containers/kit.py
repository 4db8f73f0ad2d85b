"""What the container tests share: the docker CLI, a timed step, a throw-away container."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("CONTAINER_IMAGE", "imagepipe:test")
BASE_NAME = "imagepipe-base:bookworm"
ENGINE_START_S = 90


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Print how long `name` took, whether it passed or not."""
    began = time.monotonic()
    print(f"\n[containers] {name} ...", flush=True)
    ok = "failed"
    try:
        yield
        ok = "done"
    finally:
        print(f"[containers] {name}: {ok} in {time.monotonic() - began:.1f} s", flush=True)


def docker_cli() -> str:
    """The docker CLI: `docker` on PATH, else the engine package's."""
    found = shutil.which("docker") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else None)
    if found is None:
        raise FileNotFoundError("no docker CLI")
    return found


def docker(*args: str, check: bool = True, timeout: float = 600,
           input_: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout,
                          input=input_)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {done.returncode}\n{done.stdout[-3000:]}"
                             f"\n{done.stderr[-3000:]}")
    return done


def engine_answers() -> bool:
    with contextlib.suppress(FileNotFoundError, subprocess.TimeoutExpired):
        return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
    return False


def apt_install(*packages: str) -> None:
    """Debian's packages, as root: what this suite may install on the machine it runs on."""
    if os.geteuid() != 0:
        pytest.fail(f"{', '.join(packages)} missing and this is not root: install them "
                    f"(apt-get install -y {' '.join(packages)}) or run as root", pytrace=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                        f"\n{done.stderr[-2000:]}", pytrace=False)


def run_in(image: str, *args: str, options: tuple[str, ...] = (), timeout: float = 600
           ) -> subprocess.CompletedProcess[str]:
    """`docker run --rm` of the image; removed whatever happens (its name is ours)."""
    name = f"imagepipe-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        return docker("run", "--rm", "--name", name, *options, image, *args, check=False,
                      timeout=timeout)
    finally:
        docker("rm", "-f", name, check=False)
