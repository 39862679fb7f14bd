"""Every Hugging Face detail the engine relies on, in one place: the KV cache (as plain per-layer tensors that
can be cropped, selected and joined across batches), the keyword a forward takes it under, a forward that keeps
only the logits it needs (`logits_to_keep`), and a model's dimensions. A transformers change lands here only.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Sequence

import torch
from transformers import DynamicCache

from .errors import MemauditError

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
    """Rows `rows` and the first `length` positions of every layer (copies, so the source can be freed). Layers
    may sit on different devices (a model placed by --device-map): each layer's rows are indexed on its own."""
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    on: dict[torch.device, torch.Tensor] = {}

    def here(t: torch.Tensor) -> torch.Tensor:
        if t.device not in on:
            on[t.device] = rows_t.to(t.device)
        return on[t.device]

    return [(k.index_select(0, here(k))[:, :, :length].contiguous(),
             v.index_select(0, here(v))[:, :, :length].contiguous()) for k, v in kv]


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
    return getattr(out, "past_key_values", None)  # None: a model that returns no cache (RWKV's `state`)


def forward(model, input_ids: torch.Tensor, cache, last_only: bool = True):
    """One incremental forward; returns (logits [b, k or 1, V], the updated cache).

    As `generate` does: the positions of the new tokens are passed when the model takes `position_ids` (some
    hybrids, Bamba's for one, would otherwise count from 0 after a cache), and a cache with recurrent layers
    (state-space models: Mamba, hybrids) reads several tokens one at a time (their multi-token path starts
    from an empty state)."""
    if cache is not None and input_ids.shape[1] > 1 and is_recurrent(cache):
        logits = []
        for t in range(input_ids.shape[1]):
            step, cache = forward(model, input_ids[:, t:t + 1], cache, last_only)
            logits.append(step)
        return (logits[-1] if last_only else torch.cat(logits, dim=1)), cache
    start = cache_length(cache)
    kwargs = {"input_ids": input_ids, cache_arg(type(model)): cache, "use_cache": True}
    if takes_position_ids(type(model)):
        b, k = input_ids.shape
        kwargs["position_ids"] = torch.arange(start, start + k, device=input_ids.device).expand(b, k)
    if last_only:
        try:
            out = model(**kwargs, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = model(**kwargs)
    else:
        out = model(**kwargs)
    new = output_cache(out)
    _note_length(new, start + input_ids.shape[1])
    return out.logits, new


@functools.lru_cache(maxsize=None)
def takes_position_ids(model_cls: type) -> bool:
    try:
        return "position_ids" in inspect.signature(model_cls.forward).parameters
    except (TypeError, ValueError):
        return False


def is_recurrent(cache) -> bool:
    """Whether a cache holds recurrent (state-space, linear-attention) layers, alone or beside attention in one
    layer: a state, not a token history."""
    holders = [cache, *(getattr(cache, "layers", None) or ())]
    return any(hasattr(h, a) for h in holders for a in ("recurrent_states", "conv_states", "ssm_states"))


def cache_length(cache) -> int:
    """Tokens a cache has read: its attention layers' length, or (a cache of recurrent layers only, which keep no
    length) the count `forward` noted on it."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (AttributeError, ValueError, TypeError):
        pass
    noted = getattr(cache, "_memaudit_length", None)
    if noted is not None:
        return int(noted)
    kv = kv_from_cache(cache)
    return int(kv[0][0].shape[2]) if kv else 0


def _note_length(cache, length: int) -> None:
    try:
        cache._memaudit_length = length
    except (AttributeError, TypeError):  # tuples (legacy caches) keep their length in their tensors
        pass


# --- which decoding engine a model's cache allows -----------------------------------------------------------

CACHE_KINDS = ("kv", "window", "recurrent")


def cache_kind(model: torch.nn.Module) -> str:
    """How memaudit's loops can use the model's cache, from a one-token forward (remembered per model):
    `kv`: plain per-layer keys and values, which the engine crops, selects and joins across batches;
    `window`: a cache the model itself extends (sliding-window layers), read anew for each decoding batch;
    `recurrent`: state-space or hybrid layers, fed one token per step as `generate` does.
    A model whose forward takes no cache or returns none (RWKV's `state`, RecurrentGemma's internal state) is
    refused: one MemauditError line naming its architecture."""
    known = _KINDS.get(model)
    if known is not None:
        return known
    name = type(model).__name__
    params = _forward_params(type(model))
    if params is not None and not {"cache", "past_key_values"} & params:
        raise MemauditError(f"{name} takes no cache that memaudit can drive (its forward has no `cache` or "
                            "`past_key_values`): decoding with it is not supported; scoring (mia, memorization) is")
    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = output_cache(out)
    if cache is None:
        raise MemauditError(f"{name} returns no cache that memaudit can drive (it keeps its state inside the "
                            "model): decoding with it is not supported; scoring (mia, memorization) is")
    kind = "recurrent" if is_recurrent(cache) else "kv" if kv_from_cache(cache) is not None else "window"
    _KINDS[model] = kind
    return kind


_KINDS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def _forward_params(model_cls: type) -> set[str] | None:
    try:
        return set(inspect.signature(model_cls.forward).parameters)
    except (TypeError, ValueError):
        return None


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


def forward_after(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor, kv: KV):
    """The model's forward on `inputs` [b, T] (right-padded, `mask`) continuing from `kv`: the cache of one row of
    tokens read before every row (a shared prefix). The cache is expanded, not copied, and left unchanged."""
    b, past = inputs.shape[0], kv[0][0].shape[2]
    cache = cache_from_kv([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
    full = torch.cat([mask.new_ones(b, past), mask], dim=1)
    return model(input_ids=inputs, attention_mask=full, use_cache=True, **{cache_arg(type(model)): cache})


def dimensions(model: torch.nn.Module) -> tuple[int, int, int]:
    """(vocabulary, width, layers) from the model's config, with GPT-2-small-like defaults for names it lacks:
    what the memory estimates of batch sizes need."""
    cfg = model.config
    vocab = int(getattr(cfg, "vocab_size", 50000))
    width = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 1024)))
    layers = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 12)))
    return vocab, width, layers
