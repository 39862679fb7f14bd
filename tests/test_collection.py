"""Dataset inference (memaudit.collection) on synthetic features: the fit against scipy's optimizer, the whole test
against a plain re-computation, learning never touching tested documents, calibrated p-values under the null,
power under a shift, and the minimum size. The model-backed checks (a trained-on collection, two unseen halves)
are in tests/test_mia.py."""
import numpy as np
import pytest
from scipy import optimize, stats

from memaudit.collection import CLIP_QUANTILES, L2, MIN_DOCUMENTS, dataset_inference, fit_logistic, split_documents
from memaudit.errors import MemauditError


def _synthetic(rng, n_docs=40, n_features=4, shift=0.0, doc_sd=1.0):
    """Documents with 3-30 windows each; a per-document random effect shared by its windows (as windows of one
    text share its topic) plus per-window noise; the first half of the documents is the suspect side, shifted."""
    n_windows = rng.integers(3, 31, n_docs)
    doc = np.repeat(np.arange(n_docs), n_windows)
    suspect_doc = np.arange(n_docs) < n_docs // 2
    x = rng.normal(0, doc_sd, (n_docs, n_features))[doc] + rng.normal(0, 1, (len(doc), n_features))
    x[suspect_doc[doc], 0] += shift
    return {f"f{i}": x[:, i] for i in range(n_features)}, suspect_doc[doc], doc


def test_fit_equals_scipy_minimum_of_the_same_objective():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x @ [1.5, -1.0, 0.0] + rng.normal(size=200) > 0).astype(float)
    weight = rng.uniform(0.5, 2.0, 200) / 200

    def objective(theta):
        z = theta[0] + x @ theta[1:]
        return weight @ (np.logaddexp(0, z) - y * z) + 0.5 * L2 * (theta[1:] ** 2).sum()

    w, b = fit_logistic(x, y, weight)
    ref = optimize.minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-12})
    assert np.allclose(np.r_[b, w], ref.x, atol=1e-5)
    # perfectly separated sides: the ridge keeps the fit finite, and it still points the right way
    sep = np.r_[np.zeros(50), np.ones(50)]
    w2, _ = fit_logistic(np.c_[sep * 4 - 2, rng.normal(size=100)], sep, np.full(100, 0.01))
    assert np.isfinite(w2).all() and w2[0] > 0


def test_whole_test_equals_a_plain_recomputation():
    rng = np.random.default_rng(1)
    feats, suspect, doc = _synthetic(rng, shift=0.3)
    got = dataset_inference(feats, suspect, doc, seed=7)
    names = list(feats)
    # the split: floor(n/2) of each side's documents learn, drawn as split_documents draws them
    doc_side = np.array([suspect[doc == d][0] for d in range(doc.max() + 1)])
    learn_doc = split_documents(doc_side, 7)
    for side in (True, False):
        assert learn_doc[doc_side == side].sum() == (doc_side == side).sum() // 2
    learn = np.array([learn_doc[d] for d in doc])
    # clip, standardize with the learning windows' figures only, column by column
    z = np.empty((len(doc), len(names)))
    for j, n in enumerate(names):
        lo, hi = np.quantile(feats[n][learn], CLIP_QUANTILES)
        col = np.clip(feats[n], lo, hi)
        z[:, j] = (col - col[learn].mean()) / col[learn].std()
    # every learning document weighs the same, and each side sums to one
    weight = np.zeros(len(doc))
    for d in range(doc.max() + 1):
        if learn_doc[d]:
            n_side = sum(learn_doc[e] and doc_side[e] == doc_side[d] for e in range(doc.max() + 1))
            weight[doc == d] = 1 / ((doc == d).sum() * n_side)
    w, b = fit_logistic(z[learn], suspect[learn].astype(float), weight[learn])
    assert np.allclose([got["weights"][n] for n in names], w) and got["intercept"] == pytest.approx(b)
    scores = {d: np.mean([z[i] @ w + b for i in np.flatnonzero(doc == d)]) for d in range(doc.max() + 1)}
    held_s = [scores[d] for d in scores if not learn_doc[d] and doc_side[d]]
    held_v = [scores[d] for d in scores if not learn_doc[d] and not doc_side[d]]
    want = stats.ttest_ind(held_s, held_v, equal_var=False, alternative="greater")
    assert got["p_value"] == pytest.approx(want.pvalue, rel=1e-9) and got["statistic"] == pytest.approx(want.statistic)
    assert got["suspect"]["test_documents"] == len(held_s) and got["validation"]["test_documents"] == len(held_v)
    assert got["suspect"]["windows"] == suspect.sum() and got["validation"]["learn_windows"] == (learn & ~suspect).sum()
    assert got["unit"] == "document" and got["seed"] == 7 and got["features"] == names


def test_learning_never_sees_the_tested_documents():
    rng = np.random.default_rng(2)
    feats, suspect, doc = _synthetic(rng, shift=0.5)
    base = dataset_inference(feats, suspect, doc, seed=3)
    doc_side = np.array([suspect[doc == d][0] for d in range(doc.max() + 1)])
    tested = ~split_documents(doc_side, 3)[doc]
    moved = {n: np.where(tested, v * 10 + 5, v) for n, v in feats.items()}  # only tested windows change
    again = dataset_inference(moved, suspect, doc, seed=3)
    assert again["weights"] == base["weights"] and again["intercept"] == base["intercept"]
    assert again["p_value"] != base["p_value"]


def test_pvalues_are_uniform_when_neither_side_was_trained_on():
    """Two sides from one source, windows sharing their document's random effect: the document-level test keeps
    its size (a window-level t-test would not: its windows are not independent)."""
    rng = np.random.default_rng(3)
    p = np.array([dataset_inference(*_synthetic(rng), seed=s)["p_value"] for s in range(200)])
    print(f"null: P(p < 0.05) = {(p < 0.05).mean():.3f}, KS p = {stats.kstest(p, 'uniform').pvalue:.3f}")
    assert 0.01 <= (p < 0.05).mean() <= 0.10
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_a_shifted_suspect_side_is_found():
    rng = np.random.default_rng(4)
    p = [dataset_inference(*_synthetic(rng, shift=1.5, doc_sd=0.5), seed=s)["p_value"] for s in range(10)]
    assert max(p) < 1e-3, p


def test_fewer_than_ten_documents_a_side_is_one_clear_line():
    rng = np.random.default_rng(5)
    feats, suspect, doc = _synthetic(rng, n_docs=2 * MIN_DOCUMENTS - 2)  # 9 a side
    with pytest.raises(MemauditError, match=f"--collection needs at least {MIN_DOCUMENTS} documents on each side "
                                            r"\(suspect: 9, validation: 9\)") as e:
        dataset_inference(feats, suspect, doc, seed=0)
    assert "\n" not in str(e.value)
