"""Fixtures of the tracking and registry tests (see tracking_kit.py): a real `mlflow server`
on 127.0.0.1 for the session, a tiny project folder as the cwd, a tiny `export` stage.
Nothing here is autouse: other integration tests are not touched."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.tracking_kit import (
    EXPORT_STAGE,
    REPO,
    MlflowServer,
    labels_of,
    registration,
    save_tiny,
    start_mlflow_server,
    tiny_images,
    tiny_model,
    write_dvc_yaml,
    write_target,
)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path
                  ) -> Iterator[MlflowServer]:
    """One server for the session (a test that kills it restarts it before it returns)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), empty_mlflow_db)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlflow.db with MLflow's tables created: creating them takes 5-8 s on the shared
    machine, so each project starts from a copy (the first project still creates it the way
    a fresh checkout does, through stages.core.tracking)."""
    from stages.core.tracking import Store

    root = tmp_path_factory.mktemp("mlflow-db")
    (root / "dvc.yaml").write_text("stages: {}\n")
    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        Store.connect(root)
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
    return root / "mlflow.db"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Path:
    """An empty project (params.yaml of the repo, no dvc.yaml yet) as the cwd, tracking on,
    on the SQLite default; no pipeline id or run id inherited from the test runner."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    monkeypatch.chdir(root)
    monkeypatch.setenv("IMAGEPIPE_TRACKING", "1")
    for var in ("MLFLOW_TRACKING_URI", "IMAGEPIPE_PIPELINE_ID", "IMAGEPIPE_FLOW_RUN_ID",
                "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.fixture(params=["sqlite", "server"])
def backend(request: pytest.FixtureRequest, project: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs once on the SQLite default and once against the real server (with its own
    experiment there, so tests sharing the server do not see each other's runs)."""
    if request.param == "server":
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"t-{request.node.name}-{time.time_ns()}")
        return server.uri
    return f"sqlite:///{(project / 'mlflow.db').as_posix()}"


@pytest.fixture
def tiny_export(project: Path) -> Callable[..., int]:
    """export(kind, parity=True) -> exit code: runs the real stage door for an `export` stage
    whose body writes a tiny model of that kind (and export's metrics), so the door logs and
    registers it exactly as for `dvc repro export`. The target set (data/target) is written
    on the first call, labelled by the 'good' model."""
    from stages.core.door import run_stage
    from stages.core.tracking import Parity, Registration
    from stages.params import load_params

    write_dvc_yaml(project, {"export": EXPORT_STAGE})
    images = tiny_images(64)
    write_target(project / "data" / "target", labels_of(tiny_model("good"), images), images)

    def export(kind: str, parity: bool = True) -> int:
        # finetuned.pt is the stage's input: it exists before the stage, as under DVC.
        save_tiny(tiny_model(kind), project / "models" / "finetuned.pt",
                  project / "models" / "model.onnx")

        def body() -> Registration:
            from stages.core.io import write_json

            diff = 1e-6 if parity else 0.5
            write_json(project / "metrics" / "export.json",
                       {"gate_passed": parity, "max_abs_diff": diff,
                        "mlflow_run_id_seen": os.environ.get("MLFLOW_RUN_ID")})
            return registration(
                project / "models" / "model.onnx", project / "models" / "finetuned.pt",
                Parity(passed=parity, max_abs_diff=diff, top1_agreement=1.0, atol=1e-4,
                       images=64, rtol=1e-3),
                load_params(project / "params.yaml").registry.model_name,
                project / "data" / "target")

        return run_stage("export", body)

    return export
