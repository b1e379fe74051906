"""Evaluation metrics beyond top-1: calibration (ECE) and out-of-distribution detection
(AUROC, AUPR, FPR at 95% TPR) from max-softmax scores. Plain numpy, no sklearn.

Conventions (Hendrycks & Gimpel 2017, the baseline the MixPro paper follows):
- the score is the maximum softmax probability (MSP); in-distribution (ID) samples should
  score higher than out-of-distribution (OOD) ones;
- AUROC = P(score_ID > score_OOD) + 0.5 P(tie) (Mann-Whitney U from average ranks);
- AUPR-In: ID as the positive class, score MSP; AUPR-Out: OOD positive, score -MSP. AUPR is the
  step-wise average precision sum_k (R_k - R_{k-1}) P_k over distinct thresholds (sklearn's
  `average_precision_score`), not the trapezoid;
- FPR@95: the fraction of OOD samples accepted at the highest threshold that keeps >= 95% of
  ID samples.
Worked example: ID [0.9, 0.8, 0.4], OOD [0.7, 0.4, 0.1] -> AUROC 7.5/9, AUPR-In 13/15.

ECE (Guo et al. 2017): 15 equal-width confidence bins (k/15, (k+1)/15];
ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|.
Worked example: conf [0.95, 0.95, 0.55, 0.25], correct [1, 0, 1, 0] -> 0.225 + 0.1125 + 0.0625
= 0.4.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["expected_calibration_error", "calibration_bins", "average_ranks", "auroc",
           "average_precision", "fpr_at_tpr", "ood_metrics"]


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    return a


def calibration_bins(confidence: Any, correct: Any, n_bins: int = 15) -> list[dict[str, float]]:
    """Per bin (k/n, (k+1)/n]: lower, upper, count, mean confidence, accuracy (empty bins: 0)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = _as_1d(confidence, "confidence")
    hit = _as_1d(correct, "correct")
    if conf.shape != hit.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.size} vs {hit.size}")
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidence must lie in [0, 1]")
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (n,)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=hit, minlength=n_bins)
    safe = np.maximum(count, 1)
    return [{"lower": k / n_bins, "upper": (k + 1) / n_bins, "count": int(count[k]),
             "confidence": float(conf_sum[k] / safe[k]), "accuracy": float(hit_sum[k] / safe[k])}
            for k in range(n_bins)]


def expected_calibration_error(confidence: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE in [0, 1] (see module docstring). confidence: (n,) max softmax; correct: (n,) 0/1."""
    bins = calibration_bins(confidence, correct, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        raise ValueError("ECE of an empty set")
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins))


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks, ties get the mean of their ranks: [3, 1, 3] -> [2.5, 1, 2.5]."""
    a = _as_1d(x, "scores")
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], s.size]                        # one past its last
    mean_rank = (starts + ends + 1) / 2.0                   # mean of ranks start+1 .. end
    ranks = np.empty(a.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _check_two(pos: Any, neg: Any) -> tuple[np.ndarray, np.ndarray]:
    p, n = _as_1d(pos, "positive scores"), _as_1d(neg, "negative scores")
    if p.size == 0 or n.size == 0:
        raise ValueError(f"need positive and negative samples, got {p.size} and {n.size}")
    return p, n


def auroc(pos: Any, neg: Any) -> float:
    """P(pos > neg) + 0.5 P(pos == neg), exact, from average ranks (Mann-Whitney U)."""
    p, n = _check_two(pos, neg)
    ranks = average_ranks(np.concatenate([p, n]))
    u = ranks[:p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * n.size))


def _roc_steps(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (TP, FP) at each distinct threshold, highest threshold first."""
    scores = np.concatenate([pos, neg])
    is_pos = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_pos[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last index of each tie group
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1.0 - y)[last]
    return tp, fp


def average_precision(pos: Any, neg: Any) -> float:
    """AUPR with `pos` as the positive class: sum_k (R_k - R_{k-1}) P_k over thresholds."""
    p, n = _check_two(pos, neg)
    tp, fp = _roc_steps(p, n)
    precision = tp / (tp + fp)
    recall = tp / p.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(pos: Any, neg: Any, tpr: float = 0.95) -> float:
    """FPR at the highest threshold whose TPR reaches `tpr`."""
    p, n = _check_two(pos, neg)
    tp, fp = _roc_steps(p, n)
    k = int(np.searchsorted(tp / p.size, tpr - 1e-12))  # first step with TPR >= tpr
    return float(fp[k] / n.size)


def ood_metrics(score_in: Any, score_out: Any) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out, FPR@95 for ID / OOD scores where higher means 'in'."""
    si, so = _check_two(score_in, score_out)
    return {"auroc": auroc(si, so), "aupr_in": average_precision(si, so),
            "aupr_out": average_precision(-so, -si), "fpr95": fpr_at_tpr(si, so),
            "num_in": int(si.size), "num_out": int(so.size)}
