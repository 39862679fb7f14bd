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

        cfg = GenerationConfig(max_new_tokens=suffix, do_sample=False, eos_token_id=None, bos_token_id=None,
                               pad_token_id=m.tokenizer.pad_token_id)
        with torch.no_grad():
            hf = m.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
        assert [list(r) for r in hf[:, prompts.shape[1]:].tolist()] == [list(g) for g in fast.generated_ids]


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
