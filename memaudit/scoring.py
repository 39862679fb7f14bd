"""The one scoring engine: batched teacher-forced passes that keep a few numbers per token.

For every scored token t of a sample (token t predicted from the tokens before it) the pass keeps
  logprob  ln p(x_t | x_<t)                   (nats)
  hit      argmax_v p(v | x_<t) == x_t
  argmax   argmax_v p(v | x_<t)                (the greedy choice, for the extraction shortcut)
  mean_lp  sum_v p(v) ln p(v)                  (minus the entropy, Min-K%++'s mu)
  var_lp   sum_v p(v) (ln p(v))^2 - mean_lp^2  (Min-K%++'s sigma^2)
and drops the vocabulary-sized logits once the batch is done. Everything else derives from these arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import backend, distributed
from .errors import MemauditError

# Upper bound on elements of one [batch, positions, vocab] float32 temporary (256 MiB); longer
# batches are reduced in slices of positions so the stats never hold more than this at once.
_STATS_CHUNK_ELEMS = 64 * 1024 * 1024


@dataclass
class TokenStats:
    """Per-token numbers of one sample; index i scores the (i+1)-th token of the scored input."""
    logprob: np.ndarray  # float32 [n], nats
    hit: np.ndarray  # bool [n]
    argmax: np.ndarray  # int32 [n]
    mean_lp: np.ndarray  # float32 [n]
    var_lp: np.ndarray  # float32 [n]

    def __len__(self) -> int:
        return len(self.logprob)

    @property
    def nll_nats(self) -> float:
        return float(-self.logprob.sum())

    @property
    def bits(self) -> float:
        """Code length of the scored tokens in bits: -sum log2 p."""
        return float(-self.logprob.astype(np.float64).sum() / math.log(2))


@dataclass
class ScoredBatch:
    """One batch of the pass: which samples (positions in the input list), their stats, and optionally the
    model's KV cache over `inputs` (all tokens but each sample's last), so decoding can continue from it."""
    indices: list[int]
    stats: list[TokenStats]
    inputs: torch.Tensor  # [b, T] the token ids fed to the model (right-padded)
    lengths: list[int]  # valid input length per row
    cache: object | None = None


def token_stats_from_logits(logits: torch.Tensor, targets: torch.Tensor,
                            greedy_only: bool = False) -> dict[str, torch.Tensor]:
    """Reduce logits [b, T, V] and targets [b, T] to the per-token arrays, in float32, slice by slice.
    `greedy_only`: only `argmax` and `hit` (no softmax; the extraction shortcut needs nothing else)."""
    b, t, v = logits.shape
    if greedy_only:
        am = logits.argmax(-1)
        return {"argmax": am, "hit": am == targets}
    step = max(1, _STATS_CHUNK_ELEMS // max(1, b * v))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprob", "hit", "argmax", "mean_lp", "var_lp")}
    for s in range(0, t, step):
        lg = logits[:, s:s + step].float()
        tg = targets[:, s:s + step]
        lsm = torch.log_softmax(lg, dim=-1)
        p = lsm.exp()
        mean = (p * lsm).sum(-1)
        second = (p * lsm.square()).sum(-1)
        am = lg.argmax(-1)
        parts["logprob"].append(lsm.gather(-1, tg.unsqueeze(-1)).squeeze(-1))
        parts["argmax"].append(am)
        parts["hit"].append(am == tg)
        parts["mean_lp"].append(mean)
        parts["var_lp"].append((second - mean.square()).clamp_min(0.0))
        del lg, lsm, p
    return {k: torch.cat(v, dim=1) for k, v in parts.items()}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def auto_batch_size(model: torch.nn.Module, seq_len: int, n_samples: int | None = None,
                    memory_budget: int | None = None, cache_tokens: int = 0) -> int:
    """A starting batch size from a memory budget; the pass halves it on out-of-memory.

    Per sample and position the pass holds the logits and ~3 float32 vocabulary-sized temporaries, plus
    activations (~16 floats per layer and width); per sample and position of a shared cached prefix
    (`cache_tokens`), its keys and values copied into the row's cache and the attention over them (~4 floats per
    layer and width). Budget: 40% of free GPU memory, or 2 GiB on CPU, where larger batches no longer speed
    anything up.
    """
    vocab, width, layers = backend.dimensions(model)
    device = next(model.parameters()).device
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = int(free * 0.4)
        else:
            memory_budget = 2 << 30
    per_sample = seq_len * 4 * (4 * vocab + 16 * layers * width) + cache_tokens * 4 * 4 * layers * width
    bs = max(1, memory_budget // max(1, per_sample))
    bs = min(bs, 512 if device.type == "cuda" else 64)
    if n_samples:
        bs = min(bs, n_samples)
    return int(2 ** int(math.log2(bs))) if bs >= 1 else 1


def _prepare(seqs: Sequence[Sequence[int]], bos_id: int | None) -> list[list[int]]:
    out = []
    for s in seqs:
        s = list(s)
        if bos_id is not None:
            s = [bos_id] + s
        out.append(s)
    return out


def _check_lengths(seqs: Sequence[Sequence[int]], max_length: int | None, past: int = 0) -> None:
    """Refuse a sample with nothing to score, or longer (after `past` cached prefix positions) than the context."""
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise MemauditError(f"sample {i} has fewer than 2 tokens to score")
        if max_length is not None and past + len(s) - 1 > max_length:
            raise MemauditError(
                f"sample {i} needs {past + len(s) - 1} positions but the model's context is {max_length} tokens")


@dataclass
class _SharedPrefix:
    """A prefix every sequence is scored after. With `kv` (the model's cache of every prefix token but the last,
    one row) each row is the prefix's last token + the sequence and continues from the cache; with None (a model
    whose cache cannot be reused) each row is the whole prefix + the sequence. Either way the kept stats are the
    sequence's own tokens."""
    tokens: list[int]
    kv: backend.KV | None

    @classmethod
    def read(cls, model: torch.nn.Module, prefix: Sequence[int], device: torch.device, bos_id: int | None,
             other_options: bool) -> "_SharedPrefix":
        if bos_id is not None or other_options:
            raise MemauditError("prefix: put BOS in the prefix; keep_cache, max_positions and score_from do not apply")
        if len(prefix) < 1:
            raise MemauditError("prefix: give at least one token")
        kv = None
        if len(prefix) >= 2:
            ids = torch.tensor([list(prefix[:-1])], device=device)
            with torch.inference_mode():
                try:  # no logits are needed from the prefix
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                except TypeError:  # models without logits_to_keep
                    out = model(input_ids=ids, use_cache=True)
            kv = backend.kv_from_cache(backend.output_cache(out))
        return cls(tokens=list(prefix), kv=kv)

    @property
    def past(self) -> int:
        """Positions read from the cache before each row."""
        return len(self.tokens) - 1 if self.kv is not None else 0

    def rows(self, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
        head = self.tokens[-1:] if self.kv is not None else self.tokens
        return [head + list(s) for s in seqs]

    def own(self, st: TokenStats) -> TokenStats:
        """The stats of a row's sequence tokens (a cached row scores nothing else)."""
        if self.kv is not None:
            return st
        m = len(st) - (len(self.tokens) - 1)
        return TokenStats(logprob=st.logprob[-m:], hit=st.hit[-m:], argmax=st.argmax[-m:], mean_lp=st.mean_lp[-m:],
                          var_lp=st.var_lp[-m:])


def padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (each row but its last token), targets (each row but its first) and the attention mask, padded
    on the right to the longest row."""
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row) - 1
        inputs[r, :n] = torch.tensor(row[:-1])
        targets[r, :n] = torch.tensor(row[1:])
        mask[r, :n] = 1
    return inputs, targets, mask


def _per_sample(stats: dict[str, torch.Tensor], lengths: Sequence[int], width: int, first: int) -> list[TokenStats]:
    """The batch's statistics on the host, cut per sample; positions without logits (before `first`, or every
    float statistic of a greedy-only pass) are NaN, argmax -1 and hit False."""
    host = {k: v.cpu().numpy() for k, v in stats.items()}
    for k in ("logprob", "mean_lp", "var_lp"):
        if k not in host:  # greedy_only
            host[k] = np.full((len(lengths), width - first), np.nan, dtype=np.float32)
    if first:
        fill = {"logprob": np.nan, "mean_lp": np.nan, "var_lp": np.nan, "hit": False, "argmax": -1}
        host = {k: np.concatenate([np.full((len(lengths), first), fill[k], dtype=v.dtype), v], axis=1)
                for k, v in host.items()}
    return [TokenStats(logprob=host["logprob"][r, :n].astype(np.float32), hit=host["hit"][r, :n].astype(bool),
                       argmax=host["argmax"][r, :n].astype(np.int32),
                       mean_lp=host["mean_lp"][r, :n].astype(np.float32),
                       var_lp=host["var_lp"][r, :n].astype(np.float32)) for r, n in enumerate(lengths)]


def stats_per_sample(logits: torch.Tensor, targets: torch.Tensor, lengths: Sequence[int]) -> list[TokenStats]:
    """The per-token arrays of a batch's logits [b, T, V] against its targets [b, T], cut to each row's length
    (what the scoring pass keeps, for a caller that ran the forward itself)."""
    return _per_sample(token_stats_from_logits(logits, targets), lengths, logits.shape[1], 0)


def _forward(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor, keep_cache: bool, first: int,
             shared: _SharedPrefix | None):
    """One batch's forward: after the shared prefix's cache when there is one, else from the rows alone."""
    if shared is not None and shared.kv is not None:
        return backend.forward_after(model, inputs, mask, shared.kv)
    return backend.forward_from(model, inputs, mask, keep_cache, first)


def iter_scored_batches(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *,
                        batch_size: int | str = "auto", bos_id: int | None = None, keep_cache: bool = False,
                        pad_id: int = 0, skip: set[int] | None = None,
                        on_progress: Callable[[int], None] | None = None,
                        max_length: int | None = None, greedy_only: bool = False,
                        max_positions: int | Callable[[int], int] | None = None,
                        score_from: int = 0, prefix: Sequence[int] | None = None) -> Iterator[ScoredBatch]:
    """Score `sequences` in batches of similar length (longest first, so out-of-memory shows at once).

    `greedy_only=True` keeps only `hit` and `argmax` (logprob, mean_lp, var_lp are NaN): cheaper, for greedy
    extraction.
    `max_positions`: read only the first `max_positions` input positions of each sample (a staged pass that the
    caller continues from the cache); the stats then cover those positions only. A callable gets the batch's
    number of samples and returns it, so a caller can choose per batch.
    `score_from`: compute logits only from input position `score_from` on (the model's `logits_to_keep`, which
    skips the vocabulary projection of the context); earlier positions get argmax -1, hit False and NaN.

    With `bos_id`, BOS is prepended and every token of each sequence is scored; without it the first token
    is context only. `skip` holds sample indices already done (resume). Yields batches in processing order.
    `prefix`: every sequence is scored after these tokens (ReCaLL's shots; pass BOS in it, not as `bos_id`), and
    the stats cover the sequence's own tokens, its first predicted from the prefix's last. The prefix is read
    once: its KV cache is reused by every batch (a model whose cache cannot be reused reads prefix + sequence
    each time: the same numbers, slower).
    """
    device = next(model.parameters()).device
    other = keep_cache or max_positions is not None or score_from != 0
    shared = _SharedPrefix.read(model, prefix, device, bos_id, other) if prefix is not None else None
    seqs = _prepare(sequences, bos_id) if shared is None else shared.rows(sequences)
    past = shared.past if shared is not None else 0
    _check_lengths(seqs, max_length, past)
    order = sorted((i for i in range(len(seqs)) if not skip or i not in skip), key=lambda i: -len(seqs[i]))
    if not order:
        return
    longest = len(seqs[order[0]]) - 1
    bs = auto_batch_size(model, longest, len(order), cache_tokens=past) if batch_size == "auto" else int(batch_size)
    if bs < 1:
        raise MemauditError("--batch-size must be >= 1 or auto")
    if isinstance(max_positions, int) and max_positions < 1:
        raise MemauditError("max_positions must be >= 1")
    if score_from < 0:
        raise MemauditError("score_from must be >= 0")
    pos = 0
    while pos < len(order):
        idx = order[pos:pos + bs]
        rows = [seqs[i] for i in idx]
        if max_positions is not None:  # read max_positions inputs, so keep one more token (the last target)
            limit = max_positions(len(idx)) if callable(max_positions) else max_positions
            if limit < 1:
                raise MemauditError("max_positions must be >= 1")
            rows = [r[:limit + 1] for r in rows]
        inputs, targets, mask = padded(rows, pad_id)
        first = min(score_from, inputs.shape[1] - 1)  # at least one position gets logits
        try:
            with torch.inference_mode():
                out = _forward(model, inputs.to(device), mask.to(device), keep_cache, first, shared)
                stats = token_stats_from_logits(out.logits, targets[:, first:].to(device), greedy_only=greedy_only)
        except Exception as exc:
            if is_oom(exc) and bs > 1:
                bs //= 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if is_oom(exc):
                raise MemauditError("out of memory even at batch size 1: use a shorter window or a smaller dtype") from None
            raise
        per_sample = _per_sample(stats, [len(r) - 1 for r in rows], inputs.shape[1], first)
        if shared is not None:
            per_sample = [shared.own(st) for st in per_sample]
        yield ScoredBatch(indices=list(idx), stats=per_sample, inputs=inputs,
                          lengths=[len(r) - 1 for r in rows], cache=backend.output_cache(out) if keep_cache else None)
        del out
        pos += len(idx)
        if on_progress is not None:
            on_progress(len(idx))


def score(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, batch_size: int | str = "auto",
          bos_id: int | None = None, pad_id: int = 0, on_progress: Callable[[int], None] | None = None,
          max_length: int | None = None, prefix: Sequence[int] | None = None) -> list[TokenStats]:
    """TokenStats for every sequence, in input order (see `iter_scored_batches`, also for `prefix`)."""
    result: list[TokenStats | None] = [None] * len(sequences)
    for batch in iter_scored_batches(model, sequences, batch_size=batch_size, bos_id=bos_id, pad_id=pad_id,
                                     on_progress=on_progress, max_length=max_length, prefix=prefix):
        for i, st in zip(batch.indices, batch.stats):
            result[i] = st
    return result  # type: ignore[return-value]


def score_sharded(model: torch.nn.Module, sequences: Sequence[Sequence[int]], **kwargs) -> list[TokenStats] | None:
    """`score` under torchrun: each rank scores its shard (every world-th sequence), rank 0 gets all of them
    in input order and the other ranks get None. In a single process it is exactly `score`."""
    if distributed.world_size() == 1:
        return score(model, sequences, **kwargs)
    idx = distributed.shard_indices(len(sequences))
    local = score(model, [sequences[i] for i in idx], **kwargs) if idx else []
    return distributed.gather_sharded(local, idx, len(sequences))
