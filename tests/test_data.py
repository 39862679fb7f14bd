"""Reading documents (memaudit.data): every format, damaged files, and tokenization equal to the tokenizer's own."""
import json

import pandas as pd
import pytest

from memaudit import load_model, read_documents, tokenize
from memaudit.errors import MemauditError


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
    df = pd.DataFrame({"id": ["x", "y"], "text": ["first doc", "second, with comma"]})
    df.to_parquet(tmp_path / "d.parquet")
    df.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    for ext in ("parquet", "csv", "jsonl"):
        got = read_documents(tmp_path / f"d.{ext}")
        assert got["id"].tolist() == ["x", "y"] and got["text"].tolist() == df["text"].tolist()
    (tmp_path / "d.txt").write_text("first doc\n\nsecond, with comma\n")
    assert read_documents(tmp_path / "d.txt")["text"].tolist() == df["text"].tolist()


def test_tokenize_equals_the_tokenizers_standard_call(memorized):
    """The Rust fast path gives the ids `tokenizer(texts)` gives, on awkward text too."""
    tok = load_model(memorized.model_dir, device="cpu").tokenizer
    texts = read_documents(memorized.train_file)["text"].tolist()[:20] + [
        "", "  leading spaces", "tabs\tand\nnewlines\r\n", "unicode: naïve café 日本語 🙂", "<|endoftext|> inside"]
    standard = [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert tokenize(tok, texts) == standard
