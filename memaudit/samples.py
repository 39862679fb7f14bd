"""Cutting tokenized documents into samples: the one home of that idea.

`cut` is the core: for each document it takes windows of `length` tokens starting at `offset` (one window, or one
every `stride` tokens), either skipping documents too short for a full window or, with `truncate`, keeping shorter
ones down to `min_length` tokens, and optionally dropping windows identical to an earlier one. Every sample carries
the id of its document and the token offset it starts at; the counts say what was skipped, truncated and dropped.
The named helpers below are the cuts each probe uses.

Sampling strategies (`Sampling`): which fixed-length windows of each document a command reads, as one small
object every command can take (`extract` does; `mia` and `memorization` can adopt it unchanged):

    Sampling()                          the first window, at `offset` (default 0): today's one sample per document
    Sampling(stride=N, offset=k)        every window starting at k, k + N, k + 2N, ... while a whole window fits
    Sampling(windows_per_doc=N, seed=s) N distinct starts drawn uniformly among all starts where a whole window
                                        fits (all of them when fewer fit), from a generator seeded with (s, the
                                        document's position): Carlini et al. 2023, "Quantifying Memorization"
    Sampling(tail=True)                 the last window of each document (extract: the last prefix + suffix tokens,
                                        the goldfish paper's evaluation)

    sampling.validate()                 one MemauditError line for a bad value or combination (stride >= 1;
                                        stride, windows_per_doc and tail exclude each other; offset goes with the
                                        first window and stride only)
    sampling.starts(n_tokens, length, doc)   the window starts in one document (a range or a sorted array)
    sampling.windows(token_lists, ids, length)   a WindowStream: iterating it yields Window(doc, doc_id, offset,
                                        tokens) lazily, document by document (token lists may be any sequence:
                                        lists, numpy arrays, memory maps); it counts documents and skipped ones
    stream.count()                      how many windows it yields, from the documents' lengths alone
    DistinctWindows(stream, prefix, suffix, chunk=N)   the stream's windows in chunks (`Windows`, at most N rows,
                                        numbered on across chunks), each distinct window once: a window identical
                                        to an earlier one is listed in `repeats` (doc, offset, index of the first)
                                        instead, so a caller measures it once and credits it to every place it
                                        occurs

A document shorter than one window gives none and is counted as skipped. `cut(stride=...)` stays the cut of
callers that want every window at once (mia).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from . import checks
from .errors import MemauditError


@dataclass
class Samples:
    """Samples cut from documents: `tokens[i]` starts at token `offsets[i]` of document `doc_ids[i]`."""
    tokens: list[list[int]] = field(default_factory=list)
    doc_ids: list[Any] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    n_documents: int = 0
    n_skipped: int = 0  # documents that gave no sample (too short)
    n_truncated: int = 0  # documents whose tokens run past their last sample (counted with truncate=True only)
    n_duplicates: int = 0  # samples dropped because an identical sample came earlier (dedup=True only)

    def __len__(self) -> int:
        return len(self.tokens)

    def array(self, width: int) -> np.ndarray:
        """The samples as int64 [n, width] (all must have `width` tokens); [0, width] when there are none."""
        if not self.tokens:
            return np.zeros((0, width), dtype=np.int64)
        return np.asarray(self.tokens, dtype=np.int64).reshape(len(self.tokens), width)


def cut(token_lists: Sequence[Sequence[int]], ids: Sequence[Any] | None = None, *, length: int, offset: int = 0,
        stride: int | None = None, truncate: bool = False, min_length: int = 1, dedup: bool = False) -> Samples:
    """Cut each document into windows of `length` tokens.

    Windows start at `offset`, then (with `stride`) every `stride` tokens after it; `stride=None` is one window per
    document. Without `truncate` a window must hold `length` tokens (shorter ones are not taken). With `truncate` a
    window may be shorter, down to `min_length` tokens, and a document whose tokens run past its last window is
    counted as truncated. A document giving no window is counted as skipped. With `dedup` a window identical to an
    earlier one (of any document) is dropped and counted. `ids` default to the documents' positions.
    """
    if length < 1 or offset < 0 or min_length < 1 or (stride is not None and stride < 1):
        raise MemauditError(f"cannot cut samples of length {length} at offset {offset} with stride {stride} and "
                            f"minimum length {min_length}: the length, stride and minimum must be >= 1, the offset >= 0")
    if ids is None:
        ids = range(len(token_lists))
    need = min(min_length, length) if truncate else length
    out = Samples()
    seen: set[tuple] = set()
    for doc_id, toks in zip(ids, token_lists):
        out.n_documents += 1
        n = len(toks)
        starts = [offset] if stride is None else range(offset, max(offset, n - need + 1), stride)
        end = 0  # where this document's last window ends
        for s in starts:
            if n - s < need:
                continue
            window = list(toks[s:s + length])
            end = s + len(window)
            if dedup:
                key = tuple(window)
                if key in seen:
                    out.n_duplicates += 1
                    continue
                seen.add(key)
            out.tokens.append(window)
            out.doc_ids.append(doc_id)
            out.offsets.append(s)
        if end == 0:
            out.n_skipped += 1
        elif truncate and n > end:
            out.n_truncated += 1
    return out


# ---- sampling strategies: which windows of each document are read (see the module docstring) -------------------

STRATEGIES = ("first", "stride", "random", "tail")


@dataclass(frozen=True)
class Sampling:
    """Which fixed-length windows of each document a command reads: the first (default), every `stride` tokens,
    `windows_per_doc` at seeded random starts, or the `tail`. The fields carry the command-line options' names."""
    offset: int = 0  # where the first window starts (first window and stride only)
    stride: int | None = None  # every window, starting each `stride` tokens
    windows_per_doc: int | None = None  # N windows at random starts
    tail: bool = False  # the last window of each document
    seed: int = 0  # windows_per_doc only

    def validate(self) -> None:
        """One MemauditError line for the first bad value or combination."""
        checks.integer("--offset", self.offset, low=0)
        checks.integer("--stride", self.stride)
        checks.integer("--windows-per-doc", self.windows_per_doc)
        checks.seed(self.seed)
        chosen = [name for name, on in (("--stride", self.stride is not None),
                                        ("--windows-per-doc", self.windows_per_doc is not None),
                                        ("--tail", bool(self.tail))) if on]
        if len(chosen) > 1:
            raise MemauditError(f"{' and '.join(chosen)} exclude each other: choose one way to take windows")
        if self.offset and self.strategy in ("random", "tail"):
            raise MemauditError(f"--offset moves the first window and --stride's windows; it does not go with "
                                f"{chosen[0]}")

    @property
    def strategy(self) -> str:
        """first, stride, random or tail."""
        if self.stride is not None:
            return "stride"
        if self.windows_per_doc is not None:
            return "random"
        return "tail" if self.tail else "first"

    @property
    def whole_document(self) -> bool:
        """Whether windows are read across whole documents (every strategy but the first window)."""
        return self.strategy != "first"

    def starts(self, n_tokens: int, length: int, doc: int = 0) -> Sequence[int]:
        """The starts of the windows of `length` tokens in a document of `n_tokens` (at position `doc`), in order."""
        last = n_tokens - length  # the last start where a whole window fits
        kind = self.strategy
        if kind == "first":
            return range(self.offset, self.offset + 1) if self.offset <= last else range(0)
        if kind == "stride":
            return range(self.offset, max(self.offset, last + 1), self.stride)
        if kind == "tail":
            return range(last, last + 1) if last >= 0 else range(0)
        if last < 0:
            return range(0)
        if self.windows_per_doc > last:  # at least as many windows asked for as there are starts: all of them
            return range(last + 1)
        rng = np.random.default_rng([self.seed, doc])  # per document: independent of the other documents
        return np.sort(rng.choice(last + 1, size=self.windows_per_doc, replace=False)).tolist()

    def windows(self, token_lists: Sequence[Sequence[int]], ids: Sequence[Any] | None, length: int) -> WindowStream:
        """The windows of `length` tokens of each document, produced lazily (see WindowStream)."""
        return WindowStream(self, token_lists, ids, length)


class Window(NamedTuple):
    doc: int  # the document's position in the input
    doc_id: Any
    offset: int  # the token where the window starts
    tokens: Sequence[int]


class WindowStream:
    """The windows of a sampling strategy, produced lazily: iterating yields Window(doc, doc_id, offset, tokens),
    document by document, tokens sliced from the document when the window is reached. `n_documents` and
    `n_skipped` (documents giving no window) count what iteration has passed so far."""

    def __init__(self, sampling: Sampling, token_lists: Sequence[Sequence[int]], ids: Sequence[Any] | None,
                 length: int):
        if length < 1:
            raise MemauditError(f"cannot take windows of {length} tokens")
        self.sampling, self.token_lists, self.length = sampling, token_lists, length
        self.ids = ids if ids is not None else range(len(token_lists))
        self.n_documents = self.n_skipped = 0

    def __iter__(self) -> Iterator[Window]:
        self.n_documents = self.n_skipped = 0
        for doc, (doc_id, toks) in enumerate(zip(self.ids, self.token_lists)):
            self.n_documents += 1
            starts = self.sampling.starts(len(toks), self.length, doc)
            if not len(starts):
                self.n_skipped += 1
            for s in starts:
                yield Window(doc, doc_id, int(s), toks[s:s + self.length])

    def count(self) -> int:
        """How many windows iterating yields (from the documents' lengths; no window is cut)."""
        return sum(len(self.sampling.starts(len(t), self.length, d)) for d, t in enumerate(self.token_lists))


class DistinctWindows:
    """A stream's windows cut into prefix + suffix, in chunks of at most `chunk` distinct windows, each distinct
    window once (first occurrence kept).

    Iterating yields `Windows` whose rows are numbered on across chunks (`base` is the first row's number): a
    window's number is its place among the distinct windows, as make_windows numbers them. A window identical to an
    earlier one (of any document) is not yielded again: `repeats` lists it as (doc, offset, number of the first),
    so its result can be copied and credited where it occurs. Identity is a 128-bit BLAKE2 digest of the tokens
    (kept per distinct window instead of the tokens themselves). With `window_ids` a row's id is
    "<document id>@<offset>" (several windows per document), else the document id.
    """

    def __init__(self, stream: WindowStream, prefix: int, suffix: int, *, chunk: int = 8192,
                 window_ids: bool = False):
        if prefix < 1 or suffix < 1 or prefix + suffix != stream.length:
            raise MemauditError(f"windows of {stream.length} tokens cannot be cut into prefix {prefix} + suffix "
                                f"{suffix}")
        self.stream, self.prefix, self.suffix, self.chunk, self.window_ids = stream, prefix, suffix, chunk, window_ids
        self.repeats: list[tuple[int, int, int]] = []
        self.n_distinct = 0

    @property
    def n_skipped(self) -> int:
        return self.stream.n_skipped

    def __iter__(self) -> Iterator[Windows]:
        self.repeats, self.n_distinct = [], 0
        seen: dict[bytes, int] = {}
        rows: list[np.ndarray] = []
        meta: list[tuple[int, Any, int]] = []
        for w in self.stream:
            tokens = np.asarray(w.tokens, dtype=np.int64)
            key = hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()
            first = seen.setdefault(key, self.n_distinct)
            if first != self.n_distinct:
                self.repeats.append((w.doc, w.offset, first))
                continue
            self.n_distinct += 1
            rows.append(tokens)
            meta.append((w.doc, w.doc_id, w.offset))
            if len(rows) == self.chunk:
                yield self._windows(rows, meta)
                rows, meta = [], []
        if rows:
            yield self._windows(rows, meta)

    def _windows(self, rows: list[np.ndarray], meta: list[tuple[int, Any, int]]) -> Windows:
        docs, doc_ids, offsets = (list(x) for x in zip(*meta))
        ids = [f"{d}@{o}" for d, o in zip(doc_ids, offsets)] if self.window_ids else list(doc_ids)
        return Windows(ids, np.stack(rows), self.prefix, self.suffix, 0, 0, docs=docs, offsets=offsets,
                       base=self.n_distinct - len(rows))


# ---- the cuts each probe uses -----------------------------------------------------------------------------------

@dataclass
class Windows:
    """Fixed-length token windows cut from documents: `tokens[i]` is prefix + suffix of sample `ids[i]`."""
    ids: list[str]
    tokens: np.ndarray  # int64 [n, prefix + suffix]
    prefix: int
    suffix: int
    n_skipped: int  # documents too short for the window
    n_duplicates: int  # windows dropped because an identical window came earlier
    docs: list[int] | None = None  # each window's document position (DistinctWindows fills these three)
    offsets: list[int] | None = None  # the token where each window starts in its document
    base: int = 0  # the number of the first window, when a run's windows come in chunks


def make_windows(token_lists: Sequence[Sequence[int]], ids: Sequence[str], prefix: int, suffix: int,
                 offset: int = 0) -> Windows:
    """Extraction: one window per document at `offset`; too-short documents are skipped, identical windows kept once."""
    if prefix < 1 or suffix < 1 or offset < 0:
        raise MemauditError("--prefix and --suffix must be >= 1 and --offset >= 0")
    s = cut(token_lists, ids, length=prefix + suffix, offset=offset, dedup=True)
    return Windows(s.doc_ids, s.array(prefix + suffix), prefix, suffix, s.n_skipped, s.n_duplicates)


def document_samples(token_lists: Sequence[Sequence[int]], ids: Sequence[Any] | None = None, *, max_tokens: int,
                     min_tokens: int = 1, window: int | None = None, dedup: bool = False) -> Samples:
    """Membership and memorization: one sample per document, its first `window` tokens (shorter documents are
    skipped) or, without `window`, the whole document cut to `max_tokens` (counted) when it has >= `min_tokens`."""
    if window is not None:
        return cut(token_lists, ids, length=window, dedup=dedup)
    return cut(token_lists, ids, length=max_tokens, truncate=True, min_length=min_tokens, dedup=dedup)


def sampled_windows(sampling: Sampling, token_lists: Sequence[Sequence[int]], length: int,
                    ids: Sequence[Any] | None = None, *, dedup: bool = False) -> Samples:
    """Membership over whole documents: the windows of `length` tokens a sampling strategy takes from each document
    (every `stride` tokens, or `windows_per_doc` seeded random starts), all at once as Samples; with `dedup` a
    window identical to an earlier one is dropped and counted. For a stride this is `cut(stride=...)`."""
    out = Samples()
    seen: set[tuple] = set()
    stream = sampling.windows(token_lists, ids, length)
    for w in stream:
        window = list(w.tokens)
        if dedup:
            if (key := tuple(window)) in seen:
                out.n_duplicates += 1
                continue
            seen.add(key)
        out.tokens.append(window)
        out.doc_ids.append(w.doc_id)
        out.offsets.append(w.offset)
    out.n_documents, out.n_skipped = stream.n_documents, stream.n_skipped
    return out


def tiles(token_lists: Sequence[Sequence[int]], window: int) -> Samples:
    """Capacity on text: every non-overlapping `window`-token chunk of every document, duplicates dropped (first
    kept)."""
    return cut(token_lists, length=window, stride=window, dedup=True)


def training_rows(token_lists: Sequence[Sequence[int]], bos: int, seq_len: int) -> list[list[int]]:
    """Training: one row per non-empty document, `bos` and then its first `seq_len - 1` tokens."""
    s = cut(token_lists, length=seq_len - 1, truncate=True, min_length=1)
    return [[bos] + t for t in s.tokens]


def packed_rows(token_lists: Sequence[Sequence[int]], bos: int, eos: int, seq_len: int,
                ids: Sequence[Any] | None = None, shift: int = 0) -> Samples:
    """Training, packed: the non-empty documents, each followed by `eos`, joined in order into one stream that is
    cut into rows of `bos` + the next `seq_len - 1` stream tokens; the last row holds what is left (it may be
    shorter). With `shift` the stream is rotated: it starts `shift` tokens in, and its first `shift` tokens follow
    the last document's EOS. Either way every document token, and each EOS, is in exactly one row, once. A row's
    `doc_ids`/`offsets` are those of its first stream token (an offset equal to the document's length is that
    document's EOS); empty documents are skipped and counted."""
    if seq_len < 2:
        raise MemauditError(f"cannot pack rows of {seq_len} tokens: a row needs BOS and at least one token")
    width = seq_len - 1
    out = Samples()
    units = []  # (document id, its tokens + EOS) in stream order
    for doc_id, toks in zip(range(len(token_lists)) if ids is None else ids, token_lists):
        out.n_documents += 1
        if len(toks) == 0:
            out.n_skipped += 1
        else:
            units.append((doc_id, [*toks, eos]))
    pieces, before = [], []  # the rotated stream as (id, unit, start, stop) pieces
    skip = shift % max(1, sum(len(u) for _, u in units))
    for doc_id, unit in units:
        cut = min(len(unit), max(0, skip))
        before += [(doc_id, unit, 0, cut)] if cut else []
        pieces += [(doc_id, unit, cut, len(unit))] if cut < len(unit) else []
        skip -= len(unit)
    row: list[int] = []
    for doc_id, unit, pos, stop in pieces + before:
        while pos < stop:
            if not row:  # a new row starts here
                out.doc_ids.append(doc_id)
                out.offsets.append(pos)
            take = min(width - len(row), stop - pos)
            row.extend(unit[pos:pos + take])
            pos += take
            if len(row) == width:
                out.tokens.append([bos, *row])
                row = []
    if row:
        out.tokens.append([bos, *row])
    return out
