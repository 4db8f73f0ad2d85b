"""Promote refuses a challenger DVC did not keep: export registers its version while DVC's
run of the stage is still going, and a run that then fails (a full disk during the cache copy;
here, an output the stage never writes) leaves a registered challenger that is no stage's
output. Real `dvc repro`, real registration (SQLite), real promote."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from commands.promote import main as promote_main
from stages.core.tracking.remote import AGENT_ENV
from tests.helpers import dvc
from tests.integration.tracking_kit import (
    EXPORT_STAGE,
    REPO,
    registration,
    save_tiny,
    tiny_model,
    write_dvc_yaml,
)

pytestmark = pytest.mark.slow


def export_stage() -> None:
    """The export stage's command here: writes the 'good' tiny model as models/model.onnx and
    registers it through the real stage door (tracking in the stage's process)."""
    from stages.core.door import run_stage
    from stages.core.io import write_json
    from stages.core.tracking import Parity, Registration
    from stages.params import load_params

    root = Path.cwd()
    save_tiny(tiny_model("good"), root / "scratch.pt", root / "models" / "model.onnx")

    def body() -> Registration:
        write_json(root / "metrics" / "export.json", {"gate_passed": True})
        return registration(Path("models/model.onnx"), Path("models/finetuned.pt"),
                            Parity(passed=True, max_abs_diff=1e-6, top1_agreement=1.0,
                                   atol=1e-4, images=64, rtol=1e-3),
                            load_params(root / "params.yaml").registry.model_name,
                            Path("data/target"))

    sys.exit(run_stage("export", body))


def promote(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert promote_main(["--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_challenger_whose_dvc_run_failed_is_refused_until_dvc_keeps_one(
        project: Path, tiny_export: Callable[..., int], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # tiny_export wrote data/target and models/finetuned.pt's parents; the stage writes the rest.
    save_tiny(tiny_model("good"), project / "models" / "finetuned.pt", project / "scratch.onnx")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv(AGENT_ENV, "0")
    cmd = "python -c 'from tests.integration.test_promote_dvc_kept import export_stage as e; e()'"
    # An output the stage never writes: DVC fails the run after the stage registered v1.
    failing = {**EXPORT_STAGE, "cmd": cmd, "outs": ["models/model.onnx", "models/never.bin"]}
    write_dvc_yaml(project, {"export": failing})
    dvc(project, "init", "--no-scm", "-q")
    with pytest.raises(AssertionError, match="never.bin"):
        dvc(project, "repro", "export")
    assert not (project / "dvc.lock").exists()
    refused = promote(capsys)
    assert not refused["promoted"], refused
    assert "DVC did not keep the challenger v1" in str(refused["reason"])
    assert "dvc repro export" in str(refused["reason"])

    write_dvc_yaml(project, {"export": {**EXPORT_STAGE, "cmd": cmd}})
    shutil.rmtree(project / ".dvc" / "tmp", ignore_errors=True)
    dvc(project, "repro", "export")  # v2, and dvc.lock records its model
    kept = promote(capsys)
    assert kept["promoted"] and kept["challenger_version"] == "2", kept
