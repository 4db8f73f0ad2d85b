"""A training run's history (one row per epoch, as `fit` returns it) -> the figures a stage
reports: the metrics summary, the images/s log line, the per-epoch CSV (plots/*.csv).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from stages.core.best import validation_key
from stages.core.io import atomic_path


def summary(history: list[dict[str, Any]], row: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final and best figures of a run's history, for the metrics file (numbers only). With
    `row`, the epoch the model file holds (keep_best's choice, `selected_epoch`: what `imagepipe
    tune` and export compare), val_loss/val_accuracy are that epoch's, the last's beside them.

    No timings: the metrics file is what `dvc metrics diff` and `dvc exp show` compare, and a
    rerun of the same params would show a changed images/s nobody made. Timings live in the
    plots table (per epoch), hence in the MLflow run's curves, and in the log (throughput)."""
    if not history:
        return {"epochs": 0}
    last = history[-1]
    scored = [r for r in history if r["val_acc"] is not None]
    # The epoch keep_best ships (core/best.py); max keeps the first of equal ones.
    best = max(scored, key=validation_key) if scored else None
    out = {
        "epochs": len(history), "train_loss": last["train_loss"], "train_accuracy": last["train_acc"],
        "val_loss": last["val_loss"], "val_accuracy": last["val_acc"],
        "best_val_accuracy": best["val_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
    }
    if row:
        out.update(val_loss=row["val_loss"], val_accuracy=row["val_acc"],
                   selected_epoch=row["epoch"], last_val_accuracy=last["val_acc"])
    return out


def speed(history: list[dict[str, Any]]) -> tuple[float, float]:
    """(training seconds, images/s) over the epochs of a history or of its plots table."""
    seconds = sum(float(r["seconds"]) for r in history)
    seen = sum(float(r["images_per_s"]) * float(r["seconds"]) for r in history)
    return seconds, seen / max(seconds, 1e-9)


def throughput(history: list[dict[str, Any]]) -> str:
    """'15 epochs in 13.7 s, 1,891 images/s' for the log line that ends a training phase."""
    seconds, rate = speed(history)
    return f"{len(history)} epochs in {seconds:.1f} s, {rate:,.0f} images/s"


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Rows with the same keys (a history's, evaluate's confusion pairs, audit's issues) as CSV,
    written atomically; the columns are `columns`, else the first row's key order. Given columns,
    a file with no rows still has its header (a reader can tell 'nothing' from 'not run')."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or (list(rows[0]) if rows else []),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
