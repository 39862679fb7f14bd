"""The cheap ways of ReCaLL and gradnorm (issue 20, cost): the shots' KV cache read once, and per-sample gradient
norms a batch at once, against plain transformers computations and against the ways before them."""
import math
import types

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (AutoModelForCausalLM, FalconConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, OPTConfig)

from memaudit import membership, mia, scoring
from memaudit.attacks import choose_gradient_method, gradient_norms

V = 300


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_positions=96,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _llama(tied: bool):
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)).eval()


def _tiny(config):
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(config).eval()


MODELS = {
    "gpt2": _gpt2, "llama": lambda: _llama(True), "llama-untied": lambda: _llama(False),
    # OPT's MLP reads every row's positions flattened into one dimension
    "opt": lambda: _tiny(OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=64, max_position_embeddings=96, word_embed_proj_dim=32)),
    # Falcon adds the attention output to the MLP's in place
    "falcon": lambda: _tiny(FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
}


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def _plain_logprobs(model, ids):
    """ln p of each token of `ids` after the first, from one plain forward over the whole sequence."""
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    return lsm[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


@pytest.mark.parametrize("name", list(MODELS))
def test_scores_after_a_cached_prefix_equal_the_whole_sequence(name):
    model = MODELS[name]()
    prefix = [0] + _seqs([23])[0]
    xs = _seqs([5, 17, 1, 30, 9], seed=2)
    cached = scoring.score(model, xs, prefix=prefix, batch_size=2)
    today = scoring.score(model, [prefix + x for x in xs], batch_size=2)  # the way before the cache
    for x, c, t in zip(xs, cached, today):
        plain = _plain_logprobs(model, prefix + x)[-len(x):]
        assert len(c) == len(x)
        np.testing.assert_allclose(c.logprob, plain, atol=1e-5)
        np.testing.assert_allclose(c.logprob, t.logprob[-len(x):], atol=1e-5)
        np.testing.assert_allclose(c.mean_lp, t.mean_lp[-len(x):], atol=1e-5)
        np.testing.assert_allclose(c.var_lp, t.var_lp[-len(x):], atol=1e-4)
        np.testing.assert_array_equal(c.argmax, t.argmax[-len(x):])


def test_a_cache_that_cannot_be_reused_reads_the_prefix_each_time(monkeypatch):
    model = _gpt2()
    prefix, xs = [0] + _seqs([12])[0], _seqs([4, 9], seed=3)
    plain = [_plain_logprobs(model, prefix + x)[-len(x):] for x in xs]
    monkeypatch.setattr(scoring.backend, "kv_from_cache", lambda cache: None)  # as a sliding-window cache answers
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or forward(*a, **k))
    got = scoring.score(model, xs, prefix=prefix, batch_size=2)
    assert calls[-1][1] == len(prefix) + max(map(len, xs)) - 1  # each row holds the whole prefix
    for p, st in zip(plain, got):
        np.testing.assert_allclose(st.logprob, p, atol=1e-5)


def test_a_sliding_window_model_scores_after_the_prefix_as_the_whole_sequence():
    model = _tiny(MistralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=96,
                                sliding_window=8))
    prefix, xs = [0] + _seqs([20])[0], _seqs([5, 14], seed=4)
    for x, st in zip(xs, scoring.score(model, xs, prefix=prefix, batch_size=2)):
        np.testing.assert_allclose(st.logprob, _plain_logprobs(model, prefix + x)[-len(x):], atol=1e-5)


def _loss_backward_norm(model, row):
    """The plain way: transformers' own loss of one sample, .backward(), the norm of every parameter's .grad."""
    model.zero_grad()
    ids = torch.tensor([row])
    model(input_ids=ids, labels=ids).loss.backward()
    norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    return norm


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_gradient_norms_equal_a_backward_per_sample(name):
    model = MODELS[name]()
    seqs = _seqs([6, 21, 3, 40, 13, 8])
    assert choose_gradient_method(model, seqs, bos_id=0) == ("batched", None)
    fast = gradient_norms(model, seqs, bos_id=0, method="batched", batch_size=4)
    loop = gradient_norms(model, seqs, bos_id=0, method="loop")  # the way before: one backward per sample
    plain = np.array([_loss_backward_norm(model, [0] + s) for s in seqs])
    np.testing.assert_allclose(fast, plain, rtol=1e-4)
    np.testing.assert_allclose(loop, plain, rtol=1e-4)


def test_long_samples_form_the_per_sample_gradient_and_agree():
    """Past a layer's width the per-sample weight gradient is formed instead of the Gram matrices: same norms."""
    model = _gpt2()
    seqs = _seqs([90, 70])
    fast = gradient_norms(model, seqs, bos_id=0, method="batched")
    np.testing.assert_allclose(fast, [_loss_backward_norm(model, [0] + s) for s in seqs], rtol=1e-4)


class _TupleLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x), None


class _OddLM(torch.nn.Module):
    """A causal LM whose output projection reads the embedding table outside the embedding's own forward (a use
    forward hooks cannot see), optionally with a layer that returns a tuple."""

    def __init__(self, tuple_block: bool = False):
        super().__init__()
        torch.manual_seed(2)
        self.emb = torch.nn.Embedding(V, 16)
        self.block = _TupleLinear(16, 16) if tuple_block else torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.block(self.emb(input_ids))
        h = torch.tanh(h[0] if isinstance(h, tuple) else h).cumsum(1)  # position t reads tokens <= t
        return types.SimpleNamespace(logits=torch.nn.functional.linear(h, self.emb.weight))


@pytest.mark.parametrize("tuple_block", [False, True])
def test_architectures_the_batched_way_gets_wrong_fall_back_to_the_loop(tuple_block):
    model = _OddLM(tuple_block)
    seqs = _seqs([7, 12, 5])
    method, why = choose_gradient_method(model, seqs, bos_id=0)
    assert method == "loop" and why
    got = gradient_norms(model, seqs, bos_id=0)  # auto: the loop
    np.testing.assert_allclose(got, gradient_norms(model, seqs, bos_id=0, method="loop"), rtol=0)


def _sets(m):
    return dict(model_dir=m.model_dir, members=m.train_file, nonmembers=m.heldout_file)


def test_mia_recall_and_gradnorm_equal_the_ways_before(memorized, monkeypatch):
    kw = dict(**_sets(memorized), attacks="recall,gradnorm", window=24, bootstrap=0, limit=10, write=False)
    new = mia(**kw).samples
    monkeypatch.setattr(membership, "_RECALL_PREFIX_CACHED", False)
    monkeypatch.setattr(membership, "_GRADNORM_METHOD", "loop")
    old = mia(**kw).samples
    assert new["score_recall"].notna().sum() == len(new) - 5  # five shots
    np.testing.assert_allclose(new["score_recall"], old["score_recall"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["score_gradnorm"], old["score_gradnorm"], rtol=1e-4)


def test_resume_when_gradnorm_shares_the_target_pass(memorized, tmp_path, monkeypatch):
    """The target pass computes gradnorm's norms from its own forward; an interrupted run resumes with its saved
    target chunks loaded and gradnorm computing only those chunks' norms itself."""
    monkeypatch.setattr(membership, "RESUME_CHUNK", 4)
    kw = dict(**_sets(memorized), attacks="loss,gradnorm", window=16, bootstrap=0, limit=6)
    whole = mia(**kw, out=tmp_path / "whole")
    joint, alone, calls = membership.score_and_gradient_norms, membership.gradient_norms, []

    def dies_on_second_chunk(model, seqs, **k):
        calls.append(("joint", len(seqs)))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return joint(model, seqs, **k)

    monkeypatch.setattr(membership, "score_and_gradient_norms", dies_on_second_chunk)
    monkeypatch.setattr(membership, "gradient_norms",
                        lambda model, seqs, **k: calls.append(("alone", len(seqs))) or alone(model, seqs, **k))
    with pytest.raises(KeyboardInterrupt):
        mia(**kw, out=tmp_path / "cut")
    assert sorted(p.name for p in (tmp_path / "cut" / "partial").iterdir()) == ["target-000000000.parquet"]
    calls.clear()
    monkeypatch.setattr(membership, "score_and_gradient_norms",
                        lambda model, seqs, **k: calls.append(("joint", len(seqs))) or joint(model, seqs, **k))
    resumed = mia(**kw, out=tmp_path / "cut", resume=True)
    assert calls == [("joint", 4), ("joint", 4), ("alone", 4)]  # 12 samples; chunk 0's target pass was saved
    pd.testing.assert_frame_equal(resumed.samples, whole.samples, rtol=1e-5)
