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
from stages.core.tracking.metrics import flat_numbers, metric_key, read_structured
from stages.core.tracking.store import Store

EXP_NAME_ENV = "DVC_EXP_NAME"  # dvc/env.py; set by `dvc exp run` (queued, temp or workspace)
_MAX_PARAMS, _PARAM_CHARS = 100, 6000  # MLflow's limits per log_batch and per value

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


def parent_tags() -> dict[str, str]:
    exp = os.environ.get(EXP_NAME_ENV)
    return {"dvc.exp_name": exp} if exp else {}


def all_params(params_file: Path) -> dict[str, str]:
    """Every section of the params file, flattened to dotted keys; {} if it is bad (the stage
    reports that itself with exit code 2)."""
    import json

    from stages.core.errors import BadInput
    from stages.params import flatten, load_params

    try:
        params = load_params(params_file)
    except BadInput:
        return {}
    out: dict[str, str] = {}
    for key, value in flatten(params).items():
        text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
        out[metric_key(key)] = text[:_PARAM_CHARS]
    return out


def log_parent_params(store: Store, run_id: str, params_file: Path) -> int:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in all_params(params_file).items()]
    for lo in range(0, len(items), _MAX_PARAMS):
        store.call("log parent params", store.client.log_batch, run_id,
                   params=items[lo:lo + _MAX_PARAMS])
    return len(items)


def headline_metrics(root: Path, metrics_files: list[str]) -> dict[str, float]:
    """The headline figures among the metrics files a stage declares (and wrote)."""
    out: dict[str, float] = {}
    for rel in metrics_files:
        wanted = HEADLINE.get(Path(rel).as_posix())
        if not wanted:
            continue
        numbers = flat_numbers(read_structured(root / rel))
        out.update({wanted[k]: v for k, v in numbers.items() if k in wanted})
    return out


def update_parent_metrics(store: Store, parent_id: str, root: Path,
                          metrics_files: list[str]) -> dict[str, float]:
    """Log the headline figures of a finished stage on the parent run (the latest value wins
    in MLflow's views: a re-run evaluate updates it)."""
    from mlflow.entities import Metric

    found = headline_metrics(root, metrics_files)
    if found:
        now = int(time.time() * 1000)
        store.call("log headline metrics", store.client.log_batch, parent_id,
                   metrics=[Metric(k, v, now, 0) for k, v in found.items()])
    return found
