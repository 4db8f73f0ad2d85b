"""What a pipeline run leaves behind as Prefect artifacts: a markdown one that starts with the
promotion decision and the headline figures (accuracy and transfer gain with their intervals,
scratch, calibration, ONNX parity), then stage outcomes and where the MLflow runs are; and a
table one with every scalar of `metrics/*.json`. Pure functions (no Prefect), so the text is
tested without a server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.core.flat import flatten_dict


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


METRICS_KEY = "imagepipe-metrics"  # the table artifact with every metric


def metric_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the metrics table artifact: one per file and metric."""
    return [{"file": file, "metric": k, "value": _fmt(v)}
            for file, values in metrics.items() for k, v in values.items()]


def _interval(m: Mapping[str, Any], key: str, signed: bool = False) -> str | None:
    value = m.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        text += f" (95% CI [{low:.4f}, {high:.4f}])"
    return text


def headline(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(figure, value) of evaluate.json and export.json that a reader wants first."""
    ev, ex = metrics.get("evaluate", {}), metrics.get("export", {})
    gain = _interval(ev, "transfer_gain", signed=True)
    if gain and ev.get("transfer_verdict"):
        gain += f": {ev['transfer_verdict']}"
    rows = [(f"accuracy (target test, {ev.get('n_test', '?')} images)", _interval(ev, "accuracy")),
            ("transfer gain over scratch", gain),
            ("scratch accuracy (same data and budget)", _interval(ev, "scratch_accuracy")),
            ("majority-class floor", _interval(ev, "majority_accuracy")),
            ("ECE (expected calibration error)", _interval(ev, "ece")),
            ("audit: share flagged, audit_issues.csv", _interval(metrics.get("audit", {}), "issue_fraction"))]
    if "gate_passed" in ex:
        parity = ["passed" if ex["gate_passed"] is True else "**failed**"]
        parity += [f"{k.replace('_', ' ')} {_fmt(ex[k])}" for k in ("max_abs_diff", "top1_agreement")
                   if k in ex]
        rows.append(("ONNX parity", ", ".join(parity)))
    return [(k, v) for k, v in rows if v is not None]


def render(*, title: str, flow_run_id: str | None, stages: Mapping[str, Mapping[str, Any]],
           overrides: list[str], metrics: Mapping[str, Mapping[str, Any]],
           decision: Mapping[str, Any] | None, promotion_note: str) -> str:
    """Decision and headline figures first; then stages and runs. All metrics: metric_rows."""
    lines = [f"# {title}", "", "## Promotion", "", _decision_text(decision, promotion_note), ""]
    figures = headline(metrics)
    if figures:
        lines += ["## Headline figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in figures] + [""]
    if metrics:
        count = sum(len(v) for v in metrics.values())
        lines += [f"All {count} metrics of `metrics/*.json`: table artifact `{METRICS_KEY}`.", ""]
    else:
        lines += ["No `metrics/*.json` yet.", ""]
    if flow_run_id:
        lines += [f"Flow run `{flow_run_id}` (MLflow runs carry it as their lineage tag).", ""]
    if overrides:
        lines += ["**Params overrides** (written to params.yaml, recorded in dvc.lock):", ""]
        lines += [f"- `{o}`" for o in overrides] + [""]
    lines += ["## Stages", "", "| stage | outcome | seconds | attempts |", "|---|---|---|---|"]
    for name, info in stages.items():
        lines.append(f"| {name} | {_fmt(info.get('outcome', '-'))} | "
                     f"{_fmt(info.get('seconds', '-'))} | {info.get('attempts', '-')} |")
    return "\n".join(lines + ["", *_runs_section(decision, flow_run_id)]) + "\n"


def _runs_section(decision: Mapping[str, Any] | None, flow_run_id: str | None) -> list[str]:
    """Run ids, and only commands that exist to find the rest."""
    # Run ids the promotion step reported (`imagepipe promote --json`: its `*run_id` keys).
    ids = {k: str(v) for k, v in (decision or {}).items() if k.endswith("run_id") and v}
    lines = ["## MLflow runs", ""]
    lines += [f"- {k}: `{v}`" for k, v in ids.items()]
    if flow_run_id:
        # The stages' tracking groups its runs under this key (stages/core/tracking/grouping.py).
        lines += ["- all runs of this pipeline run: `mlflow ui`, then in the runs search box "
                  f"``tags.`imagepipe.group` = 'pipeline:{flow_run_id}'``"]
    elif not ids:
        lines.append("No run ids reported.")
    if decision:
        version = decision.get("challenger_version") or "VERSION"
        lines.append("- the model's runs, data and commit: `imagepipe lineage champion` "
                     f"(or `imagepipe lineage {version}`)")
    return lines


def _decision_text(decision: Mapping[str, Any] | None, note: str) -> str:
    if not decision:
        return note or "Not run."
    now = decision.get("current_champion_version")
    champion_now = f" Champion now: {'v' + str(now) if now else 'none'}."
    if not decision.get("challenger_version"):  # promote --missing-ok: no challenger at all
        reason = str(decision.get("reason", "-")).removeprefix("nothing to promote: ")
        return f"**nothing to promote**: {reason}.{champion_now}"
    verdict = "**promoted**" if decision.get("promoted") else "**not promoted**"
    champion = decision.get("champion_version")
    against = (f"champion v{champion} (accuracy {_fmt(decision.get('champion_accuracy'))})"
               if champion else "no champion")
    text = (f"{verdict}: challenger v{decision.get('challenger_version')} "
            f"(accuracy {_fmt(decision.get('challenger_accuracy'))}) vs {against}. "
            f"Reason: {decision.get('reason', '-')}.{champion_now}")
    return f"{text}\n\n{note}" if note else text
