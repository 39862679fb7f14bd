"""Training objectives as label transforms: each returns the labels a batch is trained on
(-100 = position excluded from the loss). The loss is always the mean over kept positions.

Positions: a row is BOS + document tokens; position j >= 1 holds the target predicted from positions < j
(the trainer shifts inside the loss). Position 0 (BOS) is never a target. On packed rows (several documents in a
row) the deterministic masks are taken from each document's own BOS + tokens + EOS (packing.py).

Goldfish masks (METHODS.md section 4, Hans et al. 2024), drop rate 1/k:
- `hash` (default): target j is dropped iff H(ids[j-h:j]) / 2^64 < 1/k, where H is an order-sensitive 64-bit
  hash of the h token ids PRECEDING the target (BOS included when it is among them). Targets with fewer than
  h predecessors in the row (j < h) are never dropped, as in the official code. So the same passage gets the
  same mask in any document and any epoch, once it is h tokens in.
- `hash-official`: the goldfish repository's "hash-table" strategy, reimplemented from its description: the key
  is the product (int64, wrapping) of the h target ids ENDING at the target (order-invariant; 0 if any id is
  0), looked up modulo 1,000,003 in a table of uniform numbers drawn by torch's CPU generator seeded
  2971215073; dropped iff the table value < 1/k. The first h-1 targets are never dropped.
- `static`: every k-th target (targets 1-indexed k, 2k, ...; i.e. positions j with j % k == 0).
- `random`: each target dropped with probability 1/k, redrawn every step (a generator seeded by (seed, step),
  so a resumed or data-parallel run draws the same mask).
"""
from __future__ import annotations

import torch

IGNORE = -100
GOLDFISH_MODES = ("hash", "static", "random", "hash-official")

_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores (same bits)."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)
_GOLDEN = _s64(0x9E3779B97F4A7C15)
_POLY = _s64(0x100000001B3)  # the FNV-64 prime, as the polynomial base


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping arithmetic = arithmetic mod 2^64)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def context_hash(ids: torch.Tensor, h: int) -> torch.Tensor:
    """int64 tensor [B, T]: at position j, the order-sensitive 64-bit hash of ids[j-h:j] (junk where j < h).

    H = mix64(sum_i mix64(id_{j-h+i}) * P^(h-1-i) mod 2^64), i = 0..h-1 (a polynomial hash of mixed ids).
    """
    ids = ids.long()
    acc = torch.zeros_like(ids)
    mixed = mix64(ids)
    for i in range(h):  # window member i sits h - i positions before the target
        shifted = torch.zeros_like(ids)
        lag = h - i
        if lag < ids.shape[1]:
            shifted[:, lag:] = mixed[:, :-lag]
        acc = acc * _POLY + shifted
    return mix64(acc)


def hash_drop(ids: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """Bool [B, T]: target j dropped iff hash(ids[j-h:j]) / 2^64 < 1/k, never for j < h."""
    top53 = _shr(context_hash(ids, h), 11)  # floor(H / 2^11) in [0, 2^53)
    drop = top53 * k < (1 << 53)  # <=> floor(H / 2^11) / 2^53 < 1/k
    drop[:, :h] = False
    return drop


_OFFICIAL_TABLE_SIZE = 1_000_003
_OFFICIAL_SEED = 2971215073
_official_table: torch.Tensor | None = None


def _official_hash_table() -> torch.Tensor:
    global _official_table
    if _official_table is None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_OFFICIAL_SEED)
        _official_table = torch.rand(_OFFICIAL_TABLE_SIZE, generator=gen)
    return _official_table


def official_hash_drop(ids: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """Bool [B, T]: the goldfish repository's hash-table mask (see the module docstring)."""
    ids = ids.long()
    drop = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    targets = ids[:, 1:]  # the official code masks the shifted targets
    if targets.shape[1] < h:
        return drop
    key = targets.unfold(1, h, 1).prod(dim=-1)  # int64, wraps like the official code
    values = _official_hash_table().to(ids.device)[torch.remainder(key, _OFFICIAL_TABLE_SIZE)]
    drop[:, h:] = values < 1.0 / k  # window of targets j-h+1..j -> position j >= h
    return drop


def static_drop(ids: torch.Tensor, k: int) -> torch.Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device)
    drop = (positions % k == 0) & (positions > 0)
    return drop.unsqueeze(0).expand(ids.shape[0], -1).clone()


def random_drop(ids: torch.Tensor, k: int, seed: int, step: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 1_000_003 + step)
    return (torch.rand(ids.shape, generator=gen) < 1.0 / k).to(ids.device)


def goldfish_eligible(width: int, mode: str, h: int) -> torch.Tensor:
    """Bool [width]: the target positions a goldfish mask CAN drop (position 0, BOS, is never a target).

    `hash` needs h predecessors (j >= h), `hash-official` a full window of h targets (j >= h); `static` and
    `random` can drop any target. Among eligible targets the drop rate is ~1/k; over all targets it is lower
    for the hash modes, since a document's first h - 1 targets are always kept.
    """
    if mode not in GOLDFISH_MODES:
        raise ValueError(f"unknown goldfish mode {mode!r}")
    positions = torch.arange(width)
    first = h if mode in ("hash", "hash-official") else 1
    return positions >= first


def goldfish_drop_mask(ids: torch.Tensor, mode: str, k: int, h: int, seed: int = 0, step: int = 0) -> torch.Tensor:
    """Bool [B, T]: which target positions the goldfish loss excludes (position 0 never a target)."""
    if mode == "hash":
        drop = hash_drop(ids, k, h)
    elif mode == "hash-official":
        drop = official_hash_drop(ids, k, h)
    elif mode == "static":
        drop = static_drop(ids, k)
    elif mode == "random":
        drop = random_drop(ids, k, seed, step)
    else:
        raise ValueError(f"unknown goldfish mode {mode!r}")
    drop[:, 0] = False
    return drop


def standard_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Next-token labels: every real token is a target; padding is ignored."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE)


def goldfish_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int = 0, *, mode: str = "hash",
                    k: int = 4, h: int = 13, seed: int = 0) -> torch.Tensor:
    """Standard labels with the goldfish-dropped targets set to IGNORE."""
    drop = goldfish_drop_mask(input_ids, mode, k, h, seed, step)
    return standard_labels(input_ids, attention_mask).masked_fill(drop, IGNORE)


OBJECTIVES = ("standard", "goldfish", "sinks")
