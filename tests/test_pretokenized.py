"""Pre-tokenized corpora in `mia` and `train`, `mia --windows-per-doc`, and `train --seq-len` against the model's
context. Every pre-tokenized file is written here from the tokenizer's own ids (`tokenizer(text)["input_ids"]`,
not memaudit's tokenize), so "the same documents as ids" is built independently of the code under test."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from memaudit import mia
from memaudit.data import read_documents, train_tokenizer, write_documents
from memaudit.errors import MemauditError
from memaudit.models import load_model, load_tokenizer
from memaudit.training import TrainConfig

N = 16  # documents a side: every attack on 32 documents runs in seconds


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A tiny GPT-2 (random weights: equal inputs must give equal numbers whatever the model learned), its
    tokenizer, and 40 + 40 docstrings as members and non-members."""
    from types import SimpleNamespace

    from memaudit.corpus import demo_corpus
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("pretok_mia")
    members, heldout = demo_corpus(n_train=40, n_heldout=40, seed=1)
    tok = train_tokenizer(members + heldout, vocab_size=600)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=96,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(
        root / "model")
    tok.save_pretrained(root / "model")
    return SimpleNamespace(model_dir=root / "model",
                           train_file=write_documents(root / "m.jsonl", members, [f"m{i}" for i in range(40)]),
                           heldout_file=write_documents(root / "h.jsonl", heldout, [f"h{i}" for i in range(40)]))


def _ids(tok, texts) -> list[list[int]]:
    return [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _write_ids(path, ids, doc_ids=None):
    """`input_ids` (and `id`) as a parquet or jsonl file."""
    rows = {"input_ids": ids} | ({"id": doc_ids} if doc_ids is not None else {})
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(dict(zip(rows, vals))) + "\n" for vals in zip(*rows.values())))
    return path


# ---------- mia: the same documents as text and as stored ids give the same scores ------------------------------

@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_mia_on_input_ids_equals_mia_on_their_text(audited, tmp_path, suffix):
    """Whole documents (the default cut), every attack that runs without a reference: identical per-sample scores
    and identical metrics; dc_pdd's frequencies come from the non-member file, here the ids file too."""
    tok = load_tokenizer(audited.model_dir)
    files = {}
    for side, f in (("members", audited.train_file), ("nonmembers", audited.heldout_file)):
        docs = read_documents(f)  # every document: dc_pdd's frequencies come from the whole non-member file
        files[side] = _write_ids(tmp_path / f"{side}{suffix}", _ids(tok, docs["text"]), docs["id"].tolist())
    kw = dict(model_dir=audited.model_dir, bootstrap=50, limit=N, device="cpu", write=False)
    text = mia(members=audited.train_file, nonmembers=audited.heldout_file, **kw)
    ids = mia(**files, **kw)
    assert {"zlib", "zstd", "dc_pdd", "gradnorm", "loss"} <= set(text.summary["columns"])
    pd.testing.assert_frame_equal(ids.samples, text.samples, check_exact=True)
    assert ids.summary["attacks"] == text.summary["attacks"]
    assert ids.summary["samples"] == text.summary["samples"]
    assert ids.summary["dc_pdd_corpus"]["tokens"] == text.summary["dc_pdd_corpus"]["tokens"]


@pytest.mark.parametrize("fmt", ["npy", "bin-uint16", "bin-uint32"])
def test_mia_on_token_arrays_equals_mia_on_their_text_windows(audited, tmp_path, fmt):
    """Rows of the first W ids of each document (.npy rows, or a .bin stream cut into --seq-len W rows) score
    exactly as `--window W` on the text (recall runs here: there is room for its prefix)."""
    W = 32
    tok = load_tokenizer(audited.model_dir)
    kw = dict(model_dir=audited.model_dir, window=W, bootstrap=50, device="cpu", write=False,
              dcpdd_corpus=audited.heldout_file)  # the same frequencies for both runs
    text_files, stored = {}, {}
    for side, f in (("members", audited.train_file), ("nonmembers", audited.heldout_file)):
        docs = read_documents(f, limit=2 * N)
        ids = _ids(tok, docs["text"])
        keep = [i for i, t in enumerate(ids) if len(t) >= W][:N]
        assert len(keep) >= 12
        text_files[side] = write_documents(tmp_path / f"{side}.jsonl", [docs["text"][i] for i in keep])
        rows = np.array([ids[i][:W] for i in keep])
        if fmt == "npy":
            np.save(tmp_path / f"{side}.npy", rows)
            stored[side] = tmp_path / f"{side}.npy"
        else:
            rows.astype(fmt.split("-")[1]).tofile(tmp_path / f"{side}.bin")
            stored[side] = tmp_path / f"{side}.bin"
    extra = {} if fmt == "npy" else {"seq_len": W, "token_dtype": fmt.split("-")[1]}
    text = mia(**text_files, **kw)
    ids = mia(**stored, **kw, **extra)
    assert "recall" in text.summary["columns"] and text.summary["recall"]["shots"] == 5
    pd.testing.assert_frame_equal(ids.samples, text.samples, check_exact=True)  # ids are row numbers in both
    assert ids.summary["attacks"] == text.summary["attacks"]


def test_mia_ids_beyond_the_vocabulary_name_the_row_before_the_model_loads(audited, tmp_path, run_cli,
                                                                            monkeypatch):
    import memaudit.membership as membership

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the ids were checked")

    monkeypatch.setattr(membership, "load_model", no_model)
    tok = load_tokenizer(audited.model_dir)
    good = _ids(tok, read_documents(audited.heldout_file, limit=4)["text"])
    bad = _write_ids(tmp_path / "m.jsonl", [good[0], good[1][:3] + [len(tok) + 7], good[2]])
    line = (f"error: {bad}: line 2: token id {len(tok) + 7} is outside the model's vocabulary (ids 0-{len(tok) - 1}): "
            "were these ids made with this model's tokenizer?")
    r = run_cli("mia", audited.model_dir, "--members", bad, "--nonmembers", audited.heldout_file,
                "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [line]
    # dc_pdd's frequency corpus too (it was read after every pass)
    r = run_cli("mia", audited.model_dir, "--members", audited.train_file, "--nonmembers", audited.heldout_file,
                "--attacks", "loss,dc_pdd", "--dcpdd-corpus", bad, "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [line]


# ---------- mia --windows-per-doc -------------------------------------------------------------------------------

def test_windows_per_doc_offsets_counts_and_document_means_against_a_loop(audited, tmp_path):
    """Every document gets min(N, starts that fit) windows at distinct starts drawn by numpy's generator seeded
    with (seed, the document's position), the same starts `extract --windows-per-doc` probes; each window scores
    what a full-logits loop gives at its offset, and a document scores its windows' mean."""
    W, per_doc, n, seed = 24, 3, 6, 7
    res = mia(model_dir=audited.model_dir, members=audited.train_file, nonmembers=audited.heldout_file,
              attacks="loss", window=W, windows_per_doc=per_doc, seed=seed, bootstrap=0, limit=n, device="cpu",
              out=tmp_path / "run")
    m = load_model(audited.model_dir, device="cpu")
    bos, rows = m.tokenizer.bos_token_id, []
    for member, f in ((True, audited.train_file), (False, audited.heldout_file)):
        docs = read_documents(f, limit=n)
        for pos, (doc_id, toks) in enumerate(zip(docs["id"], _ids(m.tokenizer, docs["text"]))):
            starts = len(toks) - W + 1
            if starts <= 0:
                continue
            offsets = range(starts) if per_doc >= starts else \
                sorted(np.random.default_rng([seed, pos]).choice(starts, size=per_doc, replace=False))
            for off in offsets:
                with torch.no_grad():
                    x = torch.tensor([[bos] + toks[off:off + W]])
                    lp = torch.log_softmax(m.model(x[:, :-1]).logits[0].double(), -1)[torch.arange(W), x[0, 1:]]
                rows.append(dict(doc_id=doc_id, offset=int(off), member=member, loss=float(lp.mean())))
    want = pd.DataFrame(rows)
    win = res.windows
    assert win[["doc_id", "offset", "member"]].values.tolist() == want[["doc_id", "offset", "member"]].values.tolist()
    assert (win.groupby(["member", "doc_id"]).size() == per_doc).all()  # every document here is long enough
    np.testing.assert_allclose(win["score_loss"], want["loss"], rtol=1e-5)
    for _, d in res.samples.iterrows():
        mine = want[(want.doc_id == d["id"]) & (want.member == d["member"])]
        assert d["n_windows"] == len(mine) and d["score_loss"] == pytest.approx(mine["loss"].mean(), rel=1e-5)
    s = res.summary
    assert s["windows"]["mode"] == "random" and s["windows"]["windows_per_doc"] == per_doc
    assert s["windows"]["member_windows"] == int(want.member.sum()) and "window_attacks" in s
    assert json.loads((res.path / "config.json").read_text())["settings"]["windows_per_doc"] == per_doc
    from memaudit.extraction import extract  # the same sampling option probes the same windows in `extract`

    ex = extract(model_dir=m, data=audited.train_file, prefix=W // 2, suffix=W // 2, windows_per_doc=per_doc,
                 seed=seed, limit=n, write=False)
    assert ex.samples[["doc_id", "offset"]].values.tolist() == \
        win[win.member][["doc_id", "offset"]].values.tolist()


def test_windows_per_doc_draws_depend_on_the_seed(audited):
    kw = dict(model_dir=audited.model_dir, members=audited.train_file, nonmembers=audited.heldout_file,
              attacks="loss", window=16, windows_per_doc=2, bootstrap=0, limit=4, device="cpu", write=False)
    a, b, c = (mia(**kw, seed=s).windows["offset"].tolist() for s in (0, 0, 1))
    assert a == b and a != c


# ---------- train: the same documents as text and as stored ids train the same weights ---------------------------

TINY = dict(config="2x32", batch_size=7, epochs=2, lr=3e-3, warmup_steps=2, device="cpu", val_fraction=0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from memaudit.corpus import demo_corpus

    root = tmp_path_factory.mktemp("pretok_train")
    members, _ = demo_corpus(n_train=30, n_heldout=1, seed=3)
    train_tokenizer(members, vocab_size=400).save_pretrained(root / "tok")
    return root, members


def _train_weights(**kw):
    from memaudit.training import train

    res = train(**kw)
    return load_file(str(res.out / "model.safetensors")), json.loads((res.out / "train_config.json").read_text())


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_on_input_ids_equals_train_on_their_text(corpus, tmp_path):
    """Packed rows (the default): the parquet of the text's ids trains bit-identical weights."""
    root, texts = corpus
    text_file = write_documents(tmp_path / "d.jsonl", texts)
    ids_file = _write_ids(tmp_path / "d.parquet", _ids(load_tokenizer(root / "tok"), texts),
                          [str(i) for i in range(len(texts))])
    common = dict(tokenizer=root / "tok", seq_len=48, **TINY | {"epochs": 1}, limit=12)  # a few steps say it
    w_text, meta_text = _train_weights(data=text_file, out=tmp_path / "text", **common)
    w_ids, meta_ids = _train_weights(data=ids_file, out=tmp_path / "ids", **common)
    _same_weights(w_text, w_ids)
    assert meta_ids["n_rows"] == meta_text["n_rows"] and meta_ids["train_ids"] == meta_text["train_ids"]


def test_train_on_a_bin_stream_equals_one_row_per_document_of_the_text(corpus, tmp_path):
    """A .bin of each document's first seq_len - 1 ids, under the default --rows packed, trains exactly what the
    text trains with --rows first (BOS + its first seq_len - 1 tokens); so does the .npy of those rows."""
    root, texts = corpus
    seq_len = 24
    tok = load_tokenizer(root / "tok")
    ids = _ids(tok, texts)
    keep = [i for i, t in enumerate(ids) if len(t) >= seq_len - 1]
    assert len(keep) >= 20
    text_file = write_documents(tmp_path / "d.jsonl", [texts[i] for i in keep])
    rows = np.array([ids[i][:seq_len - 1] for i in keep])
    rows.astype(np.uint16).tofile(tmp_path / "d.bin")
    np.save(tmp_path / "d.npy", rows)
    common = dict(tokenizer=root / "tok", seq_len=seq_len, **TINY)
    w_text, _ = _train_weights(data=text_file, out=tmp_path / "text", rows="first", **common)
    w_bin, meta = _train_weights(data=tmp_path / "d.bin", out=tmp_path / "bin", **common)
    w_npy, _ = _train_weights(data=tmp_path / "d.npy", out=tmp_path / "npy", rows="first", **common)
    _same_weights(w_text, w_bin)
    _same_weights(w_text, w_npy)
    assert meta["rows"] == "packed" and meta["rows_used"].startswith("first") and meta["n_rows"] == \
        len(keep) - round(0.2 * len(keep))


def _cli_error(run_cli, *args) -> str:
    r = run_cli(*map(str, args))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_train_on_ids_without_their_tokenizer_is_refused_up_front(corpus, tmp_path, run_cli):
    root, texts = corpus
    ids_file = _write_ids(tmp_path / "d.jsonl", _ids(load_tokenizer(root / "tok"), texts))
    err = _cli_error(run_cli, "train", "--data", ids_file, "--out", tmp_path / "m", "--config", "1x32")
    assert "holds token ids: training on them needs the tokenizer that made them" in err
    assert not (tmp_path / "m").exists()
    np.save(tmp_path / "x.npy", np.array([[1, 2, 3]]))
    with pytest.raises(MemauditError, match="needs the tokenizer"):
        TrainConfig(data=tmp_path / "x.npy", out=tmp_path / "m").validate()
    TrainConfig(data=tmp_path / "x.npy", out=tmp_path / "m", tokenizer=root / "tok").validate()  # with it: fine


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_seq_len_beyond_the_models_context_is_refused_up_front(corpus, tmp_path, run_cli, family):
    """Learned positions (GPT-2's n_positions) and rotary ones (Llama's max_position_embeddings) alike: one line
    before anything is loaded or written."""
    from memaudit.models import build_config
    from transformers import AutoModelForCausalLM

    root, texts = corpus
    tok = load_tokenizer(root / "tok")
    model_dir = tmp_path / family
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(build_config("1x32", vocab_size=len(tok), max_length=32, family=family)) \
        .save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_documents(tmp_path / "d.jsonl", texts)
    err = _cli_error(run_cli, "train", "--data", data, "--out", tmp_path / "m", "--config", model_dir,
                     "--seq-len", "33")
    assert err == "error: --seq-len 33 is longer than the model's context (32 positions)"
    assert not (tmp_path / "m").exists()
    ok = run_cli("train", "--data", data, "--out", tmp_path / "m", "--config", model_dir, "--seq-len", "32",
                 "--epochs", "1", "--device", "cpu", "--val-fraction", "0")
    assert ok.returncode == 0, ok.stderr


def test_sampled_windows_against_a_brute_force_loop():
    """samples.sampled_windows (mia's cut for --stride and --windows-per-doc): a stride gives `cut`'s windows; N
    random windows per document are min(N, starts that fit) distinct starts, each window the document's tokens
    there; identical windows are dropped and counted; a document too short gives none and is counted."""
    from memaudit.samples import Sampling, cut, sampled_windows

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5, size=n).tolist() for n in (3, 8, 9, 20, 40, 8)]
    docs.append(docs[1])  # a repeated document: its windows are all duplicates
    L = 8
    for stride in (1, 3, 8):
        got, want = sampled_windows(Sampling(stride=stride), docs, L, dedup=True), cut(docs, length=L, stride=stride,
                                                                                      dedup=True)
        assert (got.tokens, got.doc_ids, got.offsets, got.n_skipped, got.n_duplicates) == \
            (want.tokens, want.doc_ids, want.offsets, want.n_skipped, want.n_duplicates)
    for per_doc in (1, 4, 50):
        got = sampled_windows(Sampling(windows_per_doc=per_doc, seed=3), docs, L)
        for d, toks in enumerate(docs):
            offs = [o for doc, o in zip(got.doc_ids, got.offsets) if doc == d]
            assert len(offs) == min(per_doc, max(0, len(toks) - L + 1)) == len(set(offs))
            assert offs == sorted(offs) and all(0 <= o <= len(toks) - L for o in offs)
        for doc, o, t in zip(got.doc_ids, got.offsets, got.tokens):
            assert t == docs[doc][o:o + L]
        assert got.n_skipped == 1 and got.n_documents == len(docs)
        deduped = sampled_windows(Sampling(windows_per_doc=per_doc, seed=3), docs, L, dedup=True)
        brute = len(got.tokens) - len({tuple(t) for t in got.tokens})
        assert deduped.n_duplicates == brute and len(deduped) == len(got) - brute
