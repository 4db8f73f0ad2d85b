"""Real DVC on a copy of the project: repro runs only what changed, experiments, remotes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from stages.core.dataset import file_sha256
from tests.helpers import dvc, git, project_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = project_copy(tmp_path_factory.mktemp("project"))
    first = dvc(root, "repro", "augment").stdout
    assert "Running stage 'ingest'" in first and "Running stage 'augment'" in first
    return root


def test_second_repro_does_nothing(project: Path) -> None:
    out = dvc(project, "repro", "augment").stdout
    assert "Running stage" not in out
    assert "didn't change" in out or "up to date" in out


def test_changing_copies_reruns_augment_alone(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["augment"]["copies"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro", "augment").stdout
    assert "Running stage 'augment'" in out and "Running stage 'ingest'" not in out
    git(project, "add", "-A")
    git(project, "commit", "-qm", "one copy")


def test_exp_run_with_set_param_is_listed(project: Path) -> None:
    dvc(project, "exp", "run", "-S", "augment.copies=3", "augment")
    shown = dvc(project, "exp", "show", "--csv", "--no-pager").stdout
    assert any(",3," in line for line in shown.splitlines()[1:]), shown


def test_push_then_pull_gives_the_same_bytes(project: Path, tmp_path: Path) -> None:
    dvc(project, "remote", "add", "-d", "-f", "folder", str(tmp_path / "remote"))
    dvc(project, "push", "--with-deps", "augment")
    files = [f for d in ("data/source", "data/augmented") for f in (project / d).rglob("*")
             if f.is_file()]
    assert any(f.parent.name == "shards" for f in files)  # the image shards are among them
    before = {f.relative_to(project): file_sha256(f) for f in files}
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data")
    dvc(project, "pull", "--with-deps", "augment")
    assert {p: file_sha256(project / p) for p in before} == before
    assert sorted(f.relative_to(project) for d in ("data/source", "data/augmented")
                  for f in (project / d).rglob("*") if f.is_file()) == sorted(before)
