"""memaudit on every architecture transformers ships that the matrix covers (tests/architectures.py: tiny random
models, local tokenizers): greedy extraction equals HF `generate`, loss scores equal a plain per-sample forward;
architectures whose cache memaudit cannot drive are refused up front with one line; one first-token convention
(BOS, else EOS) in training and every probe; ids beyond the tokenizer decoded as placeholders and counted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).parent))
import architectures as A  # noqa: E402

from memaudit import backend, extract, load_model, mia, tokenize, write_documents  # noqa: E402
from memaudit.data import decode, decode_rows, out_of_vocab_text  # noqa: E402
from memaudit.extraction import DecodingSettings, extract_windows  # noqa: E402
from memaudit.models import first_token  # noqa: E402
from memaudit.samples import Windows  # noqa: E402

P, S, N = 6, 8, 9  # prompt and continuation tokens (past the sliding windows of 6), windows per model
# --no-shortcut (plain greedy decoding from the prompt) on one architecture of each cache kind (backend.cache_kind)
PLAIN = ("gpt2", "mistral_sliding", "mamba")

# Tokenizer variants on a few architectures; every architecture with memaudit's own (BOS = EOS) tokenizer.
CASES = [(arch, "bos") for arch in A.ARCHITECTURES] + [("gpt2", "eos"), ("llama", "distinct"),
                                                        ("gpt_neox", "none"), ("mamba", "eos")]


def _case_id(case) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread computes them fastest (more only wait on each other), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(arch, tokenizer kind, extra vocabulary) -> the model directory, built once."""
    root, built = tmp_path_factory.mktemp("arch"), {}

    def get(arch: str, kind: str = "bos", extra_vocab: int = 0) -> Path:
        key = (arch, kind, extra_vocab)
        if key not in built:
            built[key] = A.build(arch, root / f"{arch}-{kind}-{extra_vocab}", kind, extra_vocab=extra_vocab)
        return built[key]

    return get


def _hf_greedy(model, prompts: np.ndarray, first: int | None, n_new: int) -> np.ndarray:
    """Plain transformers: `generate`, greedy, with an EOS that cannot stop it."""
    ids = torch.as_tensor(prompts, dtype=torch.long)
    if first is not None:
        ids = torch.cat([torch.full((len(ids), 1), first), ids], dim=1)
    cfg = T.GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=[], bos_token_id=None,
                             pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[:, ids.shape[1]:].numpy()


def _windows(loaded, first: int | None) -> tuple[Windows, np.ndarray, np.ndarray]:
    """N windows of distinct prompts: a third continue with the model's own greedy tokens (exact), a third with
    them edited at one position (diverge late, at `edit`), a third with the true text (diverge early). Returns
    the windows, the greedy continuation of every prompt (HF generate) and the edit positions."""
    docs = [d for d in tokenize(loaded.tokenizer, A.corpus()) if len(d) >= P + S][:N]
    prompts = np.array([d[:P] for d in docs])
    greedy = _hf_greedy(loaded.model, prompts, first, S)
    suffix, third = greedy.copy(), N // 3
    edit = 1 + (np.arange(third) * 3) % (S - 1)
    rows = np.arange(third, 2 * third)
    suffix[rows, edit] = (greedy[rows, edit] + 1) % len(loaded.tokenizer)
    suffix[2 * third:] = np.array([d[P:P + S] for d in docs[2 * third:]])
    return Windows([f"w{i}" for i in range(N)], np.concatenate([prompts, suffix], 1), P, S, 0, 0), greedy, edit


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_greedy_extraction_equals_generate(models, case):
    arch, kind = case
    loaded = load_model(models(arch, kind), device="cpu", dtype="float32")
    first = first_token(loaded.tokenizer)
    windows, greedy, edit = _windows(loaded, first)
    third = N // 3
    for shortcut in (True, False) if arch in PLAIN else (True,):
        res = extract_windows(loaded, windows, DecodingSettings(batch_size=5, shortcut=shortcut))
        got = np.stack(res.samples["generated_ids"].to_numpy())
        assert (got == greedy).all(), (arch, kind, shortcut, np.argwhere(got != greedy)[:5])
        assert res.samples["exact"].tolist()[:third] == [True] * third
        assert res.samples["match_prefix"].tolist()[third:2 * third] == edit.tolist()
        assert res.summary["bos"] == (first is not None) and res.summary["n_out_of_vocab_tokens"] == 0


@pytest.mark.parametrize("arch", ["mamba", "bamba"])
def test_state_space_extraction_equals_generate_in_bfloat16(models, arch):
    """In bf16 a state-space model's teacher-forced scan and its step-by-step decoding round differently, so a
    shortcut verified by teacher forcing would report tokens `generate` never emits: such models decode every
    window from its prompt, as `generate` does."""
    loaded = load_model(models(arch), device="cpu", dtype="bfloat16")
    first = first_token(loaded.tokenizer)
    docs = np.array([d[:40] for d in tokenize(loaded.tokenizer, A.corpus(n=30, words=40, seed=5)) if len(d) >= 40])
    windows = Windows([f"d{i}" for i in range(len(docs))], docs, 16, 24, 0, 0)
    got = extract_windows(loaded, windows, DecodingSettings(batch_size=8)).samples["generated_ids"]
    assert (np.stack(got.to_numpy()) == _hf_greedy(loaded.model, docs[:, :16], first, 24)).all()


def _plain_loss(model, tokens: list[int], first: int | None) -> float:
    """Minus the mean NLL of every token after `first` (all but the first token without one), one sample alone."""
    ids = ([first] if first is not None else []) + list(tokens)
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    return float(lsm[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-docs")
    docs = A.corpus(n=10, words=12, seed=3)
    return (write_documents(root / "members.jsonl", docs[:5], [f"m{i}" for i in range(5)]),
            write_documents(root / "nonmembers.jsonl", docs[5:], [f"n{i}" for i in range(5)]), docs)


@pytest.mark.parametrize("case", CASES + [(arch, "bos") for arch in A.UNDECODABLE], ids=_case_id)
def test_loss_scores_equal_plain_forward(models, documents, case):
    """Batched, right-padded scoring (batches of 3 documents of different lengths) against one plain forward per
    document: recurrent models score too (a forward without a cache), including those whose cache is refused."""
    arch, kind = case
    members, nonmembers, docs = documents
    path = models(arch, kind)
    res = mia(model_dir=path, members=members, nonmembers=nonmembers, attacks="loss", bootstrap=0, batch_size=3,
              device="cpu", dtype="float32", write=False)
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    first = first_token(tok)
    tokens = tokenize(tok, docs)
    assert len({len(t) for t in tokens}) > 1  # padding is exercised
    want = [_plain_loss(model, t, first) for t in tokens]
    np.testing.assert_allclose(res.samples["score_loss"].to_numpy(), want, rtol=0, atol=1e-5)


def _plain_gradnorm(model, tokens: list[int], first: int | None) -> float:
    """The L2 norm over every parameter (tied ones once) of one sample's mean-NLL gradient: its own backward."""
    ids = torch.tensor([([first] if first is not None else []) + list(tokens)])
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0].double()
    torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()
    grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads.values())))


@pytest.mark.parametrize("arch", list(A.ARCHITECTURES) + list(A.UNDECODABLE))
def test_gradnorm_equals_a_plain_backward_per_sample(models, documents, arch):
    """gradnorm's per-sample norms, batched (padded batches of 3) where the model allows it and one backward per
    sample where it does not (a warning says which), against each sample's own backward."""
    members, nonmembers, docs = documents
    path = models(arch)
    res = mia(model_dir=path, members=members, nonmembers=nonmembers, attacks="gradnorm", bootstrap=0,
              batch_size=3, device="cpu", dtype="float32", write=False)
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    want = [_plain_gradnorm(model, t, first_token(tok)) for t in tokenize(tok, docs)]
    np.testing.assert_allclose(-res.samples["score_gradnorm"].to_numpy(), want, rtol=1e-4)


# --- architectures whose cache memaudit cannot drive: refused up front -------------------------------------------

@pytest.mark.parametrize("arch,kind", [("rwkv", None), ("recurrent_gemma", None), ("gpt2", "kv"),
                                       ("mistral_sliding", "window"), ("gemma2", "window"), ("mamba", "recurrent")])
def test_cache_kind_says_what_the_engine_may_do(models, arch, kind):
    model = T.AutoModelForCausalLM.from_pretrained(models(arch)).eval()
    if kind is None:
        with pytest.raises(Exception, match=type(model).__name__):
            backend.cache_kind(model)
    else:
        assert backend.cache_kind(model) == kind


@pytest.mark.parametrize("arch", list(A.UNDECODABLE))
def test_extract_refuses_a_cache_it_cannot_drive(models, documents, run_cli, tmp_path, arch):
    r = run_cli("extract", models(arch), "--data", documents[0], "--prefix", "4", "--suffix", "4", "--device", "cpu",
                "--out", tmp_path / "run")
    name = {"rwkv": "RwkvForCausalLM", "recurrent_gemma": "RecurrentGemmaForCausalLM"}[arch]
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and name in r.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory is claimed


def test_forward_reads_several_tokens_into_a_recurrent_cache(models):
    """A state-space cache is extended by several tokens at once as `generate` would one by one."""
    model = T.AutoModelForCausalLM.from_pretrained(models("mamba")).eval()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 30, 11]])
    with torch.no_grad():
        full = model(ids).logits
        first, cache = backend.forward(model, ids[:, :3], None, last_only=False)
        rest, cache = backend.forward(model, ids[:, 3:], cache, last_only=False)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-4, atol=1e-4)
    assert backend.cache_length(cache) == 8


# --- ids beyond the tokenizer's vocabulary ----------------------------------------------------------------------

def test_decode_shows_ids_beyond_the_tokenizer():
    tok = A.tokenizer("bos")
    V = len(tok)
    a, b = tokenize(tok, ["the model"])[0], tokenize(tok, [" reads"])[0]
    assert decode(tok, a + [V + 3] + b) == decode(tok, a) + out_of_vocab_text(V + 3) + decode(tok, b)
    assert out_of_vocab_text(V + 3) == f"\u27e8id {V + 3}\u27e9"
    assert decode_rows(tok, [a + b, [V]]) == [tok.decode(a + b), out_of_vocab_text(V)]
    assert decode_rows(tok, [a, b]) == tok.batch_decode([a, b])  # unchanged without such ids


def test_extract_counts_and_shows_generated_ids_beyond_the_tokenizer(models, tmp_path):
    """A model whose embedding is larger than its tokenizer (as Pythia's), its extra output rows made to win the
    argmax where some in-vocabulary tokens would: the continuation holds ids no tokenizer can decode."""
    path = models("gpt_neox", "bos", extra_vocab=16)
    model = T.AutoModelForCausalLM.from_pretrained(path)
    V = len(A.tokenizer("bos"))
    with torch.no_grad():
        out = model.get_output_embeddings().weight
        out[V:V + 16] = 3 * out[:16 * 16:16]  # ids 0, 16, 32, ... lose to V, V + 1, ... where their logit > 0
    model.save_pretrained(path)
    data = write_documents(tmp_path / "docs.jsonl", A.corpus(n=16))
    res = extract(model_dir=path, data=data, prefix=P, suffix=S, device="cpu", write=False)
    ids = np.stack(res.samples["generated_ids"].to_numpy())
    n_oov = int((ids >= V).sum())
    assert n_oov > 0 and res.summary["n_out_of_vocab_tokens"] == n_oov
    tok = load_model(path, device="cpu").tokenizer
    for row, text in zip(ids, res.samples["generated"]):
        assert text == decode_rows(tok, [row.tolist()])[0]
        assert text.count("\u27e8id ") == int((row >= V).sum())
        assert all(out_of_vocab_text(i) in text for i in row if i >= V)


# --- one first-token convention: BOS, else EOS, in training and in every probe -----------------------------------

@pytest.fixture(scope="module")
def eos_trained(tmp_path_factory, documents):
    """A model memaudit trained with an EOS-only tokenizer: its rows start with EOS."""
    from memaudit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("eos-trained")
    A.tokenizer("eos").save_pretrained(root / "tok")
    train(TrainConfig(data=str(documents[0]), out=str(root / "model"), config="1x32", epochs=1, seq_len=32,
                      val_fraction=0.0, tokenizer=str(root / "tok"), device="cpu"))
    return root / "model"


def test_trainer_and_probes_start_with_the_same_token(eos_trained, documents, tmp_path, capsys):
    tok = A.tokenizer("eos")
    meta = json.loads((eos_trained / "train_config.json").read_text())
    assert tok.bos_token_id is None and meta["first_token"] == {"kind": "eos", "id": tok.eos_token_id,
                                                               "token": "<|endoftext|>"}
    members, nonmembers, _ = documents
    capsys.readouterr()
    ex = extract(model_dir=eos_trained, data=members, prefix=4, suffix=4, device="cpu", out=tmp_path / "ex")
    mi = mia(model_dir=eos_trained, members=members, nonmembers=nonmembers, attacks="loss", bootstrap=0,
             device="cpu", out=tmp_path / "mia")
    assert ex.summary["bos"] and mi.summary["bos"]["prepended"]
    for run in (tmp_path / "ex", tmp_path / "mia"):
        assert json.loads((run / "config.json").read_text())["first_token"] == meta["first_token"]
    assert "warning" not in capsys.readouterr().err
    # a probe that starts otherwise is told so, once
    for _ in range(2):
        extract(model_dir=eos_trained, data=members, prefix=4, suffix=4, device="cpu", bos=False, write=False)
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "EOS" in err and "trained by memaudit" in err


def test_no_warning_for_models_memaudit_did_not_train(models, documents, capsys):
    capsys.readouterr()
    extract(model_dir=models("gpt2"), data=documents[0], prefix=4, suffix=4, device="cpu", bos=False, write=False)
    assert "warning" not in capsys.readouterr().err


def test_trainer_refuses_a_tokenizer_without_bos_or_eos(models, documents, run_cli, tmp_path):
    """Rows start with BOS, else EOS: with neither, `train` says so in one line before the output is made (it
    failed with a traceback inside the row builder)."""
    none = models("llama", "none")
    for args in (["--config", none], ["--tokenizer", none, "--config", "1x32"]):
        r = run_cli("train", "--data", documents[0], *args, "--seq-len", "16", "--epochs", "1", "--device", "cpu",
                    "--out", tmp_path / "model")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither a BOS nor an EOS" in r.stderr, r.stderr
        assert not (tmp_path / "model").exists()
