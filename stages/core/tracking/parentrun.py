"""What the parent run of a pipeline run shows, so that MLflow's chart and compare views line
pipeline runs up: a readable name, every parameter of params.yaml, the DVC experiment name
when there is one, and the headline metrics, updated as evaluate and export finish.

Inputs: the params file, the lineage tags of the first stage, the environment (DVC_EXP_NAME,
which `dvc exp run` sets for every stage of an experiment; the Prefect flow-run id), the
metrics files a stage wrote. Outputs: run name, tags, params and metrics of the parent run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from stages.core.host import FLOW_RUN_ENV
from stages.core.tracking.metrics import flat_numbers, flat_params, metric_key, read_json
from stages.core.tracking.store import Store

EXP_NAME_ENV = "DVC_EXP_NAME"  # dvc/env.py; set by `dvc exp run` (queued, temp or workspace)

# The figures a pipeline run is compared by: metrics file -> {key there: key on the parent}.
HEADLINE: dict[str, dict[str, str]] = {
    "metrics/evaluate.json": {k: k for k in (
        "accuracy", "accuracy_ci_low", "accuracy_ci_high", "scratch_accuracy", "transfer_gain",
        "transfer_gain_ci_low", "transfer_gain_ci_high", "ece", "macro_f1")},
    "metrics/export.json": {"max_abs_diff": "parity_max_abs_diff"},
}


def parent_label(tags: dict[str, str]) -> str:
    """What tells this pipeline run apart: the DVC experiment, else the flow run, else the
    commit (short, '+dirty' when the tree was changed), else 'local'."""
    exp = os.environ.get(EXP_NAME_ENV)
    if exp:
        return exp
    flow = os.environ.get(FLOW_RUN_ENV)
    if flow:
        return f"flow {flow[:8]}"
    commit = tags.get("git.commit")
    if commit:
        return commit[:7] + ("+dirty" if tags.get("git.dirty") == "true" else "")
    return "local"


def parent_name(tags: dict[str, str]) -> str:
    """'pipeline <label> <date time>', e.g. 'pipeline exp-bfe64 2026-12-01 03:12'."""
    return f"pipeline {parent_label(tags)} {time.strftime('%Y-%m-%d %H:%M')}"


def log_parent_params(store: Store, run_id: str, params_file: Path) -> None:
    """Every entry of the params file, under dotted keys."""
    from mlflow.entities import Param

    store.call("log parent params", store.client.log_batch, run_id,
               params=[Param(metric_key(k), v) for k, v in flat_params(params_file).items()])


def headline_metrics(root: Path, metrics_files: list[str]) -> dict[str, float]:
    """The headline figures among the metrics files a stage declares (and wrote)."""
    out: dict[str, float] = {}
    for rel in metrics_files:
        wanted = HEADLINE.get(Path(rel).as_posix())
        if not wanted:
            continue
        numbers = flat_numbers(read_json(root / rel))
        out.update({wanted[k]: v for k, v in numbers.items() if k in wanted})
    return out


def update_parent_metrics(store: Store, parent_id: str, root: Path,
                          metrics_files: list[str]) -> None:
    """Log the headline figures of a finished stage on the parent run (the latest value wins
    in MLflow's views: a re-run evaluate updates it)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    found = headline_metrics(root, metrics_files)
    store.call("log headline metrics", store.client.log_batch, parent_id,
               metrics=[Metric(k, v, now, 0) for k, v in found.items()])
