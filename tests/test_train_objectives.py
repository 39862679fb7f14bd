"""Goldfish masks and memorization sinks, each checked against an independent computation written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.training.objectives import (IGNORE, goldfish_drop_mask, goldfish_eligible, goldfish_labels,
                                          hash_drop, official_hash_drop)
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
