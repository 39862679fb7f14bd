"""memaudit.metrics against independent computations: ROC and AUC (scipy's Mann-Whitney U, brute force), the
calibrated thresholds, the bootstrap, LCS (dynamic programming) and ROUGE-L (the rouge-score package)."""
import random

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from memaudit.metrics import (binary_metrics, bootstrap_roc, lcs_length, roc_auc, roc_curve, rouge_l_ids,
                              rouge_l_text, stratified_split, threshold_at_fpr, threshold_max_balanced_accuracy,
                              tpr_at_fpr)


def test_roc_auc_equals_mann_whitney_with_ties():
    rng = np.random.default_rng(0)
    for n1, n0 in [(30, 50), (7, 3), (200, 200)]:
        s = np.r_[rng.integers(0, 8, n1) + 0.5, rng.integers(0, 6, n0)].astype(float)  # many ties
        y = np.r_[np.ones(n1, bool), np.zeros(n0, bool)]
        u = mannwhitneyu(s[y], s[~y]).statistic
        assert roc_auc(s, y) == pytest.approx(u / (n1 * n0), abs=1e-12)



def test_roc_points_match_brute_force():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=60), 1)
    y = rng.random(60) < 0.4
    fpr, tpr, thr = roc_curve(s, y)
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:]):
        pred = s >= th
        assert f == pytest.approx(pred[~y].mean()) and t == pytest.approx(pred[y].mean())
    assert sorted(thr[1:].tolist(), reverse=True) == sorted(set(s.tolist()), reverse=True)
    # Oracle TPR at FPR <= 10%: the best over every possible threshold, by brute force.
    best = max(((s >= th)[y].mean() for th in np.r_[np.inf, s] if (s >= th)[~y].mean() <= 0.1))
    assert tpr_at_fpr(fpr, tpr, 0.1) == pytest.approx(best)



def test_calibrated_thresholds_and_binary_metrics():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    y = np.array([1, 1, 0, 1, 0, 1, 0, 0], bool)
    assert threshold_at_fpr(s, y, 0.0) == 0.8  # above the first non-member
    assert threshold_at_fpr(s, y, 0.25) == 0.6  # one false positive of 4 allowed
    m = binary_metrics(s, y, 0.6)  # predicted members: 0.9 0.8 0.7 0.6 -> tp 3, fp 1, fn 1
    assert (m["tpr"], m["fpr"], m["precision"]) == (0.75, 0.25, 0.75)
    assert m["f1"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)
    # balanced accuracy 0.75 at 0.8, 0.6 and 0.4 (tpr - fpr = 0.5 each): ties go to the highest threshold
    assert threshold_max_balanced_accuracy(s, y) == 0.8
    cal, ev = stratified_split(np.r_[np.ones(10, bool), np.zeros(6, bool)], 0.5, seed=0)
    assert len(set(cal) & set(ev)) == 0 and len(cal) + len(ev) == 16
    assert (cal < 10).sum() == 5 and (cal >= 10).sum() == 3



def test_bootstrap_interval_covers_and_is_seeded():
    rng = np.random.default_rng(2)
    s = np.r_[rng.normal(1, 1, 100), rng.normal(0, 1, 100)]
    y = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    a = bootstrap_roc(s, y, n=300, seed=5)
    assert a == bootstrap_roc(s, y, n=300, seed=5)
    lo, hi = a["auc"]
    assert lo < roc_auc(s, y) < hi and 0.05 < hi - lo < 0.3



def _lcs_dp(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]



def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        b = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        assert lcs_length(a, b) == _lcs_dp(a, b)



def test_rouge_l_text_equals_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(1)
    words = ["The", "cat", "sat", "on", "the", "mat.", "Ünïcode", "x_y", "42", "a-b", "", "!!", "CAT", "naïve", "\t\n"]
    pairs = [("", ""), ("", "a"), ("!!!", "a b"), ("Return the value.", "return the VALUE!")]
    pairs += [(" ".join(rng.choices(words, k=rng.randrange(0, 25))), " ".join(rng.choices(words, k=rng.randrange(0, 25))))
              for _ in range(300)]
    docs = [d for d in read_documents_safe()]
    pairs += [(docs[i][:200], docs[i + 1][:200]) for i in range(0, 40, 2)] + [(d[:150], d[:120]) for d in docs[:20]]
    for target, pred in pairs:
        assert rouge_l_text(target, pred) == scorer.score(target, pred)["rougeL"].fmeasure, (target, pred)



def read_documents_safe():
    from memaudit.corpus import stdlib_docstrings

    return stdlib_docstrings()[:60]



def test_rouge_l_ids_is_lcs_f_measure():
    for t, g in [([1, 2, 3, 4], [1, 3, 4, 5]), ([1, 1, 1], [1]), ([5], [6]), ([], [1])]:
        lcs = _lcs_dp(t, g)
        expect = 2 * lcs / (len(t) + len(g)) if t and g else 0.0
        assert rouge_l_ids(t, g) == pytest.approx(expect, abs=1e-12)
