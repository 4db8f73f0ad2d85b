"""`imagepipe run` as a user types it, in a copy of this project on the embedded default: every
stage through export, then the promotion gate; the registry afterwards (champion, lineage tags,
an ONNX file that names its run); and the exit codes of `imagepipe run` (0, 2, 75).

Training runs the default epochs (the digits' finetune is seconds long; a 1 + 4-epoch finetune
at the default lr 0.05 overshoots, 0.51 val accuracy, so cutting it tested luck); augmented
copies and quantizing are cut (-S, as a user would try a change; augment still runs, and
tests/integration/test_dvc_data_stages.py makes copies). The stages, the flow, DVC, the MLflow
store and the registry are all the real ones. The module's runs share one PREFECT_HOME: the
first creates Prefect's database (about 15 s), the others reuse it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

from tests.helpers import dvc, git, project_copy

pytestmark = pytest.mark.slow
MODEL = "imagepipe-classifier"
SHORT = ["-S", "export.quantize_int8=false", "-S", "augment.copies=0"]


def imagepipe(project: Path, home: Path, *args: str, extra_env: dict[str, str] | None = None,
              timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "IMAGEPIPE_TRACKING", "PREFECT_API_URL")}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PREFECT_HOME": str(home), "IMAGEPIPE_GPU_LOCK_DIR": str(home / "locks"),
                **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "commands.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PREFECT_HOME of this module's runs (one at a time: they share its database)."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, home: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("e2e")
    project = project_copy(root / "project")
    done = imagepipe(project, home, "run", *SHORT)
    assert done.returncode == 0, done.stderr[-6000:]
    return {"project": project, "home": home, "stderr": done.stderr}


def client(project: Path) -> Any:
    from mlflow import MlflowClient

    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_run_ends_with_a_champion_that_names_its_data_code_and_run(ran: dict[str, Any]) -> None:
    project = ran["project"]
    mv = client(project).get_model_version_by_alias(MODEL, "champion")
    assert str(mv.version) == "1"
    tags = mv.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert tags["git.commit"] == head
    assert tags["parity_passed"] == "true"
    assert tags["prefect.flow_run_id"]  # the flow's run, not a plain dvc repro
    manifest = json.loads((project / "data/target/manifest.json").read_text())
    assert tags["data.target.images.sha256"] == manifest["sha256"]["images.npy"]
    assert tags["promotion.decision"] == "promoted"
    # The file serving gets is the one registered: its sha256 leads to the version and so to the
    # run that exported it. The run id is not in the file (its bytes are its inputs' function).
    onnx_path = project / "models/model.onnx"
    assert tags["onnx.sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert tags["imagepipe.run_id"] == mv.run_id
    meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert "mlflow_run_id" not in meta
    assert json.loads(meta["classes"]) == ["5", "6", "7", "8", "9"]


def test_the_model_learned_the_target_task(ran: dict[str, Any]) -> None:
    # Five digit classes, chance 0.2: a pipeline that trained at all is far above it.
    metrics = json.loads((ran["project"] / "metrics/evaluate.json").read_text())
    assert metrics["accuracy"] > 0.8, metrics


def test_second_run_runs_no_stage_and_still_checks_promotion(ran: dict[str, Any]) -> None:
    again = imagepipe(ran["project"], ran["home"], "run", *SHORT)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "to run:" not in again.stderr, again.stderr[-4000:]
    status = dvc(ran["project"], "status", "--json")
    assert json.loads(status.stdout or "{}") == {}
    versions = client(ran["project"]).search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1  # nothing retrained, nothing registered again


def test_the_readme_s_sharing_recipe_gives_a_fresh_clone_the_same_outputs(
        ran: dict[str, Any], tmp_path: Path) -> None:
    """README, "Sharing data and models": commit what the run changed, push to a folder
    remote, then on "another machine" clone and pull: nothing to rerun, the same bytes. (In a
    copy of the run's project, so the other tests' HEAD stays the one the run tagged.)"""
    import shutil

    here, remote, there = tmp_path / "here", tmp_path / "store", tmp_path / "there"
    shutil.copytree(ran["project"], here, symlinks=True)
    git(here, "add", "-A")
    git(here, "commit", "-q", "-m", "the run's outputs")
    dvc(here, "remote", "add", "-d", "store", str(remote))
    dvc(here, "remote", "modify", "store", "verify", "true")
    git(here, "commit", "-q", "-am", "a DVC remote")
    dvc(here, "push")
    git(tmp_path, "clone", "-q", str(here), str(there))
    dvc(there, "pull")
    assert json.loads(dvc(there, "status", "--json").stdout or "{}") == {}
    for rel in ("models/model.onnx", "models/finetuned.pt", "data/target/manifest.json"):
        assert (there / rel).read_bytes() == (here / rel).read_bytes(), rel


def test_bad_input_exits_2_before_any_stage(tmp_path: Path, home: Path) -> None:
    project = project_copy(tmp_path / "project")
    params = (project / "params.yaml").read_bytes()
    typo = imagepipe(project, home, "run", "--stages", "pretrian")
    assert typo.returncode == 2 and "unknown stage 'pretrian'" in typo.stderr, typo.stderr
    assert "Traceback" not in typo.stderr
    for override, named in (("pretrain.epochs=-1", "pretrain.epochs"),
                            ("pretrain.epoch=3", "pretrain.epoch"),
                            ("pretrain.epochs=[1", "pretrain.epochs")):
        bad = imagepipe(project, home, "run", "-S", override)
        assert bad.returncode == 2, bad.stderr[-3000:]
        assert named in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-3000:]
        # Refused before Prefect's API starts: no flow run, params.yaml as it was.
        assert "Flow run" not in bad.stderr, bad.stderr[-3000:]
        assert (project / "params.yaml").read_bytes() == params
    assert not (project / "data").exists()


def test_tracking_server_down_exits_75(tmp_path: Path, home: Path) -> None:
    project = project_copy(tmp_path / "project")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # No HTTP retries inside each probe (the stage still makes its 3 attempts): the default 2
    # add seconds of waiting that test nothing more.
    down = imagepipe(project, home, "run", "--stages", "ingest", "--retries", "0",
                     "--no-promote",
                     extra_env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
                                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert down.returncode == 75, down.stderr[-3000:]
