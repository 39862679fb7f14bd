"""Every Hugging Face detail the engine relies on, in one place: the KV cache (as plain per-layer tensors that
can be cropped, selected and joined across batches), the keyword a forward takes it under, a forward that keeps
only the logits it needs (`logits_to_keep`), and a model's dimensions. A transformers change lands here only.
"""
from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [batch, heads, seq, head_dim]


# --- KV caches as plain tensors, so rows of several batches can be cropped, selected and joined ---------------

def kv_from_cache(cache) -> KV | None:
    """Per-layer (keys, values) of a transformers cache, or None for a cache we cannot slice safely."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None  # sliding-window or recurrent layers: not a plain [b, h, seq, d] history
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return [(k, v) for k, v in cache]
    return None


def cache_from_kv(kv: KV):
    """A DynamicCache holding `kv` (a model continues from it as if it had just read those tokens)."""
    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(kv))
    return DynamicCache(ddp_cache_data=kv)


def select_kv(kv: KV, rows: torch.Tensor | Sequence[int], length: int) -> KV:
    """Rows `rows` and the first `length` positions of every layer (copies, so the source can be freed)."""
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=kv[0][0].device)
    return [(k.index_select(0, rows_t)[:, :, :length].contiguous(),
             v.index_select(0, rows_t)[:, :, :length].contiguous()) for k, v in kv]


def crop_kv(kv: KV, length: int) -> KV:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


def concat_kv(parts: Sequence[KV]) -> KV:
    if len(parts) == 1:
        return list(parts[0])
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def repeat_kv(kv: KV, n: int) -> KV:
    """Each row repeated n times in place (row r becomes rows r*n .. r*n+n-1)."""
    return [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in kv]


# --- forward helpers ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cache_arg(model_cls: type) -> str:
    """The keyword under which `model_cls.forward` takes a KV cache: `cache` (transformers >= 5.24, where
    `past_key_values` is deprecated) or `past_key_values` (older versions and remote-code models)."""
    try:
        params = inspect.signature(model_cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned: `out.cache` (transformers >= 5.24; `out.past_key_values` there is a
    deprecated alias that warns) or `out.past_key_values`."""
    if "cache" in getattr(type(out), "__dataclass_fields__", ()):
        return out.cache
    return out.past_key_values


def forward(model, input_ids: torch.Tensor, cache, last_only: bool = True):
    """One incremental forward; returns (logits [b, k or 1, V], the updated cache)."""
    kwargs = {"input_ids": input_ids, cache_arg(type(model)): cache, "use_cache": True}
    if last_only:
        try:
            out = model(**kwargs, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = model(**kwargs)
    else:
        out = model(**kwargs)
    return out.logits, output_cache(out)


def forward_from(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor, use_cache: bool, first: int):
    """The model's forward with logits for input positions >= `first` only (all positions if the model does not
    take `logits_to_keep`, sliced afterwards)."""
    if first == 0:
        return model(input_ids=inputs, attention_mask=mask, use_cache=use_cache)
    try:
        out = model(input_ids=inputs, attention_mask=mask, use_cache=use_cache, logits_to_keep=inputs.shape[1] - first)
    except TypeError:  # no logits_to_keep
        out = model(input_ids=inputs, attention_mask=mask, use_cache=use_cache)
    if out.logits.shape[1] != inputs.shape[1] - first:
        out.logits = out.logits[:, first:]
    return out


def dimensions(model: torch.nn.Module) -> tuple[int, int, int]:
    """(vocabulary, width, layers) from the model's config, with GPT-2-small-like defaults for names it lacks:
    what the memory estimates of batch sizes need."""
    cfg = model.config
    vocab = int(getattr(cfg, "vocab_size", 50000))
    width = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 1024)))
    layers = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 12)))
    return vocab, width, layers
