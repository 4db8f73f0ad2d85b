"""What the record says is what was trained, with real DVC on a tiny copy of the project:

* a change to training code makes pretrain (and finetune) train again rather than resume its
  "complete" checkpoint, and the weights differ;
* a change to tracking code leaves every stage up to date (`dvc status`), a change to the
  training loop makes the training stages and what follows them stale;
* a forced rerun of identical training writes byte-identical model files (the md5s in
  dvc.lock do not move), so `dvc checkout` of any commit finds its models in the cache.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.helpers import dvc, git, project_copy, write_params
from tests.integration.test_dvc_experiments import tiny_params as experiments_params
from tests.integration.test_dvc_experiments import tracking_off  # noqa: F401 - autouse here too

pytestmark = pytest.mark.slow

MODELS = ("models/pretrained.pt", "models/finetuned.pt", "models/probe.pt", "models/scratch.pt")


def tiny_params() -> dict[str, Any]:
    """The experiments module's tiny pipeline, with a shorter phase 2: these tests compare
    weights and records, not accuracies."""
    p = experiments_params()
    p["finetune"].update(full_epochs=2, lr=0.05)  # the workspace lr neither queued one uses
    p["export"]["model"] = "finetuned"  # the records checked are the finetuned model's
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reproduced (tracking off: the autouse tracking_off) and committed: checkpoints/ holds
    complete checkpoints."""
    root = project_copy(tmp_path_factory.mktemp("codeid"))
    write_params(root / "params.yaml", tiny_params())
    git(root, "commit", "-qam", "tiny params")
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "repro")
    assert (root / "checkpoints" / "pretrain" / "pretrain.pt").is_file()
    return root


@pytest.fixture
def restore(project: Path) -> Iterator[Path]:
    """The test edits code; afterwards the project is back at its commit, models included."""
    yield project
    git(project, "checkout", "-q", "--", ".")
    dvc(project, "checkout", "-f", "-q")


def lock_md5s(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values()
            for out in stage.get("outs") or []}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer holds {old!r}: update the test's edit"
    path.write_text(text.replace(old, new, 1))


def test_a_training_code_change_trains_pretrain_again(restore: Path) -> None:
    root = restore
    before = weights(root / "models" / "pretrained.pt")
    edit(root / "stages" / "core" / "train.py", "nesterov=p.momentum > 0", "nesterov=False")
    status = json.loads(dvc(root, "status", "--json").stdout)
    assert {"pretrain", "finetune", "evaluate"} <= set(status), status
    out = dvc(root, "repro", "-s", "pretrain")
    log = out.stdout + out.stderr
    assert "nothing to train" not in log, log
    assert "made by other code (stages/core/train.py differ)" in log, log
    after = weights(root / "models" / "pretrained.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the old weights shipped"


def test_a_finetune_code_change_trains_finetune_again(restore: Path) -> None:
    root = restore
    before = weights(root / "models" / "finetuned.pt")
    edit(root / "stages" / "finetune.py", "p.lr * p.backbone_lr_scale",
         "p.lr * p.backbone_lr_scale * 0.25")
    out = dvc(root, "repro", "-s", "finetune")
    log = out.stdout + out.stderr
    assert "nothing to train" not in log, log
    assert "made by other code (stages/finetune.py differ)" in log, log
    after = weights(root / "models" / "finetuned.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the old weights shipped"


def test_a_tracking_change_leaves_every_stage_up_to_date(restore: Path) -> None:
    root = restore
    for rel in ("stages/core/tracking/agent.py", "stages/core/tracking/stagerun.py",
                "stages/core/door.py", "commands/cli.py", "flows/pipeline.py"):
        with (root / rel).open("a") as f:
            f.write("# a comment that changes no result\n")
    assert json.loads(dvc(root, "status", "--json").stdout) == {}


def test_identical_training_writes_identical_model_files(restore: Path) -> None:
    root = restore
    committed = lock_md5s(root)
    shutil.rmtree(root / "checkpoints")  # train for real, not from the complete checkpoints
    dvc(root, "repro", "-f", "-s", "pretrain")
    dvc(root, "repro", "-f", "-s", "finetune")
    again = lock_md5s(root)
    assert {m: again[m] for m in MODELS} == {m: committed[m] for m in MODELS}


@pytest.mark.timeout(1500)  # two experiments, three tracked stages each, one after the other
def test_queued_experiments_record_their_own_workspace(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two queued experiments with different params: every MLflow run of each (parent and
    children), its version's description and `imagepipe lineage` say that experiment's params,
    metrics and output hashes, as `dvc exp show` does; none says the workspace's."""
    from mlflow import MlflowClient

    from tests.integration.test_dvc_experiments import back_to_head, wait_for_queue

    monkeypatch.setenv("IMAGEPIPE_TRACKING", "1")  # the worker `queue start` spawns inherits it
    lrs = {"q-low": 0.01, "q-high": 0.1}
    for name, lr in lrs.items():
        dvc(project, "exp", "run", "--queue", "-n", name, "-S", f"finetune.lr={lr}")
    dvc(project, "queue", "start", "-j", "1", timeout=1200)
    try:
        status = wait_for_queue(project, timeout=1200)
        assert status.count("Success") == 2, status
        shown = {exp["revs"][0]["name"]: exp["revs"][0]
                 for record in json.loads(dvc(project, "exp", "show", "--json").stdout)
                 for exp in record.get("experiments") or []}
        client = MlflowClient(f"sqlite:///{(project / 'mlflow.db').as_posix()}")
        experiment = client.get_experiment_by_name("imagepipe").experiment_id
        for name, lr in lrs.items():
            rev = shown[name]
            metrics = rev["data"]["metrics"]["metrics/evaluate.json"]["data"]
            lock = yaml.safe_load(git(project, "show", f"{rev['rev']}:dvc.lock"))
            made = {o["path"]: o["md5"] for o in lock["stages"]["finetune"]["outs"]}
            parents = client.search_runs([experiment], f"tags.`dvc.exp_name` = '{name}'")
            assert len(parents) == 1, [p.data.tags for p in parents]
            parent = parents[0]
            assert float(parent.data.params["finetune.lr"]) == lr
            assert parent.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
            children = {r.info.run_name: r for r in client.search_runs(
                [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
            assert {"finetune", "evaluate", "export"} <= set(children), set(children)
            assert float(children["finetune"].data.params["finetune.lr"]) == lr
            assert children["finetune"].data.tags["dvc.out.models/finetuned.pt"] == \
                made["models/finetuned.pt"]
            assert children["evaluate"].data.metrics["accuracy"] == \
                pytest.approx(metrics["accuracy"])
            version = client.search_model_versions(
                f"run_id = '{children['export'].info.run_id}'")[0]
            assert f"Test accuracy {metrics['accuracy']:.3f}" in version.description
            walked = json.loads(_cli(project, "lineage", str(version.version), "--json"))
            finetune_runs = [r["run_id"] for r in walked["runs"] if r["stage"] == "finetune"]
            assert finetune_runs == [children["finetune"].info.run_id], walked["runs"]
    finally:
        back_to_head(project)


def _cli(cwd: Path, *args: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "commands.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
