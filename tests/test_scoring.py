"""The scoring engine against an independent full-logits computation; data reading; model loading."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from memaudit import load_model, make_windows, read_documents, score, tokenize
from memaudit.errors import MemauditError


def test_scores_equal_full_logits_loop(memorized):
    m = load_model(memorized.model_dir)
    docs = read_documents(memorized.heldout_file, limit=7)
    seqs = [t[: 10 + 9 * i] for i, t in enumerate(tokenize(m.tokenizer, docs.text))]  # ragged lengths
    stats = score(m.model, seqs, batch_size=3, bos_id=m.tokenizer.bos_token_id)
    for seq, st in zip(seqs, stats):
        ids = torch.tensor([[m.tokenizer.bos_token_id] + seq])
        with torch.no_grad():
            lsm = torch.log_softmax(m.model(ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        lp = lsm[torch.arange(len(tgt)), tgt]
        p = lsm.exp()
        mu = (p * lsm).sum(-1)
        var = (p * lsm**2).sum(-1) - mu**2
        assert len(st) == len(seq)
        np.testing.assert_allclose(st.logprob, lp.numpy(), atol=1e-4)
        np.testing.assert_allclose(st.mean_lp, mu.numpy(), atol=1e-4)
        np.testing.assert_allclose(st.var_lp, var.numpy(), atol=1e-3)
        np.testing.assert_array_equal(st.hit, (lsm.argmax(-1) == tgt).numpy())
        assert math.isclose(st.bits, -lp.sum().item() / math.log(2), rel_tol=1e-4)


def test_windows_skip_short_and_deduplicate():
    w = make_windows([[1, 2, 3, 4], [1, 2, 3, 4, 9], [5, 6], [7, 8, 9, 10]], ["a", "b", "c", "d"], 2, 2)
    assert w.ids == ["a", "d"] and w.n_skipped == 1 and w.n_duplicates == 1
    assert w.tokens.tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]


@pytest.mark.parametrize("content,expect", [
    (b'{"text": "a"}\n{"text": broken}\n', "line 2 is not valid JSON"),
    (b'{"text": "caf\xe9"}\n', "line 1 is not valid UTF-8"),
    (b"", "no documents"),
])
def test_bad_jsonl_names_the_problem(tmp_path, content, expect):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    with pytest.raises(MemauditError, match=expect):
        read_documents(f)


def test_all_formats_read_the_same(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"id": ["x", "y"], "text": ["first doc", "second, with comma"]})
    df.to_parquet(tmp_path / "d.parquet")
    df.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    for ext in ("parquet", "csv", "jsonl"):
        got = read_documents(tmp_path / f"d.{ext}")
        assert got["id"].tolist() == ["x", "y"] and got["text"].tolist() == df["text"].tolist()
    (tmp_path / "d.txt").write_text("first doc\n\nsecond, with comma\n")
    assert read_documents(tmp_path / "d.txt")["text"].tolist() == df["text"].tolist()


def test_train_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "memaudit", "train", "--data", str(tmp_path / "none.jsonl"),
                        "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data file not found: {tmp_path / 'none.jsonl'}"


def test_tokenize_equals_the_tokenizers_standard_call(memorized):
    """The Rust fast path gives the ids `tokenizer(texts)` gives, on awkward text too."""
    tok = load_model(memorized.model_dir, device="cpu").tokenizer
    texts = read_documents(memorized.train_file)["text"].tolist()[:20] + [
        "", "  leading spaces", "tabs\tand\nnewlines\r\n", "unicode: naïve café 日本語 🙂", "<|endoftext|> inside"]
    standard = [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert tokenize(tok, texts) == standard
