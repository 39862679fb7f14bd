"""Read documents (txt / jsonl / parquet / csv) and tokenize them, or read pre-tokenized corpora (.npy, .bin,
`input_ids` in jsonl / parquet); cutting them into samples is samples.py."""
from __future__ import annotations

import collections.abc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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


# ---- pre-tokenized corpora, and one view of documents for every command -----------------------------------------

IDS_FIELD = "input_ids"  # the jsonl field / parquet column of pre-tokenized documents
TOKEN_FILES = (".npy", ".bin")
TOKEN_DTYPES = ("uint16", "uint32")  # a .bin's token width (nanoGPT writes uint16; Megatron-style shards either)
_CHUNK = 1 << 22  # ids checked per step: a memory-mapped file is read in bounded pieces, never all at once


def check_token_options(paths: str | os.PathLike | Sequence[str | os.PathLike | None], token_dtype: str = "uint16",
                        seq_len: int | None = None) -> None:
    """--token-dtype and --seq-len against the data file(s) (None entries skipped), before anything is loaded: a .bin
    needs --seq-len and a size that is a whole number of tokens, and --seq-len needs a .bin. One error line each."""
    checks.choice("--token-dtype", token_dtype, TOKEN_DTYPES)
    checks.integer("--seq-len", seq_len, low=1)
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths) if p is not None]
    bins = [p for p in paths if p.suffix == ".bin"]
    if seq_len is not None and not bins:
        raise MemauditError(f"--seq-len cuts a .bin token file into rows; {' and '.join(map(str, paths))} "
                            f"{'is not one' if len(paths) == 1 else 'are not'} (leave it out)")
    for path in bins:
        if seq_len is None:
            raise MemauditError(f"{path}: a .bin token file needs --seq-len (the tokens per row to cut it into)")
        if path.is_file() and (size := path.stat().st_size) % (width := np.dtype(token_dtype).itemsize):
            raise MemauditError(f"{path}: {size} bytes is not a whole number of {width}-byte {token_dtype} tokens "
                                "(is --token-dtype right?)")


def pretokenized(path: str | os.PathLike, text_field: str = "text") -> bool:
    """Whether `load_documents` reads this file as token ids (cheap: a .npy/.bin, or a jsonl/parquet file of ids)."""
    path = Path(path)
    return path.suffix in TOKEN_FILES or (path.is_file() and _holds_ids(path, text_field))


class TokenRows(collections.abc.Sequence):
    """Stored token ids, one row per document, read only when asked for: `rows[i]` is row i as a list of ints.

    `flat` holds the rows back to back (a memory map for .npy and .bin files, so nothing is read up front); rows are
    either `width` ids each (a .bin's last row holds the remainder, and may be shorter) or delimited by `offsets`.
    """

    def __init__(self, flat: np.ndarray, *, width: int | None = None, offsets: np.ndarray | None = None,
                 n_rows: int | None = None):
        self.flat, self.width, self.offsets = flat, width, offsets
        self._n = len(offsets) - 1 if offsets is not None else (n_rows if n_rows is not None
                                                                 else -(-len(flat) // width))

    def __len__(self) -> int:
        return self._n

    def span(self, i: int) -> tuple[int, int]:
        """Where row i lies in `flat`."""
        if self.offsets is not None:
            return int(self.offsets[i]), int(self.offsets[i + 1])
        return i * self.width, min((i + 1) * self.width, len(self.flat))

    def row(self, i: int) -> np.ndarray:
        """Row i as a view of `flat` (no copy)."""
        a, b = self.span(i)
        return self.flat[a:b]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        return self.row(range(self._n)[i]).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self._n):
            yield self.row(i).tolist()

    def first_outside(self, vocab_size: int) -> tuple[int, int] | None:
        """(row, id) of the first id outside [0, vocab_size), or None; reads `flat` in chunks."""
        end = self.span(self._n - 1)[1] if self._n else 0
        for a in range(0, end, _CHUNK):
            chunk = np.asarray(self.flat[a:min(end, a + _CHUNK)])
            if chunk.size and (chunk.max() >= vocab_size or chunk.min() < 0):
                k = a + int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
                row = int(np.searchsorted(self.offsets, k, side="right")) - 1 if self.offsets is not None \
                    else k // self.width
                return row, int(self.flat[k])
        return None


class _RowNumbers(collections.abc.Sequence):
    """Ids "0", "1", ... made when asked for (a .bin may hold millions of rows)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        got = range(self.n)[i]
        return [str(j) for j in got] if isinstance(got, range) else str(got)


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The text of token ids as outputs show it (no clean-up of spaces: the text is exactly what the ids say). An
    id beyond the tokenizer's vocabulary (a model whose embedding is larger than its tokenizer, as Pythia's)
    shows as `⟨id N⟩` (`out_of_vocab_text`) instead of vanishing."""
    return _decode_marked(tokenizer, [int(i) for i in ids], clean_up_tokenization_spaces=False)


def decode_rows(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    """Each row's text as `tokenizer.batch_decode` gives it (its own clean-up of spaces), ids beyond the
    tokenizer's vocabulary shown as `⟨id N⟩` as in `decode`."""
    rows = [[int(i) for i in r] for r in rows]
    n = _vocab(tokenizer)
    if n is None or all(0 <= i < n for r in rows for i in r):
        return tokenizer.batch_decode(rows)
    return [_decode_marked(tokenizer, r) for r in rows]


def count_out_of_vocab(tokenizer, rows: np.ndarray) -> np.ndarray:
    """Per row of ids [n, k], how many lie beyond the tokenizer's vocabulary (the `⟨id N⟩` of `decode`)."""
    n = _vocab(tokenizer)
    rows = np.asarray(rows)
    return np.zeros(len(rows), dtype=np.int64) if n is None else ((rows < 0) | (rows >= n)).sum(-1)


def _vocab(tokenizer) -> int | None:
    """The tokenizer's vocabulary size, added tokens included (None for an object that does not say it)."""
    return len(tokenizer) if hasattr(tokenizer, "__len__") else None


def out_of_vocab_text(token_id: int) -> str:
    """How a text shows an id the tokenizer cannot decode."""
    return f"\u27e8id {int(token_id)}\u27e9"


def _decode_marked(tokenizer, ids: list[int], **kwargs) -> str:
    """The text of `ids`, decoded in runs between the ids beyond the vocabulary, which show as placeholders."""
    n = _vocab(tokenizer)
    if n is None or all(0 <= i < n for i in ids):
        return tokenizer.decode(ids, **kwargs)
    parts, run = [], []
    for i in [*ids, None]:  # None flushes the last run
        if i is not None and 0 <= i < n:
            run.append(i)
            continue
        if run:
            parts.append(tokenizer.decode(run, **kwargs))
            run = []
        if i is not None:
            parts.append(out_of_vocab_text(i))
    return "".join(parts)


@dataclass
class Documents:
    """Documents read from one file, as every command takes its data: `ids[i]` names document i.

    Text formats hold `texts`, tokenized by `tokens` exactly as `read_documents` and `tokenize` do. Pre-tokenized
    formats hold `rows`: `tokens` returns them as stored (lazily) once every id is checked against the tokenizer's
    vocabulary, and `text` decodes them.
    """
    path: Path
    ids: Sequence[str]
    texts: list[str] | None = None
    rows: TokenRows | None = None
    lines: list[int] | None = None  # a jsonl document's line number, for errors that name it

    @property
    def pretokenized(self) -> bool:
        return self.rows is not None

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, tokenizer) -> Sequence[list[int]]:
        """Each document's token ids for `tokenizer`: its text tokenized, or its stored ids (ids outside the
        tokenizer's vocabulary are an error naming the row)."""
        if self.rows is None:
            return tokenize(tokenizer, self.texts)
        vocab = len(tokenizer)
        if (bad := self.rows.first_outside(vocab)) is not None:
            raise MemauditError(f"{self.path}: {self.where(bad[0])}: token id {bad[1]} is outside the model's "
                                f"vocabulary (ids 0-{vocab - 1}): were these ids made with this model's tokenizer?")
        return self.rows

    def text(self, i: int, tokenizer) -> str:
        """Document i's text: as read, or decoded from its stored ids."""
        return self.texts[i] if self.rows is None else decode(tokenizer, self.rows.row(i))

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i}"


def load_documents(path: str | os.PathLike, *, text_field: str = "text", id_field: str = "id",
                   limit: int | None = None, token_dtype: str = "uint16", seq_len: int | None = None) -> Documents:
    """The documents of any supported file. Text (.jsonl, .txt, .parquet, .csv) is read by `read_documents`, exactly
    as ever. Pre-tokenized, nothing is tokenized: .npy, a 2-D integer array with a document per row; .bin, flat
    little-endian `token_dtype` ids, memory-mapped and cut into rows of `seq_len`; .jsonl / .parquet with an
    `input_ids` list of integers per document (when the file has no `text_field`, or `text_field` is "input_ids").
    Ids default to the row number; `limit` keeps the first documents."""
    path = Path(path)
    checks.readable_file(path)
    checks.limit(limit)
    if path.suffix not in SUPPORTED + TOKEN_FILES:
        raise MemauditError(f"{path}: unsupported data format {path.suffix!r} (use "
                            f"{', '.join(SUPPORTED + TOKEN_FILES)})")
    if path.suffix == ".npy":
        return _npy_documents(path, limit)
    if path.suffix == ".bin":
        check_token_options(path, token_dtype, seq_len)
        return _bin_documents(path, token_dtype, seq_len, limit)
    if _holds_ids(path, text_field):
        return (_jsonl_ids if path.suffix == ".jsonl" else _parquet_ids)(path, id_field, limit)
    df = read_documents(path, text_field=text_field, id_field=id_field, limit=limit)
    return Documents(path, df["id"].tolist(), texts=df["text"].tolist())


def _holds_ids(path: Path, text_field: str) -> bool:
    """A jsonl or parquet file of token ids: `text_field` is input_ids, or the file has input_ids and no text."""
    if path.suffix not in (".jsonl", ".parquet"):
        return False
    if text_field == IDS_FIELD:
        return True
    if path.suffix == ".parquet":
        try:
            names = pq.read_schema(path).names
        except Exception:  # read_documents names what is wrong with the file
            return False
        return IDS_FIELD in names and text_field not in names
    first = next(iter_jsonl(path), None)
    return first is not None and isinstance(first[1], dict) and IDS_FIELD in first[1] and text_field not in first[1]


def _npy_documents(path: Path, limit: int | None) -> Documents:
    try:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # an empty array cannot be mapped; anything else fails again below, and is named
            arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise MemauditError(f"{path}: cannot read as .npy: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise MemauditError(f"{path}: a .npy corpus must be a 2-D array, one token sequence per row, not shape "
                            f"{getattr(arr, 'shape', '?')}")
    if arr.dtype.kind not in "iu":
        raise MemauditError(f"{path}: holds {arr.dtype} values, not integer token ids")
    if arr.size == 0:
        raise MemauditError(f"{path}: no documents in the file")
    n = arr.shape[0] if limit is None else min(limit, arr.shape[0])
    flat = arr.reshape(-1) if arr.flags.c_contiguous else np.ascontiguousarray(arr[:n]).reshape(-1)
    return Documents(path, _RowNumbers(n), rows=TokenRows(flat, width=arr.shape[1], n_rows=n))


def _bin_documents(path: Path, token_dtype: str, seq_len: int, limit: int | None) -> Documents:
    if path.stat().st_size == 0:
        raise MemauditError(f"{path}: no documents in the file")
    flat = np.memmap(path, dtype=np.dtype(token_dtype).newbyteorder("<"), mode="r")
    n = -(-len(flat) // seq_len)
    n = n if limit is None else min(n, limit)
    return Documents(path, _RowNumbers(n), rows=TokenRows(flat, width=seq_len, n_rows=n))


def _id_array(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list) or not all(type(v) is int for v in value):  # type(): True is not a token id
        raise MemauditError(f"{where}: {IDS_FIELD!r} is not a list of integers")
    try:
        return np.array(value, dtype=np.int64)
    except OverflowError:
        raise MemauditError(f"{where}: {IDS_FIELD!r} holds an id too large for any vocabulary") from None


def _jsonl_ids(path: Path, id_field: str, limit: int | None) -> Documents:
    arrays, ids, lines = [], [], []
    for lineno, obj in iter_jsonl(path):
        if limit is not None and len(arrays) == limit:
            break
        if not isinstance(obj, dict) or IDS_FIELD not in obj:
            raise MemauditError(f"{path}: line {lineno} has no {IDS_FIELD!r} field")
        arrays.append(_id_array(obj[IDS_FIELD], f"{path}: line {lineno}"))
        if id_field in obj and obj[id_field] is None:
            raise MemauditError(f"{path}: line {lineno}: field {id_field!r} is null")
        ids.append(str(obj[id_field]) if id_field in obj else None)
        lines.append(lineno)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return _ragged_documents(path, flat, offsets, ids, id_field, lines)


def _parquet_ids(path: Path, id_field: str, limit: int | None) -> Documents:
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in dict.fromkeys((IDS_FIELD, id_field)) if c in names])
    except Exception as exc:
        raise MemauditError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0][:200]}") from None
    if IDS_FIELD not in names:
        raise MemauditError(f"{path}: no column {IDS_FIELD!r} (columns: {', '.join(map(str, names))})")
    table = table.slice(0, limit) if limit is not None else table
    flat, offsets = _id_lists(path, table.column(IDS_FIELD).combine_chunks())
    ids = [None] * table.num_rows
    if id_field in names:
        col = table.column(id_field).to_pandas()
        if (nulls := col.isna()).any():
            raise MemauditError(f"{path}: row {int(nulls.to_numpy().argmax())}: column {id_field!r} is null")
        ids = col.astype(str).tolist()
    return _ragged_documents(path, flat, offsets, ids, id_field)


def _id_lists(path: Path, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A parquet list-of-integers column as (every id back to back, row offsets); anything else names its row."""
    kind = arr.type
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if not listed or not pa.types.is_integer(kind.value_type):
        row = int(valid.argmax()) if valid.any() else 0
        raise MemauditError(f"{path}: row {row}: column {IDS_FIELD!r} is not a list of integers (it holds {kind})")
    if not valid.all():
        raise MemauditError(f"{path}: row {int((~valid).argmax())}: column {IDS_FIELD!r} is null, not a list of "
                            "integers")
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(pc.list_value_length(arr).to_numpy(zero_copy_only=False), out=offsets[1:])
    values = arr.flatten()
    if values.null_count:
        k = int((~values.is_valid().to_numpy(zero_copy_only=False)).argmax())
        row = int(np.searchsorted(offsets, k, side="right")) - 1
        raise MemauditError(f"{path}: row {row}: column {IDS_FIELD!r} holds a null, not an integer")
    return values.to_numpy(zero_copy_only=False), offsets


def _ragged_documents(path: Path, flat: np.ndarray, offsets: np.ndarray, ids: list[str | None], id_field: str,
                      lines: list[int] | None = None) -> Documents:
    if len(offsets) < 2 or offsets[-1] == 0:
        raise MemauditError(f"{path}: no documents in the file")
    if id_field != "id" and all(i is None for i in ids):
        raise MemauditError(f"{path}: no {id_field!r} field (--id-field); leave it out to number the documents")
    ids = [i if i is not None else str(n) for n, i in enumerate(ids)]
    return Documents(path, ids, rows=TokenRows(flat, offsets=offsets), lines=lines)
