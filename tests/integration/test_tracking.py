"""The stage door's MLflow tracking, on the SQLite default and against a real `mlflow server`:
runs grouped under a parent, lineage tags, params, metrics per epoch, artifacts; a returned
Registration registered (and nothing without one); failure paths (server unreachable, server
killed mid-run, SIGTERM) end with the documented exit codes and no run left RUNNING."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.core.door import run_stage
from stages.core.errors import EXIT_BUG, EXIT_TERMINATED, EXIT_TRANSIENT
from stages.core.host import FLOW_RUN_ENV
from stages.core.tracking import CHALLENGER, Parity, Registration
from stages.params import load_params
from tests.integration.tracking_kit import (
    EXPORT_STAGE,
    REPO,
    MlflowServer,
    labels_of,
    registration,
    save_tiny,
    tiny_images,
    tiny_model,
    write_dvc_yaml,
    write_target,
)

pytestmark = pytest.mark.slow

TRAIN = {
    "cmd": "python -m stages.train",
    "deps": ["inputs.txt", "data/target"],
    "params": ["seed", "finetune"],
    "outs": ["models/out.bin", "plots/preview.png"],
    "metrics": [{"metrics/train.json": {"cache": False}}],
    "plots": [{"plots/history.csv": {"x": "epoch"}}, "plots/confusion.png"],
}
EVALUATE = {"cmd": "python -m stages.evaluate", "deps": ["models/out.bin"],
            "metrics": ["metrics/eval.json"]}


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs(uri: str) -> list[Any]:
    c = client(uri)
    exp = c.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", "imagepipe"))
    return list(c.search_runs([exp.experiment_id], max_results=100)) if exp else []


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)


def write_train_outputs(root: Path) -> None:
    for rel, text in {
        "models/out.bin": "weights",
        "metrics/train.json": json.dumps({"accuracy": 0.75, "loss": {"val": 0.5}, "note": "x",
                                          "flag": True}),
        "plots/history.csv": "epoch,phase,train_loss,val_acc\n1,head,1.0,0.5\n2,head,0.8,0.6\n"
                             "1,full,0.6,0.7\n2,full,0.4,0.8\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for rel in ("plots/preview.png", "plots/confusion.png"):
        (root / rel).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))


def test_stage_runs_carry_lineage_params_metrics_and_artifacts(backend: str, project: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    write_dvc_yaml(project, {"train": TRAIN, "evaluate": EVALUATE})
    (project / "inputs.txt").write_text("v1\n")
    images = tiny_images(8)
    write_target(project / "data" / "target", images[:, 0, 0, 0] % 2, images)
    git(project, "init", "-q")
    git(project, "add", "dvc.yaml", "params.yaml", "inputs.txt")
    git(project, "commit", "-qm", "init")
    (project / "inputs.txt").write_text("v2\n")  # uncommitted: the run must say dirty
    seen: dict[str, str | None] = {}

    def train() -> None:
        seen["train"] = os.environ.get("MLFLOW_RUN_ID")
        write_train_outputs(project)

    def evaluate() -> None:
        (project / "metrics" / "eval.json").write_text(json.dumps({"accuracy": 0.7}))

    assert run_stage("train", train) == 0
    assert run_stage("evaluate", evaluate) == 0
    assert "MLFLOW_RUN_ID" not in os.environ  # restored after the stage

    by_name = {r.info.run_name: r for r in runs(backend)}
    tr, ev = by_name["train"], by_name["evaluate"]
    parent_id = tr.data.tags["mlflow.parentRunId"]
    assert ev.data.tags["mlflow.parentRunId"] == parent_id  # one parent for one invocation
    assert client(backend).get_run(parent_id).info.status == "FINISHED"
    assert seen["train"] == tr.info.run_id and tr.info.status == "FINISHED"

    tags = tr.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True).stdout.strip()
    assert tags["git.commit"] == head and tags["git.dirty"] == "true"
    assert tags["dvc.dep.inputs.txt"] == hashlib.md5(b"v2\n").hexdigest()
    assert tags["dvc.dep.data/target"].endswith(".dir")
    manifest = json.loads((project / "data/target/manifest.json").read_text())
    assert tags["data.target.images.sha256"] == manifest["sha256"]["images.npy"]
    assert tags["device"] == "cpu"
    assert tags["dvc.out.models/out.bin"] == hashlib.md5(b"weights").hexdigest()

    params = load_params(project / "params.yaml")
    assert tr.data.params["seed"] == str(params.seed)
    assert tr.data.params["finetune.lr"] == str(params.finetune.lr)
    assert "data.image_size" not in tr.data.params  # only the stage's own sections
    assert tr.data.metrics["accuracy"] == 0.75 and tr.data.metrics["loss.val"] == 0.5
    assert "flag" not in tr.data.metrics and "note" not in tr.data.metrics
    history = client(backend).get_metric_history(tr.info.run_id, "history/full/val_acc")
    assert [(m.step, m.value) for m in history] == [(2, 0.7), (3, 0.8)]  # epochs repeat: row no.

    arts = {a.path for d in ("metrics", "plots", "models") for a in
            client(backend).list_artifacts(tr.info.run_id, d)}
    assert {"metrics/train.json", "plots/history.csv", "plots/confusion.png",
            "plots/preview.png"} <= arts
    assert "models/out.bin" not in arts  # DVC versions binaries, not MLflow

    # Under Prefect: every stage joins the flow's parent, tagged with the flow-run id.
    monkeypatch.setenv(FLOW_RUN_ENV, "flow-123")
    assert run_stage("evaluate", evaluate) == 0
    flow_run = next(r for r in runs(backend)
                    if r.data.tags.get("prefect.flow_run_id") == "flow-123"
                    and r.info.run_name == "evaluate")
    flow_parent = client(backend).get_run(flow_run.data.tags["mlflow.parentRunId"])
    assert flow_parent.data.tags["imagepipe.group"] == "pipeline:flow-123"
    assert flow_parent.info.run_id != parent_id


def test_dvc_repro_groups_its_stages_and_tags_the_hashes_dvc_locks(project: Path) -> None:
    """A real `dvc repro` of two stages: one parent for both, a new parent for the next repro;
    the input hashes tagged on a run are those dvc.lock records for that run."""
    (project / "stage.py").write_text(textwrap.dedent("""
        import sys
        from pathlib import Path
        from stages.core.door import run_stage

        def first() -> None:
            Path("d").mkdir(exist_ok=True)
            Path("d/a.txt").write_text("a")
            Path("d/b.txt").write_text("b\\r\\n")

        def second() -> None:
            Path("second.txt").write_text(Path("d/a.txt").read_text() * 2)

        name = sys.argv[1]
        sys.exit(run_stage(name, {"first": first, "second": second}[name]))
    """))
    py = sys.executable
    write_dvc_yaml(project, {
        "first": {"cmd": f"{py} stage.py first", "deps": ["stage.py"], "outs": ["d"]},
        "second": {"cmd": f"{py} stage.py second", "deps": ["d", "stage.py"],
                   "outs": ["second.txt"]},
    })
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, env=env, check=True)
    for args in (["repro"], ["repro", "-f", "-s", "second"]):
        proc = subprocess.run([*dvc, *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    found = sorted(runs(uri), key=lambda r: r.info.start_time)
    children = [r for r in found if "imagepipe.stage" in r.data.tags]
    assert [r.info.run_name for r in children] == ["first", "second", "second"]
    parents = [r.data.tags["mlflow.parentRunId"] for r in children]
    assert parents[0] == parents[1] != parents[2]
    assert client(uri).get_run(parents[0]).data.tags["imagepipe.group"].startswith("dvc:")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    dep = {d["path"]: d["md5"] for d in lock["second"]["deps"]}
    assert children[2].data.tags["dvc.dep.d"] == dep["d"]
    assert children[2].data.tags["dvc.dep.stage.py"] == dep["stage.py"]
    first_out = {o["path"]: o["md5"] for o in lock["first"]["outs"]}
    assert children[0].data.tags["dvc.out.d"] == first_out["d"]


def test_a_returned_registration_is_registered_and_nothing_else_is(project: Path) -> None:
    """Only what the body returns is registered: the same export stage returning None (or
    failing) registers nothing, whatever files lie where the old guesses looked."""
    write_dvc_yaml(project, {"export": EXPORT_STAGE})
    images = tiny_images(16)
    write_target(project / "data" / "target", labels_of(tiny_model("good"), images), images)
    onnx_path, pt = project / "models" / "served.onnx", project / "models" / "source.pt"
    save_tiny(tiny_model("good"), pt, onnx_path)
    reg = registration(onnx_path, pt, Parity(True, 3e-7, 1.0, 1e-4, 16, 1e-3), "explicit",
                       project / "data" / "target")

    def write_metrics() -> None:
        (project / "metrics").mkdir(exist_ok=True)
        (project / "metrics" / "export.json").write_text(json.dumps({"gate_passed": True}))

    def bad() -> Registration:
        raise ValueError("a bug after the model was written")

    assert run_stage("export", write_metrics) == 0
    assert run_stage("export", bad) == EXIT_BUG  # a bug: never registered
    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    assert list(client(uri).search_registered_models()) == []
    assert run_stage("export", lambda: (write_metrics(), reg)[1]) == 0
    mv = client(uri).get_model_version_by_alias("explicit", CHALLENGER)
    assert str(mv.version) == "1" and mv.tags["parity_passed"] == "true"
    assert mv.tags["parity_max_abs_diff"] == "3e-07" and mv.tags["parity_images"] == "16"
    assert mv.tags["onnx.sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert mv.tags["pytorch_model_uri"].startswith("models:/")
    export_runs = [r for r in runs(uri) if r.info.run_name == "export"]
    assert mv.run_id in {r.info.run_id for r in export_runs}
    assert {r.info.status for r in export_runs} == {"FINISHED", "FAILED"}


def test_unreachable_server_writes_outputs_then_exits_75_naming_it(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    port_closed = "http://127.0.0.1:9"  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", port_closed)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the 3 probes are enough here
    write_dvc_yaml(project, {"evaluate": EVALUATE})
    out = project / "metrics" / "eval.json"

    def body() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")

    start = time.monotonic()
    assert run_stage("evaluate", body) == EXIT_TRANSIENT
    assert time.monotonic() - start < 30  # bounded retries
    assert out.exists()
    err = capsys.readouterr().err
    assert port_closed in err
    # The agent's warnings come back in the stage's stderr as the door prints its own logs.
    assert f"imagepipe.tracking: tracking at {port_closed}: attempt 1/3 failed" in err


def test_server_killed_mid_export_exits_75_registers_nothing_leaves_no_run_running(
        project: Path, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dvc_yaml(project, {"export": EXPORT_STAGE})
    images = tiny_images(16)
    write_target(project / "data" / "target", labels_of(tiny_model("good"), images), images)
    save_tiny(tiny_model("good"), project / "models/finetuned.pt", project / "models/model.onnx")
    (project / "export_stage.py").write_text(textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from stages.core.door import run_stage
        from stages.core.io import write_json
        from stages.core.tracking import Parity, Registration
        from tests.integration.tracking_kit import registration

        def body() -> Registration:
            write_json("metrics/export.json", {"gate_passed": True, "max_abs_diff": 0.0})
            os.killpg(int(os.environ["KILL_PGID"]), signal.SIGKILL)  # the server dies here
            return registration(Path("models/model.onnx"), Path("models/finetuned.pt"),
                                Parity(True, 0.0, 1.0, 1e-4, 16, 1e-3), os.environ["MODEL_NAME"],
                                Path("data/target"))

        sys.exit(run_stage("export", body))
    """))
    name = f"killed-{time.time_ns()}"
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace(
        "model_name: imagepipe-classifier", f"model_name: {name}"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    assert mlflow_server.proc is not None
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_PGID": str(mlflow_server.proc.pid),
           "MODEL_NAME": name}
    try:
        proc = subprocess.run([sys.executable, "export_stage.py"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        mlflow_server.restart()  # the same store on the same address, as after an outage
    assert proc.returncode == EXIT_TRANSIENT, proc.stderr
    assert mlflow_server.uri in proc.stderr and "no model version was registered" in proc.stderr
    assert (project / "models/model.onnx").exists()  # the stage's own outputs are there
    found = runs(mlflow_server.uri)
    assert next(r for r in found if r.info.run_name == "export").info.status == "RUNNING"

    # The next tracking session that reaches the store ends the run its dead owner left open.
    from stages.core.tracking import Registry

    Registry.connect(project)
    found = runs(mlflow_server.uri)
    assert found and all(r.info.status != "RUNNING" for r in found)
    assert next(r for r in found if r.info.run_name == "export").info.status == "FAILED"
    assert list(client(mlflow_server.uri).search_model_versions(f"name = '{name}'")) == []


def test_sigterm_ends_the_run_failed_with_exit_143(project: Path) -> None:
    write_dvc_yaml(project, {"evaluate": EVALUATE})
    (project / "slow_stage.py").write_text(textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from stages.core.door import run_stage

        def body() -> None:
            Path("started").write_text(os.environ["MLFLOW_RUN_ID"])
            time.sleep(120)

        sys.exit(run_stage("evaluate", body))
    """))
    proc = subprocess.Popen([sys.executable, "slow_stage.py"], cwd=project,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (project / "started").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_TERMINATED, err
    run_id = (project / "started").read_text()
    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    run = client(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert client(uri).get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


# ---------------------------------------------------------------- comparable pipeline runs

EVALUATE_HEADLINE = {"cmd": "python -m stages.evaluate", "deps": ["inputs.txt"],
                     "metrics": [{"metrics/evaluate.json": {"cache": False}}]}
EXPORT_METRICS_ONLY = {"cmd": "python -m stages.export", "deps": ["inputs.txt"],
                       "params": ["export"],
                       "metrics": [{"metrics/export.json": {"cache": False}}]}
PRETRAIN_LIVE = {"cmd": "python -m stages.pretrain", "deps": ["inputs.txt"],
                 "plots": [{"plots/pretrain.csv": {"x": "epoch"}}]}


def evaluate_figures(accuracy: float) -> dict[str, float]:
    return {"accuracy": accuracy, "accuracy_ci_low": accuracy - 0.05,
            "accuracy_ci_high": accuracy + 0.05, "scratch_accuracy": 0.6,
            "transfer_gain": accuracy - 0.6, "transfer_gain_ci_low": accuracy - 0.7,
            "transfer_gain_ci_high": accuracy - 0.5, "ece": 0.04, "n_test": 64}


def test_the_parent_run_is_named_and_carries_params_and_headline_metrics(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.core.flat import flatten_dict

    monkeypatch.setenv("DVC_EXP_NAME", "exp-cafe1")
    write_dvc_yaml(project, {"evaluate": EVALUATE_HEADLINE, "export": EXPORT_METRICS_ONLY})
    (project / "inputs.txt").write_text("x\n")
    (project / "metrics").mkdir()

    def evaluate(accuracy: float) -> None:
        (project / "metrics/evaluate.json").write_text(json.dumps(evaluate_figures(accuracy)))

    def export() -> None:
        (project / "metrics/export.json").write_text(json.dumps(
            {"gate_passed": True, "max_abs_diff": 2.5e-6}))

    assert run_stage("evaluate", lambda: evaluate(0.9)) == 0
    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    child = next(r for r in runs(uri) if r.info.run_name == "evaluate")
    parent = client(uri).get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name.startswith("pipeline exp-cafe1 20")
    assert parent.data.tags["dvc.exp_name"] == "exp-cafe1"
    every = flatten_dict(load_params(project / "params.yaml").model_dump())
    assert len(parent.data.params) == len(every) > 30  # all sections, not one stage's
    assert parent.data.params["finetune.lr"] == str(every["finetune.lr"])
    assert parent.data.params["data.image_size"] == str(every["data.image_size"])
    assert parent.data.metrics["accuracy"] == 0.9
    assert parent.data.metrics["transfer_gain_ci_low"] == pytest.approx(0.2)
    assert "n_test" not in parent.data.metrics  # headline figures only

    assert run_stage("export", export) == 0
    assert run_stage("evaluate", lambda: evaluate(0.8)) == 0  # a re-run evaluate updates it
    parent = client(uri).get_run(parent.info.run_id)
    assert parent.data.metrics["parity_max_abs_diff"] == 2.5e-6
    assert parent.data.metrics["accuracy"] == 0.8
    assert parent.data.metrics["scratch_accuracy"] == 0.6
    assert {"ece", "transfer_gain", "transfer_gain_ci_high"} <= set(parent.data.metrics)
    parents = [r for r in runs(uri) if r.data.tags.get("imagepipe.role") == "pipeline"]
    assert len(parents) == 1


def test_epochs_are_logged_while_the_stage_runs_once_each_and_kept_on_a_crash(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.core.epochlog import record_epoch

    monkeypatch.setenv("IMAGEPIPE_EPOCH_LOG_INTERVAL_S", "0.1")
    write_dvc_yaml(project, {"pretrain": PRETRAIN_LIVE})
    (project / "inputs.txt").write_text("x\n")
    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    rows = [{"phase": "pretrain", "epoch": e, "train_loss": 1 / e, "val_acc": e / 10,
             "val_loss": None} for e in (1, 2, 3)]
    seen_live: list[int] = []

    def history(run_id: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in
                client(uri).get_metric_history(run_id, "pretrain/val_acc")]

    def train(crash_after: int | None = None) -> None:
        run_id = os.environ["MLFLOW_RUN_ID"]
        for row in rows:
            record_epoch("pretrain", row)
            if row["epoch"] == crash_after:
                raise RuntimeError("the GPU fell over")
            deadline = time.monotonic() + 20
            while len(history(run_id)) < row["epoch"] and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_live.append(len(history(run_id)))  # in MLflow before the stage ends
        (project / "plots").mkdir(exist_ok=True)
        (project / "plots/pretrain.csv").write_text(
            "epoch,phase,train_loss,val_acc,val_loss\n"
            + "".join(f"{r['epoch']},pretrain,{r['train_loss']},{r['val_acc']},\n" for r in rows))

    assert run_stage("pretrain", train) == 0
    assert seen_live == [1, 2, 3]
    done = next(r for r in runs(uri) if r.info.run_name == "pretrain")
    assert history(done.info.run_id) == [(1, 0.1), (2, 0.2), (3, 0.3)]  # not twice
    assert len(client(uri).get_metric_history(done.info.run_id, "pretrain/train_loss")) == 3
    assert "IMAGEPIPE_EPOCH_LOG" not in os.environ

    assert run_stage("pretrain", lambda: train(crash_after=2)) == EXIT_BUG
    crashed = next(r for r in runs(uri) if r.info.run_name == "pretrain"
                   and r.info.status == "FAILED")
    assert history(crashed.info.run_id) == [(1, 0.1), (2, 0.2)]  # the epochs it finished
    assert not list((project / "mlruns/imagepipe/epochs").glob("*.jsonl"))


def test_a_registered_version_is_described_in_one_paragraph(
        project: Path, tiny_export: Any) -> None:
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics/evaluate.json").write_text(json.dumps(evaluate_figures(0.875)))
    assert tiny_export("good") == 0
    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    name = load_params(project / "params.yaml").registry.model_name
    mv = client(uri).get_model_version_by_alias(name, CHALLENGER)
    text = mv.description
    assert mv.run_id in text and "target set `target`" in text
    assert "Test accuracy 0.875 (95% CI 0.825 to 0.925)" in text
    assert "transfer gain +0.275" in text and "ONNX Runtime agrees" in text
    assert "\n" not in text
    parent = client(uri).get_run(client(uri).get_run(mv.run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["parity_max_abs_diff"] == 1e-6


def test_real_training_epochs_land_once_under_the_plots_tables_keys(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune through the door, as DVC runs it: the rows the training loop records live
    (head, full) and the plots table it writes name each epoch alike, so every curve has one
    point per epoch and no second set of keys appears."""
    from stages import finetune, pretrain
    from stages.core.tracking.metrics import per_epoch_metrics
    from tests.unit.test_train import tiny_params, write_dataset

    monkeypatch.setenv("IMAGEPIPE_EPOCH_LOG_INTERVAL_S", "0.1")
    write_dvc_yaml(project, {"finetune": {
        "cmd": "python -m stages.finetune", "deps": ["data/target"],
        "plots": [{"plots/finetune.csv": {"x": "epoch"}}]}})
    write_dataset(project / "data/augmented", ["a", "b"], {"train": 16, "val": 4, "test": 2})
    write_dataset(project / "data/target", ["x", "y"], {"train": 6, "val": 4, "test": 4}, seed=1)
    params = tiny_params()
    pretrain.run(params, project / "data/augmented", project / "models/pretrained.pt",
                 project / "ck/pretrain", project / "plots/pretrain.csv")
    out = finetune.Outputs(*(project / p for p in (
        "models/finetuned.pt", "models/probe.pt", "ck/finetune", "plots/finetune.csv")))
    assert run_stage("finetune", lambda: finetune.run(
        params, project / "data/target", project / "models/pretrained.pt", out)) == 0

    uri = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    run = next(r for r in runs(uri) if r.info.run_name == "finetune")
    table = per_epoch_metrics(project / "plots" / "finetune.csv")
    assert {k for k in run.data.metrics if "/" in k} == {k for k, _, _ in table}
    stamps: set[int] = set()
    for key in ("finetune/head/val_acc", "finetune/full/train_loss"):
        history = client(uri).get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == sorted({s for k, _, s in table if k == key}), key
        stamps |= {m.timestamp for m in history}
    assert len(stamps) > 1  # logged as epochs ended: the end of the stage logs all at one time


def test_runs_kept_side_by_side_leave_the_keepers_environment_alone(project: Path) -> None:
    """The tracking agent opens several stages' runs at once in one process: each run's id and
    epoch file go to its own stage in the reply, never into the agent's environment, where the
    last run opened would overwrite the others'."""
    from stages.core.tracking.remote import _stage_facts
    from stages.core.tracking.stagerun import StageRun

    write_dvc_yaml(project, {"pretrain": PRETRAIN_LIVE, "evaluate": EVALUATE})
    (project / "inputs.txt").write_text("x\n")
    facts = _stage_facts()  # as a stage sends them with "start"
    first, second = StageRun.start("pretrain", facts), StageRun.start("evaluate", facts)
    assert first is not None and second is not None
    assert "MLFLOW_RUN_ID" not in os.environ and "IMAGEPIPE_EPOCH_LOG" not in os.environ
    assert first.env["MLFLOW_RUN_ID"] == first.run_id != second.env["MLFLOW_RUN_ID"]
    assert first.env["IMAGEPIPE_EPOCH_LOG"] != second.env["IMAGEPIPE_EPOCH_LOG"]
    assert first.finish(EXIT_BUG) == second.finish(EXIT_BUG) == EXIT_BUG
