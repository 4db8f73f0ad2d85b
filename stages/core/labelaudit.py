"""Label issues from features: backbone features + given labels -> out-of-sample class
probabilities (K-fold cross-validated linear probe) -> cleanlab's ranked label issues.

Confident learning (Northcutt et al., JAIR 2021) needs probabilities from a model that never
saw the image it scores; a probe refit K times on K-1 folds of fixed features gives them at
the price of K small logistic regressions (the backbone runs once, not K times).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# cleanlab's default: drop from each class the examples that its estimate of the noise rate
# says are mislabelled, most confidently wrong first (Northcutt et al., section 3.1).
FILTER_BY = "prune_by_noise_rate"
# Ranks the flagged ones by the probe's probability of the given label: the lower, the surer.
RANKED_BY = "self_confidence"
METHOD = (f"cleanlab find_label_issues (filter_by={FILTER_BY}, ranked by {RANKED_BY}) on "
          "K-fold out-of-sample probabilities of a logistic-regression probe on the finetuned "
          "backbone's features")


@dataclass(frozen=True)
class LabelIssues:
    """Flagged positions (into the audited rows), most severe first, with what the probe says."""

    ranked: np.ndarray  # int positions, most severe first
    quality: np.ndarray  # per audited row: the probe's probability of the given label
    suggested: np.ndarray  # per audited row: the probe's most probable class
    oos_accuracy: float  # the probe's out-of-sample accuracy against the given labels
    folds: int  # K actually used (fewer than asked when a class has fewer images)


def audit_labels(features: np.ndarray, labels: np.ndarray, *, folds: int, c: float, seed: int
                 ) -> LabelIssues | None:
    """Features and given labels of the audited images -> cleanlab's ranking of those whose
    given label their out-of-sample probabilities (each row from the probe of the fold that
    left it out) contradict; None when some class has fewer than 2 of them: no probe can be
    fitted without it and scored on it. Stratified folds: K is at most the smallest class's
    count."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    if smallest < 2:
        return None
    k = min(folds, smallest)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    # One BLAS thread: these fits are small, and BLAS's thread pool made them slower, not
    # faster (5 folds, 192 x 64 features: 4.7 s against 1.3 s on one thread, 2 busy cores).
    with threadpool_limits(limits=1):
        probs = cross_val_predict(probe, features, labels, cv=cv, method="predict_proba")
    # n_jobs=1: cleanlab's default starts a process pool per class, slower than serial at the
    # sizes a stage audits and a poor neighbour on a shared machine.
    ranked = find_label_issues(labels, probs, filter_by=FILTER_BY,
                               return_indices_ranked_by=RANKED_BY, n_jobs=1)
    suggested = probs.argmax(axis=1)
    return LabelIssues(ranked=np.asarray(ranked, dtype=np.int64),
                       quality=get_label_quality_scores(labels, probs, method=RANKED_BY),
                       suggested=suggested, oos_accuracy=float(np.mean(suggested == labels)),
                       folds=k)
