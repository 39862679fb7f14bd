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
