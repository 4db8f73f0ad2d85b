"""The `nightly-docker` deployment for real: a Docker network of this test's own, a Prefect server
and an MLflow server on its gateway address (the host, as the containers see it; nothing else
listens there), the work pool `gpu-docker` from deploy/docker/base-job-template.json, a worker,
`prefect deploy --name nightly-docker` of prefect.yaml, and one flow run with the CPU job
variables (`device_requests: []`, the network, the extra volumes: the git repository and the
DVC remote). The run clones the code, runs the six stages and the promotion gate inside a
container as uid 10001, registers the champion in the MLflow server and `dvc push`es to the
remote. Everything started here is stopped here; the container removes itself."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows import deploy
from flows.dvcstage import child_env
from flows.orphans import kill_group
from tests.containers.kit import IMAGE, REPO, docker, step
from tests.helpers import git, project_copy

pytestmark = pytest.mark.slow

POOL = "gpu-docker"
DEPLOYMENT = "imagepipe-pipeline/nightly-docker"
MODEL = "imagepipe-classifier"
IMAGE_UID = 10001
# A real run of all six stages, kept short: the point is where it runs, not the model.
TINY = ["pretrain.epochs=2", "finetune.head_epochs=1", "finetune.full_epochs=2",
        "export.quantize_int8=false"]
RUN_TIMEOUT_S = 1500
# A server's first /health, database created: seconds on a quiet machine, up to 10 minutes on
# 2 cores shared with other pipelines (measured).
HEALTH_S = 600


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def network(engine: str) -> Iterator[tuple[str, str]]:
    """(name, gateway address) of a bridge network of this test's own."""
    name = f"imagepipe-test-{os.getpid()}"
    docker("network", "create", name)
    try:
        gateway = docker("network", "inspect", name, "--format",
                         "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
        yield name, gateway
    finally:
        left = docker("ps", "-aq", "--filter", f"network={name}").stdout.split()
        if left:
            docker("rm", "-f", *left, check=False)
        docker("network", "rm", name)
        assert not left, f"containers left on {name}: {left}"


def start_mlflow(host: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`mlflow server` on host only, SQLite backend, artifacts served through it."""
    port = free_port(host)
    uri = f"http://{host}:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = folder / "mlflow.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, process_group=0)
    try:
        deploy.wait_healthy(uri, proc, HEALTH_S, log)
    except BaseException:
        kill_group(proc, grace_s=15.0)
        raise
    return proc, uri


def shared_folder(path: Path, uid: int) -> Path:
    """A host folder the container's uid may write (as the README tells users to make one)."""
    path.mkdir(parents=True)
    os.chown(path, uid, uid)
    return path


@pytest.fixture
def stack(network: tuple[str, str], image: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    net, gateway = network
    project = project_copy(tmp_path / "project")
    remote = shared_folder(tmp_path / "dvc-remote", IMAGE_UID)
    (project / ".dvc" / "config").write_text(
        "[core]\n    analytics = false\n    remote = local\n"
        "['remote \"local\"']\n    url = /remote\n")
    git(project, "commit", "-qam", "DVC remote: the container's /remote")
    # The repository the container clones, mounted read-only at /repo: owned by the image's
    # user, or git refuses it (safe.directory).
    bare = tmp_path / "repo.git"
    git(tmp_path, "clone", "-q", "--bare", str(project), str(bare))
    subprocess.run(["chown", "-R", f"{IMAGE_UID}:{IMAGE_UID}", str(bare)], check=True)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "aws-credentials").write_text("")  # the local remote needs none

    procs: list[subprocess.Popen[bytes]] = []
    try:
        with step("MLflow server on the network's gateway"):
            mlflow_proc, mlflow_uri = start_mlflow(gateway, tmp_path)
            procs.append(mlflow_proc)
        port = free_port(gateway)
        api_url = f"http://{gateway}:{port}/api"
        env = child_env({
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "IMAGEPIPE_IMAGE": image,
            "IMAGEPIPE_GIT_URL": "file:///repo",
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "IMAGEPIPE_CREDENTIALS_DIR": str(credentials),
        })
        with step("Prefect server on the network's gateway"):
            procs.append(deploy.start_server(port, env, tmp_path / "server.log", host=gateway))
            deploy.wait_healthy(api_url, procs[-1], HEALTH_S, tmp_path / "server.log")
        with step("work pool, worker, prefect deploy --name nightly-docker"):
            created = subprocess.run(
                deploy.prefect_cmd("work-pool", "create", POOL, "--type", "docker",
                                   "--base-job-template",
                                   str(REPO / "deploy" / "docker" / "base-job-template.json")),
                env=env, capture_output=True, text=True)
            assert created.returncode == 0, created.stdout + created.stderr
            procs.append(deploy.start_worker(env, tmp_path / "worker.log", tmp_path, pool=POOL))
            deploy.deploy(project, env, name="nightly-docker")
        yield {"api_url": api_url, "env": env, "mlflow_uri": mlflow_uri, "net": net, "bare": bare,
               "remote": remote, "logs": tmp_path, "commit": git(project, "rev-parse", "HEAD").strip()}
    finally:
        with step("stop worker, Prefect server, MLflow server"):
            for proc in reversed(procs):
                kill_group(proc, grace_s=15.0)
        assert all(p.poll() is not None for p in procs), "a server or the worker outlived the test"


def champion(mlflow_uri: str) -> dict[str, Any]:
    """The registry's champion version, through MLflow's REST API."""
    reply = httpx.get(f"{mlflow_uri}/api/2.0/mlflow/registered-models/alias",
                      params={"name": MODEL, "alias": "champion"}, timeout=30)
    reply.raise_for_status()
    return dict(reply.json()["model_version"])


def test_nightly_docker_flow_run_completes_in_a_container(stack: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # The README's command, with the CPU job variables of this host.
    cpu = {"device_requests": [], "networks": [stack["net"]],
           "volumes": [f"{stack['bare']}:/repo:ro", f"{stack['remote']}:/remote"],
           # The worker hands its own Prefect settings on; its PREFECT_HOME is a host folder.
           "env": {"PREFECT_HOME": "/home/imagepipe/.prefect"}}
    cmd = deploy.prefect_cmd("deployment", "run", DEPLOYMENT, "--param",
                             f"set_params={json.dumps(TINY)}", "--watch", "--watch-timeout",
                             str(RUN_TIMEOUT_S))
    for key, value in cpu.items():
        cmd += ["--job-variable", f"{key}={json.dumps(value)}"]
    with step("prefect deployment run nightly-docker --watch (six stages, promotion, dvc push)"):
        done = subprocess.run(cmd, env=stack["env"], capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S + 120)
    found = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert found, done.stdout[-3000:] + done.stderr[-3000:]
    with temporary_settings(updates={PREFECT_API_URL: stack["api_url"]}):
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(found.group(1))
            states = client.read_flow_run_states(run.id)
            dep = client.read_deployment_by_name(DEPLOYMENT)
    worker_log = (stack["logs"] / "worker.log").read_text(errors="replace")
    history = [s.name for s in sorted(states, key=lambda s: s.timestamp)]
    print(f"[containers] flow run {run.name}: {' -> '.join(history)}", flush=True)
    assert run.state is not None and run.state.is_completed(), worker_log[-6000:] + done.stdout[-2000:]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert dep.work_pool_name == POOL and dep.job_variables["image"] == IMAGE
    # The run's infrastructure was a container of this engine (the worker records its id).
    assert run.infrastructure_pid and ":" in run.infrastructure_pid, run.infrastructure_pid

    version = champion(stack["mlflow_uri"])
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    print("[containers] champion v" + str(version["version"]) + " tags:\n"
          + json.dumps(tags, indent=1, sort_keys=True), flush=True)
    assert tags["git.commit"] == stack["commit"]  # the code the container cloned
    assert tags["prefect.flow_run_id"] == str(run.id)
    assert tags["promotion.decision"] == "promoted"
    assert tags["parity_passed"] == "true"

    # dvc push from inside the container: the remote has the outputs, written as uid 10001.
    pushed = [p for p in stack["remote"].rglob("*") if p.is_file()]
    assert pushed and {p.stat().st_uid for p in pushed} == {IMAGE_UID}
