"""`imagepipe tune pick`: the best experiment of a DVC sweep by *validation* accuracy, and
`dvc exp apply` of it.

`dvc exp show --json` (experiments of HEAD) -> one row per experiment: its params and its
metrics -> the pick -> a table, the pick, and `dvc exp apply NAME` (run with --apply).

The pick never looks at the test split: metrics/evaluate.json (test) is refused, only a key
with "val" in its name counts. The finetuned model and its from-scratch baseline are tuned
alike, each by its own validation accuracy (`val_accuracy` of metrics/finetune.json and of
metrics/scratch.json): on a grid sweep of finetune.lr x finetune.scratch_lr, the pick is the
experiment with the finetuned model's best lr and the baseline's best scratch_lr, so the
transfer gain compares two tuned models, never a tuned one with a weakened one.

A metric is maximised, unless its name says it is a loss or an error (`val_loss`, `ece`):
those are minimised (`--direction` overrides). Rows that tie with the best are named.

With --apply, the picked experiment's registered version (export tags each version with its
DVC experiment name) becomes `challenger` when it is the model `dvc exp apply` put in the
workspace: queued experiments never move that alias themselves (stages/core/tracking/register.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.door import run_stage
from stages.core.errors import BadInput
from stages.core.flat import flatten_dict
from stages.core.host import project_root

METRIC = "finetune.val_accuracy"
SCRATCH_METRIC = "scratch.val_accuracy"  # the scratch stage's metrics
SCRATCH_PARAM = "finetune.scratch_lr"
# The metrics files measured on the test split: choosing by them would fit the test set.
TEST_FILES = ("evaluate", "per_class", "export")


@dataclass(frozen=True)
class Row:
    name: str  # the experiment's name, or the baseline's "HEAD (rev)"
    baseline: bool
    params: dict[str, Any]  # flattened params.yaml: "finetune.lr" -> 0.01
    metrics: dict[str, Any]  # "finetune.val_accuracy" -> 0.9 (file stem + dotted key)


def _row(record: dict[str, Any], baseline: bool) -> Row | None:
    data = record.get("data") or {}
    if record.get("error") or not data:
        return None  # queued, running or failed: nothing to compare
    params: dict[str, Any] = {}
    for content in (data.get("params") or {}).values():
        params.update(flatten_dict(content.get("data") or {}))
    metrics: dict[str, Any] = {}
    for path, content in (data.get("metrics") or {}).items():
        metrics.update(flatten_dict(content.get("data") or {}, Path(path).stem))
    rev = str(record.get("rev", ""))
    name = f"HEAD ({rev[:7]})" if baseline else str(record.get("name") or rev[:7])
    return Row(name, baseline, params, metrics)


def rows_of(shown: list[dict[str, Any]]) -> list[Row]:
    """`dvc exp show --json` -> the baseline commits and their finished experiments."""
    rows = []
    for record in shown:
        if record.get("rev") == "workspace":
            continue  # HEAD's or an applied experiment's numbers again, maybe half-written
        rows.append(_row(record, baseline=True))
        rows += [_row(exp["revs"][0], baseline=False) for exp in record.get("experiments") or []
                 if exp.get("revs")]
    return [row for row in rows if row is not None]


def check_metric(metric: str) -> None:
    stem, _, key = metric.partition(".")
    if not key:
        raise BadInput(f"--metric wants FILE.KEY (e.g. {METRIC}), got {metric!r}")
    if stem in TEST_FILES or "val" not in key:
        raise BadInput(f"--metric {metric}: not a validation metric; tuning on the test split "
                      f"fits the test set (use {METRIC} or {SCRATCH_METRIC})")


def swept(rows: list[Row]) -> list[str]:
    """The params that differ between the rows, in params.yaml order."""
    keys = dict.fromkeys(k for r in rows for k in r.params)
    return [k for k in keys if len({json.dumps(r.params.get(k)) for r in rows}) > 1]


# Key words of metrics that are better low: a loss, an error, calibration error (ece).
_LOWER_IS_BETTER = ("loss", "error", "ece", "mae", "mse", "rmse", "perplexity")


def direction_of(metric: str) -> str:
    """'min' for a metric whose last name part says it is a loss or an error, else 'max'."""
    words = metric.rpartition(".")[2].lower().split("_")
    return "min" if any(w in _LOWER_IS_BETTER for w in words) else "max"


def _score(row: Row, metric: str, direction: str) -> float:
    """Higher is better in `direction`; a row without the metric scores -inf."""
    value = row.metrics.get(metric)
    if not isinstance(value, (int, float)):
        return float("-inf")
    return -float(value) if direction == "min" else float(value)


def _best(rows: list[Row], metric: str, direction: str) -> tuple[Row, str]:
    """The best row by `metric` in `direction`, and a line saying which (and any ties)."""
    top = max((_score(r, metric, direction) for r in rows), default=float("-inf"))
    if top == float("-inf"):
        raise BadInput(f"no finished experiment has {metric}; `dvc exp show` lists what there is")
    # A tie goes to the first row: the baseline, then experiments newest first (exp show order).
    ties = [r for r in rows if _score(r, metric, direction) == top]
    best = ties[0]
    word = "lowest" if direction == "min" else "highest"
    line = f"best by {metric} ({word}): {best.name} ({best.metrics[metric]:.4f})"
    if len(ties) > 1:
        line += (f"; a tie between {', '.join(r.name for r in ties)}: {best.name} is the first "
                 "in `dvc exp show` order")
    return best, line


def pick(rows: list[Row], metric: str, scratch_metric: str | None, direction: str
         ) -> tuple[Row, list[str]]:
    """The chosen row and what was decided, one line each. direction: 'max' or 'min' for
    `metric` (--direction, or direction_of its name); the scratch metric's always comes from
    its name."""
    best, said = _best(rows, metric, direction)
    notes = [said]
    keys = swept(rows)
    if scratch_metric is None or SCRATCH_PARAM not in keys:
        return best, notes
    scratch, said = _best(rows, scratch_metric, direction_of(scratch_metric))
    value = scratch.params.get(SCRATCH_PARAM)
    notes.append(f"{said}: {SCRATCH_PARAM}={value}")
    want = {k: best.params.get(k) for k in keys if k != SCRATCH_PARAM} | {SCRATCH_PARAM: value}
    both = next((r for r in rows if all(r.params.get(k) == v for k, v in want.items())), None)
    if both is None:
        notes.append(f"no experiment has both (not a full grid): keeping {best.name}")
    return both or best, notes


def table(rows: list[Row], metrics: list[str], chosen: Row, direction: str) -> str:
    """The rows, best first by metrics[0] in `direction`: the swept params and the metrics;
    * marks the pick."""
    keys = swept(rows)
    grid = [["  experiment", *keys, *metrics]]
    grid += [[("* " if r is chosen else "  ") + r.name, *(str(r.params.get(k)) for k in keys),
              *(_fmt(r.metrics.get(m)) for m in metrics)]
             for r in sorted(rows, key=lambda r: -_score(r, metrics[0], direction))]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in grid)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imagepipe tune",
        description="Pick the best experiment of HEAD's DVC experiments by validation accuracy "
                    "(never test) and apply it. Sweep first: dvc exp run --queue -S "
                    "'finetune.lr=0.01,0.03,0.1' -S 'finetune.scratch_lr=0.003,0.01'; "
                    "dvc queue start -j 2.")
    parser.add_argument("action", choices=["pick"])
    parser.add_argument("--metric", default=METRIC,
                        help=f"FILE.KEY of metrics/FILE.json to pick by (default {METRIC})")
    parser.add_argument("--direction", choices=["auto", "max", "min"], default="auto",
                        help="maximise or minimise --metric (auto: minimise a name with loss "
                             "or error in it, e.g. finetune.val_loss; else maximise)")
    parser.add_argument("--scratch-metric", default=SCRATCH_METRIC,
                        help=f"picks {SCRATCH_PARAM} when the sweep varies it "
                             f"(default {SCRATCH_METRIC}; 'none' to pick by --metric alone)")
    parser.add_argument("--apply", action="store_true", help="dvc exp apply the pick")
    args = parser.parse_args(argv)
    # Not a pipeline stage: no MLflow run for a pick.
    return run_stage("tune", lambda: _pick_and_apply(args), track=False)


def _pick_and_apply(args: argparse.Namespace) -> None:
    scratch = None if args.scratch_metric.lower() == "none" else args.scratch_metric
    metrics = [m for m in (args.metric, scratch) if m]
    for metric in metrics:
        check_metric(metric)
    root = project_root()
    shown = _dvc(root, "exp", "show", "--json")
    if shown.returncode != 0:
        raise BadInput(f"dvc exp show failed: {(shown.stderr or shown.stdout).strip()}")
    rows = rows_of(json.loads(shown.stdout or "[]"))
    direction = direction_of(args.metric) if args.direction == "auto" else args.direction
    chosen, notes = pick(rows, args.metric, scratch, direction)
    print(table(rows, metrics, chosen, direction))
    print("\n" + "\n".join(notes))
    if chosen.baseline:
        print(f"pick: the baseline {chosen.name}: nothing to apply")
        return
    print(f"pick: {chosen.name}\ndvc exp apply {chosen.name}")
    if not args.apply:
        return
    applied = _dvc(root, "exp", "apply", chosen.name)
    print((applied.stdout + applied.stderr).strip())
    if applied.returncode != 0:
        raise BadInput(f"dvc exp apply {chosen.name} failed (exit {applied.returncode})")
    print(challenger_to(root, chosen.name))


def challenger_to(root: Path, experiment: str) -> str:
    """After `dvc exp apply`: the version registered in `experiment` becomes `challenger` when
    it is the workspace's models/model.onnx now (a queued experiment never moved the alias
    itself: stages/core/tracking/register.py). One line saying what happened."""
    from stages.core.integrity import file_sha256
    from stages.core.tracking import CHALLENGER, Registry, tracking_enabled
    from stages.core.tracking.register import EXP_TAG
    from stages.params import load_params

    if not tracking_enabled():
        return f"tracking is off: {CHALLENGER!r} not moved"
    name = load_params(root / "params.yaml").registry.model_name
    reg = Registry.connect(root)
    found = reg.tagged(name, EXP_TAG, experiment)
    if found is None:
        return (f"no version of {name} was registered in {experiment} (its run stopped before "
                f"export?): {CHALLENGER!r} not moved; `dvc repro` exports and registers it")
    onnx = root / "models" / "model.onnx"
    if not onnx.is_file() or file_sha256(onnx) != found.tags.get("onnx.sha256"):
        return (f"{name} v{found.version} ({experiment}) is not the workspace's {onnx.name} "
                f"after the apply: {CHALLENGER!r} not moved; `dvc repro` exports and registers it")
    with reg.lock(name):
        reg.set_alias(name, CHALLENGER, found.version)
    return f"{name} v{found.version} (experiment {experiment}) is now {CHALLENGER!r}"
