"""The nightly deployment for real: `prefect server start` on 127.0.0.1, the process work pool
`gpu`, a worker, `prefect deploy` of prefect.yaml on a temporary copy of the project (its own
git repo, a local DVC remote and its own MLflow store, mlflow.db, which git does not carry), and
a triggered run that clones, pulls, runs ingest with tracking on, promotes and pushes. The run
must track into the project's store, not into a new mlflow.db inside the worker's temporary
clone, and with no challenger anywhere and nothing exported, the promotion is "nothing to
promote", not a failure. Everything is started and stopped by the fixture; PREFECT_HOME lives
in tmp_path."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import deploy, pipeline
from flows.dvcstage import child_env
from flows.orphans import kill_group

REPO = Path(__file__).resolve().parents[2]
COPIED = ["stages", "flows", "commands", "params.yaml", "prefect.yaml", "pyproject.toml", ".dvcignore",
          ".gitignore", ".dvc/config"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _project_copy(dest: Path, remote: Path) -> Path:
    """This project's code and prefect.yaml, with a dvc.yaml of the ingest stage alone (the
    other stages are not the point here), committed to a fresh git repo with a DVC remote."""
    for name in COPIED:
        src, dst = REPO / name, dest / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stages["ingest"]}}))
    (dest / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n    remote = local\n['remote \"local\"']\n"
        f"    url = {remote}\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


def test_the_deployments_store_is_the_one_its_env_names(tmp_path: Path, empty_mlflow_db: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """project_store decides from `env` (what the worker's runs get), not from this process's
    environment, which here names another store and has tracking off."""
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    monkeypatch.setenv("IMAGEPIPE_TRACKING", "0")
    project = (tmp_path / "project").resolve()
    project.mkdir()
    named = {"MLFLOW_TRACKING_URI": "http://tracking.example:5000"}
    assert deploy.project_store(project, named) == named["MLFLOW_TRACKING_URI"]
    own = f"sqlite:///{project / 'mlflow.db'}"
    assert deploy.project_store(project, {"IMAGEPIPE_TRACKING": "0"}) == own
    assert not (project / "mlflow.db").exists()  # tracking off: nothing made ready
    shutil.copy(empty_mlflow_db, project / "mlflow.db")
    assert deploy.project_store(project, {"IMAGEPIPE_TRACKING": "1"}) == own
    with sqlite3.connect(project / "mlflow.db") as db:
        location = db.execute("select artifact_location from experiments "
                              "where name = 'imagepipe'").fetchone()
    assert location == ((project / "mlartifacts").as_uri(),)
    assert not elsewhere.exists() and os.environ["IMAGEPIPE_TRACKING"] == "0"


@pytest.fixture
def prefect_stack(tmp_path: Path, empty_mlflow_db: Path) -> Iterator[dict[str, Any]]:
    remote = tmp_path / "dvc-remote"
    project = _project_copy(tmp_path / "project", remote)
    shutil.copy(empty_mlflow_db, project / "mlflow.db")  # the project's store, tables made
    port = _free_port()
    (tmp_path / "tmp").mkdir()
    api_url = f"http://127.0.0.1:{port}/api"
    env = child_env({
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick the run up at once (default 10 s)
        "IMAGEPIPE_GIT_URL": str(project),
        "IMAGEPIPE_GIT_BRANCH": "main",
        "IMAGEPIPE_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "TMPDIR": str(tmp_path / "tmp"),  # the worker's runner_storage/ and the run's clone
        "IMAGEPIPE_TRACKING": "1",
    })
    # As for a user who never set it: the deployment must default to the project's store.
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID",
                "IMAGEPIPE_FLOW_RUN_ID"):
        env.pop(var, None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(deploy.start_server(port, env, tmp_path / "server.log", services=False))
        # A first start creates the database: minutes on a machine shared by many test runs.
        deploy.wait_healthy(api_url, procs[0], 420, tmp_path / "server.log")
        deploy.create_pool(env)
        procs.append(deploy.start_worker(env, tmp_path / "worker.log", tmp_path))
        deploy.deploy(project, env)
        yield {"api_url": api_url, "remote": remote, "logs": tmp_path, "project": project}
    finally:
        for proc in reversed(procs):
            kill_group(proc, grace_s=15.0)
        assert all(p.poll() is not None for p in procs), "a server or worker outlived the test"


@pytest.mark.timeout(900)
def test_nightly_deployment_runs_on_a_process_worker(prefect_stack: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run = deploy.trigger_and_watch(prefect_stack["api_url"], {"stages": ["ingest"]},
                                   timeout_s=480)
    worker_log = (prefect_stack["logs"] / "worker.log").read_text(errors="replace")
    assert run.state is not None and run.state.is_completed(), worker_log[-4000:]
    # Kept by the tracking agent: under xdist, pytest's TMPDIR once made its socket path too
    # long to bind, and the stage fell back to tracking in its own process.
    assert "in this process instead" not in worker_log, worker_log[-4000:]
    # The stage tracked into the project's store (the clone it ran in is gone), under the
    # flow run, with its artifacts beside that store.
    with sqlite3.connect(prefect_stack["project"] / "mlflow.db") as db:
        runs = db.execute("select r.name, r.status, t.value from runs r join tags t on "
                          "t.run_uuid = r.run_uuid and t.key = 'prefect.flow_run_id'").fetchall()
        location = db.execute("select artifact_location from experiments "
                              "where name = 'imagepipe'").fetchone()
    assert ("ingest", "FINISHED", str(run.id)) in runs, (runs, worker_log[-4000:])
    assert location and location[0].startswith((prefect_stack["project"] / "mlartifacts").as_uri())
    # prefect.yaml's push: true sent ingest's outputs to the DVC remote.
    assert any(p.is_file() for p in prefect_stack["remote"].rglob("*")), worker_log[-4000:]
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack["api_url"]}):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(deploy.DEPLOYMENT)
            artifacts = client.read_artifacts()
    # The nightly schedule is there, and off until someone resumes it.
    assert [(s.schedule.cron, s.active) for s in dep.schedules] == [("0 2 * * *", False)]
    assert dep.work_pool_name == "gpu"
    ours = [a for a in artifacts if a.flow_run_id == run.id and a.key == pipeline.ARTIFACT_KEY]
    assert ours and "| ingest | ran |" in str(ours[0].data)
    # No challenger in the project's registry and nothing exported: nothing to promote, said.
    assert "**nothing to promote**: registered model 'imagepipe-classifier' has no " \
           "'challenger' version" in str(ours[0].data), str(ours[0].data)
