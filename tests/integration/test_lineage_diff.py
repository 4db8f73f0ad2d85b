"""A run from a dirty tree keeps the diff it ran with (git diff HEAD, untracked files listed) as
an artifact of its MLflow run; a run from a clean tree has none: its commit says it all."""

from __future__ import annotations

import subprocess
from pathlib import Path

from stages.core.door import run_stage
from stages.core.lineage import DIFF_ARTIFACT
from tests.integration.tracking_kit import write_dvc_yaml

STAGE = {"cmd": "python -m stages.evaluate", "deps": ["inputs.txt"], "params": ["evaluate"],
         "metrics": [{"metrics/eval.json": {"cache": False}}]}


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)


def runs_named(root: Path, name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(root / 'mlflow.db').as_posix()}")
    exp = client.get_experiment_by_name("imagepipe")
    return [r for r in client.search_runs([exp.experiment_id], order_by=["start_time ASC"])
            if r.info.run_name == name], client


def test_a_dirty_run_keeps_its_diff_and_a_clean_one_has_none(project: Path) -> None:
    write_dvc_yaml(project, {"evaluate": STAGE})
    (project / "inputs.txt").write_text("v1\n")
    (project / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/mlartifacts/\n/metrics/\n")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "init")

    def body() -> None:
        (project / "metrics").mkdir(exist_ok=True)
        (project / "metrics" / "eval.json").write_text('{"accuracy": 0.5}')

    (project / "inputs.txt").write_text("v2: what actually ran\n")
    (project / "new_module.py").write_text("X = 1\n")  # untracked, not ignored
    assert run_stage("evaluate", body) == 0
    git(project, "add", "-A")
    git(project, "commit", "-qm", "the change, committed")
    assert run_stage("evaluate", body) == 0

    (dirty, clean), client = runs_named(project, "evaluate")
    assert dirty.data.tags["git.dirty"] == "true" and clean.data.tags["git.dirty"] == "false"
    folder = DIFF_ARTIFACT.rsplit("/", 1)[0]
    assert [a.path for a in client.list_artifacts(dirty.info.run_id, folder)] == [DIFF_ARTIFACT]
    local = client.download_artifacts(dirty.info.run_id, DIFF_ARTIFACT, str(project / "dl"))
    text = Path(local).read_text()
    assert "+v2: what actually ran" in text and "-v1" in text
    assert "#   new_module.py" in text
    assert client.list_artifacts(clean.info.run_id, folder) == []
