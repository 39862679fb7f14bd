"""Reading documents (memaudit.data): every format, damaged files, tokenization equal to the tokenizer's own, and
pre-tokenized corpora (.npy, .bin, input_ids) read as stored and giving what their text gives."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from memaudit import load_model, read_documents, tokenize
from memaudit.data import check_token_options, decode, load_documents, pretokenized
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


# ---- pre-tokenized corpora ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny GPT-2 (48 positions, so long documents are cut) and its tokenizer, and real documents with
    their token ids: equivalence needs no memorization, only the same numbers from the same ids."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from memaudit.corpus import demo_corpus
    from memaudit.data import train_tokenizer

    texts, _ = demo_corpus(n_train=24, n_heldout=2, seed=3)
    tok = train_tokenizer(texts, vocab_size=600)
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=48,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return SimpleNamespace(root=root, model=root / "model", tok=tok, texts=texts, ids=tokenize(tok, texts))


def _roundtrips(tok, ids) -> bool:
    """The decoded text tokenizes back to exactly these ids (so 'the same text' is well defined)."""
    return tokenize(tok, [decode(tok, ids)])[0] == list(ids)


def _fixed_rows(tiny, width: int, n: int) -> list[list[int]]:
    """`n` rows of `width` ids, each a document's first ids, kept only where they round-trip through text."""
    rows = [t[:width] for t in tiny.ids if len(t) >= width and _roundtrips(tiny.tok, t[:width])]
    assert len(rows) >= n
    return rows[:n]


def _write_text(path, texts, ids=None):
    rows = [{"text": t} if ids is None else {"id": i, "text": t} for i, t in zip(ids or texts, texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pretokenized_formats_hold_the_stored_ids(tiny, tmp_path):
    """Each format against the ids written into it, sliced here by hand; nothing is tokenized."""
    ids = tiny.ids[:6]
    pd.DataFrame({"id": [f"d{i}" for i in range(6)], "input_ids": ids}).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "input_ids": t}) + "\n\n"
                                              for i, t in enumerate(ids)))
    for f in ("d.parquet", "d.jsonl"):
        docs = load_documents(tmp_path / f)
        assert docs.pretokenized and docs.texts is None
        assert list(docs.ids) == [f"d{i}" for i in range(6)] and list(docs.tokens(tiny.tok)) == ids
        assert [docs.text(i, tiny.tok) for i in range(6)] == tiny.texts[:6]  # decoded from the ids
        assert list(load_documents(tmp_path / f, limit=2).tokens(tiny.tok)) == ids[:2]
    assert load_documents(tmp_path / "d.jsonl").where(2) == "line 5"  # blank lines between: errors name the line
    grid = np.array([t[:20] for t in ids], dtype=np.int32)
    np.save(tmp_path / "d.npy", grid)
    docs = load_documents(tmp_path / "d.npy")
    assert list(docs.ids) == [str(i) for i in range(6)] and list(docs.tokens(tiny.tok)) == grid.tolist()
    stream = np.concatenate([np.asarray(t, dtype=np.uint32) for t in ids])
    stream.tofile(tmp_path / "d.bin")
    for seq_len in (1, 7, 64, len(stream), len(stream) + 5):
        rows = load_documents(tmp_path / "d.bin", token_dtype="uint32", seq_len=seq_len).tokens(tiny.tok)
        expect = [stream[a:a + seq_len].tolist() for a in range(0, len(stream), seq_len)]  # the last one shorter
        assert list(rows) == expect and rows[-1] == expect[-1] and rows[1:3] == expect[1:3]
    rows = load_documents(tmp_path / "d.bin", token_dtype="uint32", seq_len=7, limit=3).tokens(tiny.tok)
    assert list(rows) == [stream[a:a + 7].tolist() for a in (0, 7, 14)]


def test_text_inputs_read_as_ever(tiny, tmp_path):
    """On text, load_documents is read_documents + tokenize: same ids, texts and tokens, and a text file that also
    has input_ids still reads its text (today's results); --text-field input_ids reads the ids instead."""
    tok = tiny.tok
    f = _write_text(tmp_path / "t.jsonl", tiny.texts, [f"x{i}" for i in range(len(tiny.texts))])
    df = read_documents(f)
    docs = load_documents(f)
    assert not docs.pretokenized and list(docs.ids) == df["id"].tolist() and docs.texts == df["text"].tolist()
    assert docs.tokens(tok) == tokenize(tok, df["text"].tolist())
    both = pd.DataFrame({"text": ["one text"], "input_ids": [[5, 6, 7]]})
    both.to_parquet(tmp_path / "both.parquet")
    assert load_documents(tmp_path / "both.parquet").tokens(tok) == tokenize(tok, ["one text"])
    assert list(load_documents(tmp_path / "both.parquet", text_field="input_ids").tokens(tok)) == [[5, 6, 7]]


def test_bin_is_memory_mapped_and_read_lazily(tiny, tmp_path):
    """A 4M-token .bin: loading it, checking every id against the vocabulary and reading rows allocates next to
    nothing (the file stays a memory map); reading it into memory would allocate 8 MB."""
    import tracemalloc

    n = 1 << 22
    (np.arange(n) % len(tiny.tok)).astype(np.uint16).tofile(tmp_path / "big.bin")
    tracemalloc.start()
    try:
        docs = load_documents(tmp_path / "big.bin", seq_len=256)
        rows = docs.tokens(tiny.tok)  # every id checked
        some = [rows[i] for i in (0, 5000, len(rows) - 1)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(docs.rows.flat, np.memmap) and len(rows) == n // 256
    assert some[1] == [(5000 * 256 + k) % len(tiny.tok) for k in range(256)]
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("name,make,kw,expect", [
    ("odd.bin", lambda p: p.write_bytes(b"\x01\x00\x02"), dict(seq_len=4),
     "3 bytes is not a whole number of 2-byte uint16 tokens"),
    ("odd32.bin", lambda p: p.write_bytes(bytes(6)), dict(seq_len=4, token_dtype="uint32"),
     "not a whole number of 4-byte uint32"),
    ("ok.bin", lambda p: p.write_bytes(bytes(8)), dict(), "needs --seq-len"),
    ("ok.bin", lambda p: p.write_bytes(bytes(8)), dict(seq_len=0), "--seq-len must be >= 1"),
    ("ok.bin", lambda p: p.write_bytes(bytes(8)), dict(seq_len=2, token_dtype="int8"), "unknown --token-dtype"),
    ("empty.bin", lambda p: p.write_bytes(b""), dict(seq_len=2), "no documents"),
    ("s.jsonl", lambda p: p.write_text('{"input_ids": [1, 2]}\n{"input_ids": [3, "4"]}\n'), {},
     "line 2: 'input_ids' is not a list of integers"),
    ("s.jsonl", lambda p: p.write_text('{"input_ids": [1, 2]}\n{"input_ids": "3 4"}\n'), {},
     "line 2: 'input_ids' is not a list of integers"),
    ("s.jsonl", lambda p: p.write_text('{"input_ids": [1, true]}\n'), {}, "line 1: 'input_ids' is not a list"),
    ("s.jsonl", lambda p: p.write_text('{"input_ids": [1]}\n{"id": "x"}\n'), {}, "line 2 has no 'input_ids'"),
    ("s.jsonl", lambda p: p.write_text('{"input_ids": [%d]}\n' % 2**70), {}, "line 1: 'input_ids' holds an id too"),
    ("s.parquet", lambda p: pd.DataFrame({"input_ids": [[1], None, [2]]}).to_parquet(p), {},
     "row 1: column 'input_ids' is null"),
    ("s.parquet", lambda p: pd.DataFrame({"input_ids": [None, [1.5]]}).to_parquet(p), {},
     "row 1: column 'input_ids' is not a list of integers (it holds list<element: double>)"),
    ("s.parquet", lambda p: pd.DataFrame({"input_ids": ["1 2", "3"]}).to_parquet(p), {},
     "row 0: column 'input_ids' is not a list of integers"),
    ("s.parquet", lambda p: pd.DataFrame({"text": ["a"]}).to_parquet(p), dict(text_field="input_ids"),
     "no column 'input_ids'"),
    ("flat.npy", lambda p: np.save(p, np.arange(5)), {}, "must be a 2-D array"),
    ("float.npy", lambda p: np.save(p, np.ones((2, 3))), {}, "holds float64 values, not integer token ids"),
    ("obj.npy", lambda p: np.save(p, np.array([[1, "a"]], dtype=object)), {}, "cannot read as .npy"),
    ("empty.npy", lambda p: np.save(p, np.zeros((0, 4), dtype=np.int64)), {}, "no documents"),
    ("d.jsonl", lambda p: p.write_text('{"text": "x"}\n'), dict(seq_len=8), "--seq-len cuts a .bin"),
])
def test_bad_pretokenized_input_is_one_named_line(tmp_path, name, make, kw, expect):
    make(tmp_path / name)
    with pytest.raises(MemauditError, match=re.escape(expect)):
        if name.endswith(".bin") or "seq_len" not in kw:
            load_documents(tmp_path / name, **kw)
        else:  # load_documents ignores --seq-len off a .bin (train passes its own); the commands' validate refuses it
            check_token_options(tmp_path / name, seq_len=kw["seq_len"])


def test_which_files_hold_ids_and_need_seq_len(tmp_path):
    """`pretokenized` and the multi-file check (mia's members and non-members, train's data and validation data)."""
    np.zeros(8, dtype=np.uint16).tofile(tmp_path / "a.bin")
    np.save(tmp_path / "a.npy", np.zeros((2, 2), dtype=np.int64))
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [1]}\n')
    (tmp_path / "t.jsonl").write_text('{"text": "x", "input_ids": [1]}\n')
    pd.DataFrame({"input_ids": [[1]]}).to_parquet(tmp_path / "ids.parquet")
    pd.DataFrame({"text": ["x"]}).to_parquet(tmp_path / "t.parquet")
    files = ("a.bin", "a.npy", "ids.jsonl", "t.jsonl", "ids.parquet", "t.parquet")
    got = {f: pretokenized(tmp_path / f) for f in files}
    assert got == {"a.bin": True, "a.npy": True, "ids.jsonl": True, "t.jsonl": False, "ids.parquet": True,
                   "t.parquet": False}
    assert pretokenized(tmp_path / "t.jsonl", text_field="input_ids")
    check_token_options([tmp_path / "a.bin", tmp_path / "t.jsonl", None], seq_len=4)  # one .bin is enough
    with pytest.raises(MemauditError, match="t.jsonl and .*a.npy are not"):
        check_token_options([tmp_path / "t.jsonl", tmp_path / "a.npy"], seq_len=4)
    with pytest.raises(MemauditError, match="a.bin: a .bin token file needs --seq-len"):
        check_token_options([tmp_path / "t.jsonl", tmp_path / "a.bin"])


@pytest.mark.parametrize("fmt,bad_row,where", [("npy", 2, "row 2"), ("bin", 3, "row 3"), ("jsonl", 1, "line 3"),
                                               ("parquet", 4, "row 4")])
@pytest.mark.parametrize("bad_id", [-1, "V"])
def test_ids_outside_the_vocabulary_name_the_row(tiny, tmp_path, fmt, bad_row, where, bad_id):
    V = len(tiny.tok)
    value = V if bad_id == "V" else bad_id
    rows = [[(7 * r + k) % V for k in range(6)] for r in range(6)]
    rows[bad_row][3] = value
    rows[5][0] = V - 1  # the largest valid id passes
    path = tmp_path / f"d.{fmt}"
    kw = {}
    if fmt == "npy":
        np.save(path, np.array(rows, dtype=np.int64))
    elif fmt == "bin":
        if value < 0:
            pytest.skip("a .bin holds unsigned ids")
        np.array(rows, dtype=np.uint16).tofile(path)
        kw = dict(seq_len=6)
    elif fmt == "jsonl":
        path.write_text("\n" + "".join(json.dumps({"input_ids": r}) + "\n" for r in rows))  # a blank first line
    else:
        pd.DataFrame({"input_ids": rows}).to_parquet(path)
    docs = load_documents(path, **kw)
    with pytest.raises(MemauditError, match=re.escape(f"{where}: token id {value} is outside the model's vocabulary")):
        docs.tokens(tiny.tok)
    rows[bad_row][3] = 0
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
        assert list(load_documents(path).tokens(tiny.tok)) == rows


def _memorization(tiny, data, out, **kw):
    from memaudit.memorization import memorization

    return memorization(model_dir=tiny.model, data=data, reference="zstd", out=out, device="cpu", batch_size=4, **kw)


def _same_result(a, b):
    pd.testing.assert_frame_equal(a.samples, b.samples)
    assert a.summary == b.summary


def test_memorization_on_ids_equals_memorization_on_their_text(tiny, tmp_path):
    """Pre-tokenized input (.npy, .bin, input_ids in jsonl and parquet) gives the samples and summary that the same
    documents as text give: the same ids scored, the same texts (decoded) compressed and shown."""
    ids = [f"d{i}" for i in range(len(tiny.texts))]
    assert all(_roundtrips(tiny.tok, t) for t in tiny.ids)  # byte-level BPE: decoding gives the text back
    as_text = _memorization(tiny, _write_text(tmp_path / "t.jsonl", tiny.texts, ids), tmp_path / "r-text")
    assert as_text.summary["n_truncated_to_context"] > 0 and as_text.summary["n_samples"] == len(ids)
    pd.DataFrame({"id": ids, "input_ids": tiny.ids}).to_parquet(tmp_path / "ids.parquet")
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"id": i, "input_ids": t}) + "\n"
                                                for i, t in zip(ids, tiny.ids)))
    for f in ("ids.parquet", "ids.jsonl"):
        _same_result(_memorization(tiny, tmp_path / f, tmp_path / f"r-{f}"), as_text)

    rows = _fixed_rows(tiny, 40, 10)  # 40 ids + BOS fit the 48 positions: whole rows
    np.save(tmp_path / "rows.npy", np.array(rows, dtype=np.uint16))
    rows_text = _memorization(tiny, _write_text(tmp_path / "rows.jsonl", [decode(tiny.tok, r) for r in rows]),
                              tmp_path / "r-rows-text")
    _same_result(_memorization(tiny, tmp_path / "rows.npy", tmp_path / "r-npy"), rows_text)

    # a .bin of rows of 60 (cut to the context) and a shorter last row
    long_rows = _fixed_rows(tiny, 60, 6)
    tail = next(r[:k] for r in tiny.ids for k in range(23, 10, -1) if _roundtrips(tiny.tok, r[:k]))
    np.array([t for r in long_rows + [tail] for t in r], dtype=np.uint32).tofile(tmp_path / "rows.bin")
    bin_texts = [decode(tiny.tok, r) for r in long_rows + [tail]]
    bin_text = _memorization(tiny, _write_text(tmp_path / "bin.jsonl", bin_texts), tmp_path / "r-bin-text")
    got = _memorization(tiny, tmp_path / "rows.bin", tmp_path / "r-bin", token_dtype="uint32", seq_len=60)
    _same_result(got, bin_text)
    assert got.summary["n_truncated_to_context"] == 6 and got.samples["n_tokens"].iloc[-1] == len(tail)
    config = json.loads((tmp_path / "r-bin" / "config.json").read_text())["settings"]
    assert config["seq_len"] == 60 and config["token_dtype"] == "uint32"


def test_memorization_cli_reads_a_bin(tiny, tmp_path, run_cli):
    """--token-dtype and --seq-len through the command line; --limit keeps the first rows."""
    rows = _fixed_rows(tiny, 30, 5)
    np.array(rows, dtype=np.uint16).tofile(tmp_path / "d.bin")
    r = run_cli("memorization", tiny.model, "--data", tmp_path / "d.bin", "--seq-len", "30", "--reference", "zstd",
                "--device", "cpu", "--limit", "4", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    text = _memorization(tiny, _write_text(tmp_path / "d.jsonl", [decode(tiny.tok, x) for x in rows]),
                         tmp_path / "text", limit=4)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "samples.parquet"), text.samples)
