"""Cutting tokenized documents into samples: the one home of that idea.

`cut` is the core: for each document it takes windows of `length` tokens starting at `offset` (one window, or one
every `stride` tokens), either skipping documents too short for a full window or, with `truncate`, keeping shorter
ones down to `min_length` tokens, and optionally dropping windows identical to an earlier one. Every sample carries
the id of its document and the token offset it starts at; the counts say what was skipped, truncated and dropped.
The named helpers below are the cuts each probe uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

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


def tiles(token_lists: Sequence[Sequence[int]], window: int) -> Samples:
    """Capacity on text: every non-overlapping `window`-token chunk of every document, duplicates dropped (first
    kept)."""
    return cut(token_lists, length=window, stride=window, dedup=True)


def training_rows(token_lists: Sequence[Sequence[int]], bos: int, seq_len: int) -> list[list[int]]:
    """Training: one row per non-empty document, `bos` and then its first `seq_len - 1` tokens."""
    s = cut(token_lists, length=seq_len - 1, truncate=True, min_length=1)
    return [[bos] + t for t in s.tokens]
