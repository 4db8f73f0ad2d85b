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
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import EXIT_BAD_INPUT
from stages.core.host import project_root

METRIC = "finetune.val_accuracy"
SCRATCH_METRIC = "scratch.val_accuracy"  # the scratch stage's metrics
SCRATCH_PARAM = "finetune.scratch_lr"
# The metrics files measured on the test split: choosing by them would fit the test set.
TEST_FILES = ("evaluate", "per_class", "export")


class Refused(Exception):
    """A command line or project state that cannot give a pick: one line, exit 2."""


@dataclass(frozen=True)
class Row:
    name: str  # the experiment's name, or the baseline's "HEAD (rev)"
    rev: str
    baseline: bool
    params: dict[str, Any]  # flattened params.yaml: "finetune.lr" -> 0.01
    metrics: dict[str, Any]  # "finetune.val_accuracy" -> 0.9 (file stem + dotted key)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _row(record: dict[str, Any], baseline: bool) -> Row | None:
    data = record.get("data") or {}
    if record.get("error") or not data:
        return None  # queued, running or failed: nothing to compare
    params: dict[str, Any] = {}
    for content in (data.get("params") or {}).values():
        params.update(_flat(content.get("data") or {}))
    metrics: dict[str, Any] = {}
    for path, content in (data.get("metrics") or {}).items():
        metrics.update(_flat(content.get("data") or {}, Path(path).stem))
    rev = str(record.get("rev", ""))
    name = f"HEAD ({rev[:7]})" if baseline else str(record.get("name") or rev[:7])
    return Row(name, rev, baseline, params, metrics)


def rows_of(shown: list[dict[str, Any]]) -> list[Row]:
    """`dvc exp show --json` -> the baseline commits and their finished experiments."""
    rows = []
    for record in shown:
        if record.get("rev") == "workspace":
            continue  # HEAD's or an applied experiment's numbers again, maybe half-written
        if (row := _row(record, baseline=True)) is not None:
            rows.append(row)
        for exp in record.get("experiments") or []:
            for rev in (exp.get("revs") or [])[:1]:
                if (row := _row(rev, baseline=False)) is not None:
                    rows.append(row)
    return rows


def check_metric(metric: str) -> None:
    stem, _, key = metric.partition(".")
    if not key:
        raise Refused(f"--metric wants FILE.KEY (e.g. {METRIC}), got {metric!r}")
    if stem in TEST_FILES or "val" not in key:
        raise Refused(f"--metric {metric}: not a validation metric; tuning on the test split "
                      f"fits the test set (use {METRIC} or {SCRATCH_METRIC})")


def swept(rows: list[Row]) -> list[str]:
    """The params that differ between the rows, in params.yaml order."""
    keys = dict.fromkeys(k for r in rows for k in r.params)
    return [k for k in keys if len({json.dumps(r.params.get(k)) for r in rows}) > 1]


def _best(rows: list[Row], metric: str) -> Row:
    scored = [r for r in rows if isinstance(r.metrics.get(metric), (int, float))]
    if not scored:
        raise Refused(f"no finished experiment has {metric}; `dvc exp show` lists what there is")
    # A tie goes to the first row: the baseline, then experiments newest first (exp show order).
    return max(scored, key=lambda r: r.metrics[metric])


def pick(rows: list[Row], metric: str, scratch_metric: str | None) -> tuple[Row, list[str]]:
    """The chosen row and what was decided, one line each."""
    best = _best(rows, metric)
    notes = [f"best by {metric}: {best.name} ({best.metrics[metric]:.4f})"]
    keys = swept(rows)
    if scratch_metric is None or SCRATCH_PARAM not in keys:
        return best, notes
    scratch = _best(rows, scratch_metric)
    value = scratch.params.get(SCRATCH_PARAM)
    notes.append(f"best by {scratch_metric}: {SCRATCH_PARAM}={value} "
                 f"({scratch.name}, {scratch.metrics[scratch_metric]:.4f})")
    want = {k: best.params.get(k) for k in keys if k != SCRATCH_PARAM} | {SCRATCH_PARAM: value}
    both = [r for r in rows if all(r.params.get(k) == v for k, v in want.items())]
    if not both:
        notes.append(f"no experiment has both (not a full grid): keeping {best.name}")
        return best, notes
    return both[0], notes


def table(rows: list[Row], metrics: list[str], chosen: Row) -> str:
    """The rows, best first by metrics[0]: the swept params and the metrics; * marks the pick."""
    keys = swept(rows)
    grid = [["  experiment", *keys, *metrics]]
    grid += [[("* " if r is chosen else "  ") + r.name, *(str(r.params.get(k)) for k in keys),
              *(_fmt(r.metrics.get(m)) for m in metrics)]
             for r in sorted(rows, key=lambda r: -_num(r.metrics.get(metrics[0])))]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in grid)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("-inf")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="imagepipe tune",
        description="Pick the best experiment of HEAD's DVC experiments by validation accuracy "
                    "(never test) and apply it. Sweep first: dvc exp run --queue -S "
                    "'finetune.lr=0.01,0.03,0.1' -S 'finetune.scratch_lr=0.003,0.01'; "
                    "dvc queue start -j 2.")
    parser.add_argument("action", choices=["pick"])
    parser.add_argument("--metric", default=METRIC,
                        help=f"FILE.KEY of metrics/FILE.json to maximise (default {METRIC})")
    parser.add_argument("--scratch-metric", default=SCRATCH_METRIC,
                        help=f"picks {SCRATCH_PARAM} when the sweep varies it "
                             f"(default {SCRATCH_METRIC}; 'none' to pick by --metric alone)")
    parser.add_argument("--apply", action="store_true", help="dvc exp apply the pick")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    scratch = None if args.scratch_metric.lower() == "none" else args.scratch_metric
    root = project_root()
    try:
        for metric in filter(None, (args.metric, scratch)):
            check_metric(metric)
        shown = _dvc(root, "exp", "show", "--json")
        if shown.returncode != 0:
            raise Refused(f"dvc exp show failed: {(shown.stderr or shown.stdout).strip()}")
        rows = rows_of(json.loads(shown.stdout or "[]"))
        chosen, notes = pick(rows, args.metric, scratch)
    except Refused as err:
        print(f"imagepipe tune: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(table(rows, [m for m in (args.metric, scratch) if m], chosen))
    print("\n" + "\n".join(notes))
    if chosen.baseline:
        print(f"pick: the baseline {chosen.name}: nothing to apply")
        return 0
    print(f"pick: {chosen.name}\ndvc exp apply {chosen.name}")
    if not args.apply:
        return 0
    applied = _dvc(root, "exp", "apply", chosen.name)
    print((applied.stdout + applied.stderr).strip())
    return applied.returncode
