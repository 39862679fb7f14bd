"""Load local Hugging Face causal-LM directories safely; pick device and dtype; tiny configs for experiments."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GPT2Config,
                          LlamaConfig)
from transformers.utils import logging as hf_logging

from . import checks, distributed
from .devices import accelerate_limits, check_placement, parse_max_memory, resolve_device, resolve_dtype
from .errors import MemauditError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    device: torch.device  # with a device map: the main device, where inputs go
    dtype: torch.dtype
    placement: dict[str, str] | None = None  # --device-map: module -> device (cuda:N, cpu, disk) as accelerate put it

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
               allow_pickle: bool = False, trust_remote_code: bool = False, device_map: str | None = None,
               max_memory: str | None = None, quantize: str | None = None) -> LoadedModel:
    """Load a local causal-LM directory written by `save_pretrained`, safetensors only unless allowed.

    `device_map` (auto, balanced, cpu-offload) places it through accelerate across GPUs, CPU memory and disk
    within `max_memory`; `quantize` (8bit, 4bit) loads it through bitsandbytes. None: the whole model on
    `device`, as before these existed."""
    hf_logging.disable_progress_bar()  # our own progress bars only
    path = Path(path)
    checks.model_dir(path, allow_pickle=allow_pickle)
    check_placement(device_map, max_memory, quantize, device)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise MemauditError(f"cannot read the model config in {path}: {str(exc).splitlines()[0][:200]}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise MemauditError(f"model in {path} is an encoder-decoder, not a causal language model")
    place = _placement(device_map, max_memory, quantize, dev, dt)
    folder = place.get("offload_folder")  # accelerate's disk offload: memaudit's own folder, never the model's
    try:
        model, info = _from_pretrained(path, dt, trust_remote_code, place)
    except MemauditError:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if folder:  # removed with the model, or when the process ends
        weakref.finalize(model, shutil.rmtree, folder, True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:  # randomly initialised weights would measure nothing the model learned
        what = "; ".join(f"{k.split('_')[0]}: {', '.join(map(str, sorted(v, key=str)[:3]))}"
                         + (f" and {len(v) - 3} more" if len(v) > 3 else "") for k, v in bad.items())
        raise MemauditError(f"the weights in {path} do not match its config.json ({what})")
    if not place:
        model.to(dev)
    model.eval()
    placed = _check_placed(model, max_memory) if place else None
    tok = load_tokenizer(path, trust_remote_code)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise MemauditError(f"the tokenizer in {path} has {len(tok)} tokens but the model's embedding only {vocab}: "
                            "they do not belong together")
    return LoadedModel(model=model, tokenizer=tok, path=path, device=dev, dtype=dt, placement=placed)


def _placement(device_map: str | None, max_memory: str | None, quantize: str | None, dev: torch.device,
               dt: torch.dtype) -> dict[str, Any]:
    """from_pretrained's placement keywords: none for today's whole model on `dev`; accelerate's device map
    (cpu-offload: accelerate's `auto` limited to `dev` and CPU memory), its memory limits and an offload folder
    memaudit creates (removed with the model); bitsandbytes' quantization config."""
    place: dict[str, Any] = {}
    if device_map is not None:
        place["device_map"] = "balanced" if device_map == "balanced" else "auto"
        limits = accelerate_limits(device_map, parse_max_memory(max_memory), dev)
        if limits is not None:
            place["max_memory"] = limits
        place["offload_folder"] = tempfile.mkdtemp(prefix="memaudit-offload-")
    if quantize is not None:
        place.setdefault("device_map", {"": dev})  # bitsandbytes quantizes as it places the weights
        place["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quantize == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dt))
        # LLM.int8 multiplies in float16 by design; bitsandbytes logs so on every layer's every call
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return place


def _from_pretrained(path: Path, dt: torch.dtype, trust_remote_code: bool, place: dict[str, Any]):
    """The model and transformers' load report, its errors turned into one MemauditError line."""
    has_safetensors = any(path.glob("*.safetensors"))
    try:
        with _quiet_transformers(), _quiet_placers():  # its load report is ours to turn into one line (below)
            return AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dt, use_safetensors=has_safetensors, trust_remote_code=trust_remote_code,
                output_loading_info=True, **place)
    except ValueError as exc:
        msg = str(exc).splitlines()[0][:200]
        if "ignore_mismatched_sizes" in msg:
            raise MemauditError(f"the weights in {path} do not match its config.json (tensor shapes differ)") from None
        if "Unrecognized configuration" in msg or "AutoModelForCausalLM" in msg:
            raise MemauditError(f"model in {path} is not a causal language model ({msg})") from None
        if "dispatched on the CPU or the disk" in msg:
            raise MemauditError("the quantized model does not fit the devices' memory (--max-memory), and "
                                "bitsandbytes cannot offload quantized weights to CPU memory or disk") from None
        raise MemauditError(f"corrupt or unreadable weights in {path}: {msg}") from None
    except Exception as exc:
        raise MemauditError(f"corrupt or unreadable weights in {path}: {str(exc).splitlines()[0][:200]}") from None


def _check_placed(model: torch.nn.Module, max_memory: str | None) -> dict[str, str]:
    """accelerate's placement, module -> device (cpu, disk, cuda:N), after checking that the engine can feed the
    model: its inputs go to the device of its first weight, which a limit too small for the input embedding and
    one layer leaves offloaded (on the meta device), where no tensor can be made."""
    placed = {name: (f"cuda:{d}" if isinstance(d, int) else str(d))
              for name, d in (getattr(model, "hf_device_map", None) or {}).items()}
    if next(model.parameters()).device.type == "meta":
        blocks = [m for m in model.modules() if type(m).__name__ in (getattr(model, "_no_split_modules", None) or ())]
        need = _bytes(model.get_input_embeddings()) + max(map(_bytes, blocks), default=0)
        raise MemauditError(f"--max-memory {max_memory} leaves the first device no room for the model's input "
                            f"embedding and one layer (accelerate offloaded them): give it at least "
                            f"{need / 2**20:.1f} MiB")
    return placed


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextmanager
def _quiet_placers():
    """accelerate's note that offloaded weights sit on the meta device is what --device-map asked for
    (`LoadedModel.placement` says where each module went); bitsandbytes' note on import that an optional faster
    CPU kernel is not installed changes no number."""
    logs = [logging.getLogger(name) for name in ("accelerate", "bitsandbytes")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


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


# --- the first token: one convention for training and every probe ------------------------------------------------

def first_token(tokenizer) -> int | None:
    """The token every training row and every probed sample starts with: BOS, else EOS (a tokenizer without BOS
    ends documents with EOS, so a sequence after EOS reads as a document's start), else none (the first token is
    then context only)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def first_token_record(tokenizer, token_id: int | None) -> dict[str, Any]:
    """config.json's `first_token`: which special token (bos, eos, none) starts each sequence, its id and text."""
    kind = ("none" if token_id is None else "bos" if token_id == tokenizer.bos_token_id
            else "eos" if token_id == tokenizer.eos_token_id else "other")
    text = None if token_id is None else tokenizer.convert_ids_to_tokens(int(token_id))
    return {"kind": kind, "id": None if token_id is None else int(token_id), "token": text}


def record_first_token(run, tokenizer, token_id: int | None) -> None:
    """Add `first_token` to a run directory's config.json (outside `settings`, which --resume compares)."""
    run.config["first_token"] = first_token_record(tokenizer, token_id)
    run.write_json("config.json", run.config)


_WARNED: set[tuple] = set()


def check_trained_first_token(loaded: LoadedModel, token_id: int | None) -> None:
    """Warn once when memaudit trained this model (its train_config.json) with rows that start otherwise than the
    probe's samples (e.g. extract --no-bos): its first tokens are then read in a context it never trained in."""
    trained = _trained_first_token(loaded.path, loaded.tokenizer)
    if trained is False or trained == token_id or (key := (str(loaded.path), trained, token_id)) in _WARNED:
        return
    _WARNED.add(key)
    tok = loaded.tokenizer
    if distributed.is_main():
        print(f"warning: {loaded.path} was trained by memaudit with every row starting with {_said(tok, trained)}, "
              f"but this probe starts each sample with {_said(tok, token_id)}: the first tokens are read in a "
              "context the model never trained in (drop --no-bos/--bos to follow the training)", file=sys.stderr)


def _said(tokenizer, token_id: int | None) -> str:
    return "nothing" if token_id is None else f"{first_token_record(tokenizer, token_id)['kind'].upper()} ({token_id})"


def _trained_first_token(path: Path, tokenizer) -> int | None | bool:
    """The first token memaudit's trainer started rows with (recorded, or its convention for the tokenizer saved
    with the model); False when the model was not trained by memaudit."""
    if path is None:  # a model built in memory
        return False
    try:
        meta = json.loads((Path(path) / "train_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or not {"objective", "seq_len"} <= meta.keys():
        return False
    recorded = meta.get("first_token")
    if isinstance(recorded, dict) and "id" in recorded:
        return recorded["id"]
    return first_token(tokenizer)
