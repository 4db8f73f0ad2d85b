"""`make deploy`: the nightly deployment end to end on this machine.

A Prefect server on 127.0.0.1 (reused if one already answers), the process work pool `gpu`,
a worker, `prefect deploy` of prefect.yaml, one triggered run of `nightly`, watched to its end.
Server and worker keep running afterwards (the UI, the schedule once resumed); their pids and
logs are in .prefect/. `python -m flows.deploy --stop` stops what this started.

The worker clones IMAGEPIPE_GIT_URL (default: this checkout, so the run uses its committed
code, not uncommitted edits) and pulls DVC data, as a worker on another machine would. The
deployment's job variable env.MLFLOW_TRACKING_URI (prefect.yaml) is MLFLOW_TRACKING_URI, else
this project's own store (sqlite:///<project>/mlflow.db): the run's stages track, and the
promotion reads, the project's registry, not a new mlflow.db inside the worker's temporary
clone that goes with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from flows.dvcstage import child_env
from flows.orphans import kill_group

POOL = "gpu"
DEPLOYMENT = "imagepipe-pipeline/nightly"
STATE_DIR = Path(".prefect")  # git-ignored


def prefect_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def healthy(api_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200
    return False


def start_server(port: int, env: dict[str, str], log: Path, services: bool = True,
                 host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """`prefect server start` on 127.0.0.1 only (or the one address `host`: a Docker network's
    gateway, for containers), in its own process group."""
    args = ["server", "start", "--host", host, "--port", str(port), "--analytics-off"]
    args += [] if services else ["--no-services", "--no-ui"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(prefect_cmd(*args), env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)


def wait_healthy(api_url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float,
                 log: Path | None = None) -> None:
    """Wait for /health; the first start creates the database (~30 s on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(api_url):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"Prefect server at {api_url} did not become healthy\n{tail}")


def create_pool(env: dict[str, str]) -> None:
    """The process work pool; an existing pool of that name is kept as it is."""
    done = subprocess.run(prefect_cmd("work-pool", "create", POOL, "--type", "process"),
                          env=env, capture_output=True, text=True)
    if done.returncode != 0 and "already exists" not in done.stdout + done.stderr:
        raise RuntimeError(f"prefect work-pool create failed:\n{done.stdout}\n{done.stderr}")


def start_worker(env: dict[str, str], log: Path, cwd: Path,
                 pool: str = POOL) -> subprocess.Popen[bytes]:
    """One worker, one flow run at a time (one GPU): `--limit 1`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(prefect_cmd("worker", "start", "--pool", pool, "--limit", "1"),
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)


def project_store(project: Path, env: dict[str, str]) -> str:
    """The MLflow store the deployment's runs use: MLFLOW_TRACKING_URI of `env`, else the
    project's own (made ready here when `env` tracks: the experiment, with its artifacts beside
    mlflow.db, so the first run from a temporary clone does not put them inside that clone)."""
    from unittest import mock

    from stages.core.tracking.store import Store, tracking_enabled, tracking_uri

    # The store's functions read os.environ: for this call it is `env`, the runs' environment.
    with mock.patch.dict(os.environ, env, clear=True):
        uri = tracking_uri(project.resolve())
        if tracking_enabled() and not env.get("MLFLOW_TRACKING_URI"):
            Store.connect(project.resolve()).experiment_id()
    return uri


def deploy(project: Path, env: dict[str, str], name: str = "nightly") -> None:
    """`prefect deploy` of one deployment of the project's prefect.yaml, its job variable
    env.MLFLOW_TRACKING_URI filled from project_store (prefect.yaml reads it when deploying)."""
    env = {**env, "MLFLOW_TRACKING_URI": project_store(project, env)}
    done = subprocess.run(prefect_cmd("--no-prompt", "deploy", "--name", name), cwd=project,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def trigger_and_watch(api_url: str, parameters: dict[str, Any], timeout_s: float) -> Any:
    """Start a run of the deployment now and poll it to a final state; return the flow run."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return run_deployment(DEPLOYMENT, parameters=parameters, timeout=timeout_s,
                              poll_interval=2)


def _stop_recorded() -> int:
    for name in ("worker", "server"):
        pidfile = STATE_DIR / f"{name}.pid"
        if pidfile.exists():
            kill_group(int(pidfile.read_text()), grace_s=15.0)
            pidfile.unlink()
            print(f"stopped the {name}")
    return 0


def _git_url(project: Path) -> str:
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print("note: the worker clones the committed code (HEAD); uncommitted edits are not in "
              "this run")
    return str(project.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("IMAGEPIPE_PREFECT_PORT", 4200)))
    parser.add_argument("--params", default="{}", help="JSON parameters of the triggered run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to watch the run")
    parser.add_argument("--stop", action="store_true", help="stop the server and worker started here")
    args = parser.parse_args(argv)
    if args.stop:
        return _stop_recorded()
    project = Path.cwd()
    api_url = f"http://127.0.0.1:{args.port}/api"
    env = child_env({"PREFECT_API_URL": api_url,  # for the server, worker and CLI calls
                     "IMAGEPIPE_GIT_URL": os.environ.get("IMAGEPIPE_GIT_URL") or _git_url(project)})
    STATE_DIR.mkdir(exist_ok=True)
    if healthy(api_url):
        print(f"using the Prefect server already at {api_url}")
    else:
        server = start_server(args.port, env, STATE_DIR / "server.log")
        (STATE_DIR / "server.pid").write_text(str(server.pid))
        print(f"starting a Prefect server on {api_url} (log: .prefect/server.log)")
        wait_healthy(api_url, server, 300, STATE_DIR / "server.log")
    create_pool(env)
    worker = start_worker(env, STATE_DIR / "worker.log", project)
    (STATE_DIR / "worker.pid").write_text(str(worker.pid))
    print(f"worker {worker.pid} polls pool {POOL!r} (log: .prefect/worker.log)")
    deploy(project, env)
    print(f"deployed {DEPLOYMENT} (its schedule is off); triggering one run now")
    run = trigger_and_watch(api_url, json.loads(args.params), args.timeout)
    print(f"flow run {run.name} ({run.id}): {run.state.type.value}"
          f"{': ' + run.state.message if run.state.message else ''}")
    print(f"UI: http://127.0.0.1:{args.port}  stop: python -m flows.deploy --stop")
    return 0 if run.state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
