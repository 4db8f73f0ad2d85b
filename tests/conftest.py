"""Settings every test needs: no telemetry (no network here), and the repo root."""

from __future__ import annotations

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


@pytest.fixture(scope="session", autouse=True)
def tracking_agents(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Every tracking agent this session's stages started is stopped when it ends: those serving
    this checkout's code and those serving project copies under the session's tmp folder."""
    yield
    from stages.core.tracking.remote import stop_agents

    stop_agents(REPO)
    stop_agents(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
