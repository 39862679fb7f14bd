"""Memorization sinks on every architecture of the matrix (tests/architectures.py: tiny random models, nothing
downloaded). The MLP that memaudit finds by structure is the one named here per architecture; the hook masks that
MLP's hidden activation neuron by neuron; after a few training steps the release (sinks removed) loads with plain
`AutoModelForCausalLM.from_pretrained` and gives the logits of the trained model with its sinks dropped.
Mixture-of-experts and MLP-less (Mamba) models are refused with one line before any training step."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).parent))
import architectures as A  # noqa: E402

from memaudit.errors import MemauditError  # noqa: E402
from memaudit.training.sinks import (SinkHooks, check_architecture, dropped_mask, locate_mlps,  # noqa: E402
                                     release_from_model, sequence_id, sink_mask, sink_spec)

_GATED = ("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", False)
# arch -> (the list of layers, the projections into the MLP hidden layer, the one reading it, fused gate/up),
# written from each architecture's modeling code: what the structural search must find, name for name.
EXPECTED = {
    "gpt2": ("transformer.h", ("mlp.c_fc",), "mlp.c_proj", False),  # Conv1D
    "gpt_neox": ("gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", False),
    "llama": _GATED, "mistral": _GATED, "mistral_sliding": _GATED, "qwen2": _GATED, "qwen3": _GATED,
    "gemma": _GATED, "gemma2": _GATED, "gemma3": _GATED, "olmo2": _GATED, "stablelm": _GATED,
    "phi": ("model.layers", ("mlp.fc1",), "mlp.fc2", False),
    "phi3": ("model.layers", ("mlp.gate_up_proj",), "mlp.down_proj", True),
    "gptj": ("transformer.h", ("mlp.fc_in",), "mlp.fc_out", False),
    "gpt_neo": ("transformer.h", ("mlp.c_fc",), "mlp.c_proj", False),
    "opt": ("model.decoder.layers", ("fc1",), "fc2", False),  # the MLP sits in the decoder layer itself
    "bloom": ("transformer.h", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", False),
    "falcon": ("transformer.h", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", False),
    "bamba": ("model.layers", ("feed_forward.gate_proj", "feed_forward.up_proj"), "feed_forward.down_proj", False),
}
ZEROED = {"bloom"}  # its MLP width is 4 x hidden, not a config field: the release keeps it, sinks' weights zero
REFUSED = {"mixtral": "mixture-of-experts", "jamba": "mixture-of-experts", "mamba": "no MLP hidden layer",
           "mamba2": "no MLP hidden layer", "falcon_mamba": "no MLP hidden layer",
           "lfm2": "no MLP hidden layer"}  # LFM2's gated MLP sits beside convolutions the search does not pass


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(A.config(arch, A.tokenizer("bos")))
    with torch.no_grad():  # non-trivial biases, so a bias left on a removed neuron shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _layer0_hidden(model, down: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The input of layer 0's down projection (registered after SinkHooks: it sees the masked input)."""
    seen = []
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0].reshape(ids.shape[0], ids.shape[1], -1)  # OPT runs its MLP on [B * T, I]


def _per_neuron_params(model, layers: str, ups, down: str, fused: bool) -> int:
    """Parameters one hidden neuron owns in one layer: its rows of every up projection (both halves of a fused
    one), with bias, and its column of the down projection."""
    def dims(m):
        return tuple(m.weight.shape) if isinstance(m, T.pytorch_utils.Conv1D) else tuple(m.weight.shape[::-1])
    n = 0
    for name in ups:
        up = model.get_submodule(f"{layers}.0.{name}")
        n += (dims(up)[0] + (up.bias is not None)) * (2 if fused else 1)
    return n + dims(model.get_submodule(f"{layers}.0.{down}"))[1]


def test_every_matrix_architecture_is_covered_here():
    assert set(A.ARCHITECTURES) == set(EXPECTED) | set(REFUSED)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_sinks_train_and_release_on(arch, tmp_path):
    layers, ups, down, fused = EXPECTED[arch]
    model = _model(arch)
    n_layers = model.config.get_text_config().num_hidden_layers
    found = locate_mlps(model)
    assert [(m.ups, m.fused, m.down) for m in found] == [
        ([f"{layers}.{i}.{u}" for u in ups], [fused] * len(ups), f"{layers}.{i}.{down}") for i in range(n_layers)]
    spec = sink_spec(model, 0.3, 0.3)
    hooks = SinkHooks(model, spec)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))

    # the hook multiplies layer 0's hidden activation by each row's mask, and by the dropped mask in release mode
    d0 = model.get_submodule(f"{layers}.0.{down}")
    full = _layer0_hidden(model, d0, ids)
    hooks.set_rows([7, 8])
    rows = torch.stack([sink_mask(spec, 7), sink_mask(spec, 8)])[:, None]
    assert torch.allclose(_layer0_hidden(model, d0, ids), full * rows, atol=1e-6)
    hooks.set_dropped()
    assert torch.allclose(_layer0_hidden(model, d0, ids), full * dropped_mask(spec), atol=1e-6)

    # a few training steps, each position masked by its own document's sinks (packed rows)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(3):
        hooks.set_tokens(torch.tensor([[sequence_id([step, d]) for d in (1, 1, 1, 1, 2, 2, 2, 2, 2)]] * 2))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    hooks.set_dropped()
    with torch.no_grad():
        dropped = model(input_ids=ids).logits
    hooks.set_all_on()
    with torch.no_grad():
        everything = model(input_ids=ids).logits

    release_from_model(model, A.tokenizer("bos"), spec, tmp_path / "release")
    released = T.AutoModelForCausalLM.from_pretrained(tmp_path / "release").eval()  # an ordinary model
    assert type(released) is type(model)
    with torch.no_grad():
        logits = released(input_ids=ids).logits
    assert torch.allclose(logits, dropped, atol=1e-5)
    assert not torch.allclose(logits, everything, atol=1e-3)  # the sinks mattered

    per_neuron = _per_neuron_params(model, layers, ups, down, fused)
    n_full, n_released = (sum(p.numel() for p in m.parameters()) for m in (model, released))
    if arch in ZEROED:  # same shapes; every weight a sink neuron owns is zero
        assert n_released == n_full
        for i in range(n_layers):
            w = released.get_submodule(f"{layers}.{i}.{down}").weight
            assert (w[:, spec.n_general:] == 0).all() and (w[:, :spec.n_general] != 0).any()
            for u in ups:
                up = released.get_submodule(f"{layers}.{i}.{u}")
                assert (up.weight[spec.n_general:] == 0).all() and (up.bias[spec.n_general:] == 0).all()
    else:  # the sinks' rows and columns are gone, and the config says the narrower width
        assert n_full - n_released == n_layers * spec.n_sinks * per_neuron
        # both sides through JSON, so a value JSON spells otherwise (Bamba's infinite time-step limit) compares equal
        before = json.loads(model.config.to_json_string())
        saved = json.loads((tmp_path / "release" / "config.json").read_text())
        changed = {k: (before.get(k), v) for k, v in saved.items()
                   if before.get(k) != v and k not in ("architectures", "dtype", "transformers_version")}
        assert [new for _, new in changed.values()] == [spec.n_general]
        assert list(changed.values())[0][0] in (spec.intermediate, None)  # GPT-2's n_inner: None is 4 x hidden


def _qwen2_moe() -> torch.nn.Module:
    """Routed experts beside a dense shared expert: sinks on the shared one alone would leave the experts open."""
    cfg = T.Qwen2MoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=48,
                           num_experts=4, num_experts_per_tok=2, vocab_size=300)
    return T.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("arch", [*REFUSED, "qwen2_moe"])
def test_refused_architectures(arch):
    model = _qwen2_moe() if arch == "qwen2_moe" else _model(arch)
    with pytest.raises(MemauditError, match=REFUSED.get(arch, "mixture-of-experts")) as exc:
        sink_spec(model, 0.3, 0.3)
    assert "\n" not in str(exc.value)


def test_experts_found_by_structure_on_toy_modules():
    from memaudit.training.sinks import experts_module

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    legacy = torch.nn.ModuleList([torch.nn.ModuleDict({"experts": torch.nn.ModuleList([mlp(), mlp()])})])
    assert experts_module(legacy) == "0.experts"  # a list of MLPs inside a layer
    assert experts_module(torch.nn.ModuleList([mlp(), mlp()])) is None  # layers, not experts
    stacked = torch.nn.Module()  # experts stored as [E, out, in] weights that chain: 8 -> 16 -> 8
    stacked.register_parameter("up", torch.nn.Parameter(torch.zeros(4, 16, 8)))
    stacked.register_parameter("down", torch.nn.Parameter(torch.zeros(4, 8, 16)))
    assert experts_module(torch.nn.ModuleDict({"moe": stacked})) == "moe"
    scales = torch.nn.Module()  # 3-D, but no chain of expert weights
    scales.register_parameter("per_head", torch.nn.Parameter(torch.zeros(4, 1, 1)))
    assert experts_module(torch.nn.ModuleDict({"attn": scales, "conv": torch.nn.Conv1d(4, 4, 3)})) is None


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    from memaudit.data import write_documents

    return write_documents(tmp_path_factory.mktemp("sink_docs") / "d.jsonl", A.corpus(n=16, words=12))


def test_mixture_of_experts_refused_before_anything_loads(corpus_file, tmp_path, run_cli):
    model_dir = A.build("mixtral", tmp_path / "mixtral")
    (model_dir / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(MemauditError, match="mixture-of-experts"):
        check_architecture(model_dir)  # from config.json alone: no weights needed
    (tmp_path / "weights").rename(model_dir / "model.safetensors")
    r = run_cli("train", "--config", model_dir, "--data", corpus_file, "--out", tmp_path / "m", "--objective",
                "sinks", "--seq-len", "32", "--device", "cpu")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: sinks:")
    assert not (tmp_path / "m").exists()


def test_mlp_less_model_refused_before_training(corpus_file, tmp_path, run_cli):
    model_dir = A.build("mamba", tmp_path / "mamba")
    r = run_cli("train", "--config", model_dir, "--data", corpus_file, "--out", tmp_path / "m", "--objective",
                "sinks", "--seq-len", "32", "--device", "cpu")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "no MLP hidden layer" in err[0]
    assert not (tmp_path / "m").exists()  # found once the model is built, still before the output is claimed


@pytest.mark.parametrize("arch", ["phi3", "bloom"])  # a fused gate/up projection; a width no config field holds
def test_trainer_release_loads_and_equals_the_dropped_model(arch, corpus_file, tmp_path):
    from memaudit.training.sinks import read_sink_spec
    from memaudit.training.trainer import TrainConfig, train

    model_dir = A.build(arch, tmp_path / arch)
    out = tmp_path / "sinks"
    train(TrainConfig(data=str(corpus_file), out=str(out), config=str(model_dir), objective="sinks", seq_len=32,
                      batch_size=4, epochs=1, lr=3e-3, warmup_steps=1, device="cpu"))
    trained = T.AutoModelForCausalLM.from_pretrained(out).eval()
    SinkHooks(trained, read_sink_spec(out)).set_dropped()
    released = T.AutoModelForCausalLM.from_pretrained(out / "release").eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(released(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
