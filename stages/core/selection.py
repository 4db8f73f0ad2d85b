"""Which trained model export ships: models/finetuned.pt + models/scratch.pt (their recorded
validation accuracy, `extra.val_accuracy` of the epoch each file holds) + export.model ->
a Choice (the file, and a sentence that says why, for the log, the metrics and the registered
version's description).

`best` compares validation accuracy only, never the test split (that is evaluate's, and a
model chosen on it would be scored on the data it was chosen by). Where scratch beat transfer
on validation, the transferred model used to be exported anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages.core.errors import BadInput
from stages.core.models import load_model_file

log = logging.getLogger("imagepipe.export")

FINETUNED, SCRATCH = "finetuned", "scratch"


@dataclass(frozen=True)
class Choice:
    path: Path  # the model file to export
    model: str  # finetuned or scratch
    rule: str  # export.model: finetuned, scratch or best
    reason: str  # one sentence
    finetuned_val_accuracy: float | None = None
    scratch_val_accuracy: float | None = None

    def metrics(self) -> dict[str, Any]:
        return {"model": self.model, "model_rule": self.rule,
                "finetuned_val_accuracy": self.finetuned_val_accuracy,
                "scratch_val_accuracy": self.scratch_val_accuracy}


def _recorded(path: Path) -> tuple[float | None, int | None, bool]:
    """(validation accuracy, epoch, whether it was trained at all) as the model file records."""
    if not path.is_file():
        raise BadInput(f"{path} does not exist: run the stage that writes it first (dvc "
                       f"repro), or set export.model to the other model")
    extra = load_model_file(path)[1].extra
    acc = extra.get("val_accuracy")
    return (None if acc is None else float(acc)), extra.get("epoch"), extra.get("baseline", True)


def _said(acc: float | None, epoch: int | None) -> str:
    if acc is None:
        return "no validation accuracy"
    return f"validation accuracy {acc:.4f}" + (f" (epoch {epoch})" if epoch else "")


def choose(rule: Literal["finetuned", "scratch", "best"], finetuned: Path, scratch: Path
           ) -> Choice:
    """The model to export under `rule` (export.model); logs the choice and why."""
    if rule == FINETUNED:
        choice = Choice(finetuned, FINETUNED, rule, "The finetuned model: export.model is "
                                                    "finetuned.")
    elif rule == SCRATCH:
        _, _, trained = _recorded(scratch)
        if not trained:
            raise BadInput(f"export.model is scratch but {scratch} is untrained "
                           f"(finetune.baseline: false): set export.model to finetuned or best")
        choice = Choice(scratch, SCRATCH, rule, "The from-scratch baseline: export.model is "
                                                "scratch.")
    else:
        choice = _best(finetuned, scratch)
    log.info("export: exporting %s. %s", choice.path, choice.reason)
    return choice


def _best(finetuned: Path, scratch: Path) -> Choice:
    ft, ft_epoch, _ = _recorded(finetuned)
    sc, sc_epoch, trained = _recorded(scratch)
    both = f"finetuned {_said(ft, ft_epoch)}, scratch {_said(sc, sc_epoch)}"
    if not trained:
        return Choice(finetuned, FINETUNED, "best", "The finetuned model: there is no "
                      "from-scratch baseline to compare (finetune.baseline: false).", ft, None)
    if ft is None or sc is None:
        return Choice(finetuned, FINETUNED, "best", f"The finetuned model: export.model is "
                      f"best but the two cannot be compared ({both}).", ft, sc)
    if sc > ft:
        return Choice(scratch, SCRATCH, "best", f"The from-scratch baseline, the better on "
                      f"validation (export.model best: {both}).", ft, sc)
    tie = " (a tie keeps the finetuned one)" if sc == ft else ""
    return Choice(finetuned, FINETUNED, "best", f"The finetuned model, the better on "
                  f"validation{tie} (export.model best: {both}).", ft, sc)
