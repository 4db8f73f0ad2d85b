"""The pure parts of tracking and the promotion gate: what dvc.yaml declares, numbers out of
metrics and epoch tables, the parity verdict, the decision rule, the store URI. No MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stages.core import tracking
from stages.registry import decide

REPO = Path(__file__).resolve().parents[2]


def test_stage_decl_reads_every_dvc_yaml_form(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("""
stages:
  train:
    cmd: x
    deps: [a.py, data/target]
    params: [seed, finetune, {params.yaml: [export.opset]}, {other.yaml: [ignored]}]
    outs: [models/m.pt, {checkpoints/c: {persist: true}}]
    metrics: [{metrics/m.json: {cache: false}}]
    plots: [{plots/h.csv: {x: epoch}}, plots/c.png]
""")
    d = tracking.stage_decl(tmp_path, "train")
    assert d is not None
    assert d.deps == ["a.py", "data/target"]
    assert d.params == ["seed", "finetune", "export.opset"]
    assert d.outs == ["models/m.pt", "checkpoints/c"]
    assert d.metrics == ["metrics/m.json"] and d.plots == ["plots/h.csv", "plots/c.png"]
    assert tracking.stage_decl(tmp_path, "predict") is None  # not a stage: not tracked


def test_epoch_table_becomes_stepped_metrics_grouped_by_text_columns(tmp_path: Path) -> None:
    table = tmp_path / "finetune.csv"
    table.write_text("phase,epoch,val_acc,note\nhead,1,0.5,\nhead,2,0.6,\nfull,1,0.7,\n")
    got = tracking.per_epoch_metrics(table)
    # epochs repeat across phases: the row number is the step
    assert ("finetune/head/val_acc", 0.6, 1) in got and ("finetune/full/val_acc", 0.7, 2) in got
    same = tmp_path / "pretrain.csv"
    same.write_text("phase,epoch,loss\npretrain,1,2.0\npretrain,2,1.0\n")
    assert tracking.per_epoch_metrics(same) == [("pretrain/loss", 2.0, 1), ("pretrain/loss", 1.0, 2)]
    confusion = tmp_path / "confusion.csv"
    confusion.write_text("actual,predicted\n1,1\n")
    assert tracking.per_epoch_metrics(confusion) == []  # no epoch column: an artifact only


def test_metrics_keep_numbers_only_under_dotted_keys() -> None:
    got = tracking.flat_numbers({"acc": 0.9, "ok": True, "name": "x", "per_class": {"5": {"f1": 1}},
                                 "list": [1, 2]})
    assert got == {"acc": 0.9, "per_class.5.f1": 1.0}


@pytest.mark.parametrize(("flags", "passed"), [
    ({"gate_passed": True, "max_abs_diff": 2e-6}, "true"),
    ({"gate_passed": False}, "false"),
    ({"max_abs_diff": 0.0}, "unknown"),
])
def test_parity_verdict_from_export_metrics(flags: dict[str, object], passed: str) -> None:
    assert tracking.parity_of(flags)["parity_passed"] == passed


def test_gate_decision_rule() -> None:
    assert decide(0.5, None, "true", 0.0)[0]  # first version
    assert decide(0.8, 0.8, "true", 0.0)[0]  # a tie promotes the newer model
    assert not decide(0.8, 0.8, "true", 0.01)[0]
    assert decide(0.81, 0.8, "true", 0.01)[0]
    assert not decide(1.0, 0.1, "false", 0.0)[0] and not decide(1.0, None, "unknown", 0.0)[0]


def test_default_store_is_sqlite_at_the_project_root(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tracking.project_root(tmp_path / "sub")
    assert root == tmp_path.resolve()
    assert tracking.tracking_uri(root) == f"sqlite:////{str(tmp_path.resolve()).lstrip('/')}/mlflow.db"
    assert tracking.redact("https://ann:pw@mlflow.example:5000") == "https://ann:***@mlflow.example:5000"


def test_pipeline_id_names_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEPIPE_PIPELINE_ID", "abc")
    assert tracking.group_key()[0] == "pipeline:abc"
    monkeypatch.delenv("IMAGEPIPE_PIPELINE_ID")
    assert tracking.group_key()[0].startswith("process:")  # pytest is not under dvc


def test_untracked_commands_never_import_mlflow(tmp_path: Path) -> None:
    """A command dvc.yaml does not declare (predict) and tracking switched off both leave
    mlflow unimported: nothing happens at import time."""
    code = ("import os, sys\nfrom stages.core.errors import run_stage\n"
            "assert run_stage('predict', lambda: None) == 0\n"
            "os.environ['IMAGEPIPE_TRACKING'] = '0'\n"
            "assert run_stage('ingest', lambda: None) == 0\n"
            "print('mlflow' in sys.modules)")
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: x\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
