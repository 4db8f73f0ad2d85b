"""One line per finished epoch, for the live training curve: the training loop calls
`record_epoch(phase, row)` as each epoch ends; while a tracked stage runs, its MLflow run
(stages/core/tracking/live.py) tails the file and logs the new rows every few seconds, so a
long pretrain shows its curve as it goes and a crashed one keeps the epochs it finished.

Input: IMAGEPIPE_EPOCH_LOG, the JSON Lines file the stage's run names (unset: tracking off,
a test, a stage run outside the door; then this does nothing). Output: one JSON object per
line, the row with its phase. No MLflow, nothing but the standard library: the training loop
imports it for free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

EPOCH_LOG_ENV = "IMAGEPIPE_EPOCH_LOG"


def record_epoch(phase: str, row: Mapping[str, Any]) -> None:
    """Append `row` (one epoch's figures) under `phase`; a no-op when no run listens.

    One write of one line in append mode: a reader never sees half a row from a finished
    write (it keeps an unterminated last line for the next read). A failure to write is
    ignored: a curve is not worth a training run.
    """
    path = os.environ.get(EPOCH_LOG_ENV)
    if not path:
        return
    line = json.dumps({**row, "phase": phase}, default=str) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError:
        pass
