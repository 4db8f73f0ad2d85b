"""The pure parts of tracking and the promotion gate: what dvc.yaml declares, numbers out of
metrics and epoch tables, the parity verdict, the decision rule, the store URI, the registration
a stage hands over, and an import that loads no MLflow. No MLflow server."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from commands.promote import decide
from stages.core.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, BadInput
from stages.core.host import FLOW_RUN_ENV, project_root
from stages.core.lineage import path_hashes
from stages.core.tracking import Parity, Registration
from stages.core.tracking.declared import stage_decl
from stages.core.tracking.grouping import group_key
from stages.core.tracking.metrics import flat_numbers, per_epoch_metrics
from stages.core.tracking.stagerun import StageRun
from stages.core.tracking.store import Store, redact, tracking_uri

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
    d = stage_decl(tmp_path, "train")
    assert d is not None
    assert d.deps == ["a.py", "data/target"]
    assert d.params == ["seed", "finetune", "export.opset"]
    assert d.outs == ["models/m.pt", "checkpoints/c"]
    assert d.metrics == ["metrics/m.json"] and d.plots == ["plots/h.csv", "plots/c.png"]
    assert stage_decl(tmp_path, "predict") is None  # not a stage: not tracked


def test_epoch_table_becomes_stepped_metrics_grouped_by_text_columns(tmp_path: Path) -> None:
    table = tmp_path / "finetune.csv"
    table.write_text("phase,epoch,val_acc,note\nhead,1,0.5,\nhead,2,0.6,\nfull,1,0.7,\n")
    got = per_epoch_metrics(table)
    # epochs repeat across phases: the row number is the step
    assert ("finetune/head/val_acc", 0.6, 1) in got and ("finetune/full/val_acc", 0.7, 2) in got
    same = tmp_path / "pretrain.csv"
    same.write_text("phase,epoch,loss\npretrain,1,2.0\npretrain,2,1.0\n")
    assert per_epoch_metrics(same) == [("pretrain/loss", 2.0, 1), ("pretrain/loss", 1.0, 2)]
    confusion = tmp_path / "confusion.csv"
    confusion.write_text("actual,predicted\n1,1\n")
    assert per_epoch_metrics(confusion) == []  # no epoch column: an artifact only


def test_metrics_keep_numbers_only_under_dotted_keys() -> None:
    got = flat_numbers({"acc": 0.9, "ok": True, "name": "x", "per_class": {"5": {"f1": 1}},
                                 "list": [1, 2]})
    assert got == {"acc": 0.9, "per_class.5.f1": 1.0}


def _registration(passed: bool = True) -> Registration:
    return Registration(onnx_path=Path("models/model.onnx"), torch_path=Path("models/ft.pt"),
                        parity=Parity(passed=passed, max_abs_diff=2.5e-6, top1_agreement=1.0,
                                      atol=1e-4, images=40, rtol=1e-3),
                        model_name="m", dataset=Path("data/target"), serving_max_images=1024,
                        input_example=None, output_example=None)


@pytest.mark.parametrize(("passed", "text"), [(True, "true"), (False, "false")])
def test_parity_verdict_becomes_version_tags(passed: bool, text: str) -> None:
    tags = _registration(passed).parity.tags()
    assert tags["parity_passed"] == text  # what the promotion gate reads
    assert tags["parity_max_abs_diff"] == "2.5e-06" and tags["parity_images"] == "40"
    assert tags["parity_rtol"] == "0.001"
    with pytest.raises(dataclasses.FrozenInstanceError):
        _registration().model_name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("failure", [EXIT_TRANSIENT, EXIT_BAD_INPUT])
def test_tracking_failure_after_a_good_body_says_nothing_was_registered(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], failure: int) -> None:
    run = StageRun("export", tmp_path, {})
    run.failure = (failure, "tracking at http://x unreachable")  # as `start` leaves it
    assert run.finish(0, _registration()) == failure
    assert "no model version was registered" in capsys.readouterr().err
    other = StageRun("evaluate", tmp_path, {})
    other.failure = (EXIT_TRANSIENT, "down")
    assert other.finish(0, {"not": "a registration"}) == EXIT_TRANSIENT
    assert "registered" not in capsys.readouterr().err
    assert other.finish(EXIT_BAD_INPUT) == EXIT_BAD_INPUT  # the body's own failure wins


def test_gate_decision_rule() -> None:
    # Above the majority-class floor throughout (test_evaluate_stats.py tests the floor).
    floor = {"ci": (0.45, 0.99), "majority": (0.2, "a")}
    assert decide(0.5, None, "true", 0.0, **floor)[0]  # first version
    assert decide(0.8, 0.8, "true", 0.0, **floor)[0]  # a tie promotes the newer model
    assert not decide(0.8, 0.8, "true", 0.01, **floor)[0]
    assert decide(0.81, 0.8, "true", 0.01, **floor)[0]
    assert not decide(1.0, 0.1, "false", 0.0, **floor)[0]
    assert not decide(1.0, None, "unknown", 0.0, **floor)[0]


def test_default_store_is_sqlite_at_the_project_root(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = project_root(tmp_path / "sub")
    assert root == tmp_path.resolve()
    assert tracking_uri(root) == f"sqlite:////{str(tmp_path.resolve()).lstrip('/')}/mlflow.db"
    assert redact("https://ann:pw@mlflow.example:5000") == "https://ann:***@mlflow.example:5000"


def test_flow_run_id_names_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FLOW_RUN_ENV, "abc")
    assert group_key() == "pipeline:abc"
    monkeypatch.delenv(FLOW_RUN_ENV)
    monkeypatch.setenv("IMAGEPIPE_PIPELINE_ID", "gone")  # the old variable groups nothing
    assert group_key().startswith("process:")  # pytest is not under dvc


def test_untracked_commands_never_import_mlflow(tmp_path: Path) -> None:
    """A command dvc.yaml does not declare (predict) and tracking switched off both leave
    mlflow unimported: nothing happens at import time."""
    code = ("import os, sys\nfrom stages.core.door import run_stage\n"
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


def test_importing_tracking_loads_nothing_heavy() -> None:
    """The facade and the Registration export imports: no mlflow, yaml, pydantic or psutil."""
    code = ("import sys\nimport stages.core.tracking\n"
            "from stages.core.tracking.registration import Registration\n"
            "print(sorted(m for m in ('mlflow', 'yaml', 'pydantic', 'psutil', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin",
                         "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_record_epoch_appends_a_line_only_when_a_run_listens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from stages.core.epochlog import EPOCH_LOG_ENV, record_epoch

    monkeypatch.delenv(EPOCH_LOG_ENV, raising=False)
    record_epoch("pretrain", {"epoch": 1})  # nobody listens: nothing written anywhere
    assert list(tmp_path.iterdir()) == []
    log = tmp_path / "epochs.jsonl"
    monkeypatch.setenv(EPOCH_LOG_ENV, str(log))
    record_epoch("head", {"epoch": 1, "val_acc": 0.5, "val_loss": None})
    record_epoch("head", {"epoch": 2, "val_acc": 0.6, "val_loss": None})
    lines = log.read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert json.loads(lines[0]) == {"epoch": 1, "val_acc": 0.5, "val_loss": None,
                                    "phase": "head"}
    monkeypatch.setenv(EPOCH_LOG_ENV, str(tmp_path / "missing" / "x.jsonl"))
    record_epoch("head", {"epoch": 3})  # an unwritable file never stops training


def test_live_epoch_keys_and_steps_are_those_of_the_plots_table(tmp_path: Path) -> None:
    """The live tail and the end-of-stage table name an epoch alike, so the end logs only
    what the tail missed (finetune's two phases in one table, scratch in its own)."""
    from stages.core.tracking.live import row_metrics

    rows = [{"phase": "head", "epoch": 1, "train_loss": 1.0, "val_acc": 0.5, "lr": 0.01},
            {"phase": "head", "epoch": 2, "train_loss": 0.8, "val_acc": 0.6, "lr": 0.01},
            {"phase": "full", "epoch": 3, "train_loss": 0.5, "val_acc": 0.7, "lr": 0.001}]
    scratch = [{"phase": "scratch", "epoch": 1, "train_loss": 2.0, "val_acc": 0.3, "lr": 0.1}]
    (tmp_path / "finetune.csv").write_text("phase,epoch,train_loss,val_acc,lr\n" + "".join(
        f"{r['phase']},{r['epoch']},{r['train_loss']},{r['val_acc']},{r['lr']}\n" for r in rows))
    (tmp_path / "scratch.csv").write_text("phase,epoch,train_loss,val_acc,lr\nscratch,1,2.0,0.3,0.1\n")
    stems = {"finetune", "scratch"}
    live = {(k, s): v for r in rows + scratch for k, v, s in row_metrics("finetune", r, stems)}
    table = {(k, s): v for f in ("finetune.csv", "scratch.csv")
             for k, v, s in per_epoch_metrics(tmp_path / f)}
    assert live == table
    assert ("finetune/full/val_acc", 3) in live and ("scratch/val_acc", 1) in live
    assert row_metrics("pretrain", {"phase": "pretrain", "epoch": 4, "val_acc": None,
                                    "ok": True}, {"pretrain"}) == []


def test_the_parent_run_name_says_which_pipeline_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.core.tracking.parentrun import parent_label, parent_name

    tags = {"git.commit": "0123456789abcdef", "git.dirty": "true"}
    for var in ("DVC_EXP_NAME", FLOW_RUN_ENV):
        monkeypatch.delenv(var, raising=False)
    assert parent_label({}) == "local"
    assert parent_label(tags) == "0123456+dirty"
    monkeypatch.setenv(FLOW_RUN_ENV, "5f2c9a1e-0000-4000-8000-000000000000")
    assert parent_label(tags) == "flow 5f2c9a1e"
    monkeypatch.setenv("DVC_EXP_NAME", "exp-bfe64")
    assert parent_label(tags) == "exp-bfe64"
    assert parent_name(tags).startswith("pipeline exp-bfe64 20")


def test_an_agent_log_is_kept_only_when_it_holds_a_warning_or_a_traceback(tmp_path: Path) -> None:
    from stages.core.tracking.agent import _drop_log_if_quiet

    logs = {name: tmp_path / f"{name}.log" for name in ("quiet", "warned", "crashed")}
    logs["quiet"].write_text("2026-12-01 07:00:00 INFO imagepipe.tracking.agent: listening\n")
    logs["warned"].write_text(logs["quiet"].read_text() + "2026-12-01 07:00:01 WARNING "
                              "imagepipe.tracking.agent: a stage dropped its connection\n")
    logs["crashed"].write_text("Traceback (most recent call last):\n  File ...\n")
    for path in logs.values():
        _drop_log_if_quiet(path)
    assert {name: path.exists() for name, path in logs.items()} == {
        "quiet": False, "warned": True, "crashed": True}


def test_dvc_hashes_of_a_relative_root_are_those_of_its_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC's ignore filter takes absolute paths only: under a .dvcignore, a relative root once
    gave no hashes at all."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("a\n")
    (tmp_path / "f").write_text("b\n")
    (tmp_path / ".dvcignore").write_text("*.tmp\n")
    monkeypatch.chdir(tmp_path)
    absolute = path_hashes(tmp_path, ["d", "f", "missing"])
    assert set(absolute) == {"d", "f"} and absolute["d"].endswith(".dir")
    (tmp_path / "d" / "scratch.tmp").write_text("ignored\n")
    assert path_hashes(Path("."), ["d", "f"]) == absolute


def test_refused_credentials_are_bad_input_at_once_with_the_servers_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 401 when connecting: exit 2 naming the credentials and what the server said (one
    translation of store failures, Store.call's), not the retries of an outage."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"bad token for alice"
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    try:
        with pytest.raises(BadInput, match="refused the credentials .*bad token for alice"):
            Store.connect(tmp_path)
    finally:
        server.shutdown()


def test_params_as_mlflow_params_a_stages_keys_or_all(tmp_path: Path) -> None:
    from stages.core.tracking.metrics import flat_params

    every = flat_params(REPO / "params.yaml")
    mine = flat_params(REPO / "params.yaml", ["seed", "finetune.head_epochs", "pretrain"])
    assert mine["seed"] == every["seed"]
    assert mine["finetune.head_epochs"] == every["finetune.head_epochs"]
    assert "finetune.full_epochs" not in mine and "finetune.full_epochs" in every
    assert {k for k in every if k.startswith("pretrain.")} <= set(mine)
    (tmp_path / "params.yaml").write_text("seed: [not a number\n")
    assert flat_params(tmp_path / "params.yaml") == {}  # the stage reports a bad file itself
