"""Evaluation figures on cases whose answers are worked out by hand, so a wrong formula fails."""

from __future__ import annotations

import numpy as np
import pytest

from stages import evaluate


def test_ece_of_a_hand_computed_case() -> None:
    # One sample per bin (10 bins): confidences .9 .6 .7 .8, the last one wrong.
    # ECE = 1/4 (|1-.9| + |1-.6| + |1-.7| + |0-.8|) = 1/4 (.1 + .4 + .3 + .8) = 0.4
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    assert evaluate.expected_calibration_error(y, probs, bins=10) == pytest.approx(0.4)


def test_ece_pools_samples_that_share_a_bin() -> None:
    # Both in the 0.7-0.8 bin: mean confidence 0.75, accuracy 0.5 -> |0.5 - 0.75| = 0.25.
    y = np.array([0, 1])
    probs = np.array([[0.72, 0.28], [0.78, 0.22]])
    assert evaluate.expected_calibration_error(y, probs, bins=10) == pytest.approx(0.25)


def test_scores_of_known_predictions() -> None:
    # Truth 0 0 1 1 2 2; predicted 0 0 1 2 2 2: 5 of 6 right.
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 2, 2, 2])
    logits = np.full((6, 3), -5.0)
    logits[np.arange(6), pred] = 5.0
    s = evaluate.scores(y, logits, n_classes=3, bins=10)
    assert s["accuracy"] == pytest.approx(5 / 6)
    # Per class F1: class 0 = 1; class 1: P=1, R=.5 -> 2/3; class 2: P=2/3, R=1 -> 0.8.
    assert s["macro_f1"] == pytest.approx((1 + 2 / 3 + 0.8) / 3)
    assert s["top5_accuracy"] is None  # fewer than six classes: top-5 says nothing
