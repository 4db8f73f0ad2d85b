"""A tiny end-to-end `dvc repro evaluate` in a fresh copy of the project (committed files plus
uncommitted work, in its own git repo): every training output, metric and plot appears, DVC
reads the metrics and plot definitions, and a second repro runs nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import default_params, dvc, project_copy, write_params

pytestmark = pytest.mark.slow

EVALUATE_KEYS = {"accuracy", "top5_accuracy", "macro_f1", "ece", "scratch_accuracy",
                 "transfer_gain", "n_test", "probe_accuracy", "shift_consistency",
                 "flip_consistency"}


def tiny_params(path: Path) -> None:
    raw = default_params()
    raw["data"]["image_size"] = 8  # the digits' own size: no resizing
    raw["augment"]["copies"] = 0  # augment still runs (copies the splits), in no time
    cpu = {"device": "cpu", "crop_padding": 1}
    raw["pretrain"] = {**raw.get("pretrain", {}), **cpu, "epochs": 1, "width": 8, "batch_size": 64}
    raw["finetune"] = {**raw.get("finetune", {}), **cpu, "head_epochs": 1, "full_epochs": 1,
                       "batch_size": 32}
    raw["evaluate"] = {**raw.get("evaluate", {}), "device": "cpu"}
    write_params(path, raw)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = project_copy(tmp_path_factory.mktemp("train-project"))
    tiny_params(root / "params.yaml")
    out = dvc(root, "repro", "evaluate").stdout
    for stage in ("ingest", "augment", "pretrain", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    return root


def test_repro_writes_models_checkpoints_metrics_and_plots(project: Path) -> None:
    for rel in ("models/pretrained.pt", "models/finetuned.pt", "models/probe.pt",
                "models/scratch.pt", "checkpoints/pretrain/pretrain.pt",
                "checkpoints/finetune/head.pt", "checkpoints/finetune/full.pt",
                "checkpoints/finetune/scratch.pt", "plots/pretrain.csv", "plots/finetune.csv",
                "plots/scratch.csv", "plots/confusion.png", "plots/confusion.csv",
                "metrics/pretrain.json", "metrics/finetune.json", "metrics/per_class.json"):
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
    out = dvc(project, "repro", "evaluate").stdout
    assert "Running stage" not in out, out
