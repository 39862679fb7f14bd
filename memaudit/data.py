"""Read documents (txt / jsonl / parquet / csv) and tokenize them; cutting them into samples is samples.py."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from . import checks
from .errors import MemauditError

SUPPORTED = (".jsonl", ".txt", ".parquet", ".csv")


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-blank line of a JSON-lines file; bad UTF-8 or JSON is one clear error."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MemauditError(f"{path}: line {lineno} is not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MemauditError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise MemauditError(f"{path}: line {lineno} is nested too deeply to read") from None
            yield lineno, obj


def _read_jsonl(path: Path, text_field: str, id_field: str) -> pd.DataFrame:
    ids, texts = [], []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or text_field not in obj:
            raise MemauditError(f"{path}: line {lineno} has no {text_field!r} field (use --text-field)")
        if not isinstance(obj[text_field], str):
            raise MemauditError(f"{path}: line {lineno}: field {text_field!r} is not a string")
        texts.append(obj[text_field])
        if id_field in obj and obj[id_field] is None:
            raise MemauditError(f"{path}: line {lineno}: field {id_field!r} is null")
        ids.append(str(obj[id_field]) if id_field in obj else None)
    return pd.DataFrame({"id": ids, "text": texts})


def _read_txt(path: Path) -> pd.DataFrame:
    data = path.read_bytes()
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data[: exc.start].count(b"\n") + 1
        raise MemauditError(f"{path}: line {lineno} is not valid UTF-8") from None
    texts = [line for line in content.splitlines() if line.strip()]
    return pd.DataFrame({"id": [None] * len(texts), "text": texts})


def _read_table(path: Path, text_field: str, id_field: str) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:  # every csv cell is text: read the text and id columns as written, not as inferred numbers
            df = pd.read_csv(path, encoding="utf-8", keep_default_na=False, dtype={text_field: str, id_field: str})
    except UnicodeDecodeError:
        raise MemauditError(f"{path}: not valid UTF-8") from None
    except Exception as exc:
        raise MemauditError(f"{path}: cannot read as {path.suffix[1:]}: {str(exc).splitlines()[0][:200]}") from None
    if text_field not in df.columns:
        raise MemauditError(f"{path}: no column {text_field!r} (columns: {', '.join(map(str, df.columns))}; use --text-field)")
    texts = df[text_field].tolist()
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        what = "empty (null)" if texts[bad] is None or (isinstance(texts[bad], float) and texts[bad] != texts[bad]) \
            else f"a {type(texts[bad]).__name__}, not text"
        raise MemauditError(f"{path}: row {bad}: column {text_field!r} is {what}")
    ids = [None] * len(df)
    if id_field in df.columns:
        if (nulls := df[id_field].isna()).any():
            raise MemauditError(f"{path}: row {int(nulls.to_numpy().argmax())}: column {id_field!r} is null")
        ids = df[id_field].astype(str).tolist()
    return pd.DataFrame({"id": ids, "text": texts})


def read_documents(path: str | os.PathLike, *, text_field: str = "text", id_field: str = "id",
                   limit: int | None = None) -> pd.DataFrame:
    """A DataFrame with columns `id` (str) and `text`; ids default to the row number."""
    path = Path(path)
    checks.readable_file(path)
    checks.limit(limit)
    if path.suffix not in SUPPORTED:
        raise MemauditError(f"{path}: unsupported data format {path.suffix!r} (use {', '.join(SUPPORTED)})")
    if path.suffix == ".jsonl":
        df = _read_jsonl(path, text_field, id_field)
    elif path.suffix == ".txt":
        df = _read_txt(path)
    else:
        df = _read_table(path, text_field, id_field)
    if len(df) == 0 or not df["text"].str.strip().any():
        raise MemauditError(f"{path}: no documents in the file")
    if id_field != "id" and path.suffix != ".txt" and df["id"].isna().all():
        raise MemauditError(f"{path}: no {id_field!r} field (--id-field); leave it out to number the documents")
    df["id"] = [i if i is not None else str(n) for n, i in enumerate(df["id"])]
    if limit is not None:
        df = df.iloc[:limit]
    return df.reset_index(drop=True)


def write_documents(path: str | os.PathLike, texts: Sequence[str], ids: Sequence[str] | None = None) -> Path:
    """Write documents as .jsonl (the format every command reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = ids if ids is not None else [str(i) for i in range(len(texts))]
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in zip(ids, texts):
            fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    return path


def tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (windows are cut from raw text tokens).

    A fast tokenizer's Rust backend is called directly (`encode_batch_fast`: no offsets, no attention masks, no
    conversion of every encoding to Python dicts), which roughly halves tokenizing time on long documents. The
    first non-blank text is also encoded the standard way, and any difference (a wrapper that changes the text before the
    backend sees it) falls back to the standard call for all texts.
    """
    texts = list(texts)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast") and texts:
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        probe = next((i for i, t in enumerate(texts) if t.strip()), 0)  # an empty text would prove nothing
        if ids[probe] == list(tokenizer(texts[probe], add_special_tokens=False)["input_ids"]):
            return ids
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in enc]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained locally on `texts`, as a transformers fast tokenizer.

    `<|endoftext|>` is BOS, EOS and padding, as in GPT-2, so code lengths can condition the first token on BOS.
    """
    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                   pad_token=special, unk_token=special)
