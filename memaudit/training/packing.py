"""Packed training rows (`memaudit train --rows packed`) and how goldfish masks and sink ids follow documents
across them.

The rows themselves are cut by `samples.packed_rows`: the documents, each followed by EOS, joined into one stream
and cut into rows of BOS + the next seq_len - 1 stream tokens. Every row starts with BOS, as every probe sample
does (BOS + tokens from any offset of a document). Canary copies are packed alone: each is one row, BOS + canary +
EOS, so a canary is always trained on whole and never shares a row. Every epoch packs anew (`EpochPacker`: a
seeded document order and stream rotation), because a tiny model trained on one fixed cut memorizes text by its
place in the row and reproduces almost none of it from a prefix at another offset.

A row holds pieces of several documents, so what the objectives attach to a document is looked up per token:
each row position knows its document and its index in that document's unit BOS + tokens + EOS (index 0 is the
BOS, 1..n the tokens, n + 1 the EOS; a row's leading BOS stands for index 0 of its first token's document).
- goldfish: the deterministic masks (hash, hash-official, static) are computed on each document's unit, so a
  target's h-token context never reaches across a document boundary (a document's first h - 1 targets are never
  dropped, as with one row per document) but does reach across a row boundary: a document's mask does not
  depend on where the rows are cut, on the documents around it or on the epoch, and on its first seq_len - 1
  tokens it is the mask `--rows first` gives.
- sinks: every position takes its document's sequence id (the hash of the whole document's tokens), so a
  repeated document keeps its sink set wherever it is packed; a row is masked position by position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import MemauditError
from ..samples import packed_rows
from .objectives import goldfish_drop_mask
from .sinks import sequence_id

ROWS = ("packed", "first")
# What train_config.json records under "row_layout": each choice the rows make, in words.
ROW_LAYOUT = {
    "packed": {
        "rows": "the training documents, each followed by EOS, joined into one stream cut into rows of BOS + the "
                "next seq_len - 1 stream tokens; every epoch packs them anew, in a seeded document order with the "
                "stream rotated by a seeded 0..seq_len - 2 tokens (the first tokens then follow the last EOS), so a "
                "passage meets row boundaries at a different place each epoch; the rows are then shuffled",
        "bos": "every row starts with BOS (the tokenizer's BOS, else its EOS), as every probe sample does (BOS + "
               "tokens from any offset of a document); a document starting inside a row follows the previous "
               "document's EOS (the same token as BOS for memaudit's tokenizers and GPT-2's)",
        "last_row": "kept, shorter than seq_len (right-padded, padding masked): every token of every training "
                    "document, and each document's EOS, is a target exactly once per epoch; the number of rows is "
                    "the same every epoch",
        "attention": "not blocked between the documents of a row",
        "validation": "split by documents before packing (a seeded --val-fraction of the documents, or --val-data); "
                      "validation documents are packed the same way and every token scored without masks",
        "canaries": "each inserted copy is a row of its own, BOS + canary + EOS: trained on whole, never cut across "
                    "rows nor packed with a document",
        "goldfish": "hash, hash-official and static masks are computed on each document's unit BOS + tokens + EOS: "
                    "a target's h-token context never reaches across a document boundary (a document's first h - 1 "
                    "targets are never dropped) but does across a row boundary, so a document's mask does not "
                    "depend on where rows are cut and equals the --rows first mask on its first seq_len - 1 "
                    "tokens; random is drawn per step on the rows",
        "sinks": "every position takes its document's sequence id (the hash of the whole document's tokens), so a "
                 "repeated document keeps its sink set wherever it is packed; a row's BOS takes the id of the "
                 "document of the token after it",
    },
    "first": {
        "rows": "one row per document: BOS + its first seq_len - 1 tokens (the rest of a longer document is not "
                "trained on), right-padded",
        "bos": "every row starts with BOS (the tokenizer's BOS, else its EOS), as every probe sample does",
        "validation": "split by documents (a seeded --val-fraction of the documents, or --val-data); one row per "
                      "validation document, cut the same way",
        "canaries": "each inserted copy is a row of its own, BOS + canary",
        "goldfish": "masks computed on each row, i.e. on the document's first seq_len - 1 tokens after BOS",
        "sinks": "one sequence id per row: the hash of the row's tokens after BOS",
    },
}


@dataclass
class Packing:
    """Packed rows and, per row and position, the document index (into the token lists) and the unit index."""
    rows: list[list[int]]
    doc: list[np.ndarray]  # int64 per row position
    pos: list[np.ndarray]  # int64 per row position: index in the document's unit BOS + tokens + EOS
    n_documents: int  # non-empty documents packed (canary copies included)


def pack(token_lists: Sequence[Sequence[int]], bos: int, eos: int, seq_len: int, *, alone_from: int | None = None,
         order: Sequence[int] | None = None, shift: int = 0) -> Packing:
    """token_lists[:alone_from] packed together, in `order` (default: as given) and with the stream rotated by
    `shift` tokens (`samples.packed_rows`); each of token_lists[alone_from:] (canary copies) in a row of its own,
    which must hold it whole with its EOS."""
    split = len(token_lists) if alone_from is None else alone_from
    groups = [list(range(split)) if order is None else list(order)] + [[i] for i in range(split, len(token_lists))]
    rows, doc, pos, n_docs = [], [], [], 0
    for g, group in enumerate(groups):
        cut = packed_rows([token_lists[i] for i in group], bos, eos, seq_len, ids=group, shift=shift if g == 0 else 0)
        if g > 0 and len(cut) > 1:
            raise MemauditError(f"a canary is {len(token_lists[group[0]])} tokens, longer than a row holds "
                                f"(--seq-len {seq_len} - 2, for BOS and EOS): raise --seq-len")
        kept = [i for i in group if len(token_lists[i])]
        empty = np.zeros(0, dtype=np.int64)
        stream_doc = np.concatenate([np.full(len(token_lists[i]) + 1, i) for i in kept] or [empty])
        stream_pos = np.concatenate([np.arange(1, len(token_lists[i]) + 2) for i in kept] or [empty])
        if len(stream_doc) and g == 0:  # the same rotation as the rows
            stream_doc, stream_pos = (np.roll(a, -(shift % len(a))) for a in (stream_doc, stream_pos))
        start = 0
        for r, row in enumerate(cut.tokens):
            end = start + len(row) - 1
            d = stream_doc[start:end]
            assert d[0] == cut.doc_ids[r] and stream_pos[start] == cut.offsets[r] + 1  # the same cut, read twice
            doc.append(np.concatenate([d[:1], d]).astype(np.int64))
            pos.append(np.concatenate([[0], stream_pos[start:end]]).astype(np.int64))
            start = end
        rows += cut.tokens
        n_docs += cut.n_documents - cut.n_skipped
    return Packing(rows, doc, pos, n_docs)


def _units(token_lists: Sequence[Sequence[int]], bos: int, eos: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every document's unit BOS + tokens + EOS laid end to end as one [1, N] row, each position's unit index,
    and where each document's unit starts in it (empty documents get an empty unit)."""
    units = [[bos, *t, eos] if len(t) else [] for t in token_lists]
    lengths = np.array([len(u) for u in units], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = torch.tensor([[tok for u in units for tok in u]], dtype=torch.long)
    unit_pos = np.concatenate([np.arange(n) for n in lengths] or [np.zeros(0, dtype=np.int64)])
    return flat, unit_pos, starts


class DocumentMasks:
    """The deterministic goldfish masks (hash, hash-official, static) of every document's unit, computed once;
    `rows(packing)` looks each row position's up (the row's BOS never a target). `random` is drawn per step."""

    def __init__(self, token_lists: Sequence[Sequence[int]], bos: int, eos: int, mode: str, k: int, h: int):
        if mode not in ("hash", "hash-official", "static"):
            raise ValueError(f"goldfish mode {mode!r} has no per-document mask")
        flat, unit_pos, self.starts = _units(token_lists, bos, eos)
        if mode == "static":  # every k-th target of the document, counted from its BOS
            self.drop = (unit_pos % k == 0) & (unit_pos > 0)
        else:  # hashed on the units end to end; a target with fewer than h tokens of its own unit before it is kept
            self.drop = goldfish_drop_mask(flat, mode, k, h)[0].numpy() & (unit_pos >= h)

    def rows(self, packing: Packing) -> list[np.ndarray]:
        masks = []
        for d, p in zip(packing.doc, packing.pos):
            m = self.drop[self.starts[d] + p]
            m[0] = False
            masks.append(m)
        return masks


def sink_row_ids(packing: Packing, doc_ids: np.ndarray) -> list[np.ndarray]:
    """int64 per row position: the sequence id of the position's document (`doc_ids`, one per document)."""
    return [doc_ids[d] for d in packing.doc]


def document_sequence_ids(token_lists: Sequence[Sequence[int]]) -> np.ndarray:
    """Each document's sinks sequence id, the hash of all its tokens (so repeated copies share it)."""
    return np.array([sequence_id(t) if len(t) else 0 for t in token_lists], dtype=np.int64)


@dataclass
class EpochRows:
    rows: list[list[int]]
    drop: list[np.ndarray] | None  # goldfish (deterministic masks): per row position
    seq_ids: list[np.ndarray]  # sinks: per row position; empty otherwise


class EpochPacker:
    """The training rows of each epoch: the documents in a seeded order, their stream rotated by a seeded
    0..seq_len - 2 tokens, so a passage meets the row boundaries at another place every epoch (as random offsets
    do in nanoGPT) while the number of rows stays fixed; canary copies keep rows of their own. Goldfish masks and
    sink ids are per document, so they are the same whatever the epoch's packing."""

    def __init__(self, token_lists: list[list[int]], bos: int, eos: int, seq_len: int, n_docs: int, seed: int, *,
                 goldfish: tuple[str, int, int] | None = None, sinks: bool = False):
        self.toks, self.bos, self.eos, self.seq_len, self.n_docs, self.seed = \
            token_lists, bos, eos, seq_len, n_docs, seed
        self.masks = DocumentMasks(token_lists, bos, eos, *goldfish) if goldfish else None
        self.doc_ids = document_sequence_ids(token_lists) if sinks else None
        self.n_documents = sum(1 for t in token_lists if len(t))

    def layout(self, epoch: int) -> tuple[np.ndarray, int]:
        """The epoch's document order and stream rotation, a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch, 1])  # apart from the row order's default_rng([seed, epoch])
        return rng.permutation(self.n_docs), int(rng.integers(self.seq_len - 1))

    def epoch(self, epoch: int) -> EpochRows:
        order, shift = self.layout(epoch)
        packing = pack(self.toks, self.bos, self.eos, self.seq_len, alone_from=self.n_docs, order=order,
                       shift=shift)
        return EpochRows(packing.rows, self.masks.rows(packing) if self.masks else None,
                         sink_row_ids(packing, self.doc_ids) if self.doc_ids is not None else [])
