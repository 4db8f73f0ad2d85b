"""The tracking agent (stages/core/tracking/agent.py): stages run as DVC runs them, in processes
of their own, keep their MLflow runs in one long-lived agent and never import mlflow
themselves; a stage killed outright (SIGKILL: no door code runs) has its run ended FAILED by
the agent; with the agent switched off the stage tracks in its own process as before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from stages.core.tracking.remote import AGENT_ENV, code_key, socket_path, stop_agents
from tests.integration.tracking_kit import REPO, write_dvc_yaml

pytestmark = pytest.mark.slow

EVALUATE = {"cmd": "python stage.py", "deps": ["inputs.txt"],
            "metrics": [{"metrics/evaluate.json": {"cache": False}}]}

STAGE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from stages.core.door import run_stage

    def body() -> None:
        Path("metrics").mkdir(exist_ok=True)
        Path("metrics/evaluate.json").write_text(json.dumps({"accuracy": float(sys.argv[1])}))
        Path("seen.json").write_text(json.dumps({"run_id": os.environ.get("MLFLOW_RUN_ID")}))
        if len(sys.argv) > 2:
            time.sleep(float(sys.argv[2]))

    code = run_stage("evaluate", body)
    Path("mlflow_imported.json").write_text(json.dumps("mlflow" in sys.modules))
    sys.exit(code)
""")


def client(project: Path) -> Any:
    from mlflow import MlflowClient

    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def stage(project: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "stage.py", *args], cwd=project,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def agent_pid() -> int | None:
    """The pid the running agent for this checkout's code answers with, if one runs."""
    from stages.core.tracking.remote import _connect, receive, send

    sock = _connect(socket_path(code_key()))
    if sock is None:
        return None
    try:
        with sock:
            send(sock, {"op": "ping"})
            reply = receive(sock) or {}
    except OSError:  # an agent that is exiting
        return None
    return int(reply["pid"]) if "pid" in reply else None


@pytest.fixture
def tracked(project: Path) -> Path:
    write_dvc_yaml(project, {"evaluate": EVALUATE})
    (project / "inputs.txt").write_text("x")
    (project / "stage.py").write_text(STAGE)
    return project


def test_stages_share_one_agent_and_never_import_mlflow(tracked: Path) -> None:
    run_ids, pids = [], set()
    for accuracy in ("0.75", "0.8"):
        proc = stage(tracked, accuracy)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert json.loads((tracked / "mlflow_imported.json").read_text()) is False
        run_ids.append(json.loads((tracked / "seen.json").read_text())["run_id"])
        pids.add(agent_pid())
    assert None not in pids and len(pids) == 1, pids  # the second stage reused the first's
    runs = [client(tracked).get_run(r) for r in run_ids]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.metrics["accuracy"] for r in runs] == [0.75, 0.8]
    assert runs[0].data.tags["mlflow.parentRunId"] != runs[1].data.tags["mlflow.parentRunId"]


def test_a_stage_killed_outright_has_its_run_ended_failed(tracked: Path) -> None:
    proc = stage(tracked, "0.7", "120")
    try:
        deadline = time.monotonic() + 120
        while not (tracked / "seen.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        run_id = json.loads((tracked / "seen.json").read_text())["run_id"]
        assert client(tracked).get_run(run_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGKILL)  # no handler, no finally: only the agent can end it
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    status = "RUNNING"
    while status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client(tracked).get_run(run_id).info.status
    assert status == "FAILED"


def test_switched_off_the_stage_tracks_in_its_own_process(tracked: Path) -> None:
    proc = stage(tracked, "0.6", env={AGENT_ENV: "0"})
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert json.loads((tracked / "mlflow_imported.json").read_text()) is True
    run_id = json.loads((tracked / "seen.json").read_text())["run_id"]
    run = client(tracked).get_run(run_id)
    assert (run.info.status, run.data.metrics["accuracy"]) == ("FINISHED", 0.6)


def test_stop_ends_the_agent_and_a_new_stage_starts_another(tracked: Path) -> None:
    proc = stage(tracked, "0.5")
    assert proc.wait(timeout=180) == 0
    first = agent_pid()
    assert first is not None
    assert stop_agents(REPO) >= 1
    deadline = time.monotonic() + 15
    while agent_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent_pid() is None
    proc = stage(tracked, "0.55")
    assert proc.wait(timeout=180) == 0
    second = agent_pid()
    assert second is not None and second != first


def test_a_stage_right_after_the_flows_prewarm_uses_that_agent_not_a_second(tracked: Path
                                                                             ) -> None:
    from stages.core.tracking.remote import connect_agent, prewarm

    stop_agents(REPO)
    deadline = time.monotonic() + 15
    while agent_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    key = code_key()
    prewarm()  # returns at once: the agent has not bound its socket yet
    sock = connect_agent()  # what the first stage does a moment later
    assert sock is not None
    sock.close()
    running = [p for p in Path("/proc").glob("[0-9]*")
               if _cmdline(p).count(key.encode()) and b"tracking.agent" in _cmdline(p)]
    assert len(running) == 1, running


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
