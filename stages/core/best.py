"""The best epoch of a training run: a model's weights at the epoch with the best validation
score so far, kept while it trains, so the stage ships that epoch instead of the last one
(timm's best-metric checkpoint habit). Input: each finished epoch's history row and the
model at that moment. Output: `restore()` puts the best epoch's weights back into the model
and returns its row.

It rides in the training checkpoint (`fit` saves it with the model and optimizer states), so
a run killed after its best epoch still ships that epoch when it resumes, and a rerun of a
finished run (a complete checkpoint, nothing to train) restores it too. One keeper may span
several `fit` calls on the same model (finetune's head and full phases): the best of all.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("imagepipe.train")


def validation_key(row: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: validation accuracy, then the lower validation loss. Equal keys keep
    the earlier epoch: more epochs that add nothing on validation are not more evidence.
    (history.summary's best_epoch ranks by the same key.)"""
    loss = row.get("val_loss")
    return float(row["val_acc"]), -float(loss) if loss is not None else float("-inf")


class BestEpoch:
    """Keeps a copy (on the CPU) of `model`'s weights at its best epoch by validation."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.row: dict[str, Any] | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def observe(self, row: dict[str, Any]) -> None:
        """After an epoch (the model holds its weights): keep them if this epoch is the best."""
        if row.get("val_acc") is None:  # no validation split: nothing to choose by
            return
        if self.row is None or validation_key(row) > validation_key(self.row):
            self.row = dict(row)
            self.weights = {k: v.detach().to("cpu", copy=True)
                            for k, v in self.model.state_dict().items()}

    def restore(self) -> dict[str, Any] | None:
        """Load the best epoch's weights into the model; its history row, or None (then the
        model keeps its last weights: no epoch was validated)."""
        if self.row is None:
            return None
        self.model.load_state_dict(self.weights)
        return self.row

    # CheckpointStore saves and resumes anything with these two (torch.load weights_only:
    # tensors and plain containers only, so the row travels as JSON text).
    def state_dict(self) -> dict[str, Any]:
        return {"row": json.dumps(self.row), "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.row = json.loads(state["row"])
        self.weights = dict(state["weights"])


def chosen(best: BestEpoch | None, history: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Restore the best epoch when keeping it, log which epoch the model file holds and why;
    return that epoch's row ({} when no epoch ran)."""
    if not history:
        return {}
    last = history[-1]
    row = best.restore() if best is not None else None
    if row is None:
        why = ("keep_best is off" if best is None
               else "no validation split to choose by")
        log.info("%s: the model is the last epoch (%d, val acc %s): %s", name, last["epoch"],
                 last["val_acc"], why)
        return last
    log.info("%s: the model is epoch %d of %d, the best by validation (val acc %s, loss %s; "
             "the last epoch had %s)", name, row["epoch"], last["epoch"], row["val_acc"],
             row["val_loss"], last["val_acc"])
    return row
