"""The extraction probe: per-sample metrics against their published definitions, the greedy
shortcut against plain full decoding (our loop and HF generate), sampling's (n, p) figures, resume, memory."""
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memaudit import MemauditError, extract, load_model, read_documents, tokenize, write_documents
from memaudit.extraction import ExtractSettings, sample_metrics


def _samples(model, data, **options) -> pd.DataFrame:
    """The result rows of a run that writes nothing."""
    return extract(model_dir=model, data=data, write=False, **options).samples


def test_sample_metrics_follow_pythia_and_carlini():
    target = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    gen_ = np.array([1, 2, 9, 4, 5, 6, 7, 0])
    m = sample_metrics(gen_, target)
    # Pythia: the fraction of positions where the greedy token equals the true token, position by position
    assert m["token_match"] == sum(int(a == b) for a, b in zip(gen_, target)) / len(target) == 6 / 8
    # Carlini 2023: extractable iff the whole generated suffix equals the true suffix
    assert m["exact"] is False and sample_metrics(target.copy(), target)["exact"] is True
    assert m["match_prefix"] == 2 and sample_metrics(target.copy(), target)["match_prefix"] == 8


def test_reproduced_rows_get_the_general_metrics():
    """Exact rows skip the metric computations (their values are known): they must equal the general formulas,
    including a text with no word token (ROUGE-L 0 for rouge-score)."""
    from memaudit.extraction import _records

    class Tok:
        words = ["!!", "the", "Cat", ",", "x1", "..."]

        def batch_decode(self, rows):
            return [" ".join(self.words[t % 6] for t in r) for r in rows]

    rng = np.random.default_rng(0)
    targets = np.concatenate([rng.integers(0, 6, (30, 8)), [[0, 3, 5, 0, 3, 5, 0, 0]]])
    ids = [str(i) for i in range(len(targets))]
    fast = _records(range(len(targets)), targets, targets, Tok(), ids, reproduced=True)
    slow = _records(range(len(targets)), targets.copy(), targets, Tok(), ids)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "generated_ids"} for r in rows]  # noqa: E731
    assert strip(fast) == strip(slow) and fast[-1]["rouge_l_text"] == 0.0 and fast[0]["rouge_l_text"] == 1.0


# --- the probe on a model that memorized its training documents ------------------------------------------------

def test_exact_rate_trained_vs_heldout(memorized):
    m = load_model(memorized.model_dir)
    tr = extract(model_dir=m, data=memorized.train_file, write=False).summary
    ho = extract(model_dir=m, data=memorized.heldout_file, write=False).summary
    assert tr["exact_rate"] >= 0.9, tr
    assert ho["exact_rate"] <= 0.05, ho
    assert tr["mean_rouge_l"] > ho["mean_rouge_l"] + 0.5


@pytest.fixture(scope="module")
def mixed(memorized, tmp_path_factory):
    """Trained, edited-trained and held-out documents shuffled into one file. An edited document is a trained
    one with a word inserted at a token position inside the 32+32 window's suffix (3..27), so greedy decoding
    follows the memorized text and diverges there: divergence points spread over the suffix, and batches (and
    decoding pools) mix rows that diverge at once, late, or never."""
    m = load_model(memorized.model_dir)
    train = read_documents(memorized.train_file)
    edited = []
    for i, toks in enumerate(tokenize(m.tokenizer, train.text)):
        k = 32 + 3 + (7 * i) % 25
        edited.append(m.tokenizer.decode(toks[:k]) + " zebra" + m.tokenizer.decode(toks[k:]))
    docs = pd.concat([train, pd.DataFrame({"id": [f"e{i}" for i in range(len(edited))], "text": edited}),
                      read_documents(memorized.heldout_file)])
    docs = docs.sample(frac=1.0, random_state=0)
    path = write_documents(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", docs.text.tolist(), docs.id.tolist())
    return m, path


def test_shortcut_equals_full_greedy_decoding(mixed):
    m, path = mixed
    for offset, prefix, suffix in [(0, 32, 32), (40, 16, 40)]:
        fast = _samples(m, path, prefix=prefix, suffix=suffix, offset=offset, batch_size=7)
        full = _samples(m, path, prefix=prefix, suffix=suffix, offset=offset, batch_size=16, shortcut=False)
        assert len(fast) == len(full) > 150
        pd.testing.assert_frame_equal(fast, full)
        early = (fast.match_prefix < 3) & ~fast.exact
        assert early.any()
        if offset == 0:  # exact, late-diverging (edited) and early-diverging rows all occur
            late = (fast.match_prefix >= 10) & ~fast.exact
            assert late.sum() > 20 and fast.exact.sum() > 30
        # and against Hugging Face generate (greedy), sample by sample
        docs = read_documents(path)
        toks = {i: t for i, t in zip(docs.id, tokenize(m.tokenizer, docs.text))}
        prompts = torch.tensor([[m.tokenizer.bos_token_id] + toks[i][offset:offset + prefix] for i in fast.id])
        from transformers import GenerationConfig

        # eos_token_id=[]: never stop at EOS (None falls back to the model's generation_config, whose EOS a model
        # trained on EOS-joined packed rows emits, and min_new_tokens would forbid EOS, changing the tokens)
        cfg = GenerationConfig(max_new_tokens=suffix, do_sample=False, eos_token_id=[], bos_token_id=None,
                               pad_token_id=m.tokenizer.pad_token_id)
        with torch.no_grad():
            hf = m.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
        assert [list(r) for r in hf[:, prompts.shape[1]:].tolist()] == [list(g) for g in fast.generated_ids]


def test_hf_generate_reference_does_not_stop_at_the_models_eos():
    """The HF generate reference (here and in bench/bench_extract.py) passes eos_token_id=[]: for a model whose
    generation_config names an EOS that greedy decoding emits, it still gives all the greedy tokens, while None (the
    model's EOS applies) stops early and min_new_tokens (EOS forbidden) changes them."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from memaudit import generation as gen

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    prompts = torch.tensor([[3, 4, 5], [7, 8, 9]])
    with torch.no_grad():
        want = gen.greedy(model, prompts, 10)
        model.generation_config.eos_token_id = int(want[0, 1])  # row 0 emits "EOS" at its second step
        model.generation_config.pad_token_id = 49

        def hf(**kw):
            cfg = GenerationConfig(max_new_tokens=10, do_sample=False, bos_token_id=None, pad_token_id=49, **kw)
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
            return out[:, prompts.shape[1]:]

        assert hf(eos_token_id=[]).tolist() == want.tolist()
        assert hf(eos_token_id=None).tolist() != want.tolist()
        assert hf(min_new_tokens=10).tolist() != want.tolist()


def test_staged_verification_equals_full_greedy_at_every_cut(mixed, monkeypatch):
    """The cost model only decides where the teacher-forced verification is cut (first stage of 1, 3 or all
    suffix tokens; continuation from the cache); without a sliceable cache the shortcut re-reads the context.
    Every variant must give plain greedy decoding's output."""
    import memaudit.extraction as ex

    m, path = mixed
    kw = dict(prefix=32, suffix=32, limit=120)
    full = _samples(m, path, **kw, batch_size=16, shortcut=False)
    assert 0 < full.exact.sum() < len(full) and ((full.match_prefix >= 3) & ~full.exact).sum() > 5
    chosen = []
    for k0 in (1, 3, 32):
        monkeypatch.setattr(ex._Stages, "first_stage", lambda self, rows, k0=k0: chosen.append(k0) or k0)
        pd.testing.assert_frame_equal(_samples(m, path, **kw, batch_size=9), full)
    assert sorted(set(chosen)) == [1, 3, 32]
    monkeypatch.setattr(ex, "_cache_is_sliceable", lambda model, token: False)
    pd.testing.assert_frame_equal(_samples(m, path, **kw, batch_size=9), full)


def test_stage_choice_follows_the_data():
    from memaudit.extraction import _Stages

    memorized, fresh, late, half = _Stages(32), _Stages(32), _Stages(32), _Stages(32)
    memorized.record(np.full(64, 32))
    fresh.record(np.zeros(64, dtype=int))
    late.record(np.full(64, 20))
    half.record(np.r_[np.zeros(32, dtype=int), np.full(32, 32)])
    assert memorized.first_stage(16) == 32  # everything matches: one full pass per batch
    assert fresh.first_stage(16) == 1  # everything diverges at once: stop right after the prefix
    assert late.first_stage(64) == 32  # every row would survive any short stage: it saves nothing
    assert half.first_stage(16) == 1  # half leave after the prefix: worth a second forward for the rest
    assert _Stages(32).first_stage(1) == 32  # a single row: a second forward costs more than it saves


def test_partial_scoring_pass_matches_full_pass(memorized):
    """iter_scored_batches with max_positions / score_from: the same numbers on the positions it scores."""
    from memaudit.scoring import iter_scored_batches

    m = load_model(memorized.model_dir)
    seqs = [t[:40] for t in tokenize(m.tokenizer, read_documents(memorized.train_file).text)[:12]]
    bos = m.tokenizer.bos_token_id
    full = {i: s for b in iter_scored_batches(m.model, seqs, batch_size=5, bos_id=bos)
            for i, s in zip(b.indices, b.stats)}
    cut = {i: s for b in iter_scored_batches(m.model, seqs, batch_size=5, bos_id=bos, max_positions=30,
                                             score_from=20) for i, s in zip(b.indices, b.stats)}
    for i, s in cut.items():
        assert len(s) == 30 and (s.argmax[:20] == -1).all() and not s.hit[:20].any()
        assert np.isnan(s.logprob[:20]).all()
        np.testing.assert_array_equal(s.argmax[20:], full[i].argmax[20:30])
        np.testing.assert_allclose(s.logprob[20:], full[i].logprob[20:30], rtol=1e-4, atol=1e-4)
    per_batch = []
    for b in iter_scored_batches(m.model, seqs, batch_size=5, bos_id=bos, greedy_only=True,
                                 max_positions=lambda rows: per_batch.append(rows) or 10 + rows):
        assert all(len(s) == 10 + len(b.indices) for s in b.stats)
    assert per_batch == [5, 5, 2]


def test_sampling_np_discoverable(mixed):
    m, path = mixed
    kw = dict(prefix=16, suffix=16, limit=70, decoding="sample", num_samples=8)
    df = _samples(m, path, **kw, batch_size=5)
    # batch-independent draws: another batch size gives identical samples
    pd.testing.assert_frame_equal(df, _samples(m, path, **kw, batch_size=32))
    # p_seq under the untransformed sampler = exp(sum of the target log-probs), from an independent full pass
    docs = read_documents(path, limit=70)
    toks = dict(zip(docs.id, tokenize(m.tokenizer, docs.text)))
    bos = m.tokenizer.bos_token_id
    for _, row in df.iloc[:12].iterrows():
        ids = torch.tensor([[bos] + toks[row.id][:32]])
        with torch.no_grad():
            lsm = torch.log_softmax(m.model(ids).logits[0].double(), -1)
        lp = sum(lsm[16 + j, ids[0, 17 + j]].item() for j in range(16))
        assert row.p_seq == pytest.approx(np.exp(lp), rel=1e-3, abs=1e-12)
        assert row.p_extract == pytest.approx(1 - (1 - row.p_seq) ** 8, rel=1e-9, abs=1e-12)
    assert 0 < df.p_hat.mean() < 1 and df.any_exact.mean() >= df.exact.mean()
    # top_k=1 makes the sampler greedy: its draws are the greedy tokens and p_seq is 1 exactly when exact
    greedy = _samples(m, path, prefix=16, suffix=16, limit=70)
    k1 = _samples(m, path, **(kw | {"top_k": 1, "num_samples": 2}))
    assert k1.generated_ids.map(tuple).tolist() == greedy.generated_ids.map(tuple).tolist()
    np.testing.assert_array_equal(k1.p_seq.to_numpy() == 1.0, greedy.exact.to_numpy())
    np.testing.assert_array_equal(k1.p_hat.to_numpy(), greedy.exact.to_numpy().astype(float))


def test_beam_with_one_beam_is_greedy(mixed):
    m, path = mixed
    kw = dict(prefix=16, suffix=16, limit=40)
    beam = _samples(m, path, decoding="beam", num_beams=1, **kw)
    greedy = _samples(m, path, **kw)
    assert beam.generated_ids.map(tuple).tolist() == greedy.generated_ids.map(tuple).tolist()
    b4 = extract(model_dir=m, data=path, decoding="beam", num_beams=4, write=False, **kw).summary
    assert b4["decoding"] == "beam" and b4["n_samples"] == 40


# --- run directory, resume, CLI ------------------------------------------------------------------------------------

class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(mixed, tmp_path):
    m, path = mixed
    kw = dict(prefix=32, suffix=32, batch_size=8)
    whole = extract(ExtractSettings(model_dir=m, data=path, **kw, out=tmp_path / "whole"))
    assert whole.path == tmp_path / "whole"

    def stop_after_3(k):
        if k == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        extract(model_dir=m, data=path, **kw, out=tmp_path / "cut", on_batch=stop_after_3)
    saved = pd.concat([pd.read_parquet(f) for f in (tmp_path / "cut" / "partial").glob("*.parquet")])
    assert 0 < len(saved) < len(whole.samples)
    redone = []
    resumed = extract(ExtractSettings(model_dir=m, data=path, **kw, out=tmp_path / "cut", resume=True),
                      on_batch=redone.append)
    pd.testing.assert_frame_equal(resumed.samples, whole.samples)
    assert not (tmp_path / "cut" / "partial").exists()
    assert pd.read_parquet(tmp_path / "cut" / "samples.parquet").equals(pd.read_parquet(tmp_path / "whole" / "samples.parquet"))
    assert json.loads((tmp_path / "cut" / "summary.json").read_text()) == whole.summary == resumed.summary


def test_resume_skips_finished_samples(mixed, tmp_path, monkeypatch):
    """Count what the scoring engine is asked to score on resume: only the samples not saved before."""
    import memaudit.extraction as ex

    m, path = mixed
    kw = dict(prefix=16, suffix=16, limit=60, batch_size=10)

    def stop(k):
        if k == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        extract(model_dir=m, data=path, **kw, out=tmp_path / "r", on_batch=stop)
    n_saved = sum(len(pd.read_parquet(f)) for f in (tmp_path / "r" / "partial").glob("*.parquet"))
    real = ex.iter_scored_batches
    scored = []

    def counting(*a, **k):
        for b in real(*a, **k):
            scored.extend(b.indices)
            yield b

    monkeypatch.setattr(ex, "iter_scored_batches", counting)
    df = extract(model_dir=m, data=path, **kw, out=tmp_path / "r", resume=True).samples
    assert len(scored) == len(df) - n_saved and n_saved > 0


def test_settings_object_or_keywords_and_the_default_out(memorized, tmp_path, monkeypatch):
    """One ExtractSettings, or its fields as keywords (not both); without `out` the library picks
    runs/extract-<time>; write=False writes nothing and returns the same results."""
    monkeypatch.chdir(tmp_path)
    s = ExtractSettings(model_dir=memorized.model_dir, data=memorized.train_file, prefix=8, suffix=8, limit=4)
    res = extract(s)
    assert res.path is not None and res.path.parent == Path("runs") and res.path.name.startswith("extract-")
    assert list(res.summary)[:2] == ["schema_version", "command"] and res.summary["command"] == "extract"
    assert json.loads((res.path / "summary.json").read_text()) == res.summary
    with pytest.raises(TypeError, match="not both"):
        extract(s, limit=2)
    quiet = extract(dataclasses.replace(s, write=False))
    assert quiet.path is None and quiet.summary == res.summary and list(Path("runs").iterdir()) == [res.path]
    pd.testing.assert_frame_equal(quiet.samples, res.samples)
    with pytest.raises(MemauditError, match="--resume needs --out"):
        extract(dataclasses.replace(s, write=False, resume=True))


def test_cli_extract_writes_run_dir(memorized, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "memaudit", "extract", str(memorized.model_dir), "--data",
                        str(memorized.train_file), "--limit", "20", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "exact (verbatim suffix):" in r.stdout and str(out) in r.stdout
    df = pd.read_parquet(out / "samples.parquet")
    assert {"id", "exact", "token_match", "match_prefix", "rouge_l", "rouge_l_text", "generated",
            "target"} <= set(df.columns) and len(df) == 20
    s = json.loads((out / "summary.json").read_text())
    for key in ("n_samples", "n_skipped", "n_duplicates", "exact_rate", "mean_token_match", "mean_rouge_l",
                "mean_rouge_l_text", "prefix", "suffix", "decoding"):
        assert key in s
    assert s["exact_rate"] == df["exact"].mean()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "extract" and len(cfg["inputs"]["model_weights_sha256"]) == 64
    assert (out / "rouge_l.png").stat().st_size > 1000 and (out / "match_prefix.png").stat().st_size > 1000
    from memaudit import cli  # a second run into the same folder: refused in one line (in-process main())

    monkeypatch.setattr(sys, "argv", ["memaudit", "extract", str(memorized.model_dir), "--data",
                                      str(memorized.train_file), "--limit", "20", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "--resume" in err


# --- memory: nothing is held per sample beyond its few numbers -------------------------------------------------

_MEM_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel
    from memaudit.samples import Windows
    from memaudit.extraction import DecodingSettings, extract_windows
    from memaudit.models import LoadedModel
    torch.manual_seed(0)
    n = int(sys.argv[1])
    cfg = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    class Tok:  # ids to text without a trained tokenizer
        bos_token_id, pad_token_id = 0, 0
        def batch_decode(self, rows):
            return [" ".join(map(str, r)) for r in rows]
    tokens = np.random.default_rng(0).integers(1, 512, size=(n, 48))
    w = Windows([str(i) for i in range(n)], tokens, 24, 24, 0, 0)
    lm = LoadedModel(model, Tok(), None, torch.device("cpu"), torch.float32)
    df = extract_windows(lm, w, DecodingSettings(batch_size=64)).samples
    assert len(df) == n
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_flat_in_number_of_samples(tmp_path):
    script = tmp_path / "mem.py"
    script.write_text(_MEM_SCRIPT)
    peaks = {}
    for n in (300, 3000):
        r = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        peaks[n] = int(r.stdout.split()[-1])
    assert peaks[3000] <= 1.10 * peaks[300], peaks


# --- whole documents: sampling strategies, per-document aggregates, the memorization map --------------------------

def _brute_documents(windows, n_tokens, prefix, suffix):
    """Per document, token by token: mark the suffix tokens of every exact window, then count and scan runs."""
    rows = []
    for d, n in enumerate(n_tokens):
        mine = [w for w in windows if w[0] == d]
        covered = [False] * n
        for _, off, exact, _ in mine:
            if exact:
                for t in range(off + prefix, off + prefix + suffix):
                    covered[t] = True
        longest = run = 0
        for c in covered:
            run = run + 1 if c else 0
            longest = max(longest, run)
        n_exact = sum(bool(w[2]) for w in mine)
        rows.append({"n_windows": len(mine), "n_exact": n_exact,
                     "exact_fraction": n_exact / len(mine) if mine else np.nan,
                     "reproduced_tokens": sum(covered), "longest_reproduced_run": longest,
                     "mean_rouge_l": float(np.mean([w[3] for w in mine])) if mine else np.nan})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(5))
def test_document_table_against_brute_force(seed):
    from memaudit.extraction import document_table

    rng = np.random.default_rng(seed)
    P, S = int(rng.integers(1, 5)), int(rng.integers(1, 7))
    n_tokens = rng.integers(0, 60, size=25)
    windows = []
    for d, n in enumerate(n_tokens):
        if n >= P + S:  # a few distinct starts, often overlapping or adjacent
            k = int(rng.integers(0, min(8, n - P - S + 1) + 1))
            for off in sorted(rng.choice(n - P - S + 1, size=k, replace=False)):
                windows.append((d, int(off), bool(rng.random() < 0.6), float(rng.random())))
    rng.shuffle(windows)  # the table must not depend on the windows' order
    frame = pd.DataFrame(windows, columns=["doc", "offset", "exact", "rouge_l"])
    ids = [f"doc{d}" for d in range(len(n_tokens))]
    got = document_table(frame, ids, n_tokens, P, S)
    want = _brute_documents(windows, n_tokens, P, S)
    assert got["id"].tolist() == ids and got["n_tokens"].tolist() == n_tokens.tolist()
    for col in want.columns:
        np.testing.assert_allclose(got[col].to_numpy(dtype=float), want[col].to_numpy(dtype=float), err_msg=col)
    assert (got["reproduced_tokens"] > 0).sum() > 3 and (got["longest_reproduced_run"] > S).any()


@pytest.fixture(scope="module")
def few_docs(memorized, tmp_path_factory):
    """Eight trained and four held-out documents (each several windows long) in one file."""
    docs = pd.concat([read_documents(memorized.train_file, limit=8), read_documents(memorized.heldout_file, limit=4)])
    path = write_documents(tmp_path_factory.mktemp("few") / "few.jsonl", docs.text.tolist(), docs.id.tolist())
    return load_model(memorized.model_dir), path


_ROW_COLUMNS = ["exact", "token_match", "match_prefix", "rouge_l", "rouge_l_text", "generated", "target"]


def test_stride_equals_single_window_extract_at_each_offset(few_docs):
    """Every --stride window's row equals the row today's single-window extract gives with --offset at its start."""
    m, path = few_docs
    kw = dict(prefix=8, suffix=8)
    res = extract(model_dir=m, data=path, stride=16, write=False, **kw)
    rows = res.samples
    assert rows.exact.any() and not rows.exact.all() and rows.offset.nunique() > 5
    compared = 0
    for k in sorted(rows.offset.unique()):
        single = _samples(m, path, offset=k, **kw).set_index("doc_id")
        assert (single.offset == k).all()
        for _, r in rows[rows.offset == k].iterrows():
            if r.doc_id not in single.index:  # a window identical to another document's at this offset
                continue
            s = single.loc[r.doc_id]
            assert [r[c] for c in _ROW_COLUMNS] == [s[c] for c in _ROW_COLUMNS], (k, r.doc_id)
            assert list(r.generated_ids) == list(s.generated_ids) and r.id == f"{r.doc_id}@{k}"
            compared += 1
    assert compared >= len(rows) - res.summary["n_repeats"] > 50


@pytest.mark.parametrize("options", [{"stride": 5}, {"tail": True}, {"windows_per_doc": 3, "seed": 4},
                                     {"stride": 7, "offset": 3, "decoding": "sample", "num_samples": 3}])
def test_whole_document_rows_documents_and_summary(few_docs, options):
    """Each strategy's windows sit where the strategy says, each greedy continuation is what HF generate gives
    from the window's prefix, and the documents table and summary block follow from the rows (brute force)."""
    from transformers import GenerationConfig

    from memaudit.samples import Sampling

    m, path = few_docs
    P, S = 6, 6
    res = extract(model_dir=m, data=path, prefix=P, suffix=S, write=False, **options)
    docs = read_documents(path)
    toks = dict(zip(docs.id, tokenize(m.tokenizer, docs.text)))
    sampling = Sampling(**{k: v for k, v in options.items() if k in ("stride", "tail", "windows_per_doc", "seed",
                                                                     "offset")})
    want = [(i, o) for d, i in enumerate(docs.id) for o in sampling.starts(len(toks[i]), P + S, d)]
    rows = res.samples
    assert list(zip(rows.doc_id, rows.offset)) == want
    assert (rows.id == rows.doc_id + "@" + rows.offset.astype(str)).all()
    assert [toks[i][o + P: o + P + S] for i, o in want] == [
        m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in rows.target]
    if options.get("decoding") != "sample":
        pick = rows.iloc[:: max(1, len(rows) // 12)]
        prompts = torch.tensor([[m.tokenizer.bos_token_id] + toks[i][o:o + P] for i, o in zip(pick.doc_id, pick.offset)])
        cfg = GenerationConfig(max_new_tokens=S, do_sample=False, eos_token_id=[], bos_token_id=None,
                               pad_token_id=m.tokenizer.pad_token_id)  # []: never stop at the model's own EOS
        with torch.no_grad():
            hf = m.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
        assert hf[:, prompts.shape[1]:].tolist() == [list(g) for g in pick.generated_ids]
    position = {i: d for d, i in enumerate(docs.id)}
    windows = [(position[i], o, e, r) for i, o, e, r in zip(rows.doc_id, rows.offset, rows.exact, rows.rouge_l)]
    want_docs = _brute_documents(windows, [len(toks[i]) for i in docs.id], P, S)
    got = res.documents
    assert got["id"].tolist() == docs.id.tolist()
    for col in want_docs.columns:
        np.testing.assert_allclose(got[col].to_numpy(dtype=float), want_docs[col].to_numpy(dtype=float), err_msg=col)
    block = res.summary["documents"]
    probed = want_docs.n_windows > 0
    assert block == pytest.approx({
        "n_documents": len(docs), "documents_with_exact": int((want_docs.n_exact > 0).sum()),
        "mean_exact_fraction": float(want_docs.exact_fraction[probed].mean()),
        "reproduced_token_fraction": want_docs.reproduced_tokens.sum() / sum(len(t) for t in toks.values())})
    assert res.summary["sampling"] == sampling.strategy and res.summary["n_samples"] == len(want)


def test_repeated_windows_are_probed_once_and_counted_everywhere(few_docs, tmp_path, monkeypatch):
    """A document repeated under another id: whole-document strategies give it rows of its own (copies, probed
    once), the first window drops it from samples as ever, and both credit it in the documents table."""
    import memaudit.extraction as ex

    m, path = few_docs
    docs = read_documents(path)
    twice = write_documents(tmp_path / "twice.jsonl", docs.text.tolist() + docs.text.tolist()[:3],
                            docs.id.tolist() + ["again0", "again1", "again2"])
    probed = []
    real = ex._Job.prepare
    monkeypatch.setattr(ex._Job, "prepare", classmethod(lambda cls, lm, w, st: probed.append(len(w.ids)) or
                                                        real.__func__(cls, lm, w, st)))
    res = extract(model_dir=m, data=twice, prefix=6, suffix=6, stride=6, write=False)
    rows, d = res.samples, res.documents.set_index("id")
    n_first3 = int((rows.doc_id.isin(docs.id[:3])).sum())
    assert res.summary["n_repeats"] >= n_first3 and sum(probed) == len(rows) - res.summary["n_repeats"]
    for k in range(3):
        a, b = rows[rows.doc_id == docs.id[k]], rows[rows.doc_id == f"again{k}"]
        assert a.drop(columns=["id", "doc_id"]).reset_index(drop=True).equals(
            b.drop(columns=["id", "doc_id"]).reset_index(drop=True))
        assert d.loc[f"again{k}"].tolist() == d.loc[docs.id[k]].tolist()
    first = extract(model_dir=m, data=twice, prefix=6, suffix=6, write=False)
    assert first.summary["n_duplicates"] == 3 and len(first.samples) == len(docs)
    assert first.documents.set_index("id").loc["again1"].n_windows == 1
    assert first.summary["documents"]["documents_with_exact"] == int((first.documents.n_exact > 0).sum())


def test_chunked_windows_and_resume_equal_one_pass(few_docs, tmp_path, monkeypatch):
    """Windows in many small chunks (numbered on across them) give the rows of one pass, for greedy and for
    sampling (draws keyed by the run's window numbers); an interrupted chunked run resumes to the same files."""
    import memaudit.extraction as ex

    m, path = few_docs
    for kw in (dict(stride=5, limit=6), dict(stride=9, limit=6, decoding="sample", num_samples=2)):
        whole = extract(model_dir=m, data=path, prefix=6, suffix=6, batch_size=8, write=False, **kw)
        monkeypatch.setattr(ex, "CHUNK_WINDOWS", 13)
        chunked = extract(model_dir=m, data=path, prefix=6, suffix=6, batch_size=8, write=False, **kw)
        pd.testing.assert_frame_equal(chunked.samples, whole.samples)
        pd.testing.assert_frame_equal(chunked.documents, whole.documents)
        assert chunked.summary == whole.summary
        monkeypatch.undo()
    monkeypatch.setattr(ex, "CHUNK_WINDOWS", 13)
    kw = dict(prefix=6, suffix=6, stride=5, batch_size=8, limit=6)
    done = extract(model_dir=m, data=path, out=tmp_path / "whole", **kw)

    def stop(k):
        if k == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        extract(model_dir=m, data=path, out=tmp_path / "cut", on_batch=stop, **kw)
    resumed = extract(model_dir=m, data=path, out=tmp_path / "cut", resume=True, **kw)
    pd.testing.assert_frame_equal(resumed.samples, done.samples)
    for name in ("samples.parquet", "documents.parquet"):
        assert pd.read_parquet(tmp_path / "cut" / name).equals(pd.read_parquet(tmp_path / "whole" / name))
    assert json.loads((tmp_path / "cut" / "summary.json").read_text()) == done.summary
    with pytest.raises(MemauditError, match="other settings"):
        extract(model_dir=m, data=path, out=tmp_path / "cut", resume=True, **(kw | {"stride": 7}))


def test_cli_extract_whole_documents(few_docs, run_cli, tmp_path):
    m, path = few_docs
    out = tmp_path / "run"
    r = run_cli("extract", m.path, "--data", path, "--prefix", "8", "--suffix", "8", "--stride", "8",
                "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "every window at stride 8" in r.stdout and "documents with an exact suffix:" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    docs = pd.read_parquet(out / "documents.parquet")
    assert list(docs.columns) == ["id", "n_tokens", "n_windows", "n_exact", "exact_fraction", "reproduced_tokens",
                                  "longest_reproduced_run", "mean_rouge_l"] and len(docs) == 12
    assert s["sampling"] == "stride" and s["stride"] == 8 and s["documents"]["n_documents"] == 12
    assert s["documents"]["documents_with_exact"] == int((docs.n_exact > 0).sum()) > 0
    samples = pd.read_parquet(out / "samples.parquet")
    assert list(samples.columns[-2:]) == ["doc_id", "offset"] and s["n_samples"] == len(samples)
    assert (out / "memorization_map.png").stat().st_size > 3000
    assert json.loads((out / "config.json").read_text())["settings"]["stride"] == 8


_MEM_STRIDE_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel
    from memaudit import extract, write_documents
    from memaudit.models import LoadedModel
    torch.manual_seed(0)
    n_docs, path = int(sys.argv[1]), sys.argv[2]
    cfg = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    class Tok:  # text "12 7 300 ..." <-> ids, without a trained tokenizer
        bos_token_id, pad_token_id, is_fast = 0, 0, False
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[int(t) for t in x.split()] for x in texts]}
        def batch_decode(self, rows):
            return [" ".join(map(str, r)) for r in rows]
    rng = np.random.default_rng(0)
    write_documents(path, [" ".join(map(str, rng.integers(1, 512, size=336))) for _ in range(n_docs)])
    lm = LoadedModel(model, Tok(), None, torch.device("cpu"), torch.float32)
    res = extract(model_dir=lm, data=path, prefix=24, suffix=24, stride=32, batch_size=64, write=False)
    assert len(res.samples) == 10 * n_docs and len(res.documents) == n_docs
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_flat_in_number_of_documents_with_stride(tmp_path):
    """Windows are cut lazily, a chunk at a time, and the texts are dropped once tokenized: ten times the
    documents (300 -> 3,000 windows) may not raise the peak by more than the existing bound."""
    script = tmp_path / "mem_stride.py"
    script.write_text(_MEM_STRIDE_SCRIPT)
    peaks = {}
    for n in (30, 300):
        r = subprocess.run([sys.executable, str(script), str(n), str(tmp_path / f"docs{n}.jsonl")],
                           capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        peaks[n] = int(r.stdout.split()[-1])
    assert peaks[300] <= 1.10 * peaks[30], peaks


def test_resume_of_rows_saved_without_document_positions(few_docs, tmp_path):
    """Partial rows of an earlier version hold neither doc nor offset: a resumed run cuts the windows again for
    them and ends as an uninterrupted run."""
    m, path = few_docs
    kw = dict(prefix=6, suffix=6, batch_size=4, limit=10)
    whole = extract(model_dir=m, data=path, out=tmp_path / "whole", **kw)

    def stop(k):
        if k == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        extract(model_dir=m, data=path, out=tmp_path / "cut", on_batch=stop, **kw)
    saved = sorted((tmp_path / "cut" / "partial").glob("*.parquet"))
    assert saved
    for f in saved:
        pd.read_parquet(f).drop(columns=["doc", "offset"]).to_parquet(f)
    resumed = extract(model_dir=m, data=path, out=tmp_path / "cut", resume=True, **kw)
    pd.testing.assert_frame_equal(resumed.samples, whole.samples)
    pd.testing.assert_frame_equal(resumed.documents, whole.documents)


# --- pre-tokenized corpora: stored ids give what the same text gives ---------------------------------------------

def _run_files(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A run directory's samples, documents and summary."""
    return (pd.read_parquet(out / "samples.parquet"), pd.read_parquet(out / "documents.parquet"),
            json.loads((out / "summary.json").read_text()))


def test_pretokenized_corpora_equal_the_same_text(few_docs, run_cli, tmp_path):
    """The ids of the text, stored as input_ids (parquet, jsonl), as a 2-D .npy and as a flat .bin (uint16 through
    the CLI, uint32), give the text's samples.parquet, documents.parquet and summary."""
    from memaudit.data import decode

    m, path = few_docs
    docs = read_documents(path)
    ids = tokenize(m.tokenizer, docs.text)
    kw = dict(prefix=6, suffix=6, stride=5, device="cpu", batch_size=8)

    def run(data, name, **more):
        return _run_files(extract(model_dir=m, data=data, out=tmp_path / f"run-{name}", **kw, **more).path)

    text = run(path, "text")
    assert text[0].exact.any() and not text[0].exact.all()
    pd.DataFrame({"id": docs.id, "input_ids": ids}).to_parquet(tmp_path / "ids.parquet")
    _write_rows(tmp_path / "ids.jsonl", [{"id": i, "input_ids": t} for i, t in zip(docs.id, ids)])
    for name in ("ids.parquet", "ids.jsonl"):
        _assert_same_run(run(tmp_path / name, name), text)
    # rectangular rows: each document's first L ids, kept where they are the tokenization of their own text
    L = 40
    rows = [t[:L] for t in ids if len(t) >= L and tokenize(m.tokenizer, [decode(m.tokenizer, t[:L])])[0] == t[:L]]
    assert len(rows) >= 8
    cut_text = run(write_documents(tmp_path / "cut.jsonl", [decode(m.tokenizer, r) for r in rows]), "cut")
    np.save(tmp_path / "ids.npy", np.array(rows, dtype=np.int32))
    _assert_same_run(run(tmp_path / "ids.npy", "npy"), cut_text)
    np.array(rows, dtype="<u4").tofile(tmp_path / "ids32.bin")
    _assert_same_run(run(tmp_path / "ids32.bin", "bin32", token_dtype="uint32", seq_len=L), cut_text)
    np.array(rows, dtype="<u2").tofile(tmp_path / "ids.bin")
    r = run_cli("extract", m.path, "--data", tmp_path / "ids.bin", "--seq-len", L, "--prefix", 6, "--suffix", 6,
                "--stride", 5, "--device", "cpu", "--batch-size", 8, "--out", tmp_path / "run-bin16")
    assert r.returncode == 0, r.stderr
    _assert_same_run(_run_files(tmp_path / "run-bin16"), cut_text)
    settings = json.loads((tmp_path / "run-bin16" / "config.json").read_text())["settings"]
    assert settings["seq_len"] == L and settings["token_dtype"] == "uint16"


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _assert_same_run(got, want) -> None:
    for g, w in zip(got[:2], want[:2]):
        pd.testing.assert_frame_equal(g, w)
    assert got[2] == want[2]
