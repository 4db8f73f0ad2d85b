"""What a pipeline run leaves behind as a Prefect markdown artifact: stage outcomes, the
metrics of `metrics/*.json`, the promotion decision and the MLflow run ids. Pure functions
(no Prefect), so the text is tested without a server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.params import flatten_dict


def read_metrics(metrics_dir: Path) -> dict[str, dict[str, Any]]:
    """`metrics/NAME.json` -> {NAME: {dotted.key: scalar}}; unreadable files are noted, not fatal."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(metrics_dir.glob("*.json")):
        try:
            flat = flatten_dict(json.loads(path.read_text()))
            # Per-class tables and curves belong in plots, not in a summary table.
            found[path.stem] = {k: v for k, v in flat.items() if not isinstance(v, list)}
        except (OSError, ValueError) as err:
            found[path.stem] = {"(unreadable)": str(err).splitlines()[0]}
    return found


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def mlflow_run_ids(decision: Mapping[str, Any] | None) -> dict[str, str]:
    """Run ids the promotion step reported: any `*run_id` key, or a `run_ids` mapping.

    The hook for the MLflow side: `imagepipe promote --json` may add e.g.
    `challenger_run_id` or `run_ids: {stage: id}` and they appear here with no flow change.
    """
    if not decision:
        return {}
    ids = {k: str(v) for k, v in decision.items() if k.endswith("run_id") and v}
    nested = decision.get("run_ids")
    if isinstance(nested, Mapping):
        ids.update({str(k): str(v) for k, v in nested.items() if v})
    return ids


def render(*, title: str, flow_run_id: str | None, stages: Mapping[str, Mapping[str, Any]],
           overrides: list[str], metrics: Mapping[str, Mapping[str, Any]],
           decision: Mapping[str, Any] | None, promotion_note: str) -> str:
    lines = [f"# {title}", ""]
    if flow_run_id:
        lines += [f"Flow run `{flow_run_id}` (MLflow runs carry it as their lineage tag).", ""]
    if overrides:
        lines += ["**Params overrides** (written to params.yaml, recorded in dvc.lock):", ""]
        lines += [f"- `{o}`" for o in overrides] + [""]
    lines += ["## Stages", "", "| stage | outcome | seconds | attempts |", "|---|---|---|---|"]
    for name, info in stages.items():
        lines.append(f"| {name} | {_fmt(info.get('outcome', '-'))} | "
                     f"{_fmt(info.get('seconds', '-'))} | {info.get('attempts', '-')} |")
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| file | metric | value |", "|---|---|---|"]
        for file, values in metrics.items():
            lines += [f"| {file} | {k} | {_fmt(v)} |" for k, v in values.items()]
    else:
        lines.append("No `metrics/*.json` yet.")
    lines += ["", "## Promotion", "", _decision_text(decision, promotion_note)]
    ids = mlflow_run_ids(decision)
    lines += ["", "## MLflow runs", ""]
    lines += [f"- {k}: `{v}`" for k, v in ids.items()]
    if flow_run_id:
        # The stages' tracking groups its runs under this key (stages/core/tracking/grouping.py).
        lines += [f"- all runs of this pipeline run: `mlflow runs search` / UI filter "
                  f"``tags.`imagepipe.group` = 'pipeline:{flow_run_id}'``"]
    elif not ids:
        lines.append("No run ids reported.")
    return "\n".join(lines) + "\n"


def _decision_text(decision: Mapping[str, Any] | None, note: str) -> str:
    if not decision:
        return note or "Not run."
    verdict = "**promoted**" if decision.get("promoted") else "**not promoted**"
    text = (f"{verdict}: challenger v{decision.get('challenger_version')} "
            f"(accuracy {_fmt(decision.get('challenger_accuracy'))}) vs champion "
            f"v{decision.get('champion_version')} "
            f"(accuracy {_fmt(decision.get('champion_accuracy'))}). "
            f"Reason: {decision.get('reason', '-')}")
    return f"{text}\n\n{note}" if note else text
