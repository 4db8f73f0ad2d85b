"""evaluate: data/target/ (test split) + models/finetuned.pt, models/scratch.pt, models/probe.pt
-> metrics/evaluate.json, reports/per_class.json, plots/confusion.png, plots/confusion.csv.

Scores the finetuned model, the from-scratch baseline and the linear probe on the target test
split with sklearn's metrics: accuracy, top-5 accuracy (6 classes or more), macro
precision/recall/F1, a per-class table, expected calibration error, the confusion matrix.
`transfer_gain` = accuracy - scratch_accuracy, whatever its sign.

Error bars (`<key>_ci_low`, `<key>_ci_high`), the majority-class floor and McNemar's test
(`mcnemar_p`) come from stages/core/stats.py; see README, "Training and transfer".

Behaviour checks on the finetuned model: the share of test predictions unchanged when every
image moves one pixel right, and (only where flips were part of its training policy, so the
model was taught that invariance) when every image is mirrored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import softmax

from stages.core.dataset import Dataset, load_dataset
from stages.core.door import arguments, exit_process, run_stage
from stages.core.errors import BadInput
from stages.core.io import atomic_path, write_json
from stages.core.stats import statistics, transfer_verdict, warn_wide
from stages.params import EvaluateParams, Params, load_params

if TYPE_CHECKING:
    from stages.core.models import ModelFile
    from stages.core.scoring import Scorer

# torch (through stages.core.scoring) and sklearn are imported where they are
# used: `python -m stages.evaluate --help` and the door come up without them.

log = logging.getLogger("imagepipe.evaluate")


@dataclass(frozen=True)
class Outputs:
    metrics: Path
    per_class: Path
    confusion_png: Path
    confusion_csv: Path


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """Top-label ECE over equal-width confidence bins (Guo et al. 2017). Hand-written: sklearn
    has reliability curves for binary problems only, not a multi-class ECE."""
    conf = probs.max(axis=1)
    hit = probs.argmax(axis=1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    # Each bin's share times |accuracy - confidence| there = |sum of (hit - conf) in it| / N.
    gap = np.bincount(which, weights=hit - conf, minlength=bins)
    return float(np.abs(gap).sum() / len(y))


def scores(y: np.ndarray, logits: np.ndarray, n_classes: int, bins: int) -> dict[str, Any]:
    """The headline figures of one model on one split."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, top_k_accuracy_score

    probs = softmax(logits.astype(np.float64), axis=1)
    pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, average="macro",
                                                       zero_division=0)
    top5 = (top_k_accuracy_score(y, probs, k=5, labels=labels) if n_classes >= 6 else None)
    return {"accuracy": float(accuracy_score(y, pred)), "top5_accuracy": top5,
            "macro_precision": float(prec), "macro_recall": float(rec), "macro_f1": float(f1),
            "ece": expected_calibration_error(y, probs, bins)}


def shift_right(images: np.ndarray) -> np.ndarray:
    """Every image one pixel to the right, the first column repeated (no wrap-around)."""
    out = images.copy()
    out[:, :, 1:] = images[:, :, :-1]
    return out


def behaviour(scorer: Scorer, images: np.ndarray, y: np.ndarray, pred: np.ndarray
              ) -> dict[str, Any]:
    shifted = scorer.logits(shift_right(images), y).argmax(axis=1)
    flip = None
    if scorer.mf.extra.get("hflip_policy", False):
        flipped = scorer.logits(np.ascontiguousarray(images[:, :, ::-1]), y).argmax(axis=1)
        flip = float(np.mean(flipped == pred))
    return {"shift_consistency": float(np.mean(shifted == pred)), "flip_consistency": flip}


def run(params: Params, data: Path, finetuned: Path, scratch: Path, probe: Path, out: Outputs
        ) -> dict[str, Any]:
    from sklearn.metrics import classification_report

    from stages.core.scoring import Scorer

    p = params.evaluate
    ds = load_dataset(data, verify=params.verify_data)
    images, y = test_split(ds)
    main_model = Scorer(finetuned, ds, p)
    logits = main_model.logits(images, y)
    pred = logits.argmax(axis=1)
    metrics = {**scores(y, logits, len(ds.classes), p.ece_bins), "n_test": int(len(y)),
               **behaviour(main_model, images, y, pred)}
    figures, scratch_pred = baselines(scratch, probe, main_model.mf, p, ds, images, y)
    metrics.update(figures)
    metrics["transfer_gain"] = (None if metrics["scratch_accuracy"] is None
                                else metrics["accuracy"] - metrics["scratch_accuracy"])
    metrics.update(statistics(y, pred, scratch_pred, len(ds.classes), params.seed))
    write_json(out.per_class, {"per_class": classification_report(
        y, pred, labels=np.arange(len(ds.classes)), target_names=ds.classes, output_dict=True,
        zero_division=0)})
    write_confusion(y, pred, ds.classes, out)
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
    report(metrics)
    return metrics


def report(m: dict[str, Any]) -> None:
    """The log lines: figures with their intervals, the verdict on transfer in words, warnings."""
    log.info("evaluate: accuracy %.4f [%.4f, %.4f] (95%% CI), macro-F1 %.4f [%.4f, %.4f], "
             "majority-class %.4f, scratch %s, probe %s on %d test images",
             m["accuracy"], m["accuracy_ci_low"], m["accuracy_ci_high"], m["macro_f1"],
             m["macro_f1_ci_low"], m["macro_f1_ci_high"], m["majority_accuracy"],
             m["scratch_accuracy"], m["probe_accuracy"], m["n_test"])
    if m["transfer_gain"] is not None:
        word, sentence = transfer_verdict(m["transfer_gain"], m["transfer_gain_ci_low"],
                                          m["transfer_gain_ci_high"], m["mcnemar_p"], m["n_test"])
        m["transfer_verdict"] = word
        log.info("evaluate: %s", sentence)
    if m["accuracy_ci_low"] <= m["majority_accuracy"]:
        log.warning("evaluate: the accuracy interval reaches down to the majority-class accuracy "
                    "%.4f: the model is not shown to beat always answering one class (promote "
                    "will refuse it)", m["majority_accuracy"])
    warn_wide(m)


def test_split(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, y = ds.part("test")
    if not len(y):
        raise BadInput("the target test split is empty: nothing to evaluate")
    return images, y


def baselines(scratch: Path, probe: Path, mf: ModelFile, p: EvaluateParams, ds: Dataset,
              images: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], np.ndarray | None]:
    """Scratch-baseline and linear-probe figures (None where that model was not trained), and
    the baseline's predictions (for the paired intervals and McNemar's test)."""
    from stages.core.scoring import Scorer

    out: dict[str, Any] = {"scratch_accuracy": None, "scratch_macro_f1": None, "scratch_ece": None,
                           "probe_accuracy": None}
    scratch_pred = None
    base = Scorer(scratch, ds, p)
    if (base.mf.mean, base.mf.std) != (mf.mean, mf.std):
        raise BadInput(f"{scratch} normalises with other numbers than the finetuned model: "
                       "both must come from the same finetune run")
    if base.mf.extra.get("baseline", True):
        base_logits = base.logits(images, y)
        scratch_pred = base_logits.argmax(axis=1)
        s = scores(y, base_logits, len(ds.classes), p.ece_bins)
        out.update(scratch_accuracy=s["accuracy"], scratch_macro_f1=s["macro_f1"],
                   scratch_ece=s["ece"])
    else:
        log.info("evaluate: the baseline was off (finetune.baseline: false): no transfer gain")
    lin = Scorer(probe, ds, p)
    if lin.mf.extra.get("head_epochs", 0) > 0:
        out["probe_accuracy"] = float(np.mean(lin.logits(images, y).argmax(axis=1) == y))
    return out, scratch_pred


def write_confusion(y: np.ndarray, pred: np.ndarray, classes: list[str], out: Outputs) -> None:
    """The matrix as a figure with class names on both axes, and as rows for DVC's template."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    from stages.core.history import write_csv

    labels = np.arange(len(classes))
    side = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(confusion_matrix(y, pred, labels=labels), display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if len(classes) > 6 else "horizontal")
    ax.set_title(f"finetuned model\ntarget test split, {len(y)} images", fontsize=10)
    fig.tight_layout()
    with atomic_path(out.confusion_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    write_csv(out.confusion_csv, [{"actual": classes[a], "predicted": classes[b]}
                                  for a, b in zip(y, pred, strict=True)])


def main(argv: list[str] | None = None) -> int:
    args = arguments("evaluate", __doc__, argv, data="data/target", model="models/finetuned.pt",
                     scratch="models/scratch.pt", probe="models/probe.pt",
                     metrics="metrics/evaluate.json", per_class="reports/per_class.json",
                     confusion="plots/confusion.png", confusion_data="plots/confusion.csv")
    out = Outputs(args.metrics, args.per_class, args.confusion, args.confusion_data)

    def body() -> None:
        params = load_params(args.params)
        write_json(out.metrics, run(params, args.data, args.model, args.scratch, args.probe, out))

    return run_stage("evaluate", body)


if __name__ == "__main__":
    exit_process(main())
