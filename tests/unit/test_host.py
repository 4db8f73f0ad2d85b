"""project_root(): the nearest DVC project, and the real one from DVC's temporary experiment
workspaces (where a queued experiment's stages run and must find the project's mlflow.db)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.host import project_root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "stages" / "core").mkdir(parents=True)
    return root


def test_nearest_project_at_or_above(project: Path) -> None:
    assert project_root(project) == project.resolve()
    assert project_root(project / "stages" / "core") == project.resolve()


def test_no_project_answers_the_start(tmp_path: Path) -> None:
    assert project_root(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("queue", ["celery", "standalone"])
def test_experiment_workspace_answers_the_real_project(project: Path, queue: str) -> None:
    # The layout of dvc/repo/experiments/queue/{celery,tempdir}.py: a git clone of the project
    # (dvc.yaml and .dvc/ included) in <project>/.dvc/tmp/exps/<queue>/tmpXXXX.
    workspace = project / ".dvc" / "tmp" / "exps" / queue / "tmpab12cd"
    (workspace / ".dvc").mkdir(parents=True)
    (workspace / "dvc.yaml").write_text("stages: {}\n")
    (workspace / "stages").mkdir()
    assert project_root(workspace) == project.resolve()
    assert project_root(workspace / "stages") == project.resolve()


def test_project_in_a_git_subfolder_inside_a_workspace(project: Path) -> None:
    # A DVC project in a monorepo's subfolder: the clone holds the whole git repo, and the
    # project is the subfolder of the original, not of the clone.
    sub = project / "ml"
    (sub / ".dvc").mkdir(parents=True)
    workspace_sub = sub / ".dvc" / "tmp" / "exps" / "celery" / "tmpx" / "ml"
    (workspace_sub / ".dvc").mkdir(parents=True)
    assert project_root(workspace_sub) == sub.resolve()


def test_a_folder_merely_named_exps_is_not_a_workspace(tmp_path: Path) -> None:
    root = tmp_path / "tmp" / "exps" / "proj"
    (root / ".dvc").mkdir(parents=True)
    assert project_root(root) == root.resolve()
