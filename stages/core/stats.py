"""Error bars and paired tests for one test split: 0/1 hits and predicted labels in, figures
out. evaluate writes them into metrics/evaluate.json; `imagepipe promote` gates on the
accuracy interval of the same bootstrap, so both read it from here.

Paired percentile bootstrap (Efron & Tibshirani 1993, ch. 13): every resample draws the same
test images for all models, so the gain's interval carries their correlation. 2000 resamples
put the Monte Carlo error of a 2.5% percentile near 0.3 points of the interval's own scale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("imagepipe.evaluate")

BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95
# An interval wider than +/- this (accuracy scale) gets a warning: at ~500 test images an
# accuracy near 0.8 is already +/- 3.5 points; below ~250 it passes 5.
WIDE_HALF_WIDTH = 0.05
# scipy draws the resamples this many index entries at a time (int64: 16 MB), whatever n.
_CHUNK_ENTRIES = 2_000_000


def percentile_intervals(data: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray],
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile intervals of every row `statistic` returns, paired: each resample
    draws the same images from every array of `data` (scipy.stats.bootstrap, paired=True).
    `statistic(*arrays, axis)` gets (k, n) resampled arrays and returns (rows, k). Fewer than
    two images cannot be resampled: the interval is the point value."""
    n = len(data[0])
    if n < 2:
        point = np.atleast_1d(np.asarray(statistic(*data, axis=-1), dtype=np.float64))
        return point, point
    from scipy.stats import bootstrap

    res = bootstrap(data, statistic, paired=True, vectorized=True, method="percentile",
                    n_resamples=BOOTSTRAP_RESAMPLES, batch=max(1, _CHUNK_ENTRIES // n),
                    confidence_level=CI_LEVEL, rng=np.random.default_rng([seed, n]))
    return np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)


def macro_f1_rows(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each row of (k, n) label matrices over classes 0..n_classes-1, as sklearn's
    f1_score(average="macro", labels=range(n_classes), zero_division=0): F1_c = 2 tp / (true +
    predicted), 0 for a class neither true nor predicted in that row. One bincount per count."""
    k = len(y)
    offset = (np.arange(k) * n_classes)[:, None]
    size = k * n_classes

    def count(keys: np.ndarray) -> np.ndarray:
        return np.bincount(keys.ravel(), minlength=size).reshape(k, n_classes)

    tp = count((offset + y)[y == pred])
    denom = count(offset + y) + count(offset + pred)
    f1 = np.divide(2.0 * tp, denom, out=np.zeros((k, n_classes)), where=denom > 0)
    return f1.mean(axis=1)


def bootstrap_intervals(y: np.ndarray, pred: np.ndarray, n_classes: int,
                        scratch_pred: np.ndarray | None = None, *, seed: int = 0
                        ) -> dict[str, Any]:
    """95% percentile intervals of accuracy and macro-F1, and (with the scratch baseline's
    predictions on the same images) of its accuracy and of the transfer gain, paired."""
    hit = (pred == y).astype(np.float64)
    other = hit if scratch_pred is None else (scratch_pred == y).astype(np.float64)

    def figures(y_: np.ndarray, pred_: np.ndarray, hit_: np.ndarray, other_: np.ndarray,
                axis: int = -1) -> np.ndarray:
        f1 = macro_f1_rows(np.atleast_2d(y_), np.atleast_2d(pred_), n_classes)
        acc, base = hit_.mean(axis=axis), other_.mean(axis=axis)
        return np.stack([acc, f1.reshape(np.shape(y_)[:-1]), base, acc - base])

    low, high = percentile_intervals((y, pred, hit, other), figures, seed)
    out: dict[str, Any] = {}
    for i, name in enumerate(("accuracy", "macro_f1", "scratch_accuracy", "transfer_gain")):
        known = i < 2 or scratch_pred is not None
        out[f"{name}_ci_low"] = float(low[i]) if known else None
        out[f"{name}_ci_high"] = float(high[i]) if known else None
    return out


def accuracy_interval(hits: np.ndarray) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of a 0/1 vector (promote's gate)."""
    low, high = percentile_intervals((np.asarray(hits, dtype=np.float64),),
                                     lambda h, axis=-1: h.mean(axis=axis), seed=0)
    return float(low[0]), float(high[0])


def majority(labels: np.ndarray) -> tuple[float, Any]:
    """(accuracy of always answering the most frequent label, that label): the floor a model
    must beat (evaluate reports it, promote gates on it). (0.0, None) for no labels."""
    values, counts = np.unique(labels, return_counts=True)
    if not len(values):
        return 0.0, None
    return float(counts.max() / counts.sum()), values[counts.argmax()]


def mcnemar_exact(a_hits: np.ndarray, b_hits: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two models on the same images: the discordant pairs (a right
    and b wrong: `only_a`; the reverse: `only_b`) are Binomial(only_a + only_b, 1/2) when
    neither model is better. Two-sided p; 1.0 when they never disagree."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_hits, dtype=bool), np.asarray(b_hits, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    p = float(binomtest(only_a, n, 0.5).pvalue) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": p}


def transfer_verdict(gain: float, lo: float, hi: float, p: float, n: int) -> tuple[str, str]:
    """("helped" | "hurt" | "inconclusive", one sentence). Both the paired interval and
    McNemar's test must agree before a direction is claimed."""
    figures = (f"gain {gain * 100:+.1f} points, 95% CI [{lo * 100:+.1f}, {hi * 100:+.1f}], "
               f"McNemar p={p:.3g}, {n} test images")
    if lo > 0 and p < 1 - CI_LEVEL:
        return "helped", f"transfer helped: {figures}"
    if hi < 0 and p < 1 - CI_LEVEL:
        return "hurt", f"transfer hurt: {figures}"
    return "inconclusive", (f"transfer and scratch cannot be told apart at this test size: "
                            f"{figures}")


def statistics(y: np.ndarray, pred: np.ndarray, scratch_pred: np.ndarray | None, n_classes: int,
               seed: int) -> dict[str, Any]:
    """Intervals, the majority-class floor and McNemar's test, as flat evaluate.json keys."""
    m = {} if scratch_pred is None else mcnemar_exact(pred == y, scratch_pred == y)
    return {**bootstrap_intervals(y, pred, n_classes, scratch_pred, seed=seed),
            "majority_accuracy": majority(y)[0], "ci_level": CI_LEVEL,
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "mcnemar_p": m.get("p"),
            "mcnemar_finetuned_only": m.get("only_a"), "mcnemar_scratch_only": m.get("only_b"),
            "transfer_verdict": None}


def warn_wide(metrics: dict[str, Any]) -> None:
    """One warning per interval wider than +/- WIDE_HALF_WIDTH."""
    for name in ("accuracy", "macro_f1", "transfer_gain"):
        lo, hi = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        if lo is not None and (hi - lo) / 2 > WIDE_HALF_WIDTH:
            log.warning("evaluate: the %s interval [%.3f, %.3f] is wider than +/- %d points: "
                        "%d test images cannot measure it closely; add test images",
                        name, lo, hi, round(WIDE_HALF_WIDTH * 100), metrics["n_test"])
