"""Load local Hugging Face causal-LM directories safely; pick device and dtype; tiny configs for experiments."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig
from transformers.utils import logging as hf_logging

from . import checks
from .devices import resolve_device, resolve_dtype
from .errors import MemauditError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def max_length(self) -> int:
        """The longest sequence the model accepts (its context window)."""
        return checks.context_length(self.model.config.to_dict()) or 1 << 30


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise MemauditError(f"no usable tokenizer in {path}: {str(exc).splitlines()[0][:200]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def tokenizers_match(a, b) -> bool:
    """Same vocabulary (token -> id) and the same BOS and EOS ids: then token sequences mean the same, and
    per-token figures of two models compare token by token."""
    return (a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id
            and a.eos_token_id == b.eos_token_id)


def load_model(path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
               allow_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    """Load a local causal-LM directory written by `save_pretrained`, safetensors only unless allowed."""
    hf_logging.disable_progress_bar()  # our own progress bars only
    path = Path(path)
    checks.model_dir(path, allow_pickle=allow_pickle)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise MemauditError(f"cannot read the model config in {path}: {str(exc).splitlines()[0][:200]}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise MemauditError(f"model in {path} is an encoder-decoder, not a causal language model")
    has_safetensors = any(path.glob("*.safetensors"))
    try:
        with _quiet_transformers():  # its load report is ours to turn into one line (below)
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dt, use_safetensors=has_safetensors, trust_remote_code=trust_remote_code,
                output_loading_info=True)
    except ValueError as exc:
        msg = str(exc).splitlines()[0][:200]
        if "ignore_mismatched_sizes" in msg:
            raise MemauditError(f"the weights in {path} do not match its config.json (tensor shapes differ)") from None
        if "Unrecognized configuration" in msg or "AutoModelForCausalLM" in msg:
            raise MemauditError(f"model in {path} is not a causal language model ({msg})") from None
        raise MemauditError(f"corrupt or unreadable weights in {path}: {msg}") from None
    except Exception as exc:
        raise MemauditError(f"corrupt or unreadable weights in {path}: {str(exc).splitlines()[0][:200]}") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:  # randomly initialised weights would measure nothing the model learned
        what = "; ".join(f"{k.split('_')[0]}: {', '.join(map(str, sorted(v, key=str)[:3]))}"
                         + (f" and {len(v) - 3} more" if len(v) > 3 else "") for k, v in bad.items())
        raise MemauditError(f"the weights in {path} do not match its config.json ({what})")
    model.to(dev).eval()
    tok = load_tokenizer(path, trust_remote_code)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise MemauditError(f"the tokenizer in {path} has {len(tok)} tokens but the model's embedding only {vocab}: "
                            "they do not belong together")
    return LoadedModel(model=model, tokenizer=tok, path=path, device=dev, dtype=dt)


@contextmanager
def _quiet_transformers():
    """transformers' own warnings while loading (its key-mismatch table, config notes) are turned into memaudit's
    one-line errors or are not the user's concern."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the weight files (name + bytes), so a run records exactly which model it measured."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# Tiny configs for tests, the demo and experiments: (layers, width, heads).
TINY_CONFIGS = {"tiny": (2, 128, 4), "small": (4, 256, 4)}


def build_config(name: str, vocab_size: int, max_length: int, family: str = "gpt2",
                 bos_token_id: int | None = None, eos_token_id: int | None = None):
    """A from-scratch GPT-2 or Llama config of a named size (`tiny`, `small`) or `LxW` (layers x width)."""
    if name in TINY_CONFIGS:
        layers, width, heads = TINY_CONFIGS[name]
    else:
        try:
            layers_s, width_s = name.lower().split("x")
            layers, width = int(layers_s), int(width_s)
        except ValueError:
            raise MemauditError(f"unknown model config {name!r}: use tiny, small, LxW (e.g. 2x64) or a model directory") from None
        if layers < 1 or width < 1:
            raise MemauditError(f"--config {name}: layers and width must be >= 1")
        heads = max(1, width // 32)
        while width % heads:  # the heads must divide the width
            heads -= 1
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_embd=width, n_layer=layers,
                          n_head=heads, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_length, hidden_size=width,
                           intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                           tie_word_embeddings=True)
    raise MemauditError(f"unknown model family {family!r}: use gpt2 or llama")


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
