"""samples.py against brute-force loops written here: offsets, ids and counts of every kind of cut."""
import numpy as np
import pytest

from memaudit.errors import MemauditError
from memaudit.samples import (DistinctWindows, Sampling, Windows, cut, document_samples, make_windows, tiles,
                              training_rows)


def _docs(seed: int, n: int = 60, vocab: int = 3, longest: int = 14) -> list[list[int]]:
    """Short documents over a tiny vocabulary, so duplicates and every length (0 included) occur."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, longest + 1))).tolist() for _ in range(n)]


def _brute(docs, ids, length, offset=0, stride=None, truncate=False, min_length=1, dedup=False):
    """The reference: try every start, keep by the rules spelled out one at a time."""
    rows, out_ids, offs = [], [], []
    skipped = truncated = dups = 0
    seen = []
    for doc_id, toks in zip(ids, docs):
        starts = [offset] if stride is None else [s for s in range(offset, len(toks) + 1) if (s - offset) % stride == 0]
        last_end = None
        for s in starts:
            w = toks[s:s + length]
            if truncate:
                if len(w) < min(min_length, length):
                    continue
            elif len(w) != length:
                continue
            last_end = s + len(w)
            if dedup and w in seen:
                dups += 1
                continue
            seen.append(w)
            rows.append(w)
            out_ids.append(doc_id)
            offs.append(s)
        if last_end is None:
            skipped += 1
        elif truncate and len(toks) > last_end:
            truncated += 1
    return rows, out_ids, offs, (skipped, truncated, dups)


def _check(docs, **kw):
    ids = [f"d{i}" for i in range(len(docs))]
    s = cut(docs, ids, **kw)
    rows, out_ids, offs, counts = _brute(docs, ids, **kw)
    assert s.tokens == rows
    assert s.doc_ids == out_ids
    assert s.offsets == offs
    assert (s.n_skipped, s.n_truncated, s.n_duplicates) == counts
    assert s.n_documents == len(docs)
    for t, d, o in zip(s.tokens, s.doc_ids, s.offsets):  # every sample is where it says it is
        assert docs[int(d[1:])][o:o + len(t)] == t
    return s


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dedup", [False, True])
def test_first_window(seed, dedup):
    s = _check(_docs(seed), length=5, dedup=dedup)
    assert all(o == 0 for o in s.offsets) and all(len(t) == 5 for t in s.tokens)
    assert s.n_truncated == 0  # fixed windows are never counted as truncated


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("offset", [1, 3, 9])
def test_window_at_offset(seed, offset):
    s = _check(_docs(seed), length=4, offset=offset, dedup=True)
    assert all(o == offset for o in s.offsets)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("length,stride,offset", [(4, 4, 0), (4, 2, 0), (3, 5, 1), (2, 1, 2), (5, 3, 0)])
@pytest.mark.parametrize("dedup", [False, True])
def test_strided_windows(seed, length, stride, offset, dedup):
    s = _check(_docs(seed), length=length, stride=stride, offset=offset, dedup=dedup)
    assert all((o - offset) % stride == 0 for o in s.offsets)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("length,min_length", [(6, 1), (6, 2), (6, 4), (3, 5)])
@pytest.mark.parametrize("dedup", [False, True])
def test_truncation_and_minimum_length(seed, length, min_length, dedup):
    s = _check(_docs(seed), length=length, truncate=True, min_length=min_length, dedup=dedup)
    assert all(min(min_length, length) <= len(t) <= length for t in s.tokens)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stride", [2, 4])
def test_truncation_with_stride(seed, stride):
    _check(_docs(seed), length=4, stride=stride, truncate=True, min_length=2, dedup=True)


def test_counts_by_hand():
    docs = [[1, 2, 3, 4], [1, 2, 3, 4, 9], [5, 6], [7, 8, 9, 10], []]
    s = cut(docs, list("abcde"), length=4, dedup=True)
    assert (s.doc_ids, s.n_skipped, s.n_duplicates, s.n_truncated) == (["a", "d"], 2, 1, 0)
    s = cut(docs, length=3, truncate=True, min_length=2)
    assert s.doc_ids == [0, 1, 2, 3] and s.tokens[2] == [5, 6]  # ids default to positions
    assert (s.n_skipped, s.n_truncated, s.n_duplicates) == (1, 3, 0)
    s = cut([[1, 2, 3, 4, 5, 6, 7]], length=2, stride=3, offset=1)
    assert s.tokens == [[2, 3], [5, 6]] and s.offsets == [1, 4]


def test_bad_settings_are_refused():
    for kw in ({"length": 0}, {"length": 2, "offset": -1}, {"length": 2, "stride": 0}, {"length": 2, "min_length": 0}):
        with pytest.raises(MemauditError):
            cut([[1, 2, 3]], **kw)


# ---- the callers' cuts, each against the loop it replaced ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix,suffix,offset", [(2, 2, 0), (3, 2, 2), (1, 1, 5)])
def test_make_windows(seed, prefix, suffix, offset):
    docs = _docs(seed)
    ids = [str(i) for i in range(len(docs))]
    need = offset + prefix + suffix
    keep, rows, seen, skipped, dups = [], [], set(), 0, 0
    for i, t in zip(ids, docs):
        if len(t) < need:
            skipped += 1
        elif tuple(t[offset:need]) in seen:
            dups += 1
        else:
            seen.add(tuple(t[offset:need]))
            keep.append(i)
            rows.append(t[offset:need])
    w = make_windows(docs, ids, prefix, suffix, offset)
    assert isinstance(w, Windows) and w.tokens.dtype == np.int64 and w.tokens.shape == (len(rows), prefix + suffix)
    assert w.ids == keep and w.tokens.tolist() == rows and (w.n_skipped, w.n_duplicates) == (skipped, dups)
    assert (w.prefix, w.suffix) == (prefix, suffix)


def test_make_windows_empty_and_errors():
    w = make_windows([[1], []], ["a", "b"], 2, 3)
    assert w.tokens.shape == (0, 5) and w.ids == [] and w.n_skipped == 2
    with pytest.raises(MemauditError, match="--prefix and --suffix must be >= 1 and --offset >= 0"):
        make_windows([[1, 2]], ["a"], 0, 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window,max_tokens,min_tokens,dedup",
                         [(None, 6, 1, True), (None, 6, 2, True), (None, 5, 2, False), (4, 99, 1, True), (6, 99, 2, False)])
def test_document_samples(seed, window, max_tokens, min_tokens, dedup):
    docs = _docs(seed)
    ids = [f"m{i}" for i in range(len(docs))]
    keep, rows, seen, skipped, truncated, dups = [], [], set(), 0, 0, 0
    for i, t in zip(ids, docs):
        if window is not None:
            if len(t) < window:
                skipped += 1
                continue
            t = t[:window]
        else:
            if len(t) < min_tokens:
                skipped += 1
                continue
            if len(t) > max_tokens:
                truncated += 1
                t = t[:max_tokens]
        if dedup and tuple(t) in seen:
            dups += 1
            continue
        seen.add(tuple(t))
        keep.append(i)
        rows.append(t)
    s = document_samples(docs, ids, max_tokens=max_tokens, min_tokens=min_tokens, window=window, dedup=dedup)
    assert (s.doc_ids, s.tokens) == (keep, rows)
    assert (s.n_skipped, s.n_truncated, s.n_duplicates) == (skipped, truncated, dups)
    assert s.offsets == [0] * len(rows)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("seq_len", [2, 3, 8, 40])
def test_training_rows(seed, seq_len):
    docs = _docs(seed)
    expected = []
    for t in docs:
        if t:
            expected.append([99] + t[:seq_len - 1])
    assert training_rows(docs, 99, seq_len) == expected


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_tiles(seed, window):
    docs = _docs(seed, longest=20)
    rows, offs, seen = [], [], set()
    for d, t in enumerate(docs):
        for s in range(0, len(t) - window + 1, window):
            if tuple(t[s:s + window]) not in seen:
                seen.add(tuple(t[s:s + window]))
                rows.append(t[s:s + window])
                offs.append((d, s))
    s = tiles(docs, window)
    assert s.tokens == rows and list(zip(s.doc_ids, s.offsets)) == offs
    a = s.array(window)
    assert a.dtype == np.int64 and a.tolist() == rows


def test_text_windows_error_kept():
    from memaudit.capacity.text import text_windows

    class Tok:  # a slow tokenizer: one token per character
        is_fast = False

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    a = text_windows(["abcdabcdx", "abcd"], Tok(), window=4)
    assert a.tolist() == [[97, 98, 99, 100]]
    with pytest.raises(MemauditError, match="no document has 10 tokens: give a longer text file"):
        text_windows(["abc"], Tok(), window=10)


def test_windows_skip_short_and_deduplicate():
    w = make_windows([[1, 2, 3, 4], [1, 2, 3, 4, 9], [5, 6], [7, 8, 9, 10]], ["a", "b", "c", "d"], 2, 2)
    assert w.ids == ["a", "d"] and w.n_skipped == 1 and w.n_duplicates == 1
    assert w.tokens.tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]


# ---- sampling strategies: offsets and counts against brute-force loops ----------------------------------------------


def _brute_starts(kind: str, n: int, length: int, offset: int = 0, stride: int = 1) -> list[int]:
    """Every start 0..n tried against the strategy's rule, spelled out."""
    fits = [s for s in range(n + 1) if s + length <= n]
    if kind == "first":
        return [s for s in fits if s == offset]
    if kind == "stride":
        return [s for s in fits if s >= offset and (s - offset) % stride == 0]
    if kind == "tail":
        return [s for s in fits if s == n - length]
    raise ValueError(kind)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind,length,offset,stride", [
    ("first", 4, 0, 1), ("first", 3, 5, 1), ("stride", 4, 0, 1), ("stride", 4, 0, 4), ("stride", 3, 2, 5),
    ("stride", 5, 1, 2), ("tail", 4, 0, 1), ("tail", 1, 0, 1)])
def test_window_starts_and_stream_against_brute_force(seed, kind, length, offset, stride):
    docs = _docs(seed, longest=30)
    ids = [f"d{i}" for i in range(len(docs))]
    sampling = Sampling(offset=offset, stride=stride if kind == "stride" else None, tail=kind == "tail")
    sampling.validate()
    expected, skipped = [], 0
    for d, t in enumerate(docs):
        starts = _brute_starts(kind, len(t), length, offset, stride)
        assert list(sampling.starts(len(t), length, d)) == starts
        skipped += not starts
        expected += [(d, ids[d], s, t[s:s + length]) for s in starts]
    stream = sampling.windows(docs, ids, length)
    got = [(w.doc, w.doc_id, w.offset, list(w.tokens)) for w in stream]
    assert got == expected and stream.count() == len(expected)
    assert (stream.n_documents, stream.n_skipped) == (len(docs), skipped)
    if kind == "first":  # the default strategy is today's cut, window for window
        s = cut(docs, ids, length=length, offset=offset)
        assert [(g[1], g[2], g[3]) for g in got] == list(zip(s.doc_ids, s.offsets, s.tokens))


@pytest.mark.parametrize("n_per_doc", [1, 3, 40])
def test_random_windows_per_document(n_per_doc):
    """N distinct sorted starts where a whole window fits (all when fewer fit), the same for the same seed and
    document, another draw for another seed, and uniform over the starts."""
    length = 5
    s0, s1 = Sampling(windows_per_doc=n_per_doc, seed=0), Sampling(windows_per_doc=n_per_doc, seed=1)
    for n in (0, 4, 5, 6, 12, 50, 300):
        fits = list(range(n - length + 1)) if n >= length else []
        for doc in range(5):
            starts = list(s0.starts(n, length, doc))
            assert len(starts) == min(n_per_doc, len(fits))
            assert starts == sorted(set(starts)) and set(starts) <= set(fits)
            assert list(s0.starts(n, length, doc)) == starts  # seeded: drawn again, the same
    if n_per_doc < 40:
        assert [list(s0.starts(300, length, d)) for d in range(20)] != [list(s1.starts(300, length, d)) for d in range(20)]
        assert len({tuple(s0.starts(300, length, d)) for d in range(20)}) > 15  # documents draw independently
    # uniform: every start is drawn about as often, over many documents (a chi-square bound far in the tail)
    n, docs = 20, 6000
    counts = np.zeros(n - length + 1)
    for d in range(docs):
        np.add.at(counts, list(s0.starts(n, length, d)), 1)
    expected = docs * min(n_per_doc, n - length + 1) / len(counts)
    if n_per_doc < len(counts):
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 50, (chi2, counts)  # 15 degrees of freedom: P(chi2 > 50) < 1e-5
    else:
        assert (counts == docs).all()


def test_random_windows_of_a_document_do_not_depend_on_the_others():
    docs = _docs(0, longest=40)
    s = Sampling(windows_per_doc=2, seed=7)
    whole = [(w.doc, w.offset) for w in s.windows(docs, None, 4)]
    for d in (3, 10, 25):
        alone = list(s.starts(len(docs[d]), 4, d))
        assert [o for doc, o in whole if doc == d] == alone


def test_streams_are_lazy():
    """Iterating reads one document at a time: the first window comes before any later document is touched."""
    class Docs:
        def __init__(self, docs):
            self.docs, self.read = docs, []

        def __len__(self):
            return len(self.docs)

        def __getitem__(self, i):
            if i >= len(self.docs):
                raise IndexError(i)
            self.read.append(i)
            return self.docs[i]

    docs = Docs([[1, 2, 3, 4, 5, 6]] * 1000)
    it = iter(Sampling(stride=2).windows(docs, None, 4))
    assert next(it).offset == 0 and next(it).offset == 2 and docs.read == [0]
    assert next(it).doc == 1 and docs.read == [0, 1]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk,window_ids", [(1, False), (3, True), (1000, True)])
def test_distinct_windows_against_brute_force(seed, chunk, window_ids):
    docs = _docs(seed, vocab=2, longest=12)
    ids = [f"d{i}" for i in range(len(docs))]
    sampling = Sampling(stride=2)
    first, rows, repeats = {}, [], []
    for d, t in enumerate(docs):
        for s in _brute_starts("stride", len(t), 4, 0, 2):
            w = tuple(t[s:s + 4])
            if w in first:
                repeats.append((d, s, first[w]))
            else:
                first[w] = len(rows)
                rows.append((d, s, list(w)))
    plan = DistinctWindows(sampling.windows(docs, ids, 4), 3, 1, chunk=chunk, window_ids=window_ids)
    chunks = list(plan)
    assert all(0 < len(c.ids) <= chunk for c in chunks)
    assert [c.base for c in chunks] == list(np.cumsum([0] + [len(c.ids) for c in chunks[:-1]]))
    got = [(d, o, list(t)) for c in chunks for d, o, t in zip(c.docs, c.offsets, c.tokens.tolist())]
    assert got == rows and plan.repeats == repeats and plan.n_distinct == len(rows)
    assert all(c.tokens.dtype == np.int64 and (c.prefix, c.suffix) == (3, 1) for c in chunks)
    want_ids = [f"d{d}@{o}" if window_ids else f"d{d}" for d, o, _ in rows]
    assert [i for c in chunks for i in c.ids] == want_ids


def test_distinct_first_windows_equal_make_windows():
    for seed in range(3):
        docs = _docs(seed)
        ids = [str(i) for i in range(len(docs))]
        for offset in (0, 2):
            w = make_windows(docs, ids, 2, 2, offset)
            plan = DistinctWindows(Sampling(offset=offset).windows(docs, ids, 4), 2, 2)
            chunks = list(plan)
            assert [i for c in chunks for i in c.ids] == w.ids
            assert np.concatenate([c.tokens for c in chunks]).tolist() == w.tokens.tolist()
            assert (plan.n_skipped, len(plan.repeats)) == (w.n_skipped, w.n_duplicates)


@pytest.mark.parametrize("kw,message", [
    ({"stride": 0}, "--stride must be >= 1"), ({"stride": -2}, "--stride must be >= 1"),
    ({"windows_per_doc": 0}, "--windows-per-doc must be >= 1"), ({"offset": -1}, "--offset must be >= 0"),
    ({"stride": 2, "tail": True}, "--stride and --tail exclude each other"),
    ({"stride": 2, "windows_per_doc": 2}, "--stride and --windows-per-doc exclude each other"),
    ({"windows_per_doc": 2, "tail": True}, "--windows-per-doc and --tail exclude each other"),
    ({"tail": True, "offset": 3}, "does not go with --tail"),
    ({"windows_per_doc": 2, "offset": 3}, "does not go with --windows-per-doc"),
    ({"windows_per_doc": 2, "seed": -1}, "--seed"),
])
def test_sampling_refuses_bad_values_and_combinations(kw, message):
    with pytest.raises(MemauditError, match=message):
        Sampling(**kw).validate()


def test_sampling_strategies_named():
    assert [Sampling(**kw).strategy for kw in ({}, {"offset": 3}, {"stride": 2}, {"windows_per_doc": 1},
                                                {"tail": True})] == ["first", "first", "stride", "random", "tail"]
    assert not Sampling(offset=4).whole_document and Sampling(tail=True).whole_document
