"""Real DVC on a tiny copy of the project: `dvc repro` writes every training output, metric
and plot, DVC reads their definitions, and a second repro runs nothing; experiments carry
metrics and plots, push/pull round-trips to an up-to-date clone, a queued experiment reruns
only what its params change and tracks into the project's mlflow.db, and `imagepipe tune pick`
applies the best experiment of a sweep by validation accuracy.

Experiments that change finetune's params reproduce only up to the stage their assertions
read (`dvc exp run ... evaluate`): export would add ~10 s to each and is tested elsewhere."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from commands.tune import Row, check_metric, pick, rows_of
from stages.core.errors import BadInput
from tests.helpers import default_params, dvc, git, project_copy, write_params

pytestmark = pytest.mark.slow

EVALUATE_KEYS = {"accuracy", "top5_accuracy", "macro_f1", "ece", "scratch_accuracy",
                 "transfer_gain", "n_test", "probe_accuracy", "shift_consistency",
                 "flip_consistency"}


def tiny_params() -> dict[str, Any]:
    """The pipeline in ~25 s on 2 cores. The warm-up is 0: with one epoch, a one-epoch warm-up
    puts the peak lr on the last steps and training diverges. full_epochs=6 lets the finetuned
    model learn enough that lr choices differ on the val split; lr=0.1 is a poor baseline
    there (val accuracy ~0.2 against ~0.6 at 0.01), so a sweep's best is an experiment, not
    HEAD. A poorly trained model's logits are large: the parity gate gets fp32 room for them
    (export's own tests hold it to 1e-4)."""
    p = default_params()
    p["data"]["target"]["train_per_class"] = 10
    p["augment"]["copies"] = 0
    p["pretrain"].update(epochs=1, warmup_epochs=0, lr=0.02)
    p["finetune"].update(head_epochs=1, full_epochs=6, warmup_epochs=0, lr=0.1)
    p["export"].update(quantize_int8=False, parity_atol=0.01)
    return p


@pytest.fixture(scope="module", autouse=True)
def tracking_off() -> Iterator[None]:
    """Tracking off (runs here would only slow the tests), except where a test turns it on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEPIPE_TRACKING", "0")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tracking_off: None) -> Path:
    """The copy with tiny params, reproduced, and dvc.lock, metrics and plots committed, as a
    user does after `dvc repro` (`git status` is then clean: nothing left untracked)."""
    root = project_copy(tmp_path_factory.mktemp("exps"))
    write_params(root / "params.yaml", tiny_params())
    git(root, "commit", "-qam", "tiny params")
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "repro")
    assert git(root, "status", "--porcelain") == ""
    assert (root / "metrics" / "evaluate.json").is_file()
    return root


def back_to_head(root: Path) -> None:
    """A workspace `dvc exp run` leaves its results in the workspace: back to HEAD's, with no
    experiments and no finished queue tasks left for the next test to count."""
    git(root, "checkout", "-q", "--", ".")
    dvc(root, "checkout", "-q")
    dvc(root, "exp", "remove", "-A")
    dvc(root, "queue", "remove", "--all")


def exp_metrics(root: Path) -> dict[str, dict[str, Any]]:
    """Experiment name -> {"metrics/evaluate.json": {...}, ...} of HEAD's experiments."""
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    out = {}
    for record in shown:
        for exp in record.get("experiments") or []:
            rev = exp["revs"][0]
            out[rev["name"]] = {path: m.get("data") for path, m in
                                ((rev.get("data") or {}).get("metrics") or {}).items()}
    return out


def readme_compare(root: Path) -> str:
    """What the README's `dvc exp show ...` compare line prints in a 120-column terminal."""
    import os
    import shlex

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("dvc exp show --"))
    args = shlex.split(line.partition("  #")[0])[1:]
    env = {**os.environ, "COLUMNS": "120", "LINES": "50", "TERM": "dumb"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_for_queue(root: Path, timeout: float = 480) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc(root, "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def stages_run(log: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", log))


# The project as `dvc repro` left it (these run first: the module's tests run in file order).

def test_repro_writes_models_checkpoints_metrics_and_plots(project: Path) -> None:
    for rel in ("models/pretrained.pt", "models/finetuned.pt", "models/probe.pt",
                "models/scratch.pt", "models/model.onnx", "checkpoints/pretrain/pretrain.pt",
                "checkpoints/finetune/head.pt", "checkpoints/finetune/full.pt",
                "checkpoints/scratch/scratch.pt", "plots/pretrain.csv", "plots/finetune.csv",
                "plots/scratch.csv", "plots/confusion.png", "plots/confusion.csv",
                "metrics/pretrain.json", "metrics/finetune.json", "reports/per_class.json",
                "metrics/scratch.json", "metrics/export.json", "reports/export.json"):
        assert (project / rel).is_file(), rel
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert EVALUATE_KEYS <= metrics.keys()
    assert metrics["top5_accuracy"] is None  # five target classes: top-5 would be trivial
    assert metrics["flip_consistency"] is None  # digits: flips are not in the policy


def test_dvc_reads_the_metrics_and_plot_definitions(project: Path, tmp_path: Path) -> None:
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = shown[""]["data"] if "" in shown else next(iter(shown.values()))["data"]
    assert files["metrics/evaluate.json"]["data"]["n_test"] > 0
    assert "val_accuracy" in files["metrics/pretrain.json"]["data"]
    plots = json.loads(dvc(project, "plots", "show", "--json", "-o", str(tmp_path)).stdout)
    assert "errors" not in plots, plots["errors"]
    assert {"plots/pretrain.csv", "plots/finetune.csv", "plots/confusion.csv", "plots/confusion.png",
            "transfer vs scratch (target val accuracy)"} <= set(plots["data"]), sorted(plots["data"])


def test_second_repro_runs_nothing(project: Path) -> None:
    out = dvc(project, "repro").stdout
    assert "Running stage" not in out, out


def test_a_transfer_only_param_reruns_finetune_but_not_the_baseline(project: Path) -> None:
    """finetune.l2sp concerns the transfer alone: finetune and what reads it rerun, the scratch
    stage stays up to date and its model is the one HEAD has (issue 22: 220 s of a 522 s
    experiment went to retraining a bit-identical baseline)."""
    def outs(stage: str) -> dict[str, str]:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}

    before, finetuned = outs("scratch"), outs("finetune")["models/finetuned.pt"]
    try:
        out = dvc(project, "exp", "run", "-S", "finetune.l2sp=0.01", "evaluate").stdout
        assert "finetune" in stages_run(out), out
        assert "scratch" not in stages_run(out), out
        assert outs("scratch") == before
        # evaluate reads the finetuned model: it reruns exactly when that model changed (with
        # keep_best, an epoch of phase 1, where the backbone is frozen and l2sp does nothing,
        # can be the one shipped: then finetune's outputs are the same bytes)
        changed = outs("finetune")["models/finetuned.pt"] != finetuned
        assert ("evaluate" in stages_run(out)) == changed, out
        assert yaml.safe_load((project / "params.yaml").read_text())["finetune"]["l2sp"] == 0.01
    finally:
        back_to_head(project)


def test_experiments_carry_metrics_and_plots(project: Path) -> None:
    dvc(project, "exp", "run", "-n", "lr-low", "-S", "finetune.lr=0.01", "evaluate")
    dvc(project, "exp", "run", "-n", "lr-high", "-S", "finetune.lr=0.03", "evaluate")
    try:
        shown = exp_metrics(project)
        for name in ("lr-low", "lr-high"):
            evaluate = shown[name]["metrics/evaluate.json"]
            assert evaluate is not None, f"{name}: no metrics in the experiment commit"
            assert isinstance(evaluate["accuracy"], float)
            assert isinstance(evaluate["transfer_gain"], float)

        diff = json.loads(dvc(project, "metrics", "diff", "lr-low", "lr-high", "--json").stdout)
        finetune = diff["metrics/finetune.json"]
        assert finetune["val_accuracy"]["old"] == shown["lr-low"]["metrics/finetune.json"]["val_accuracy"]
        assert finetune["val_accuracy"]["new"] == shown["lr-high"]["metrics/finetune.json"]["val_accuracy"]
        assert finetune["val_accuracy"]["old"] != finetune["val_accuracy"]["new"]
        # Only what the lr changed: no timing differs in a metrics file on every run.
        timings = [f"{f}:{k}" for f, keys in diff.items() for k in keys
                   if "seconds" in k or "per_s" in k]
        assert not timings, timings

        # The README's compare command fits 120 columns: no column folded into '…'.
        shown_table = readme_compare(project)
        assert "…" not in shown_table, shown_table
        assert max(map(len, shown_table.splitlines())) <= 120, shown_table
        assert all(w in shown_table for w in ("lr-low", "lr-high", "finetune.lr", "accuracy"))
        # Per-class tables and per-batch parity are not metrics (reports/ holds them).
        listed = json.loads(dvc(project, "metrics", "show", "--json").stdout)
        files = next(iter(listed.values()))["data"]
        assert "reports/per_class.json" not in files
        assert "by_batch_size" not in files["metrics/export.json"]["data"]

        plots = json.loads(dvc(project, "plots", "diff", "lr-low", "lr-high", "--json").stdout)["data"]
        curve = plots["plots/finetune.csv"][0]["content"]["data"]["values"]
        assert {row["rev"] for row in curve} == {"lr-low", "lr-high"}

        # The workspace holds lr-high's results (the last run): apply swaps in lr-low's.
        dvc(project, "exp", "apply", "lr-low")
        for name in ("evaluate", "finetune"):
            applied = json.loads((project / "metrics" / f"{name}.json").read_text())
            # exp show leaves out null values
            assert {k: v for k, v in applied.items() if v is not None} == \
                shown["lr-low"][f"metrics/{name}.json"]
    finally:
        back_to_head(project)


def test_push_then_fresh_clone_pull_is_up_to_date(project: Path, tmp_path: Path) -> None:
    dvc(project, "remote", "add", "-d", "-f", "store", str(tmp_path / "remote"))
    git(project, "commit", "-qam", "remote")
    dvc(project, "push")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    pulled = dvc(clone, "pull")
    assert "No file hash info" not in pulled.stdout + pulled.stderr
    assert json.loads(dvc(clone, "status", "--json").stdout) == {}
    assert not (clone / "checkpoints").exists()  # resume points stay on their machine

    from flows.dvcstage import plan_stages  # what `imagepipe run` asks before running

    assert plan_stages(clone).to_run == []


def test_queued_experiment_reruns_downstream_only_and_tracks_into_the_project(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEPIPE_TRACKING", "1")  # the worker `queue start` spawns inherits it
    assert not (project / "mlflow.db").exists()
    dvc(project, "exp", "run", "--queue", "-n", "q-ece", "-S", "evaluate.ece_bins=10")
    dvc(project, "queue", "start", "-j", "1")
    try:
        status = wait_for_queue(project)
        assert re.search(r"q-ece\s.*Success", status), status
        assert stages_run(dvc(project, "queue", "logs", "q-ece").stdout) == {"evaluate"}
        with sqlite3.connect(project / "mlflow.db") as db:
            runs = db.execute("select name, status from runs").fetchall()
        assert ("evaluate", "FINISHED") in runs, runs
    finally:
        back_to_head(project)


def _registry(root: Path) -> tuple[dict[str, str], str | None]:
    """{version: its dvc.exp_name tag} of the project's registered model, and challenger."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "imagepipe-classifier"
    versions = {str(v.version): v.tags.get("dvc.exp_name", "")
                for v in client.search_model_versions(f"name = '{name}'")}
    try:
        challenger = str(client.get_model_version_by_alias(name, "challenger").version)
    except MlflowException:
        challenger = None
    return versions, challenger


def test_tune_pick_applies_the_best_by_validation_and_only_it_becomes_challenger(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sweep runs through export with tracking on: each queued experiment registers a
    # version tagged with its name, and none of them moves challenger (the last to finish
    # would otherwise win); the pick, applied, becomes challenger and promote accepts it.
    monkeypatch.setenv("IMAGEPIPE_TRACKING", "1")  # the worker `queue start` spawns inherits it
    before, challenger_before = _registry(project) if (project / "mlflow.db").exists() else ({}, None)
    dvc(project, "exp", "run", "--queue", "-S", "finetune.lr=0.01,0.03")
    dvc(project, "queue", "start", "-j", "1")
    try:
        status = wait_for_queue(project)
        assert status.count("Success") == 2, status
        rows = rows_of(json.loads(dvc(project, "exp", "show", "--json").stdout))
        best = max(rows, key=lambda r: r.metrics["finetune.val_accuracy"])
        assert not best.baseline, "the tiny baseline's lr=0.1 should lose to the sweep"
        versions, challenger = _registry(project)
        swept = {v: exp for v, exp in versions.items() if v not in before}
        assert sorted(swept.values()) == sorted(r.name for r in rows if not r.baseline), swept
        assert challenger == challenger_before, "a queued experiment moved challenger"

        done = subprocess.run([sys.executable, "-m", "commands.cli", "tune", "pick", "--apply"],
                              cwd=project, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"pick: {best.name}" in done.stdout
        params = yaml.safe_load((project / "params.yaml").read_text())
        assert params["finetune"]["lr"] == best.params["finetune.lr"]
        finetune = json.loads((project / "metrics" / "finetune.json").read_text())
        assert finetune["val_accuracy"] == best.metrics["finetune.val_accuracy"]
        picked = next(v for v, exp in swept.items() if exp == best.name)
        assert _registry(project)[1] == picked, done.stdout
        assert f"v{picked} (experiment {best.name}) is now 'challenger'" in done.stdout
        # The workspace now holds that model: promote judges it instead of refusing it.
        promoted = subprocess.run([sys.executable, "-m", "commands.cli", "promote", "--json"],
                                  cwd=project, capture_output=True, text=True, timeout=180)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        decision = json.loads(promoted.stdout.strip().splitlines()[-1])
        assert decision["challenger_version"] == picked
        assert "older than the workspace" not in decision["reason"], decision
    finally:
        back_to_head(project)


def _row(name: str, lr: float, scratch_lr: float, val: float, scratch_val: float) -> Row:
    return Row(name, False, {"finetune.lr": lr, "finetune.scratch_lr": scratch_lr},
               {"finetune.val_accuracy": val, "finetune.scratch_val_accuracy": scratch_val})


def test_pick_combines_the_best_lr_with_the_best_scratch_lr() -> None:
    # A 2x2 grid: lr=0.03 wins the finetuned model, scratch_lr=0.01 the baseline; the row
    # holding both is the pick, though neither metric alone ranks it first.
    rows = [_row("a", 0.03, 0.003, 0.90, 0.60), _row("b", 0.03, 0.01, 0.89, 0.70),
            _row("c", 0.1, 0.003, 0.80, 0.61), _row("d", 0.1, 0.01, 0.79, 0.71)]
    assert pick(rows, "finetune.val_accuracy", "finetune.scratch_val_accuracy", "max")[0].name == "b"
    assert pick(rows, "finetune.val_accuracy", None, "max")[0].name == "a"


def test_pick_refuses_test_metrics() -> None:
    for metric in ("evaluate.accuracy", "per_class.macro avg.f1-score", "finetune.train_loss"):
        with pytest.raises(BadInput):
            check_metric(metric)
    check_metric("finetune.scratch_val_accuracy")
