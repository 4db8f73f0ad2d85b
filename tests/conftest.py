"""Settings every test needs: no telemetry (no network here), and the repo root."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A user's machine has no ../shared: tests that need the CIFAR archive skip there.
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

QUIET_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "ORT_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Tracking agents the tests start (stages/core/tracking/remote.py) go idle quickly; the
    # session stops the rest at its end (tracking_agents below).
    "IMAGEPIPE_TRACKING_AGENT_IDLE_S": "20",
}
os.environ.update(QUIET_ENV)

# `import dvc` binds DVC's log handlers to sys.stdout/sys.stderr as they are at that moment.
# Imported first inside a test that uses capsys, they keep that test's stream, which pytest
# closes afterwards, and every later in-process DVC call fails with "I/O operation on closed
# file". Imported here, they bind to the session's streams, which stay open.
import dvc  # noqa: E402, F401


def stop_agents(under: Path, *, drain: bool = False) -> None:
    """End the tracking agents (`python -m stages.core.tracking.agent KEY CODE_DIR`) serving
    code under `under`. `drain`: remove their sockets instead, so an agent still serving a
    stage (a developer's `dvc repro` in this checkout) finishes it and then exits."""
    import psutil

    from stages.core.tracking.channel import agents_dir

    for proc in psutil.process_iter(["cmdline", "uids"]):
        cmd = proc.info["cmdline"] or []
        if not (proc.info["uids"] and proc.info["uids"].real == os.getuid()
                and "stages.core.tracking.agent" in cmd and Path(cmd[-1]).is_relative_to(under)):
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if drain:
                (agents_dir() / f"{cmd[-2]}.sock").unlink(missing_ok=True)
            else:
                proc.terminate()


@pytest.fixture(scope="session", autouse=True)
def tracking_agents(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The tracking agents serving project copies under this session's tmp folder (a worker's
    own, under pytest-xdist) are stopped when it ends."""
    yield
    stop_agents(tmp_path_factory.getbasetemp())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Agents serving this checkout's own code are shared by xdist's workers: the process that
    outlives them all (the controller, or pytest itself without xdist) stops them."""
    if not hasattr(session.config, "workerinput"):
        stop_agents(REPO, drain=True)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# The longest modules first (seconds each on 2 cores, serially): `make test` runs the suite on
# two pytest-xdist workers, each module on one worker, handed out in collection order; a long
# module handed out last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_dvc_experiments", "test_distributed", "test_end_to_end", "test_registry",
                 "test_resume", "test_flow", "test_dvc_data_stages", "test_prefect")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept
