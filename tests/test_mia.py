"""Membership inference: every attack against an independent full-logits loop,
orientation (memorized model: AUC > 0.9; a model that saw neither set: 0.5 inside the interval), bad input."""
import json
import math
import zlib
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
import zstandard

from memaudit import mia
from memaudit.collection import dataset_inference
from memaudit.membership import MiaSettings, MiaSummary, mia_headline
from memaudit.data import read_documents, tokenize, write_documents
from memaudit.errors import MemauditError
from memaudit.metrics import roc_auc
from memaudit.models import load_model, load_tokenizer


def _sets(trained, model_dir=None):
    """mia's three inputs for a conftest TrainedModel (another model directory scored on its sets, if given)."""
    return dict(model_dir=model_dir or trained.model_dir, members=trained.train_file, nonmembers=trained.heldout_file)


def _fresh_copy(model_dir, out, seed):
    """A freshly initialized model with `model_dir`'s config and tokenizer (it saw no data)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    m.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def unseen(tmp_path_factory, memorized):
    """A model (and tokenizer) trained on other documents of the same source: it saw neither the members nor
    the held-out set. Its tokenizer is trained on those other documents too, so nothing of either set reaches
    it (a tokenizer trained on the members alone would separate them even with untrained weights)."""
    from memaudit.corpus import demo_corpus
    from memaudit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("unseen")
    _, heldout = demo_corpus(n_train=60, n_heldout=160, seed=1)  # same draw as `memorized`; [60:] unused there
    other = write_documents(root / "other.jsonl", heldout[60:], [f"o{i}" for i in range(100)])
    train(TrainConfig(data=str(other), out=str(root / "model"), epochs=8, lr=3e-3, batch_size=16, seq_len=96,
                      rows="first", val_fraction=0.0, seed=0))
    return root / "model"


@pytest.fixture(scope="session")
def memorized_reference(tmp_path_factory, memorized):
    """A reference model sharing the memorized model's tokenizer (fresh weights)."""
    return _fresh_copy(memorized.model_dir, tmp_path_factory.mktemp("ref") / "model", seed=3)


# ---------- attacks against an independent per-sample loop over full logits ----------

def _full_logprobs(model, ids):
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    tgt = torch.tensor(ids[1:])
    return lsm, lsm[torch.arange(len(tgt)), tgt].numpy()


def test_every_attack_equals_independent_loop(memorized, memorized_reference, tmp_path):
    window, k, shots = 24, [20.0, 50.0], 2
    res = mia(**_sets(memorized), reference=memorized_reference, attacks="all", k=k, window=window,
              recall_shots=shots, bootstrap=50, limit=8, out=tmp_path / "run")
    df = res.samples
    m = load_model(memorized.model_dir)
    ref = load_model(memorized_reference).model
    tok = m.tokenizer
    bos, eos, ctx = tok.bos_token_id, tok.eos_token_id, m.max_length
    docs = pd.concat([read_documents(memorized.train_file, limit=8), read_documents(memorized.heldout_file, limit=8)])
    windows = dict(zip(docs["id"], (t[:window] for t in tokenize(tok, docs["text"]))))
    # dc_pdd: Laplace-smoothed unigram frequencies of the non-member file (the default corpus), by Counter.
    corpus = [t for doc in tokenize(tok, read_documents(memorized.heldout_file)["text"]) for t in doc]
    counts, total, vocab = Counter(corpus), len(corpus), len(tok)
    # recall: the shots the run drew, joined by EOS, cut from the left to the room before a window.
    prefix = [t for sid in res.summary["recall"]["shot_ids"] for t in windows[sid] + [eos]][-(ctx - window):]

    for _, row in df.iterrows():
        x = windows[row["id"]]
        lsm, lp = _full_logprobs(m.model, [bos] + x)
        _, lp_ref = _full_logprobs(ref, [bos] + x)
        p = lsm.exp()
        mu = (p * lsm).sum(-1).numpy()
        sigma = np.sqrt(((p * lsm ** 2).sum(-1).numpy() - mu ** 2).clip(min=1e-12))
        text = tok.decode(x)
        expect = {"loss": lp.mean(),
                  "zlib": lp.mean() / (8 * len(zlib.compress(text.encode("utf-8")))),
                  "zstd": lp.mean() / (8 * len(zstandard.ZstdCompressor(level=3).compress(text.encode("utf-8")))),
                  "reference": lp.mean() - lp_ref.mean()}
        for kk in k:
            n_low = max(1, int(len(x) * kk / 100))
            expect[f"min_k_{kk:g}"] = np.sort(lp)[:n_low].mean()
            expect[f"min_k_pp_{kk:g}"] = np.sort((lp - mu) / sigma)[:n_low].mean()
        seen, alphas = set(), []
        for t, l in zip(x, lp):
            if t not in seen:
                seen.add(t)
                alphas.append(min(math.exp(l) * math.log((total + vocab) / (counts[t] + 1)), 0.01))
        expect["dc_pdd"] = np.mean(alphas)
        if row["id"] in res.summary["recall"]["shot_ids"] and not row["member"]:
            assert np.isnan(row["score_recall"])
        else:
            _, lp_cond = _full_logprobs(m.model, [bos] + prefix + x)
            expect["recall"] = lp_cond[-len(x):].mean() / lp.mean()
        m.model.zero_grad()
        ids = torch.tensor([[bos] + x])
        torch.nn.functional.cross_entropy(m.model(ids).logits[0, :-1], ids[0, 1:]).backward()
        expect["gradnorm"] = -math.sqrt(sum(float((q.grad.double() ** 2).sum()) for q in m.model.parameters()
                                            if q.grad is not None))
        for col, want in expect.items():
            got = row[f"score_{col}"]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (col, row["id"], got, want)
    assert set(df.columns) == {"id", "member", "n_tokens"} | {f"score_{c}" for c in res.summary["columns"]}
    assert len(res.summary["columns"]) == 11 and (res.path / "roc.png").is_file()


# ---------- orientation ----------

def test_memorized_model_every_attack_separates(memorized, memorized_reference, tmp_path):
    res = mia(**_sets(memorized), reference=memorized_reference, window=32, bootstrap=200, out=tmp_path / "run")
    aucs = {c: m["auc"] for c, m in res.summary["attacks"].items()}
    print("memorized AUCs", json.dumps(aucs))
    assert len(aucs) == 13
    assert all(a > 0.9 for a in aucs.values()), aucs
    s = json.loads((res.path / "summary.json").read_text())
    assert s["windows"]["mode"] == "window" and s["windows"]["tokens"] == 32 and s["bos"]["prepended"]
    samples = pd.read_parquet(res.path / "samples.parquet")
    assert samples["member"].sum() == 60 and (~samples["member"]).sum() == 60
    for f in ("roc.png", "roc_loglog.png", "histograms.png", "config.json"):
        assert (res.path / f).is_file()


def test_model_that_saw_neither_set_is_at_chance(memorized, unseen, tmp_path):
    ref = _fresh_copy(unseen, tmp_path / "ref", seed=4)
    res = mia(**_sets(memorized, unseen), reference=ref, window=32, bootstrap=1000, write=False)
    for c, m in res.summary["attacks"].items():
        print(f"unseen {c}: AUC {m['auc']:.3f} CI {m['auc_ci95']}")
        lo, hi = m["auc_ci95"]
        assert lo <= 0.5 <= hi, (c, m["auc"], m["auc_ci95"])


def test_whole_documents_truncate_to_context_and_skip_recall(memorized):
    res = mia(**_sets(memorized), attacks="loss,min_k", bootstrap=0, limit=10, write=False)
    s = res.summary
    assert s["windows"]["mode"] == "document" and s["samples"]["members"]["truncated_to_context"] > 0
    assert res.samples["n_tokens"].max() == s["model_context"]
    with pytest.raises(MemauditError, match="recall: no room"):
        mia(**_sets(memorized), attacks="recall", bootstrap=0, limit=10, write=False)
    s_all = mia(**_sets(memorized), attacks="all", bootstrap=0, limit=6, write=False).summary
    assert set(s_all["skipped_attacks"]) == {"recall", "reference"}


def test_no_bos_scores_all_but_the_first_token(memorized):
    res = mia(**_sets(memorized), attacks="loss", window=16, bos=False, bootstrap=0, limit=4, write=False)
    assert (res.samples["n_tokens"] == 15).all() and not res.summary["bos"]["prepended"]


# ---------- the API: settings, the returned summary, the headline ----------

def test_settings_object_or_keywords_not_both(memorized):
    s = MiaSettings(**_sets(memorized), attacks="loss", window=16, bootstrap=0, limit=4, write=False)
    by_object, by_keywords = mia(s), mia(**vars(s))
    pd.testing.assert_frame_equal(by_object.samples, by_keywords.samples)
    assert by_object.path is None and list(by_object.summary)[:2] == ["schema_version", "command"]
    with pytest.raises(TypeError, match="not both"):
        mia(s, bootstrap=10)
    with pytest.raises(MemauditError, match="--resume needs --out"):
        MiaSettings(**_sets(memorized), out="x", resume=True, write=False).validate()
    with pytest.raises(MemauditError, match="needs --reference"):
        MiaSettings(**_sets(memorized), attacks="loss,reference").validate()


def test_returned_summary_is_summary_json(memorized, tmp_path):
    from memaudit.rundir import write_json

    res = mia(**_sets(memorized), attacks="loss,zlib,recall", window=16, bootstrap=20, limit=6, out=tmp_path / "run")
    write_json(tmp_path / "returned.json", res.summary)  # the same strict JSON writer
    assert (tmp_path / "returned.json").read_text() == (res.path / "summary.json").read_text()
    assert set(res.summary) <= set(MiaSummary.__annotations__)


def test_mia_headline_order_best_and_missing():
    attacks = {"loss": {"auc": 0.7, "oracle": {"tpr_at_fpr_0.01": 0.05}},
               "zlib": {"auc": 0.9}, "min_k_20": {"auc": 0.9}, "recall": {"auc": None}, "odd": "not a block"}
    head = mia_headline({"attacks": attacks, "n_members": 10, "n_nonmembers": 12, "columns": list(attacks)})
    assert list(head.items()) == [("n_members", 10), ("n_nonmembers", 12), ("best_attack", "zlib"),
                                  ("best_auc", 0.9), ("loss_auc", 0.7), ("loss_tpr_at_1pct_fpr", 0.05)]
    # no loss attack, an undefined AUC (null in summary.json, NaN in memory): skipped, never "best"
    assert mia_headline({"attacks": {"gradnorm": {"auc": float("nan")}, "zstd": {"auc": 0.6}}}) == \
        {"best_attack": "zstd", "best_auc": 0.6}
    assert mia_headline({}) == {}


def test_mia_headline_reads_a_run(memorized, tmp_path):
    res = mia(**_sets(memorized), attacks="loss,zlib", window=16, bootstrap=0, limit=6, out=tmp_path / "run")
    on_disk = json.loads((res.path / "summary.json").read_text())
    head = mia_headline(on_disk)
    assert head == mia_headline(res.summary)
    aucs = {c: m["auc"] for c, m in on_disk["attacks"].items()}
    assert head["n_members"] == 6 and head["best_auc"] == max(aucs.values()) == aucs[head["best_attack"]]
    assert head["loss_auc"] == aucs["loss"]
    assert head["loss_tpr_at_1pct_fpr"] == on_disk["attacks"]["loss"]["oracle"]["tpr_at_fpr_0.01"]


# ---------- bad input, through the command line ----------

def test_cli_bad_input_is_one_clear_line(memorized, tmp_path, run_cli):
    from memaudit.data import train_tokenizer

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other_tok = tmp_path / "other_tok"
    _fresh_copy(memorized.model_dir, other_tok, seed=5)
    train_tokenizer(["entirely different words here"] * 20, vocab_size=300).save_pretrained(other_tok)
    base = [memorized.model_dir, "--bootstrap", "0", "--limit", "6", "--window", "16"]
    cases = [
        (base + ["--members", empty, "--nonmembers", memorized.heldout_file], "no documents in the file"),
        (base + ["--members", memorized.train_file, "--nonmembers", empty], "no documents in the file"),
        (base + ["--members", memorized.train_file, "--nonmembers", memorized.heldout_file, "--attacks", "loss,foo"],
         "unknown attack(s) 'foo'"),
        (base + ["--members", memorized.train_file, "--nonmembers", memorized.heldout_file, "--reference", other_tok,
                 "--attacks", "reference"], "different tokenizer"),
    ]
    for args, msg in cases:
        r = run_cli("mia", *args, "--out", tmp_path / "x")
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr


def test_cli_overlapping_ids_warn_and_continue(memorized, tmp_path, run_cli):
    docs = read_documents(memorized.heldout_file, limit=6)
    mem = read_documents(memorized.train_file, limit=6)
    ids = mem["id"].tolist()[:2] + docs["id"].tolist()[2:]  # two member ids reused for non-members
    non = write_documents(tmp_path / "non.jsonl", docs["text"].tolist(), ids)
    r = run_cli("mia", memorized.model_dir, "--members", memorized.train_file, "--nonmembers", non, "--limit", "6",
                "--window", "16", "--attacks", "loss", "--bootstrap", "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "warning: 2 id(s) appear in both the member and the non-member file" in r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["overlap"]["ids_in_both_files"] == 2 and s["n_members"] == 6 and s["n_nonmembers"] == 6


def test_resume_after_interruption_recomputes_only_unfinished_chunks(memorized, tmp_path, monkeypatch):
    import memaudit.membership as membership

    monkeypatch.setattr(membership, "RESUME_CHUNK", 4)
    # One backward per sample, so the target pass is score_sharded's alone (batched gradnorm shares its forward:
    # tests/test_mia_cost.py resumes that way).
    monkeypatch.setattr(membership, "_GRADNORM_METHOD", "loop")
    kw = dict(attacks="loss,min_k,gradnorm", window=16, bootstrap=0, limit=6)
    whole = mia(**_sets(memorized), out=tmp_path / "whole", **kw)
    real, calls = membership.score_sharded, []

    def dies_on_second_chunk(model, seqs, **k):
        calls.append(len(seqs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of the target pass
        return real(model, seqs, **k)

    monkeypatch.setattr(membership, "score_sharded", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        mia(**_sets(memorized), out=tmp_path / "cut", **kw)
    assert sorted(p.name for p in (tmp_path / "cut" / "partial").iterdir()) == ["target-000000000.parquet"]
    with pytest.raises(MemauditError, match="--resume"):  # never overwritten silently
        mia(**_sets(memorized), out=tmp_path / "cut", **kw)
    calls.clear()
    monkeypatch.setattr(membership, "score_sharded", lambda model, seqs, **k: calls.append(len(seqs)) or
                        real(model, seqs, **k))
    resumed = mia(**_sets(memorized), out=tmp_path / "cut", resume=True, **kw)
    assert calls == [4, 4]  # 12 samples: chunk 0 loaded from disk, chunks 1 and 2 scored
    pd.testing.assert_frame_equal(resumed.samples, whole.samples)
    assert not (tmp_path / "cut" / "partial").exists()
    with pytest.raises(MemauditError, match="other settings"):
        mia(**_sets(memorized), out=tmp_path / "cut", resume=True, **{**kw, "window": 12})


# ---------- whole documents: every window at a stride, documents' means, collection-level membership ----------

def test_stride_scores_every_window_and_documents_take_their_mean(memorized, tmp_path):
    window, stride, n = 16, 12, 3
    res = mia(**_sets(memorized), attacks="loss,min_k", k=[20.0], window=window, stride=stride, bootstrap=0,
              limit=n, out=tmp_path / "run")
    m = load_model(memorized.model_dir)
    bos = m.tokenizer.bos_token_id
    rows = []  # brute force: every window of every document, scored by a full-logits loop
    for member, f in ((True, memorized.train_file), (False, memorized.heldout_file)):
        docs, seen = read_documents(f, limit=n), set()
        for doc_id, toks in zip(docs["id"], tokenize(m.tokenizer, docs["text"])):
            for off in range(0, len(toks) - window + 1, stride):
                if tuple(toks[off:off + window]) in seen:  # a window identical to an earlier one of its set
                    continue
                seen.add(tuple(toks[off:off + window]))
                _, lp = _full_logprobs(m.model, [bos] + toks[off:off + window])
                rows.append(dict(doc_id=doc_id, offset=off, member=member, loss=lp.mean(),
                                 min_k=np.sort(lp)[:max(1, int(window * 0.2))].mean(), doc_tokens=len(toks)))
    want = pd.DataFrame(rows)
    win = res.windows
    pd.testing.assert_frame_equal(win, pd.read_parquet(res.path / "windows.parquet"))
    assert list(win.columns) == ["doc_id", "offset", "member", "n_tokens", "score_loss", "score_min_k_20"]
    assert win[["doc_id", "offset", "member"]].values.tolist() == want[["doc_id", "offset", "member"]].values.tolist()
    np.testing.assert_allclose(win["score_loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(win["score_min_k_20"], want["min_k"], rtol=1e-5)
    docs = res.samples  # one row per document: the mean of its windows, by a plain loop
    pd.testing.assert_frame_equal(docs, pd.read_parquet(res.path / "samples.parquet"))
    assert len(docs) == 2 * n
    for _, d in docs.iterrows():
        mine = want[(want.doc_id == d["id"]) & (want.member == d["member"])]
        assert d["n_windows"] == len(mine) and d["n_tokens"] == mine["doc_tokens"].iloc[0]
        assert d["score_loss"] == pytest.approx(mine["loss"].mean(), rel=1e-5)
        assert d["score_min_k_20"] == pytest.approx(mine["min_k"].mean(), rel=1e-5)
    s = res.summary
    assert s["windows"] == {**s["windows"], "mode": "stride", "tokens": window, "stride": stride,
                            "member_windows": int(want.member.sum()), "nonmember_windows": int((~want.member).sum())}
    assert s["n_members"] == n and s["attacks"]["loss"]["auc"] == roc_auc(docs["score_loss"], docs["member"])
    assert s["window_attacks"]["loss"]["auc"] == roc_auc(win["score_loss"], win["member"])
    per_window = s["window_attacks"]["loss"]
    assert per_window["n_members"] == want.member.sum() and "auc_ci95" not in per_window
    # without --stride nothing changes: the same first windows, no window table, no new keys
    first = mia(**_sets(memorized), attacks="loss,min_k", k=[20.0], window=window, bootstrap=0, limit=n, write=False)
    assert first.windows is None and not {"window_attacks", "collection"} & set(first.summary)
    np.testing.assert_allclose(first.samples["score_loss"], win[win.offset == 0]["score_loss"], rtol=1e-6)


def test_stride_recall_leaves_out_shot_documents_and_all_skips_gradnorm(memorized):
    window, shots = 16, 2
    res = mia(**_sets(memorized), attacks="all", window=window, stride=window, recall_shots=shots, bootstrap=0,
              limit=4, write=False)
    s, win = res.summary, res.windows
    assert "gradnorm" in s["skipped_attacks"] and "gradnorm" not in s["columns"]
    shot_ids = s["recall"]["shot_ids"]
    in_shot = ~win["member"] & win["doc_id"].isin(shot_ids)
    assert len(shot_ids) == shots and win.loc[in_shot, "score_recall"].isna().all()
    assert win.loc[~in_shot, "score_recall"].notna().all() and (win.loc[in_shot, "offset"] > 0).any()
    assert res.samples.loc[~res.samples["member"] & res.samples["id"].isin(shot_ids), "score_recall"].isna().all()
    # recall on a window: the full-logits loop on [BOS] + the shots' first windows joined by EOS + the window
    m = load_model(memorized.model_dir)
    tok, ctx = m.tokenizer, m.max_length
    docs = pd.concat([read_documents(memorized.train_file, limit=4), read_documents(memorized.heldout_file, limit=4)])
    toks = dict(zip(docs["id"], tokenize(tok, docs["text"])))
    prefix = [t for sid in shot_ids for t in toks[sid][:window] + [tok.eos_token_id]][-(ctx - window):]
    for _, row in win[~in_shot].iloc[::7].iterrows():
        x = toks[row["doc_id"]][row["offset"]:row["offset"] + window]
        _, lp = _full_logprobs(m.model, [tok.bos_token_id] + x)
        _, lp_cond = _full_logprobs(m.model, [tok.bos_token_id] + prefix + x)
        assert row["score_recall"] == pytest.approx(lp_cond[-window:].mean() / lp.mean(), rel=1e-5)
    named = mia(**_sets(memorized), attacks="gradnorm", window=window, stride=4 * window, bootstrap=0, limit=2,
                write=False)  # named, it runs on every window
    assert named.windows["score_gradnorm"].notna().all() and len(named.windows) > 4


def _features(windows: pd.DataFrame, names):
    return {c: windows[f"score_{c}"].to_numpy() for c in names}


def test_collection_trained_on_is_found_in_every_seed(memorized):
    res = mia(**_sets(memorized), attacks="loss,zlib,min_k,min_k_pp", window=32, stride=32, collection=True,
              bootstrap=0, write=False)
    col, win = res.summary["collection"], res.windows
    assert col["suspect"]["documents"] == 60 and col["validation"]["documents"] == 60
    assert col["suspect"]["windows"] == win["member"].sum() and col["unit"] == "document" and col["seed"] == 0
    assert col["suspect"]["test_documents"] == 30 and set(col["weights"]) == set(col["features"])
    doc = pd.factorize(win["member"].astype(str) + "/" + win["doc_id"])[0]
    p = [dataset_inference(_features(win, col["features"]), win["member"].to_numpy(), doc, seed=s)["p_value"]
         for s in range(10)]
    print("trained-on collection p-values by seed:", " ".join(f"{x:.2g}" for x in p))
    assert p[0] == col["p_value"] and max(p) < 1e-3, p


def test_collection_two_unseen_halves_look_uniform(memorized, tmp_path, run_cli):
    held = read_documents(memorized.heldout_file)
    a = write_documents(tmp_path / "a.jsonl", held["text"][:30].tolist(), held["id"][:30].tolist())
    b = write_documents(tmp_path / "b.jsonl", held["text"][30:].tolist(), held["id"][30:].tolist())
    r = run_cli("mia", memorized.model_dir, "--members", a, "--nonmembers", b, "--attacks", "loss,zlib,min_k,min_k_pp",
                "--window", "32", "--stride", "32", "--collection", "--bootstrap", "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "collection test (members = suspect set): p = " in r.stdout
    col = json.loads((tmp_path / "run" / "summary.json").read_text())["collection"]
    win = pd.read_parquet(tmp_path / "run" / "windows.parquet")
    # Further seeds: other documents-wise halves of the 60 held-out documents (these attacks read no labels, so
    # a window's scores do not depend on its side), each tested with its own seed.
    feats, doc = _features(win, col["features"]), pd.factorize(win["doc_id"])[0]
    p = [col["p_value"]]
    for seed in range(1, 20):
        half = np.random.default_rng(seed).permutation(held["id"].to_numpy())[:30]
        p.append(dataset_inference(feats, win["doc_id"].isin(half).to_numpy(), doc, seed=seed)["p_value"])
    print("unseen halves p-values by seed:", " ".join(f"{x:.2g}" for x in p))
    assert np.mean(np.array(p) > 0.05) >= 0.8, p
