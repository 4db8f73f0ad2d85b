"""Live training curves: while a stage body runs, a thread tails the epoch file the training
loop appends to (stages/core/epochlog.py) and logs each new epoch into the stage's run, with
its epoch as the step, every few seconds and once more when the stage ends.

Inputs: the JSON Lines file (one row per epoch, with its phase), the stage's name and the
stems of its plots files. Output: metrics under the very keys and steps that the plots table
gives at the end (metrics.per_epoch_metrics), and the (key, step) pairs logged, so that the
end of the stage logs only what the live tail did not.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from stages.core.host import env_seconds
from stages.core.tracking.metrics import metric_key, number
from stages.core.tracking.store import Store

log = logging.getLogger("imagepipe.tracking")

INTERVAL_ENV = "IMAGEPIPE_EPOCH_LOG_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0  # a curve a few seconds behind; one small write per interval at most


def row_metrics(stage: str, row: dict[str, Any], plot_stems: set[str]
                ) -> list[tuple[str, float, int]]:
    """(key, value, step) of every number in one epoch row; step = its epoch."""
    step = number(row.get("epoch"))
    if step is None:
        return []
    # The key parts before the column, as per_epoch_metrics names the same row from its plots
    # table: '<file stem>/<phase>' ('finetune/head'), or '<phase>' alone when the phase has a
    # table of its own ('pretrain', 'scratch').
    phase = str(row.get("phase") or "")
    prefix = ([phase] if phase in plot_stems
              else [stage, phase] if phase not in ("", stage) else [stage])
    out: list[tuple[str, float, int]] = []
    for col, raw in row.items():
        value = number(raw)
        if col in ("epoch", "phase") or value is None:
            continue
        out.append((metric_key("/".join([*prefix, col])), value, int(step)))
    return out


class EpochTail:
    """The thread that logs the epochs of `path` into run `run_id` as they are appended."""

    def __init__(self, store: Store, run_id: str, path: Path, stage: str,
                 plot_stems: set[str]) -> None:
        self.store, self.run_id, self.path, self.stage = store, run_id, path, stage
        self.plot_stems = plot_stems
        self.logged: set[tuple[str, int]] = set()
        self._offset = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._thread = threading.Thread(target=self._loop, name=f"epoch-log-{self.stage}",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        period = env_seconds(INTERVAL_ENV, DEFAULT_INTERVAL_S, floor=0.05)
        while not self._stop.wait(period):
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - a live curve must never stop the stage
                if not self._warned:
                    log.warning("live epoch metrics: %s (retried; logged at the end)", err)
                    self._warned = True

    def flush(self) -> None:
        """Log the complete rows appended since the last flush."""
        from mlflow.entities import Metric

        with self._lock:
            try:
                with self.path.open("rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except OSError:
                return
            end = data.rfind(b"\n") + 1  # an unterminated last line waits for the next read
            if end == 0:
                return
            now = int(time.time() * 1000)
            found: list[tuple[str, float, int]] = []
            for line in data[:end].splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    found += row_metrics(self.stage, row, self.plot_stems)
            # Once per (key, step), even when a row is written twice (every rank of a
            # distributed stage that appends): the last value wins.
            latest = {(k, s): v for k, v, s in found if (k, s) not in self.logged}
            self.store.call("log epoch metrics", self.store.client.log_batch, self.run_id,
                            metrics=[Metric(k, v, now, s) for (k, s), v in latest.items()])
            self.logged.update(latest.keys())
            self._offset += end

    def stop(self) -> None:
        """Stop the thread and log what is left (raises TrackingDown when the store fails)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        try:
            self.flush()
        finally:
            self.path.unlink(missing_ok=True)
