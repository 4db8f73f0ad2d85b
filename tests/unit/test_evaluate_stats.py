"""evaluate's error bars on cases whose answer is known: a perfect classifier, McNemar with
known discordant counts, the majority class of a known label vector, a bootstrap interval that
must land near the normal approximation, macro-F1 per resample equal to sklearn's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.metrics import f1_score

from stages.core import stats


def test_perfect_classifier_has_a_point_interval() -> None:
    y = np.repeat(np.arange(4), 25)
    ci = stats.bootstrap_intervals(y, y.copy(), 4, y.copy())
    assert (ci["accuracy_ci_low"], ci["accuracy_ci_high"]) == (1.0, 1.0)
    assert (ci["macro_f1_ci_low"], ci["macro_f1_ci_high"]) == (1.0, 1.0)
    # Same predictions twice: every paired resample has gain exactly 0.
    assert (ci["transfer_gain_ci_low"], ci["transfer_gain_ci_high"]) == (0.0, 0.0)


def test_mcnemar_exact_with_known_discordant_counts() -> None:
    # 10 images only the first model gets right, none the other way, 5 both right, 5 both wrong.
    a = np.array([1] * 10 + [1] * 5 + [0] * 5, dtype=bool)
    b = np.array([0] * 10 + [1] * 5 + [0] * 5, dtype=bool)
    m = stats.mcnemar_exact(a, b)
    assert (m["only_a"], m["only_b"]) == (10, 0)
    assert m["p"] == pytest.approx(2 * 0.5 ** 10)
    # Symmetric and balanced: 3 vs 3 discordant is no evidence at all.
    a2 = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    assert stats.mcnemar_exact(a2, ~a2)["p"] == pytest.approx(1.0)
    assert stats.mcnemar_exact(a, a)["p"] == 1.0  # never disagree


def test_majority_accuracy_of_a_known_label_vector() -> None:
    assert stats.majority(np.array([0, 1, 1, 1, 2, 2, 1, 0])) == (pytest.approx(4 / 8), 1)
    assert stats.majority(np.array([3, 3, 3])) == (1.0, 3)
    assert stats.majority(np.array([], dtype=np.int64)) == (0.0, None)


def test_bootstrap_interval_matches_the_normal_approximation_at_large_n() -> None:
    n, p = 10_000, 0.8
    hits = np.zeros(n)
    hits[: int(n * p)] = 1.0
    lo, hi = stats.accuracy_interval(hits)
    half = 1.959964 * np.sqrt(p * (1 - p) / n)  # 0.00784
    assert lo == pytest.approx(p - half, abs=0.0015)
    assert hi == pytest.approx(p + half, abs=0.0015)
    assert stats.accuracy_interval(hits) == (lo, hi)  # seeded


def test_macro_f1_rows_equal_sklearn_per_resample() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, size=(20, 30))
    pred = np.where(rng.random((20, 30)) < 0.6, y, rng.integers(0, 5, size=(20, 30)))
    pred[0] = 0  # a row where most classes are never predicted
    ours = stats.macro_f1_rows(y, pred, 5)
    for i in range(len(y)):
        want = f1_score(y[i], pred[i], labels=np.arange(5), average="macro", zero_division=0)
        assert ours[i] == pytest.approx(want)


def test_one_image_has_a_point_interval() -> None:
    """scipy cannot resample one observation: the interval is the figure itself, as before."""
    ci = stats.bootstrap_intervals(np.array([1]), np.array([1]), 2, np.array([0]))
    assert (ci["accuracy_ci_low"], ci["accuracy_ci_high"]) == (1.0, 1.0)
    assert (ci["transfer_gain_ci_low"], ci["transfer_gain_ci_high"]) == (1.0, 1.0)
    assert stats.accuracy_interval(np.array([0.0])) == (0.0, 0.0)


def test_gain_interval_is_paired() -> None:
    # The finetuned model is right on every image the scratch one gets right, plus 20 more of
    # 400: unpaired intervals of the two accuracies would overlap; the paired gain's does not
    # reach 0, and McNemar agrees.
    y = np.zeros(400, dtype=np.int64)
    scratch = np.ones(400, dtype=np.int64)
    scratch[:200] = 0
    tuned = scratch.copy()
    tuned[200:220] = 0
    ci = stats.bootstrap_intervals(y, tuned, 2, scratch)
    assert ci["transfer_gain_ci_low"] > 0
    assert ci["accuracy_ci_low"] < ci["scratch_accuracy_ci_high"]  # unpaired: overlap
    s = stats.statistics(y, tuned, scratch, 2, seed=0)
    assert s["mcnemar_finetuned_only"] == 20 and s["mcnemar_scratch_only"] == 0
    word, sentence = stats.transfer_verdict(0.05, s["transfer_gain_ci_low"],
                                               s["transfer_gain_ci_high"], s["mcnemar_p"], 400)
    assert word == "helped" and "transfer helped" in sentence


def test_verdict_words() -> None:
    assert stats.transfer_verdict(-0.1, -0.15, -0.05, 0.001, 300)[0] == "hurt"
    word, sentence = stats.transfer_verdict(0.02, -0.03, 0.07, 0.4, 40)
    assert word == "inconclusive" and "cannot be told apart" in sentence
    # The interval clears 0 but McNemar does not: no direction claimed.
    assert stats.transfer_verdict(0.02, 0.001, 0.04, 0.2, 40)[0] == "inconclusive"


def test_wide_interval_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    m = {"accuracy_ci_low": 0.6, "accuracy_ci_high": 0.8, "macro_f1_ci_low": 0.7,
         "macro_f1_ci_high": 0.72, "transfer_gain_ci_low": None, "transfer_gain_ci_high": None,
         "n_test": 40}
    with caplog.at_level(logging.WARNING, logger="imagepipe.evaluate"):
        stats.warn_wide(m)
    assert "accuracy interval [0.600, 0.800] is wider than +/- 5 points" in caplog.text
    assert "macro_f1" not in caplog.text


def test_promote_refuses_a_challenger_no_better_than_the_majority_class() -> None:
    from commands.promote import decide

    truth = np.array(["cat"] * 70 + ["dog"] * 30, dtype=object)
    always_cat = truth == "cat"  # hits of a model that always answers "cat": accuracy 0.70
    floor = stats.majority(truth)
    assert floor == (pytest.approx(0.7), "cat")
    ci = stats.accuracy_interval(always_cat)
    ok, why = decide(0.7, None, "true", 0.0, ci=ci, majority=floor)
    assert not ok and "does not clear the majority-class accuracy 0.7000" in why
    assert "'cat'" in why
    # Better than the champion is not enough either.
    assert not decide(0.7, 0.4, "true", 0.0, ci=ci, majority=floor)[0]
    # A model right on 95 of 100: its interval clears 0.7, and the first version is promoted.
    good = np.ones(100, dtype=bool)
    good[:5] = False
    ok, why = decide(0.95, None, "true", 0.0, ci=stats.accuracy_interval(good), majority=floor)
    assert ok and "first version" in why
    # Above the floor by a hair on few images: the interval reaches it, refused.
    few = np.array([True] * 8 + [False] * 2)  # 0.8 on 10 images vs a floor of 0.7
    assert not decide(0.8, None, "true", 0.0, ci=stats.accuracy_interval(few), majority=floor)[0]
