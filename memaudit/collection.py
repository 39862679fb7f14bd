"""Collection-level membership: was this set of documents trained on? (Maini et al. 2024, "LLM Dataset
Inference", arXiv 2406.06443.)

`dataset_inference` takes per-sample MIA features (one row per window, or per document), each sample's side
(suspect = True, validation = False) and its document, and
  1. splits each side's documents into a learning and a test half at random (seeded): all windows of a document
     stay on one side of the split;
  2. on the learning halves only, clips each feature to its 2.5-97.5% quantiles, standardizes it, and fits a
     logistic regression (L2) suspect vs validation in which every document weighs the same;
  3. scores the test halves' windows with the learned combination and averages them per document;
  4. runs a one-sided Welch t-test: the held-out suspect documents score higher than the held-out validation ones.
Nothing learned (quantiles, means, weights) ever sees a tested sample. The test's unit is the document: windows of
one document overlap or share its topic, so they are not independent draws, and a t-test over windows would give
too-small p-values on two sets nobody trained on.
"""
from __future__ import annotations

from typing import Mapping, TypedDict

import numpy as np
from scipy import stats

from .errors import MemauditError

MIN_DOCUMENTS = 10  # per side: half learns the combination and half is tested, so each test half has >= 5
CLIP_QUANTILES = (0.025, 0.975)  # the official code clips the top and bottom 2.5% of every feature
L2 = 1e-2  # ridge on the standardized weights: keeps the fit finite when the sides separate perfectly
TEST = ("one-sided Welch t-test (unequal variances), H1: held-out suspect documents' mean combined score > "
        "held-out validation documents'")


class SideCounts(TypedDict):
    """One side's documents and windows, in all and in each half of the split."""
    documents: int
    windows: int
    learn_documents: int
    learn_windows: int
    test_documents: int
    test_windows: int


class CollectionTest(TypedDict, total=False):
    """summary["collection"] of `memaudit mia --collection`."""
    p_value: float  # small: the suspect set scores as trained on
    test: str
    statistic: float  # Welch's t
    df: float  # Welch-Satterthwaite degrees of freedom
    unit: str  # "document": what the t-test compares
    suspect: SideCounts  # the members file
    validation: SideCounts  # the non-members file (known unseen)
    mean_score: dict[str, float]  # held-out documents' mean combined score per side
    seed: int
    features: list[str]  # score columns combined
    weights: dict[str, float]  # per standardized feature; higher combined score = more suspect-like
    intercept: float
    left_out: dict[str, str]  # score columns or documents not used, and why
    how: str


def check_sizes(n_suspect: int, n_validation: int, note: str = "") -> None:
    """One error line unless both sides have MIN_DOCUMENTS documents."""
    if n_suspect < MIN_DOCUMENTS or n_validation < MIN_DOCUMENTS:
        raise MemauditError(f"--collection needs at least {MIN_DOCUMENTS} documents on each side (suspect: "
                            f"{n_suspect}, validation: {n_validation}{note}): half of each side learns the "
                            "combination of attacks and the other half is tested")


def split_documents(doc_side: np.ndarray, seed: int) -> np.ndarray:
    """A learning mask over documents: floor(n / 2) of each side's documents, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    learn = np.zeros(len(doc_side), bool)
    for side in (True, False):
        docs = rng.permutation(np.flatnonzero(doc_side == side))
        learn[docs[:len(docs) // 2]] = True
    return learn


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, l2: float = L2,
                 max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Weights and intercept minimizing sum_i weight_i * logloss_i + l2 / 2 * |w|^2 (intercept unpenalized), by
    Newton's method with backtracking: the objective is strictly convex, so this is its one minimum."""
    X = np.c_[np.ones(len(x)), x]
    pen = np.r_[0.0, np.full(x.shape[1], l2)]
    theta = np.zeros(X.shape[1])

    def objective(t: np.ndarray) -> float:
        z = X @ t
        return float(weight @ (np.logaddexp(0.0, z) - y * z) + 0.5 * (pen * t * t).sum())

    f = objective(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(X @ theta)))
        grad = X.T @ (weight * (p - y)) + pen * theta
        if np.abs(grad).max() < 1e-10:
            break
        hess = (X * (weight * p * (1 - p))[:, None]).T @ X + np.diag(pen + 1e-12)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while (new := objective(theta - t * step)) > f - 1e-4 * t * (grad @ step) and t > 1e-10:
            t /= 2
        theta, f = theta - t * step, new
    return theta[1:], float(theta[0])


def _standardize(x: np.ndarray, learn: np.ndarray) -> np.ndarray:
    """Clip each column to the learning rows' quantiles, then centre and scale by the learning rows' mean and
    standard deviation (a constant column becomes 0)."""
    lo, hi = np.quantile(x[learn], CLIP_QUANTILES, axis=0)
    x = np.clip(x, lo, hi)
    mean, std = x[learn].mean(axis=0), x[learn].std(axis=0)
    return (x - mean) / np.where(std > 0, std, 1.0)


def _counts(doc: np.ndarray, on_side: np.ndarray, doc_learn: np.ndarray) -> SideCounts:
    docs = np.unique(doc[on_side])
    learn_docs = docs[doc_learn[docs]]
    learn_w = on_side & doc_learn[doc]
    return SideCounts(documents=len(docs), windows=int(on_side.sum()), learn_documents=len(learn_docs),
                      learn_windows=int(learn_w.sum()), test_documents=len(docs) - len(learn_docs),
                      test_windows=int((on_side & ~learn_w).sum()))


def dataset_inference(features: Mapping[str, np.ndarray], suspect: np.ndarray, doc: np.ndarray, *,
                      seed: int) -> CollectionTest:
    """The test of module docstring. `features`: score column -> one finite value per sample; `suspect`: bool per
    sample; `doc`: each sample's document (any integers; a document's samples share one side)."""
    names = list(features)
    x = np.column_stack([np.asarray(features[n], dtype=np.float64) for n in names])
    suspect = np.asarray(suspect, bool)
    _, doc = np.unique(np.asarray(doc), return_inverse=True)  # documents as 0..D-1
    n_docs = int(doc.max()) + 1 if len(doc) else 0
    doc_side = np.zeros(n_docs, bool)
    doc_side[doc] = suspect
    if not np.isfinite(x).all() or (doc_side[doc] != suspect).any():
        raise ValueError("dataset_inference needs finite features and one side per document")
    check_sizes(int(doc_side.sum()), int((~doc_side).sum()))
    doc_learn = split_documents(doc_side, seed)
    learn = doc_learn[doc]
    z = _standardize(x, learn)
    per_doc = np.bincount(doc, minlength=n_docs)
    side_docs = np.bincount(doc_side[doc_learn].astype(int), minlength=2)  # learning documents per side
    weight = 1.0 / (per_doc[doc] * side_docs[suspect.astype(int)])  # each document weighs the same
    w, b = fit_logistic(z[learn], suspect[learn].astype(float), weight[learn])
    combined = z @ w + b
    doc_score = np.bincount(doc, weights=combined, minlength=n_docs) / np.maximum(per_doc, 1)
    test_s, test_v = doc_score[~doc_learn & doc_side], doc_score[~doc_learn & ~doc_side]
    res = stats.ttest_ind(test_s, test_v, equal_var=False, alternative="greater")
    return CollectionTest(
        p_value=float(res.pvalue), test=TEST, statistic=float(res.statistic), df=float(res.df), unit="document",
        suspect=_counts(doc, suspect, doc_learn), validation=_counts(doc, ~suspect, doc_learn),
        mean_score={"suspect": float(test_s.mean()), "validation": float(test_v.mean())}, seed=seed,
        features=names, weights=dict(zip(names, map(float, w))), intercept=b,
        how=(f"each side's documents split in halves (seed {seed}); on the learning halves every feature is clipped "
             f"to its {CLIP_QUANTILES[0]:g}-{CLIP_QUANTILES[1]:g} quantiles and standardized, and a logistic "
             f"regression (L2 {L2:g}, every document weighing the same) learns suspect vs validation; each held-out "
             "document's score is the mean of its windows' combined scores"))
