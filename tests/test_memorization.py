"""Unintended memorization (Morris et al.): code lengths vs an independent computation, members vs held-out."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture(scope="session")
def reference_model(memorized, tmp_path_factory):
    """Same tokenizer and architecture as `memorized`, fresh weights, trained briefly on OTHER docstrings."""
    from transformers import AutoModelForCausalLM

    from memaudit.corpus import stdlib_docstrings
    from memaudit.data import read_documents, write_documents
    from memaudit.models import load_model
    from memaudit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("reference")
    used = set(read_documents(memorized.train_file)["text"]) | set(read_documents(memorized.heldout_file)["text"])
    other = [d for d in stdlib_docstrings() if d not in used][:150]
    loaded = load_model(memorized.model_dir, device="cpu", dtype="float32")
    torch.manual_seed(123)
    fresh = AutoModelForCausalLM.from_config(loaded.model.config)
    init = root / "init"
    fresh.save_pretrained(init)
    loaded.tokenizer.save_pretrained(init)
    data = write_documents(root / "other.jsonl", other)
    train(TrainConfig(data=str(data), out=str(root / "model"), config=str(init), epochs=4, lr=3e-3,
                      batch_size=16, seq_len=96, rows="first", val_fraction=0.0, seed=0))
    return root / "model"


def _bits_independent(model_dir, texts):
    """-sum log2 p over every token, first token conditioned on BOS: a plain full-logits loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for t in texts:
        ids = [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"][: model.config.n_positions]
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(x[:, :-1]).logits[0].double(), -1)
        out.append(float(-lp[torch.arange(len(ids) - 1), x[0, 1:]].sum() / math.log(2)))
    return np.array(out)


def test_model_reference_members_carry_more_mem_u(memorized, reference_model, tmp_path, run_cli):
    runs = {}
    for name, f in (("members", memorized.train_file), ("heldout", memorized.heldout_file)):
        r = run_cli("memorization", str(memorized.model_dir), "--data", str(f), "--reference", str(reference_model),
                    "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        runs[name] = (pd.read_parquet(tmp_path / name / "samples.parquet"),
                      json.loads((tmp_path / name / "summary.json").read_text()))
    mem, held = runs["members"][0], runs["heldout"][0]
    assert (mem["mem_u_bits"] >= 0).all() and (held["mem_u_bits"] >= 0).all()
    # members: clearly more unintended memorization per token than held-out docs of the same source
    per_tok_m = mem["mem_u_bits"].sum() / mem["n_tokens"].sum()
    per_tok_h = held["mem_u_bits"].sum() / held["n_tokens"].sum()
    assert per_tok_m > 3 * per_tok_h + 0.2
    assert np.median(mem["mem_u_bits"]) > np.percentile(held["mem_u_bits"], 90)
    # definition and the independent computation of the code lengths
    np.testing.assert_allclose(mem["mem_u_bits"], np.maximum(0, mem["bits_reference"] - mem["bits_model"]))
    texts = [json.loads(line)["text"] for line in open(memorized.train_file)][:8]
    np.testing.assert_allclose(mem["bits_model"].to_numpy()[:8], _bits_independent(memorized.model_dir, texts),
                               rtol=1e-4)
    np.testing.assert_allclose(mem["bits_reference"].to_numpy()[:8], _bits_independent(reference_model, texts),
                               rtol=1e-4)
    s = runs["members"][1]
    assert s["first_token"] == "conditioned on BOS"
    assert s["top_samples"][0]["mem_u_bits"] == pytest.approx(mem["mem_u_bits"].max())
    assert abs(s["total_mem_u_bits"] - mem["mem_u_bits"].sum()) < 1e-6 * max(1.0, s["total_mem_u_bits"])
    assert (tmp_path / "members" / "mem_u_hist.png").stat().st_size > 1000


def test_against_itself_is_zero(memorized, tmp_path):
    from memaudit.memorization import MemorizationSettings, memorization

    res = memorization(MemorizationSettings(model_dir=memorized.model_dir, data=memorized.train_file,
                                            reference=str(memorized.model_dir), out=tmp_path / "self", device="cpu",
                                            limit=10))
    df = pd.read_parquet(tmp_path / "self" / "samples.parquet")
    assert res.summary["total_mem_u_bits"] == 0.0 and (df["mem_u_bits"] == 0).all() and len(df) == 10
    # the result is what the run directory holds
    assert res.path == tmp_path / "self"
    assert res.summary == json.loads((res.path / "summary.json").read_text())
    assert list(res.summary)[:2] == ["schema_version", "command"] and res.summary["command"] == "memorization"
    pd.testing.assert_frame_equal(res.samples, df)


def test_zstd_reference_matches_zstandard_and_separates(memorized, tmp_path):
    import zstandard

    from memaudit.memorization import memorization

    s_m = memorization(model_dir=memorized.model_dir, data=memorized.train_file, reference="zstd",
                       out=tmp_path / "zm", device="cpu", zstd_level=19, zstd_dict_from=memorized.heldout_file).summary
    s_h = memorization(model_dir=memorized.model_dir, data=memorized.heldout_file, reference="zstd",
                       out=tmp_path / "zh", device="cpu", zstd_level=19, zstd_dict_from=memorized.heldout_file).summary
    df = pd.read_parquet(tmp_path / "zm" / "samples.parquet")
    texts = [json.loads(line)["text"] for line in open(memorized.train_file)]
    # independent zstd code length without a dictionary, for the bytes each row says it has
    memorization(model_dir=memorized.model_dir, data=memorized.train_file, reference="zstd", out=tmp_path / "zp",
                 device="cpu", zstd_level=3, limit=5)
    dfp = pd.read_parquet(tmp_path / "zp" / "samples.parquet")
    for i in range(5):
        frame = zstandard.ZstdCompressor(level=3, write_checksum=False, write_content_size=False).compress(
            texts[i].encode()[: dfp["n_bytes"][i]])  # long docs are cut to the model's context
        assert dfp["bits_reference"][i] == 8 * len(frame)
        assert 0 < dfp["n_bytes"][i] <= len(texts[i].encode())
    assert "dictionary" in s_m["reference"] and s_m["reference"].startswith("zstd level 19")
    assert s_m["total_mem_u_bits"] / df["n_tokens"].sum() > 2 * s_h["total_mem_u_bits"] / max(
        1, pd.read_parquet(tmp_path / "zh" / "samples.parquet")["n_tokens"].sum())
    # the member texts are listed, escaped, for a reviewer
    top = s_m["top_samples"][0]["text"]
    assert any(t.startswith(top) for t in texts)  # the scored part of a member (cut to the context)


def test_bad_input_one_line(memorized, tmp_path, run_cli):
    from memaudit.data import train_tokenizer, write_documents

    # a reference with another tokenizer is refused
    other = tmp_path / "other"
    tok = train_tokenizer(["completely different text " * 20, "another vocabulary here " * 20], vocab_size=300)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=1)).save_pretrained(other)
    tok.save_pretrained(other)
    r = run_cli("memorization", str(memorized.model_dir), "--data", str(memorized.train_file), "--reference", str(other),
             "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "another tokenizer" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("memorization", str(memorized.model_dir), "--data", str(memorized.train_file), "--reference",
             str(tmp_path / "missing"), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("memorization", str(memorized.model_dir), "--data", str(memorized.train_file), "--reference", "zstd",
             "--zstd-level", "40", "--out", str(tmp_path / "z"))
    assert r.returncode == 2 and "zstd-level" in r.stderr
    empty = write_documents(tmp_path / "tiny.jsonl", ["a"])
    r = run_cli("memorization", str(memorized.model_dir), "--data", str(empty), "--reference", "zstd",
             "--zstd-dict-from", str(empty), "--out", str(tmp_path / "w"))
    assert r.returncode == 2 and r.stderr.startswith("error:")


# --- windows: --window, --stride, --windows-per-doc ---------------------------------------------------------------

N_DOCS = 12  # documents of the member file the window tests read (--limit)


@pytest.fixture(scope="module")
def doc_tokens(memorized):
    """(id, tokens) of the first N_DOCS member documents, tokenized with plain transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(memorized.model_dir))
    rows = [json.loads(line) for line in open(memorized.train_file)][:N_DOCS]
    return tok, [(r["id"], tok(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]


def _expected_starts(n, window, options, doc):
    """The window starts in a document of n tokens, by a plain loop over the strategy's definition."""
    last = n - window
    if last < 0:
        return []
    if "stride" in options:
        out, o = [], 0
        while o + window <= n:
            out.append(o)
            o += options["stride"]
        return out
    if "windows_per_doc" in options:
        k = options["windows_per_doc"]
        if k >= last + 1:
            return list(range(last + 1))
        return sorted(np.random.default_rng([options["seed"], doc]).choice(last + 1, size=k, replace=False).tolist())
    return [0]


@pytest.mark.parametrize("options", [{}, {"stride": 8}, {"stride": 24}, {"windows_per_doc": 3, "seed": 5}],
                         ids=["first", "stride-8", "stride-24", "random-3"])
def test_window_offsets_counts_and_zstd_against_a_loop(options, memorized, doc_tokens, tmp_path):
    import zstandard

    from memaudit.memorization import memorization

    window = 16
    res = memorization(model_dir=memorized.model_dir, data=memorized.train_file, reference="zstd", zstd_level=3,
                       limit=N_DOCS, window=window, out=tmp_path / "w", device="cpu", **options)
    tok, docs = doc_tokens
    whole = bool(options)
    expected = [(i, d, o) for d, (i, t) in enumerate(docs) for o in _expected_starts(len(t), window, options, d)]
    df = res.samples
    assert list(zip(df["doc_id"], df["offset"])) == [(i, o) for i, _, o in expected]
    assert (df["n_tokens"] == window).all() and res.summary["n_samples"] == len(expected) == len(df)
    assert df["id"].tolist() == ([f"{i}@{o}" for i, _, o in expected] if whole else [i for i, _, _ in expected])
    assert res.summary["n_skipped_too_short"] == sum(len(t) < window for _, t in docs)
    assert res.summary["n_documents"] == N_DOCS and res.summary["n_truncated_to_context"] == 0
    mode = "stride" if "stride" in options else "random" if options else "window"
    assert res.summary["windows"]["mode"] == mode and res.summary["windows"]["tokens"] == window
    # each window's zstd code length: its decoded text (the document's own text when the window is all of it)
    zc = zstandard.ZstdCompressor(level=3, write_checksum=False, write_content_size=False)
    texts = [json.loads(line)["text"] for line in open(memorized.train_file)]
    for (i, d, o), bits in zip(expected, df["bits_reference"]):
        t = docs[d][1]
        text = texts[d] if o == 0 and len(t) == window else tok.decode(t[o:o + window],
                                                                         clean_up_tokenization_spaces=False)
        assert bits == 8 * len(zc.compress(text.encode()))
    assert (res.documents is not None) == whole and (res.path / "documents.parquet").exists() == whole
    if "windows_per_doc" in options:  # another seed draws other starts
        other = memorization(model_dir=memorized.model_dir, data=memorized.train_file, reference="zstd", limit=N_DOCS,
                             window=window, out=tmp_path / "w2", device="cpu", windows_per_doc=3, seed=6)
        assert other.samples["offset"].tolist() != df["offset"].tolist()
        assert other.samples["doc_id"].tolist() == df["doc_id"].tolist()


def _bits_of_ids(model_dir, id_lists):
    """-sum log2 p over every token of each id list, the first conditioned on BOS: a plain full-logits loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bos = AutoTokenizer.from_pretrained(str(model_dir)).bos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for ids in id_lists:
        x = torch.tensor([[bos, *ids]])
        with torch.no_grad():
            lp = torch.log_softmax(model(x[:, :-1]).logits[0].double(), -1)
        out.append(float(-lp[torch.arange(len(ids)), x[0, 1:]].sum() / math.log(2)))
    return np.array(out)


def test_stride_documents_table_and_windows_as_samples(memorized, reference_model, doc_tokens, tmp_path):
    """--stride: the documents table and summary against a loop over the windows; each window measured as its own
    sample (a pre-tokenized file of the windows, default options) gives the same code lengths; the first windows'
    code lengths against plain transformers."""
    from memaudit.memorization import memorization

    window, stride = 20, 8  # overlapping windows: covered tokens differ from scored ones
    kw = dict(model_dir=memorized.model_dir, reference=str(reference_model), device="cpu")
    res = memorization(data=memorized.train_file, limit=N_DOCS, window=window, stride=stride, out=tmp_path / "s", **kw)
    _, docs = doc_tokens
    df, table = res.samples, res.documents
    windows = [t[o:o + window] for _, t in docs for o in _expected_starts(len(t), window, {"stride": stride}, 0)]
    assert len(windows) == len(df) and table["id"].tolist() == [i for i, _ in docs]
    for d, (i, t) in enumerate(docs):
        rows = df[df["doc_id"] == i]
        got = table.iloc[d]
        covered = {p for o in rows["offset"] for p in range(o, o + window)}
        assert got["n_tokens"] == len(t) and got["n_windows"] == len(rows)
        assert got["scored_tokens"] == window * len(rows) and got["covered_tokens"] == len(covered)
        for c in ("bits_model", "bits_reference", "mem_u_bits"):
            assert got[c] == pytest.approx(sum(rows[c]), rel=1e-12, abs=1e-9)
        assert got["windows_with_mem_u"] == sum(m > 0 for m in rows["mem_u_bits"])
        if len(rows):
            assert got["max_window_mem_u_bits"] == max(rows["mem_u_bits"])
            assert got["mem_u_bits_per_token"] == pytest.approx(sum(rows["mem_u_bits"]) / (window * len(rows)))
        else:
            assert math.isnan(got["max_window_mem_u_bits"]) and math.isnan(got["mem_u_bits_per_token"])
    read = [d for d in range(len(docs)) if (df["doc_id"] == docs[d][0]).any()]
    block = res.summary["documents"]
    assert block["n_documents"] == len(docs) and block["documents_with_windows"] == len(read)
    assert block["mean_mem_u_bits"] == pytest.approx(np.mean([table["mem_u_bits"].iloc[d] for d in read]))
    n_tokens = sum(len(t) for _, t in docs)
    assert block["covered_token_fraction"] == pytest.approx(table["covered_tokens"].sum() / n_tokens)
    assert block["documents_with_mem_u"] == sum(table["windows_with_mem_u"] > 0) > 0
    assert res.summary["total_mem_u_bits"] == pytest.approx(table["mem_u_bits"].sum())
    pd.testing.assert_frame_equal(pd.read_parquet(res.path / "documents.parquet"), table)
    # every window as its own sample
    np.save(tmp_path / "windows.npy", np.array(windows, dtype=np.int64))
    alone = memorization(data=tmp_path / "windows.npy", out=tmp_path / "alone", **kw).samples
    for c in ("bits_model", "bits_reference", "mem_u_bits", "n_tokens", "n_bytes"):
        np.testing.assert_allclose(alone[c], df[c], rtol=1e-5, atol=1e-4, err_msg=c)
    np.testing.assert_allclose(df["bits_model"][:4], _bits_of_ids(memorized.model_dir, windows[:4]), rtol=1e-4)


def test_default_rows_name_their_document_and_resume_skips_saved_chunks(memorized, tmp_path, monkeypatch):
    """Default rows carry doc_id (their id) and offset 0; an interrupted --windows-per-doc run resumed measures only
    the chunks it had not saved, and ends equal to an uninterrupted run."""
    from memaudit import memorization as mod
    from memaudit.errors import MemauditError

    base = mod.memorization(model_dir=memorized.model_dir, data=memorized.train_file, reference="zstd", limit=5,
                            out=tmp_path / "d", device="cpu")
    assert base.samples["doc_id"].tolist() == base.samples["id"].tolist() and (base.samples["offset"] == 0).all()
    assert base.summary["windows"]["mode"] == "document" and "documents" not in base.summary
    kw = dict(model_dir=memorized.model_dir, data=memorized.train_file, reference="zstd", limit=N_DOCS, window=12,
              windows_per_doc=2, seed=3, device="cpu")
    monkeypatch.setattr(mod, "CHUNK", 5)
    whole = mod.memorization(out=tmp_path / "whole", **kw)
    calls, inner = [], mod._measure_chunk

    def counted(loaded, chunk, crash_at=None):
        calls.append(len(chunk))
        if len(calls) == crash_at:
            raise MemauditError("interrupted for the test")
        return inner(loaded, chunk)

    monkeypatch.setattr(mod, "_measure_chunk", lambda loaded, chunk: counted(loaded, chunk, crash_at=3))
    with pytest.raises(MemauditError, match="interrupted"):
        mod.memorization(out=tmp_path / "cut", **kw)
    assert len(list((tmp_path / "cut" / "partial").glob("*.parquet"))) == 2
    calls.clear()
    monkeypatch.setattr(mod, "_measure_chunk", lambda loaded, chunk: counted(loaded, chunk))
    resumed = mod.memorization(out=tmp_path / "cut", resume=True, **kw)
    n_chunks = -(-len(whole.samples) // 5)
    assert len(calls) == n_chunks - 2 and n_chunks >= 4
    pd.testing.assert_frame_equal(resumed.samples, whole.samples)
    pd.testing.assert_frame_equal(resumed.documents, whole.documents)
    assert resumed.summary == whole.summary
    with pytest.raises(MemauditError, match="other settings"):  # another seed is another run
        mod.memorization(out=tmp_path / "cut", resume=True, **{**kw, "seed": 4})
