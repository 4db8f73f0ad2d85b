"""`make test-containers`: the engine, the base image and the project image, made for real.

Session fixtures, in order: a Docker engine (`docker info` answers, else Debian's docker.io is
installed and `dockerd` started as root; stopped again at the end when this session started
it), a base image (CONTAINER_BASE_IMAGE, else `make base-image`: debootstrap's Debian 12), and
the project image (`make image` on that base; BuildKit's cache makes a rebuild of unchanged
layers a matter of seconds). No registry is asked for anything. An engine that cannot start
fails the session: nothing here is skipped.

Each step prints its wall time (`make test-containers` runs pytest with -s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.kit import (
    BASE_NAME,
    ENGINE_START_S,
    IMAGE,
    REPO,
    apt_install,
    docker,
    docker_cli,
    engine_answers,
    step,
)

# `make test` leaves this folder out (it needs root and builds an image for minutes);
# `make test-containers` sets it.
SWITCH = "IMAGEPIPE_CONTAINER_TESTS"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if os.environ.get(SWITCH) != "1" and collection_path.suffix == ".py":
        return True
    return None


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Docker engine that answers; the docker CLI's path. Started here, stopped here."""
    proc = None
    with step("docker engine"):
        if not engine_answers():
            if shutil.which("dockerd") is None:
                apt_install("docker.io")
            if os.geteuid() != 0:
                pytest.fail("the Docker engine is not running and only root can start dockerd",
                            pytrace=False)
            log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
            with log.open("wb") as out:
                # Niced: the builds and containers it runs inherit it (a machine shared with
                # others; it changes nothing on a quiet one).
                proc = subprocess.Popen(["nice", "-n", "10", "dockerd"], stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + ENGINE_START_S
            while not engine_answers():
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"dockerd did not start (exit {proc.poll()}): the container suite "
                                f"cannot run here.\n{log.read_text(errors='replace')[-3000:]}",
                                pytrace=False)
                time.sleep(1)
        print(f"[containers] engine {docker('version', '--format', '{{.Server.Version}}').stdout.strip()}"
              f"{' (started by this session)' if proc else ''}", flush=True)
    yield docker_cli()
    if proc is not None:
        with step("stop dockerd"):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="session")
def base_image(engine: str) -> str:
    """CONTAINER_BASE_IMAGE, or the Debian 12 base made by debootstrap (kept between sessions)."""
    given = os.environ.get("CONTAINER_BASE_IMAGE")
    if given:
        return given
    with step(f"base image {BASE_NAME}"):
        if docker("image", "inspect", BASE_NAME, check=False).returncode != 0 \
                and shutil.which("debootstrap") is None:
            apt_install("debootstrap")
        done = subprocess.run(["make", "base-image", f"BASE_NAME={BASE_NAME}"], cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return BASE_NAME


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    """The project image, built by `make image` on base_image."""
    with step(f"make image IMAGE={IMAGE}"):
        before = docker("image", "inspect", IMAGE, "--format", "{{.Id}}", check=False).stdout.strip()
        done = subprocess.run(["make", "image", f"IMAGE={IMAGE}", f"BASE_IMAGE={base_image}"],
                              cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
        # The build this one replaced, now untagged: removed (its layers that the new image
        # shares stay), so runs after code changes do not pile up images; in use, it is kept.
        now = docker("image", "inspect", IMAGE, "--format", "{{.Id}}").stdout.strip()
        if before and before != now:
            docker("image", "rm", before, check=False)
        size = docker("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip()
        print(f"[containers] {IMAGE}: {int(size) / 1e9:.2f} GB; its layers (docker history):",
              flush=True)
        layers = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE).stdout
        for line in layers.splitlines():
            layer_size, _, created_by = line.partition("\t")
            if layer_size not in ("0B", "0"):
                print(f"  {layer_size:>9}  {created_by[:110]}", flush=True)
    return IMAGE
