"""Goldfish masks, memorization sinks and packed rows, each checked against an independent computation written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.errors import MemauditError
from memaudit.samples import packed_rows
from memaudit.training.objectives import (IGNORE, goldfish_drop_mask, goldfish_eligible, goldfish_labels,
                                          hash_drop, official_hash_drop)
from memaudit.training.packing import DocumentMasks, EpochPacker, document_sequence_ids, pack, sink_row_ids
from memaudit.training.sinks import SinkHooks, dropped_mask, release_from_model, sequence_id, sink_mask, sink_spec

M64 = (1 << 64) - 1


# ------------------------------------------------------------------ an independent pure-Python hash reference

def _mix64_py(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _hash_drop_py(row: list[int], k: int, h: int) -> list[bool]:
    out = []
    for j in range(len(row)):
        if j < h:
            out.append(False)
            continue
        acc = 0
        for tok in row[j - h:j]:  # oldest first: sum mix(id_i) * P^(h-1-i)
            acc = (acc * 0x100000001B3 + _mix64_py(tok)) & M64
        out.append(_mix64_py(acc) / 2 ** 64 < 1 / k)
    return out


def test_hash_mask_matches_pure_python_reference():
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, 50_000, size=(3, 60)))
    for k, h in [(4, 13), (2, 3), (8, 1)]:
        got = hash_drop(ids, k, h).tolist()
        want = [_hash_drop_py(r, k, h) for r in ids.tolist()]
        # floor(H/2^11)*k < 2^53 and H/2^64 < 1/k differ only within 2^-53 of the threshold: never here
        assert got == want


@pytest.mark.parametrize("mode", ["hash", "hash-official", "static", "random"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_drop_rates_are_one_over_k(mode, k):
    ids = torch.tensor(np.random.default_rng(k).integers(1, 2048, size=(64, 256)))
    drop = goldfish_drop_mask(ids, mode, k, 13, seed=0, step=0)
    h_skip = 13 if mode.startswith("hash") else 1
    rate = drop[:, h_skip:].float().mean().item()
    n = drop[:, h_skip:].numel()
    assert abs(rate - 1 / k) < 4 * np.sqrt((1 / k) * (1 - 1 / k) / n) + (1e-9 if mode != "static" else 1 / 256)
    assert not drop[:, 0].any()


def test_masks_are_deterministic_and_random_redraws_per_step():
    ids = torch.tensor(np.random.default_rng(1).integers(1, 2048, size=(4, 100)))
    for mode in ("hash", "hash-official", "static"):
        assert torch.equal(goldfish_drop_mask(ids, mode, 4, 13, 0, 0), goldfish_drop_mask(ids, mode, 4, 13, 7, 99))
    r0 = goldfish_drop_mask(ids, "random", 4, 13, seed=0, step=3)
    assert torch.equal(r0, goldfish_drop_mask(ids, "random", 4, 13, seed=0, step=3))
    assert not torch.equal(r0, goldfish_drop_mask(ids, "random", 4, 13, seed=0, step=4))


def test_hash_mask_equal_for_a_shared_passage_in_different_documents():
    rng = np.random.default_rng(2)
    passage = rng.integers(1, 2048, size=80).tolist()
    h = 13
    doc_a = [0] + rng.integers(1, 2048, size=7).tolist() + passage
    doc_b = [0] + rng.integers(1, 2048, size=31).tolist() + passage + [5, 6, 7]
    da = hash_drop(torch.tensor([doc_a]), 4, h)[0].tolist()
    db = hash_drop(torch.tensor([doc_b]), 4, h)[0].tolist()
    sa, sb = len(doc_a) - len(passage), len(doc_b) - len(passage) - 3
    # once h tokens into the passage, the window lies inside it: identical masks
    assert da[sa + h:sa + len(passage)] == db[sb + h:sb + len(passage)]
    assert any(da[sa + h:sa + len(passage)])  # and it does drop something
    # order-sensitive: reversing the context changes the decision somewhere; the official product does not
    x = torch.tensor([rng.integers(1, 2048, size=40).tolist()])
    rev = torch.cat([x[:, :1], x[:, 1:h + 1].flip(1), x[:, h + 1:]], dim=1)
    assert hash_drop(x, 2, h)[0, h] != hash_drop(rev, 2, h)[0, h] or \
        hash_drop(x, 2, h)[0, h + 1:].tolist() != hash_drop(rev, 2, h)[0, h + 1:].tolist()


def test_official_variant_follows_the_product_hash_table():
    gen = torch.Generator().manual_seed(2971215073)
    table = torch.rand(1_000_003, generator=gen)
    ids = torch.tensor(np.random.default_rng(3).integers(0, 500, size=(2, 40)))
    ids[1, 20] = 0  # a zero id makes every window through it key 0
    k, h = 4, 5
    got = official_hash_drop(ids, k, h)
    for b in range(2):
        for j in range(40):
            if j < h:
                assert not got[b, j]
                continue
            prod = 1
            for t in ids[b, j - h + 1:j + 1].tolist():  # the h targets ENDING at j
                prod = (prod * t) & M64
            prod = prod - (1 << 64) if prod >= 1 << 63 else prod  # int64 wrap-around, as in torch
            assert bool(got[b, j]) == bool(table[prod % 1_000_003] < 1 / k)
    shuffled = ids.clone()
    shuffled[0, 10:15] = shuffled[0, 10:15].flip(0)
    assert official_hash_drop(shuffled, k, h)[0, 14] == got[0, 14]  # order-invariant


@pytest.mark.parametrize("mode", ["hash", "hash-official", "static", "random"])
def test_eligible_positions_cover_every_drop(mode):
    ids = torch.tensor(np.random.default_rng(5).integers(1, 2048, size=(32, 120)))
    drop = goldfish_drop_mask(ids, mode, 2, 13, seed=0, step=0)
    eligible = goldfish_eligible(120, mode, 13)
    assert not drop[:, ~eligible].any()  # nothing outside the eligible positions is ever dropped
    assert eligible.tolist() == [j >= (13 if mode.startswith("hash") else 1) for j in range(120)]
    with pytest.raises(ValueError):
        goldfish_eligible(10, "nope", 13)


def test_goldfish_labels_ignore_padding_and_dropped_targets():
    ids = torch.tensor(np.random.default_rng(4).integers(1, 2048, size=(2, 50)))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = goldfish_labels(ids, mask, 0, mode="static", k=4, h=13)
    assert (labels[1, 30:] == IGNORE).all()
    assert (labels[0, 4::4] == IGNORE).all() and (labels[0, 1:4] == ids[0, 1:4]).all()


# ------------------------------------------------------------------ sinks

def _tiny(family: str):
    from transformers import AutoModelForCausalLM

    from memaudit.models import build_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("2x32", vocab_size=97, max_length=32, family=family))
    with torch.no_grad():  # non-trivial biases so folding mistakes show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_sink_masks_shared_by_repeats_and_differ_otherwise():
    spec = sink_spec(_tiny("gpt2"), 0.3, 0.3)
    assert spec.intermediate == 128 and spec.n_sinks == 38 and spec.n_general == 90
    doc = [5, 6, 7, 8, 9]
    a, b = sequence_id(doc), sequence_id(list(doc))
    assert a == b >= 1 and sequence_id([5, 6, 7, 8, 10]) != a
    ma, mb = sink_mask(spec, a), sink_mask(spec, b)
    assert torch.equal(ma, mb)
    assert (ma[:90] == 1).all() and int(ma[90:].sum()) == spec.n_active_sinks == round(0.3 * 38)
    others = [sink_mask(spec, sequence_id([i, i + 1])) for i in range(20)]
    assert all(not torch.equal(ma, m) for m in others)
    assert torch.equal(dropped_mask(spec)[:90], torch.full((90,), (90 + 0.3 * 38) / 90))


def test_hook_masks_the_gpt2_mlp_hidden_activation():
    model = _tiny("gpt2")
    spec = sink_spec(model, 0.3, 0.3)
    hooks = SinkHooks(model, spec)
    x = torch.randn(2, 4, 32)
    hooks.set_rows([11, 12])
    masks = torch.stack([sink_mask(spec, 11), sink_mask(spec, 12)]).unsqueeze(1)
    outs = []
    for block in model.transformer.h:  # every layer, with the same neuron indices (one mask per row)
        mlp = block.mlp
        got = mlp(x)
        act = torch.nn.functional.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")  # gelu_new
        want = (act * masks) @ mlp.c_proj.weight + mlp.c_proj.bias  # 0/1 mask, no rescaling in training
        assert torch.allclose(got, want, atol=1e-5)
        outs.append(got)
    hooks.remove()
    assert not torch.allclose(model.transformer.h[1].mlp(x), outs[1], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_release_model_equals_sinks_dropped_evaluation(family, tmp_path):
    from memaudit.data import train_tokenizer
    from memaudit.models import load_model

    model = _tiny(family)
    tok = train_tokenizer(["some text for a tokenizer"] * 4, vocab_size=300)
    model.resize_token_embeddings(len(tok))  # a tokenizer and a model that belong together (memaudit checks)
    spec = sink_spec(model, 0.3, 0.3)
    ids = torch.tensor(np.random.default_rng(5).integers(0, 97, size=(3, 20)))
    hooks = SinkHooks(model, spec)
    hooks.set_dropped()
    with torch.no_grad():
        dropped = model(input_ids=ids).logits
    hooks.set_all_on()
    with torch.no_grad():
        full = model(input_ids=ids).logits
    release_from_model(model, tok, spec, tmp_path / "release")
    loaded = load_model(tmp_path / "release", device="cpu", dtype="float32")
    assert type(loaded.model).__name__ == type(model).__name__
    with torch.no_grad():
        released = loaded.model(input_ids=ids).logits
    assert torch.allclose(released, dropped, atol=1e-5)
    assert not torch.allclose(released, full, atol=1e-3)  # the sinks did matter
    inter = loaded.model.config.intermediate_size if family == "llama" else loaded.model.config.n_inner
    assert inter == spec.n_general


# ------------------------------------------------------------------ packed rows

def _brute_force_rows(docs: list[list[int]], bos: int, eos: int, seq_len: int, shift: int = 0):
    """One token at a time: the stream (each non-empty document, then EOS), rotated by `shift`, cut into rows of
    BOS + seq_len - 1 tokens; with each row's first (document, offset)."""
    stream = [(tok, d, o) for d, t in enumerate(docs) if t for o, tok in enumerate(t + [eos])]
    shift %= max(1, len(stream))
    rows, starts = [], []
    for tok, d, o in stream[shift:] + stream[:shift]:
        if not rows or len(rows[-1]) == seq_len:
            rows.append([bos])
            starts.append((d, o))
        rows[-1].append(tok)
    return rows, starts


@pytest.mark.parametrize("seq_len", [2, 3, 8, 40])
@pytest.mark.parametrize("shift", [0, 1, 17, 1000])
def test_packed_rows_equal_a_brute_force_loop(seq_len, shift):
    rng = np.random.default_rng(seq_len * 31 + shift)
    docs = [rng.integers(1, 50, size=n).tolist() for n in rng.integers(0, 30, size=12)]
    docs[3] = []  # an empty document is skipped
    s = packed_rows(docs, 0, 99, seq_len, shift=shift)
    rows, starts = _brute_force_rows(docs, 0, 99, seq_len, shift)
    assert s.tokens == rows and list(zip(s.doc_ids, s.offsets)) == starts
    # every row full but the last, which holds what is left (at least one token after BOS)
    assert all(len(r) == seq_len for r in rows[:-1]) and 2 <= len(rows[-1]) <= seq_len
    assert all(r[0] == 0 for r in rows) and s.n_skipped == sum(1 for d in docs if not d)
    # undo the rotation: every token of every document once, in order, EOS after each document
    body = [t for r in s.tokens for t in r[1:]]
    back = len(body) - shift % len(body)
    assert body[back:] + body[:back] == [t for d in docs if d for t in d + [99]]


def test_pack_maps_every_position_to_its_document_and_canaries_get_rows_of_their_own():
    rng = np.random.default_rng(7)
    docs = [rng.integers(1, 50, size=n).tolist() for n in (23, 0, 9, 31, 4)]
    canary = [7, 8, 9]
    p = pack(docs + [canary, canary], 0, 99, 10, alone_from=len(docs), order=[3, 0, 4, 1, 2], shift=5)
    assert p.n_documents == 4 + 2
    for row, d, q in zip(p.rows, p.doc, p.pos):
        assert q[0] == 0 and len(d) == len(q) == len(row)
        for t in range(1, len(row)):  # each position names the token it holds in its document's BOS + doc + EOS
            assert row[t] == ([0] + (docs + [canary, canary])[d[t]] + [99])[q[t]] and q[t] >= 1
    assert p.rows[-2:] == [[0, 7, 8, 9, 99]] * 2  # each canary copy whole, in a row of its own
    assert all((d < len(docs)).all() for d in p.doc[:-2])  # no canary among the documents' rows
    with pytest.raises(MemauditError, match="canary is 9 tokens, longer than a row holds"):
        pack(docs + [list(range(1, 10))], 0, 99, 10, alone_from=len(docs))


def test_each_epoch_packs_the_same_tokens_anew_and_deterministically():
    rng = np.random.default_rng(8)
    docs = [rng.integers(1, 50, size=n).tolist() for n in (40, 13, 27, 5, 61)]
    packer = EpochPacker(docs, 0, 99, 16, n_docs=5, seed=3)
    epochs = [packer.epoch(e).rows for e in range(4)]
    assert len({len(r) for r in epochs}) == 1  # the same number of rows every epoch (steps per epoch fixed)
    assert all(sorted(t for r in rows for t in r) == sorted(t for r in epochs[0] for t in r) for rows in epochs)
    assert len({str(r) for r in epochs}) == 4  # a new order and phase every epoch
    assert EpochPacker(docs, 0, 99, 16, n_docs=5, seed=3).epoch(2).rows == epochs[2]  # a function of (seed, epoch)


def _unit_reference(unit: list[int], mode: str, k: int, h: int) -> list[bool]:
    if mode == "hash":
        return _hash_drop_py(unit, k, h)
    if mode == "static":
        return [j > 0 and j % k == 0 for j in range(len(unit))]
    return official_hash_drop(torch.tensor([unit]), k, h)[0].tolist()  # checked by hand above


@pytest.mark.parametrize("mode,h", [("hash", 13), ("static", 13), ("hash-official", 5)])
def test_packed_goldfish_masks_follow_documents_not_rows(mode, h):
    rng = np.random.default_rng(9)
    docs = [rng.integers(1, 2048, size=n).tolist() for n in (70, 5, 130, 40)]
    docs.append(list(docs[0]))  # a repeated document: the same mask wherever it lands
    bos, eos, k = 0, 1, 4
    masks = DocumentMasks(docs, bos, eos, mode, k, h)
    want = [_unit_reference([bos] + d + [eos], mode, k, h) for d in docs]
    for seq_len, order, shift in [(16, None, 0), (33, [3, 1, 0, 2, 4], 7), (64, [4, 2, 1, 0, 3], 50)]:
        p = pack(docs, bos, eos, seq_len, order=order, shift=shift)
        for d, q, m in zip(p.doc, p.pos, masks.rows(p)):
            assert not m[0]  # the row's BOS is never a target
            assert m[1:].tolist() == [want[d[t]][q[t]] for t in range(1, len(m))]
        # on a document's first seq_len - 1 tokens: the mask `--rows first` gives
        first = goldfish_drop_mask(torch.tensor([[bos] + docs[2][:seq_len - 1]]), mode, k, h)[0].tolist()
        assert first == want[2][:seq_len]
    assert any(any(w) for w in want) and not any(any(w[:1 if mode == "static" else h]) for w in want)


def test_packed_sink_masks_follow_each_positions_document():
    model = _tiny("gpt2")
    spec = sink_spec(model, 0.3, 0.3)
    docs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [5, 6, 7, 8, 9, 10]]  # the first document repeated
    p = pack(docs, 0, 1, 13)  # row 0: BOS, doc 0, EOS, doc 1, EOS, doc 2's first token; row 1: the rest
    ids = sink_row_ids(p, document_sequence_ids(docs))
    for r, (d, row_ids) in enumerate(zip(p.doc, ids)):
        assert row_ids.tolist() == [sequence_id(docs[i]) for i in d]  # copies of a document share its id
    assert ids[0][1] == ids[1][-1] == sequence_id(docs[0])  # the same document, two places in the rows
    hooks = SinkHooks(model, spec)
    row = 0  # holds pieces of all three documents
    assert len(set(p.doc[row].tolist())) == 3
    x = torch.randn(1, len(p.rows[row]), 32)
    hooks.set_tokens(torch.as_tensor(ids[row])[None])
    masks = torch.stack([sink_mask(spec, sequence_id(docs[i])) for i in p.doc[row]])[None]
    mlp = model.transformer.h[0].mlp
    act = torch.nn.functional.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")
    assert torch.allclose(mlp(x), (act * masks) @ mlp.c_proj.weight + mlp.c_proj.bias, atol=1e-5)
    hooks.remove()
