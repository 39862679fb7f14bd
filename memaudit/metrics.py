"""Evaluation metrics shared by the measuring commands."""
from __future__ import annotations

import numpy as np

# --- ROC / AUC / TPR at FPR / bootstrap / calibrated thresholds (membership inference) ---
# Convention: a score >= threshold is predicted "member"; higher scores mean "more likely a member".


def _check_binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be 1-d arrays of the same length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: drop those samples first")
    if y.all() or not y.any():
        raise ValueError("need at least one positive (member) and one negative (non-member) sample")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score (ties move together), starting at (0, 0).

    Point i is the rule "member iff score >= thresholds[i]"; thresholds[0] = +inf predicts no member.
    """
    s, y = _check_binary(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    fpr = np.r_[0.0, fps / (~y).sum()]
    tpr = np.r_[0.0, tps / y.sum()]
    return fpr, tpr, np.r_[np.inf, s[ends]]


def auc_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoid area; with tied scores as one diagonal step this equals P(s_member > s_non) + P(tie)/2."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def roc_auc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return auc_from_roc(fpr, tpr)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Oracle TPR at a false-positive budget: the best ROC point with FPR <= target (threshold picked on the
    very samples it is evaluated on, as peers report it)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max())


def threshold_at_fpr(scores, labels, target: float) -> float:
    """The lowest threshold whose FPR on (scores, labels) is <= target (+inf if only "no member" qualifies)."""
    fpr, _, thr = roc_curve(scores, labels)
    return float(thr[np.flatnonzero(fpr <= target + 1e-12)[-1]])


def threshold_max_balanced_accuracy(scores, labels) -> float:
    """The threshold maximizing balanced accuracy (TPR + TNR) / 2; ties go to the highest threshold."""
    fpr, tpr, thr = roc_curve(scores, labels)
    return float(thr[int(np.argmax(tpr - fpr))])


def binary_metrics(scores, labels, threshold: float) -> dict[str, float]:
    """TPR, FPR, precision, balanced accuracy and F1 of the rule "member iff score >= threshold"."""
    s, y = _check_binary(scores, labels)
    pred = s >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tpr = tp / y.sum()
    fpr = fp / (~y).sum()
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"threshold": float(threshold), "tpr": float(tpr), "fpr": float(fpr), "precision": float(precision),
            "balanced_accuracy": float((tpr + 1 - fpr) / 2), "f1": float(f1)}


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) index arrays: `fraction` of each class (at least one) goes to calibration."""
    y = np.asarray(labels).astype(bool)
    if not 0.0 < fraction < 1.0:
        raise ValueError("the calibration fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    cal, ev = [], []
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(y == cls))
        k = min(len(idx) - 1, max(1, int(round(len(idx) * fraction))))
        if k < 1:
            raise ValueError("each class needs at least 2 samples to split off a calibration set")
        cal.append(idx[:k])
        ev.append(idx[k:])
    return np.sort(np.concatenate(cal)), np.sort(np.concatenate(ev))


def bootstrap_roc(scores, labels, *, n: int = 1000, seed: int = 0, fpr_targets=(0.01, 0.001),
                  ci: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of AUC and oracle TPR@FPR, resampling members and non-members
    separately (stratified, so every resample has both classes)."""
    s, y = _check_binary(scores, labels)
    pos, neg = s[y], s[~y]
    rng = np.random.default_rng(seed)
    labels_b = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    aucs = np.empty(n)
    tprs = np.empty((n, len(fpr_targets)))
    for b in range(n):
        sb = np.r_[pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]]
        fpr, tpr, _ = roc_curve(sb, labels_b)
        aucs[b] = auc_from_roc(fpr, tpr)
        tprs[b] = [tpr_at_fpr(fpr, tpr, t) for t in fpr_targets]
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    out = {"auc": np.percentile(aucs, [lo, hi]).tolist()}
    for j, t in enumerate(fpr_targets):
        out[f"tpr_at_fpr_{t:g}"] = np.percentile(tprs[:, j], [lo, hi]).tolist()
    return out


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------------------
# rouge-score's default tokenizer (no stemmer): lowercase, every run of characters outside [a-z0-9] becomes a
# space, split on whitespace, keep the non-empty [a-z0-9]+ tokens. Non-ASCII letters are dropped, as there.
import re as _re  # noqa: E402
from typing import Hashable, Sequence  # noqa: E402

_NON_ALNUM = _re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """Word tokens exactly as `rouge_score.tokenize.tokenize(text, stemmer=None)` makes them."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro): O(len(b)) big-int steps.

    Bit i of `v` is 0 where row i of the classic DP table grows; the LCS length is the number of 0 bits.
    """
    if not a or not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_f(target: Sequence[Hashable], prediction: Sequence[Hashable]) -> float:
    """ROUGE-L F-measure between two token sequences, with rouge-score's arithmetic (0 if either is empty)."""
    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    precision = lcs / len(prediction)
    recall = lcs / len(target)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l_text(target: str, prediction: str) -> float:
    """ROUGE-L F-measure on words, equal to `RougeScorer(['rougeL']).score(target, prediction)['rougeL'].fmeasure`."""
    return rouge_l_f(rouge_tokenize(target), rouge_tokenize(prediction))


def rouge_l_ids(target: np.ndarray | Sequence[int], prediction: np.ndarray | Sequence[int]) -> float:
    """ROUGE-L F-measure on token ids."""
    return rouge_l_f([int(t) for t in target], [int(t) for t in prediction])
