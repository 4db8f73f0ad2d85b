"""Which registration moves `challenger`: the environment DVC gives a stage tells a queued or
--temp experiment (run in DVC's temporary copy, DVC_ROOT the project) from a workspace run
(the sweep itself, through real DVC and MLflow: tests/integration/test_dvc_experiments.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.tracking.register import experiment_run


def test_only_an_experiment_in_dvcs_temporary_copy_leaves_challenger_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "celery" / "tmpab12"
    copy.mkdir(parents=True)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert experiment_run(project) == (None, False)  # dvc repro, imagepipe run
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert experiment_run(project) == (None, False)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-low")
    assert experiment_run(project) == ("lr-low", False)  # a workspace `dvc exp run`
    assert experiment_run(copy) == ("lr-low", True)  # queued or --temp
