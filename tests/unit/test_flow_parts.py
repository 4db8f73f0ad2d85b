"""Parts of the Prefect flow that need no Prefect server: exit-code classification, the report,
GPU lock files, stage output plumbing."""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flows import dvcstage, report, slots
from stages.core import host


@pytest.mark.parametrize("count", [1, 2])
def test_local_gpu_slots_exclude_each_other(count: int, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEPIPE_GPU_LOCK_DIR", str(tmp_path))
    a_in, release_a, b_waits, b_in = (threading.Event() for _ in range(4))
    got: dict[str, int] = {}

    def first() -> None:
        with slots.local_gpu_slots(count, 1, on_wait=lambda _: None) as (index,):
            got["a"] = index
            a_in.set()
            release_a.wait(30)

    def second() -> None:
        with slots.local_gpu_slots(count, 1, on_wait=lambda _: b_waits.set()) as (index,):
            got["b"] = index
            b_in.set()

    a = threading.Thread(target=first)
    a.start()
    assert a_in.wait(30)
    b = threading.Thread(target=second)
    b.start()
    if count == 1:  # the one slot is held: the second must say it waits, and not get in
        assert b_waits.wait(30) and not b_in.is_set()
        release_a.set()
        assert b_in.wait(30) and got == {"a": 0, "b": 0}
    else:  # a free slot: the second gets the other one while the first still holds its
        assert b_in.wait(30) and not b_waits.is_set()
        assert {got["a"], got["b"]} == {0, 1}
        release_a.set()
    a.join()
    b.join()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert slots.device_env([1], 2).get("CUDA_VISIBLE_DEVICES") == "1"
    assert "CUDA_VISIBLE_DEVICES" not in slots.device_env([0], 1)


@pytest.mark.parametrize(("code", "kind"), [
    (75, dvcstage.StageTransient), (-9, dvcstage.StageTransient), (137, dvcstage.StageTransient),
    (2, dvcstage.StageBadInput), (1, dvcstage.StageError)])
def test_classify_by_the_stage_exit_code(code: int, kind: type) -> None:
    tail = ["Running stage 'train':", "train: error: no such file", "some other line",
            f"ERROR: failed to reproduce 'train': failed to run: python -m x, exited with {code}"]
    err = dvcstage.classify("train", 255, tail)
    assert type(err) is kind
    assert "train: error: no such file" in str(err)


def test_classify_dvc_own_failures() -> None:
    locked = dvcstage.classify("s", 1, ["ERROR: Unable to acquire lock. Most likely ..."])
    assert isinstance(locked, dvcstage.StageTransient)
    killed = dvcstage.classify("s", -15, ["Running stage 's':"])
    assert isinstance(killed, dvcstage.StageTransient) and "SIGTERM" in str(killed)
    broken = dvcstage.classify("s", 1, ["ERROR: 'dvc.yaml' is invalid"])
    assert type(broken) is dvcstage.StageError


EVALUATE = {"accuracy": 0.98765, "accuracy_ci_low": 0.97, "accuracy_ci_high": 0.995,
            "transfer_gain": 0.031, "transfer_gain_ci_low": 0.01, "transfer_gain_ci_high": 0.05,
            "transfer_verdict": "helped", "scratch_accuracy": 0.95, "ece": 0.021,
            "majority_accuracy": 0.1, "n_test": 360,
            **{f"per_class.c{i}.f1": 0.9 for i in range(110)}}


def test_report_puts_decision_and_headline_first_and_metrics_in_a_table() -> None:
    metrics = {"evaluate": EVALUATE, "export": {"gate_passed": True, "max_abs_diff": 1.2e-6,
                                                "top1_agreement": 1.0}}
    text = report.render(
        title="t", flow_run_id="f-1", stages={"ingest": {"outcome": "ran", "seconds": 1.5,
                                                        "attempts": 1}},
        overrides=["a.b: 1 -> 2"], metrics=metrics,
        decision={"promoted": False, "challenger_version": 3, "champion_version": 2,
                  "challenger_accuracy": 0.9, "champion_accuracy": 0.95, "reason": "worse",
                  "current_champion_version": "2", "challenger_run_id": "abc"},
        promotion_note="")
    lines = text.splitlines()
    assert lines[2] == "## Promotion" and lines[4].startswith("**not promoted**: challenger v3")
    assert "Reason: worse" in lines[4] and "Champion now: v2." in lines[4]
    head = "\n".join(lines[:20])  # the figures a reader wants, before stages and runs
    assert "| accuracy (target test, 360 images) | 0.9877 (95% CI [0.9700, 0.9950]) |" in head
    assert "| transfer gain over scratch | +0.0310 (95% CI [0.0100, 0.0500]): helped |" in head
    assert "| scratch accuracy (same data and budget) | 0.9500 |" in head
    assert "| ECE (expected calibration error) | 0.0210 |" in head
    assert "| ONNX parity | passed, max abs diff 1.2e-06, top1 agreement 1 |" in head
    assert "per_class" not in text and "table artifact `imagepipe-metrics`" in head
    assert text.index("## Promotion") < text.index("## Stages") < text.index("## MLflow runs")
    assert "mlflow runs search" not in text  # no such command
    assert "`mlflow ui`" in text and "`imagepipe lineage champion`" in text
    assert "- challenger_run_id: `abc`" in text and "| ingest | ran | 1.5 | 1 |" in text
    rows = report.metric_rows(metrics)
    assert len(rows) == len(EVALUATE) + 3
    assert {"file": "evaluate", "metric": "accuracy", "value": "0.9877"} in rows


def test_report_without_champion_or_metrics_says_so() -> None:
    text = report.render(title="t", flow_run_id=None, stages={}, overrides=[], metrics={},
                         decision={"promoted": True, "challenger_version": "1",
                                   "champion_version": None, "challenger_accuracy": 1.0,
                                   "reason": "first", "current_champion_version": "1"},
                         promotion_note="")
    assert "vs no champion" in text and "vNone" not in text
    assert "No `metrics/*.json` yet." in text and report.metric_rows({}) == []


def test_output_lines_reach_the_callers_context(tmp_path: Path) -> None:
    # Prefect's API URL and run context live in context variables: the reader threads of a
    # stage's output must see them, or their logs would start a second temporary server.
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller")
    seen: list[tuple[str, str]] = []
    done = dvcstage.run_killable([sys.executable, "-c", "print('a'); print('b')"], tmp_path,
                                 dict(os.environ), 30, lambda ln: seen.append((ln, var.get())))
    assert done.code == 0 and seen == [("a", "caller"), ("b", "caller")]


def test_child_env_puts_this_python_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin")
    env = dvcstage.child_env({"IMAGEPIPE_FLOW_RUN_ID": "x"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["IMAGEPIPE_FLOW_RUN_ID"] == "x"


def test_telemetry_is_off_wherever_the_user_left_it_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """One definition for the CLI's own process, the stages' and Prefect's environments; a value
    the user set is kept."""
    from commands import cli

    for var in host.TELEMETRY_OFF:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    want = {**host.TELEMETRY_OFF, "DO_NOT_TRACK": "0"}
    env = dvcstage.child_env()  # stages' and (flows/deploy.py) Prefect's server and worker
    assert {var: env[var] for var in want} == want
    with pytest.raises(SystemExit):
        cli.main(["lineage", "--help"])
    assert {var: os.environ[var] for var in want} == want


def test_a_stage_gets_all_the_slots_it_asks_for_or_waits(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Three GPUs; the first stage holds two, so a second asking for two must wait (holding
    # none: all or nothing), and gets two when the first lets go.
    monkeypatch.setenv("IMAGEPIPE_GPU_LOCK_DIR", str(tmp_path))
    a_in, release_a, b_waits, b_in = (threading.Event() for _ in range(4))
    got: dict[str, list[int]] = {}

    def first() -> None:
        with slots.local_gpu_slots(3, 2, on_wait=lambda _: None) as held:
            got["a"] = held
            a_in.set()
            release_a.wait(30)

    def second() -> None:
        with slots.local_gpu_slots(3, 2, on_wait=lambda _: b_waits.set()) as held:
            got["b"] = held
            b_in.set()

    a = threading.Thread(target=first)
    a.start()
    assert a_in.wait(30) and got["a"] == [0, 1]
    b = threading.Thread(target=second)
    b.start()
    assert b_waits.wait(30) and not b_in.is_set()
    with slots.local_gpu_slots(3, 1, on_wait=lambda _: None) as third:  # the free one is free
        assert third == [2]
    release_a.set()
    assert b_in.wait(30) and len(got["b"]) == 2
    a.join()
    b.join()


def test_granted_slots_map_to_the_devices_the_process_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert slots.device_env([0, 2], 3) == {"CUDA_VISIBLE_DEVICES": "4,6",
                                           "IMAGEPIPE_GPUS_GRANTED": "2"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU: left as the user set it
    assert slots.device_env([0], 1) == {"IMAGEPIPE_GPUS_GRANTED": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: no grant to announce
    assert slots.device_env([0], 1) == {}


def test_training_stages_ask_for_their_devices(tmp_path: Path) -> None:
    from flows import pipeline
    from tests.helpers import REPO, default_params, write_params

    raw = default_params()
    raw["pretrain"]["devices"] = 2
    raw["finetune"]["devices"] = 3  # the scratch stage trains with finetune's settings
    write_params(tmp_path / "params.yaml", raw)
    asked = {s: pipeline._gpus_wanted(tmp_path, s) for s in ("pretrain", "finetune", "scratch",
                                                              "evaluate")}
    assert asked == {"pretrain": 2, "finetune": 3, "scratch": 3, "evaluate": 0}
    assert pipeline._gpus_wanted(REPO / "flows", "pretrain") == 1  # no params.yaml there


def test_the_flow_logs_the_promotion_in_words() -> None:
    from commands.promote import said as _said

    kept = {"promoted": False, "model_name": "m", "challenger_version": "3",
            "reason": "version 3 is already champion", "current_champion_version": "3"}
    assert _said(kept) == "m v3 not promoted: version 3 is already champion (champion now: v3)"
    first = {**kept, "promoted": True, "reason": "no champion yet",
             "current_champion_version": None}
    assert _said(first).endswith("promoted: no champion yet (champion now: no champion)")


def test_nothing_to_promote_is_said_as_such() -> None:
    from commands.promote import said as _said
    from flows import report

    nothing = {"promoted": False, "model_name": "m", "challenger_version": None,
               "reason": "nothing to promote: registered model 'm' has no 'challenger' version",
               "current_champion_version": "2"}
    assert _said(nothing) == ("m: nothing to promote: registered model 'm' has no 'challenger' "
                              "version (champion now: v2)")
    text = report.render(title="t", flow_run_id=None, stages={}, overrides=[], metrics={},
                         decision=nothing, promotion_note="")
    assert "**nothing to promote**: nothing to promote: registered model 'm'" not in text
    assert "**nothing to promote**: registered model 'm' has no 'challenger' version" in text
    assert "Champion now: v2." in text and "vNone" not in text


def test_a_bad_override_is_refused_on_a_copy_and_params_stay(tmp_path: Path) -> None:
    # What `imagepipe run -S` checks before Prefect's API starts (commands/run.py).
    import shutil

    from commands import run as run_command
    from stages.core.errors import BadInput
    from tests.helpers import REPO

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    for bad in ("pretrain.epochs=-1", "pretrain.epoch=3", "pretrain.epochs=[1"):
        with pytest.raises(BadInput, match=r"pretrain\.epoch"):
            run_command._check_overrides(tmp_path, [bad])
    run_command._check_overrides(tmp_path, ["pretrain.epochs=3", "augment.copies=0"])
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_a_temporary_api_that_exits_is_unavailable_and_says_how_it_ended() -> None:
    from flows import localapi
    from stages.core.errors import Transient

    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], process_group=0)
    with pytest.raises(Transient, match="exited with 3"):
        localapi.ready(proc, "http://127.0.0.1:9/api", 30)


def test_a_bad_timeout_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    from commands import run as run_command

    with pytest.raises(SystemExit) as exit_:
        run_command.main(["--timeout", "pretrain"])
    assert exit_.value.code == 2
    assert "--timeout: wants STAGE=SECONDS, got 'pretrain'" in capsys.readouterr().err
