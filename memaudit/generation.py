"""Batched continuation with a KV cache: greedy, sampling and beam search.

All rows of a batch have the same length (extraction windows are fixed-length), so there is no padding and
positions follow from the cache length. Greedy and sampling are our own short loops (HF `generate` spends
more time per step on bookkeeping than a tiny model spends computing); beam search uses HF `generate`.

A decoding loop can start from a KV cache that the scoring pass already computed (`backend.kv_from_cache`,
`backend.cache_from_kv`): the extraction shortcut crops it to the context before the divergence point.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig

from .backend import KV, cache_from_kv, concat_kv, forward, kv_from_cache

@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor | None, n_new: int, *, past=None, forced: torch.Tensor | None = None,
           n_forced: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy continuation: `n_new` tokens per row, [b, n_new].

    `input_ids` [b, k] are tokens the model has not read yet; `past` (a cache) holds everything before them.
    `forced` [b, n_new] with `n_forced` [b]: output t of row r is `forced[r, t]` while t < n_forced[r] (tokens
    already known to be the greedy choice), the model's argmax afterwards. Steps where every row is forced
    need no forward: their tokens are fed together with the next step's.
    """
    device = next(model.parameters()).device
    b = (input_ids if input_ids is not None else forced).shape[0]
    out = torch.empty((b, n_new), dtype=torch.long, device=device)
    pending = input_ids.to(device) if input_ids is not None else None
    if forced is not None:
        forced, n_forced = forced.to(device), n_forced.to(device)
    cache = past
    for t in range(n_new):
        need_model = forced is None or bool((n_forced <= t).any())
        if need_model:
            if pending is None:
                raise ValueError("greedy: nothing to read before the first unforced step")
            logits, cache = forward(model, pending, cache)
            nxt = logits[:, -1].argmax(-1)
            pending = None
            if forced is not None:
                nxt = torch.where(n_forced > t, forced[:, t], nxt)
        else:
            nxt = forced[:, t]
        out[:, t] = nxt
        col = nxt[:, None]
        pending = col if pending is None else torch.cat([pending, col], dim=1)
    return out


@torch.inference_mode()
def greedy_join(model, joins: Sequence[tuple[int, KV, torch.Tensor]], n_new: int) -> list[torch.Tensor]:
    """Greedy decoding where rows enter the batch at different steps, each with its own cached context.

    `joins[i] = (t, kv, tok)`: k rows whose output at step t is `tok` [k] (already known) and whose cache `kv`
    holds exactly the context before it (cache length = base + t, the same base for every entry). Rows decode
    together from the step they join on, so no row reads a token it already has in its cache, and a step runs
    only the rows that need it. Returns per entry a [k, n_new] tensor: column t is `tok`, later columns the
    greedy tokens; earlier columns are left 0 (the caller knows them).
    """
    device = next(model.parameters()).device
    outs = [torch.zeros((len(tok), n_new), dtype=torch.long, device=device) for _, _, tok in joins]
    for o, (t, _, tok) in zip(outs, joins):
        o[:, t] = tok.to(device)
    order = sorted(range(len(joins)), key=lambda i: joins[i][0])
    if not order:
        return outs
    kv: KV | None = None
    cache = None
    tok_run = None
    members: list[tuple[int, int]] = []  # (entry, rows) in batch order
    nxt_join = 0
    for t in range(joins[order[0]][0], n_new - 1):
        entering = []
        while nxt_join < len(order) and joins[order[nxt_join]][0] == t:
            entering.append(order[nxt_join])
            nxt_join += 1
        if entering:
            if cache is not None:
                kv = kv_from_cache(cache)
            parts = ([kv] if kv is not None else []) + [joins[i][1] for i in entering]
            kv = concat_kv(parts)
            cache = cache_from_kv(kv)
            toks = ([tok_run] if tok_run is not None else []) + [joins[i][2].to(device) for i in entering]
            tok_run = torch.cat(toks)
            members += [(i, len(joins[i][2])) for i in entering]
        if tok_run is None:
            continue
        logits, cache = forward(model, tok_run[:, None], cache)
        tok_run = logits[:, -1].argmax(-1)
        r = 0
        for i, k in members:
            outs[i][:, t + 1] = tok_run[r:r + k]
            r += k
    return outs


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the sampling distribution: temperature, then top-k, then top-p (nucleus), as HF
    applies them; removed tokens get -inf. top-p keeps the smallest set of most likely tokens whose mass >= top_p."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(sorted_x, dim=-1)
        mass_before = p.cumsum(-1) - p
        drop_sorted = mass_before >= top_p  # the top token always has mass_before 0 and is kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.log_softmax(x, dim=-1)


@torch.inference_mode()
def sample(model, input_ids: torch.Tensor, n_new: int, uniforms: torch.Tensor, *, past=None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampled continuation [b, n_new]. Token t of row r is drawn by inverse CDF from `uniforms[r, t]` in [0, 1),
    so a row's tokens depend only on its own random numbers, never on which rows share its batch."""
    device = next(model.parameters()).device
    b = input_ids.shape[0]
    out = torch.empty((b, n_new), dtype=torch.long, device=device)
    pending, cache = input_ids.to(device), past
    u = uniforms.to(device=device, dtype=torch.float64)
    for t in range(n_new):
        logits, cache = forward(model, pending, cache)
        probs = process_logits(logits[:, -1], temperature, top_k, top_p).exp().double()
        cdf = probs.cumsum(-1)
        nxt = torch.searchsorted(cdf, (u[:, t] * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
        nxt = nxt.clamp_max(probs.shape[-1] - 1)
        out[:, t] = nxt
        pending = nxt[:, None]
    return out


@torch.inference_mode()
def sequence_logprob(model, input_ids: torch.Tensor, targets: torch.Tensor, *, past=None, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """ln P(the sampler emits exactly `targets` [b, S]) after reading `input_ids`: one teacher-forced forward over
    the targets, summing the processed (temperature / top-k / top-p) log-probabilities. [b], float64."""
    device = next(model.parameters()).device
    feed = torch.cat([input_ids.to(device), targets[:, :-1].to(device)], dim=1)
    logits, _ = forward(model, feed, past, last_only=False)
    logits = logits[:, -targets.shape[1]:]
    lp = process_logits(logits, temperature, top_k, top_p)
    return lp.gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1).double().sum(-1)


@torch.inference_mode()
def beam_search(model, input_ids: torch.Tensor, n_new: int, num_beams: int, pad_id: int) -> torch.Tensor:
    """The highest-scoring beam of exactly `n_new` tokens per row (HF `generate`, EOS suppressed until then)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    cfg = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, num_beams=num_beams, do_sample=False,
                           early_stopping=True, length_penalty=1.0, pad_token_id=pad_id,
                           eos_token_id=getattr(model.generation_config, "eos_token_id", None))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[:, ids.shape[1]:]
