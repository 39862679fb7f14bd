"""Membership-inference attacks: a registry of name -> function(AttackInputs, ...) -> one score per sample.

Every score is oriented so that HIGHER means "more likely a member" (METHODS.md section 2). All attacks
but `gradnorm` are arithmetic on the scoring engine's per-token arrays (TokenStats): the target pass, plus
the reference model's pass for `reference` and a second, shots-conditioned pass for `recall`.
"""
from __future__ import annotations

import contextlib
import math
import weakref
import zlib as _zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import zstandard
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers.pytorch_utils import Conv1D

from .errors import MemauditError
from .scoring import TokenStats, auto_batch_size, is_oom, padded, stats_per_sample

DEFAULT_K = (10.0, 20.0, 30.0)  # percent; Min-K% default is 20 (Shi et al. 2023)
DCPDD_CAP = 0.01  # a in alpha_t = min(p * ln(1/f), a) (Zhang et al. 2024)
VAR_FLOOR = 1e-12  # Min-K%++: sigma_t^2 floored so a one-hot prediction (sigma = 0) gives a finite z


@dataclass
class AttackInputs:
    """Everything the attacks read, aligned by sample index."""
    stats: list[TokenStats]  # target model; stats[i].logprob[j] scores token scored_tokens[i][j]
    scored_tokens: list[np.ndarray]  # the token ids each TokenStats scores
    texts: list[str]  # the text of the scored sample (for the compression attacks)
    reference_stats: list[TokenStats] | None = None  # reference model, same tokens
    recall_stats: list[TokenStats | None] | None = None  # x's tokens after the non-member shots; None = a shot
    token_log_freq: np.ndarray | None = None  # ln f(v) for every vocabulary id (dc_pdd)
    gradnorms: np.ndarray | None = None  # L2 norm of d(mean NLL)/d(parameters) per sample


def _mean_lp(st: TokenStats) -> float:
    return float(np.mean(st.logprob, dtype=np.float64))


def _n_lowest(n: int, k: float) -> int:
    """How many of n tokens "the k% lowest" keeps: floor(n * k / 100), at least one."""
    return max(1, int(math.floor(n * k / 100.0 + 1e-9)))


def loss(inp: AttackInputs) -> np.ndarray:
    """mean_t l_t: minus the mean NLL."""
    return np.array([_mean_lp(s) for s in inp.stats])


def zlib(inp: AttackInputs) -> np.ndarray:
    """mean_t l_t / (8 * zlib-compressed bytes of the UTF-8 text) (Carlini et al. 2021; zlib's default level 6).
    mean l_t < 0, so dividing by the text's zlib entropy in bits keeps "higher = member"."""
    return np.array([_mean_lp(s) / (8 * len(_zlib.compress(t.encode("utf-8"))))
                     for s, t in zip(inp.stats, inp.texts)])


def zstd(inp: AttackInputs) -> np.ndarray:
    """As `zlib` with zstd (level 3, its default; the frame header counts) as the entropy estimate."""
    cctx = zstandard.ZstdCompressor(level=3)
    return np.array([_mean_lp(s) / (8 * len(cctx.compress(t.encode("utf-8"))))
                     for s, t in zip(inp.stats, inp.texts)])


def reference(inp: AttackInputs) -> np.ndarray:
    """mean_t l_t(target) - mean_t l_t(reference model)."""
    if inp.reference_stats is None:
        raise MemauditError("the reference attack needs --reference MODEL_DIR")
    return np.array([_mean_lp(s) - _mean_lp(r) for s, r in zip(inp.stats, inp.reference_stats)])


def min_k(inp: AttackInputs, k: float = 20.0) -> np.ndarray:
    """Min-K% (Shi et al. 2023): the mean of the k% lowest l_t."""
    out = []
    for s in inp.stats:
        lp = np.sort(s.logprob.astype(np.float64))
        out.append(float(lp[:_n_lowest(len(lp), k)].mean()))
    return np.array(out)


def min_k_pp(inp: AttackInputs, k: float = 20.0) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024): z_t = (l_t - mu_t) / sigma_t, the mean of the k% lowest z_t."""
    out = []
    for s in inp.stats:
        z = (s.logprob.astype(np.float64) - s.mean_lp) / np.sqrt(np.maximum(s.var_lp.astype(np.float64), VAR_FLOOR))
        z = np.sort(z)
        out.append(float(z[:_n_lowest(len(z), k)].mean()))
    return np.array(out)


def recall(inp: AttackInputs) -> np.ndarray:
    """ReCaLL (Xie et al. 2024): LL(x | non-member shots) / LL(x), LL = mean l_t over the same tokens.
    Members lose more likelihood when primed with non-members, so their ratio is higher. NaN for the
    non-member samples used as shots (the attacker used them, so they are not evaluated)."""
    if inp.recall_stats is None:
        raise MemauditError("the recall attack needs its conditioned pass")
    out = []
    for s, c in zip(inp.stats, inp.recall_stats):
        out.append(float("nan") if c is None else _mean_lp(c) / min(_mean_lp(s), -1e-12))
    return np.array(out)


def dc_pdd(inp: AttackInputs, cap: float = DCPDD_CAP) -> np.ndarray:
    """DC-PDD (Zhang et al. 2024): mean over first occurrences of min(p(x_t) * ln(1/f(x_t)), cap)."""
    if inp.token_log_freq is None:
        raise MemauditError("the dc_pdd attack needs token frequencies from a reference corpus")
    out = []
    for s, toks in zip(inp.stats, inp.scored_tokens):
        _, first = np.unique(toks, return_index=True)
        alpha = np.exp(s.logprob[first].astype(np.float64)) * -inp.token_log_freq[toks[first]]
        out.append(float(np.minimum(alpha, cap).mean()))
    return np.array(out)


def gradnorm(inp: AttackInputs) -> np.ndarray:
    """Minus the L2 norm of the gradient of the sample's mean NLL (members sit near a minimum)."""
    if inp.gradnorms is None:
        raise MemauditError("the gradnorm attack needs its backward pass")
    return -np.asarray(inp.gradnorms, dtype=np.float64)


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[..., np.ndarray]
    needs: tuple[str, ...] = ()  # extra passes: reference, recall, corpus, backward
    takes_k: bool = False  # one score column per k


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("loss", loss),
    Attack("zlib", zlib),
    Attack("zstd", zstd),
    Attack("reference", reference, needs=("reference",)),
    Attack("min_k", min_k, takes_k=True),
    Attack("min_k_pp", min_k_pp, takes_k=True),
    Attack("recall", recall, needs=("recall",)),
    Attack("dc_pdd", dc_pdd, needs=("corpus",)),
    Attack("gradnorm", gradnorm, needs=("backward",)),
)}


def parse_attacks(spec: str | Sequence[str]) -> tuple[list[str], bool]:
    """(names, is_all) from `all` or a comma list; unknown names are a user error."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise MemauditError("--attacks is empty: use all or a comma list of " + ", ".join(ATTACKS))
    if names == ["all"]:
        return list(ATTACKS), True
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise MemauditError(f"unknown attack(s) {', '.join(map(repr, unknown))}: use all or a comma list of "
                            + ", ".join(ATTACKS))
    return list(dict.fromkeys(names)), False


def parse_ks(spec: str | Sequence[float]) -> list[float]:
    try:
        ks = [float(k) for k in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise MemauditError(f"--k must be a comma list of percentages, not {spec!r}") from None
    if not ks or any(not 0 < k <= 100 for k in ks):
        raise MemauditError("--k needs percentages in (0, 100], e.g. 10,20,30")
    return list(dict.fromkeys(ks))


def column_name(attack: str, k: float | None = None) -> str:
    return attack if k is None else f"{attack}_{k:g}"


def run_attacks(names: Sequence[str], inp: AttackInputs, ks: Sequence[float] = DEFAULT_K) -> dict[str, np.ndarray]:
    """Score columns (column name -> one score per sample) for the named attacks."""
    cols: dict[str, np.ndarray] = {}
    for name in names:
        a = ATTACKS[name]
        if a.takes_k:
            for k in ks:
                cols[column_name(name, k)] = a.fn(inp, k=k)
        else:
            cols[name] = a.fn(inp)
    return cols


def token_log_frequencies(token_lists: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """ln f(v) with Laplace smoothing: f(v) = (count(v) + 1) / (N + V) over a reference corpus's tokens."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for toks in token_lists:
        np.add.at(counts, np.asarray(toks, dtype=np.int64), 1.0)
    return np.log((counts + 1.0) / (counts.sum() + vocab_size))


# --- gradient norms: per sample, a batch at once ------------------------------------------------------------------

GRADIENT_METHODS = ("auto", "batched", "loop")
_PROBE_TOKENS = 8  # the longer of choose_gradient_method's two rows
_PROBE_RTOL = {torch.float32: 1e-3, torch.float64: 1e-3}  # per parameter; 16-bit dtypes: 5e-2


class _Unsupported(Exception):
    """A layer the batched per-sample gradients cannot attribute to samples."""


def gradient_norms(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, bos_id: int | None,
                   on_progress: Callable[[int], None] | None = None, method: str = "auto",
                   batch_size: int | str = "auto", pad_id: int = 0) -> np.ndarray:
    """Per sample, the L2 norm over all trainable parameters of d(mean NLL of its scored tokens)/d(theta); scored
    tokens as in the scoring engine: every token after BOS, or all but the first without BOS.

    `batched`: a batch of samples at once (right-padded): one forward, one backward to every layer's output (no
    weight gradient is formed), then each sample's squared norm per parameter from the layer's inputs x_t and
    output gradients g_t: for a linear layer ||sum_t g_t x_t^T||^2 = sum_{t,s} (g_t . g_s)(x_t . x_s) (the "ghost
    norm"), or the sample's weight gradient itself where that is cheaper (long samples); an embedding table
    likewise, tied matrices with their cross terms; other layers' own parameters (norms, ...) get per-sample
    gradients from torch.func. `loop`: one forward and backward per sample. `auto`: `choose_gradient_method`.
    """
    if method not in GRADIENT_METHODS:
        raise MemauditError(f"gradient method must be one of {', '.join(GRADIENT_METHODS)}, not {method!r}")
    rows = [([bos_id] if bos_id is not None else []) + list(s) for s in sequences]
    if method == "auto":
        method, _ = choose_gradient_method(model, sequences, bos_id=bos_id, pad_id=pad_id)
    with _grad_mode(model):
        if method == "loop":
            params = _trainable(model)
            out = np.empty(len(rows))
            for i, row in enumerate(rows):
                out[i] = math.sqrt(sum(_loop_sq(model, params, row).values()))
                if on_progress is not None:
                    on_progress(1)
            return out
        return _batched_norms(model, rows, pad_id, batch_size, on_progress)


def score_and_gradient_norms(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, bos_id: int | None,
                             on_progress: Callable[[int], None] | None = None, batch_size: int | str = "auto",
                             pad_id: int = 0) -> tuple[list[TokenStats], np.ndarray]:
    """The scoring pass's TokenStats (as `scoring.score` with `bos_id`) and the `batched` gradient norms, from one
    forward per batch: a target pass that also needs gradnorm reads the model once. For a model where
    `choose_gradient_method` says "batched"."""
    rows = [([bos_id] if bos_id is not None else []) + list(s) for s in sequences]
    stats: list[TokenStats | None] = [None] * len(rows)
    with _grad_mode(model):
        norms = _batched_norms(model, rows, pad_id, batch_size, on_progress, stats)
    return stats, norms  # type: ignore[return-value]


def choose_gradient_method(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, bos_id: int | None,
                           pad_id: int = 0) -> tuple[str, str | None]:
    """("batched", None) when, in a batch of the starts of the two shortest `sequences` cut to different lengths,
    the shorter (padded) row's batched squared norm of every parameter equals its own backward's to 1e-3 (5e-2 in
    16-bit dtypes); else ("loop", why). The rows are short, so the check costs about one short backward. A single
    sample: ("loop", None), as there is nothing to batch."""
    rows = sorted((([bos_id] if bos_id is not None else []) + list(s) for s in sequences), key=len)
    if len(rows) < 2:
        return "loop", None
    first = rows[0][:_PROBE_TOKENS]
    probe = [first, rows[1][:max(2, len(first) // 2)]]
    rtol = _PROBE_RTOL.get(next(model.parameters()).dtype, 5e-2)
    with _grad_mode(model):
        try:
            fast, _ = _batch_sq(model, probe, pad_id)
        except Exception as exc:  # anything the batched way cannot do on this model, the loop can
            return "loop", f"{type(exc).__name__}: {exc}"
        slow = _loop_sq(model, _trainable(model), probe[1], copy_free=True)
    total = sum(slow.values())
    named = {id(p): n for n, p in model.named_parameters()}
    for pid in set(slow) | set(fast):
        got, want = float(fast[pid][1]) if pid in fast else 0.0, slow.get(pid, 0.0)
        if abs(got - want) > rtol * want + 1e-6 * total:
            return "loop", (f"the batched per-sample gradient of {named.get(pid, '?')} differs from one backward "
                            "per sample on this architecture")
    return "batched", None


@contextlib.contextmanager
def _grad_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) with gradients on; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]


def _loop_sq(model: torch.nn.Module, params: list[torch.nn.Parameter], row: Sequence[int],
             copy_free: bool = False) -> dict[int, float]:
    """One sample's squared gradient norm per parameter (by id) from its own forward and backward; `copy_free`
    squares in float64 without a float64 copy of each gradient (the loop itself keeps its own arithmetic)."""
    ids = torch.tensor([list(row)], device=next(model.parameters()).device)
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    grads = torch.autograd.grad(nll, params, allow_unused=True)
    if copy_free:
        return {id(p): float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
                for p, g in zip(params, grads) if g is not None}
    return {id(p): float(g.double().square().sum()) for p, g in zip(params, grads) if g is not None}


def _batched_norms(model: torch.nn.Module, rows: list[list[int]], pad_id: int, batch_size: int | str,
                   on_progress: Callable[[int], None] | None, stats: list | None = None) -> np.ndarray:
    """Per-sample norms in batches of similar length, longest first; the batch halves on out-of-memory. With
    `stats`, each row's TokenStats from the same forward are put in it."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = np.empty(len(rows))
    if not order:
        return out
    # Half the scoring pass's batch: the backward keeps each layer's output gradient beside its activations.
    bs = max(1, min(len(rows), auto_batch_size(model, len(rows[order[0]]) - 1) // 2)) if batch_size == "auto" \
        else int(batch_size)
    pos = 0
    while pos < len(order):
        idx = order[pos:pos + bs]
        try:
            sq, st = _batch_sq(model, [rows[i] for i in idx], pad_id, stats is not None)
        except Exception as exc:
            if is_oom(exc) and bs > 1:
                bs //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            raise
        out[idx] = np.sqrt(np.sum(list(sq.values()), axis=0)) if sq else 0.0
        for i, one in zip(idx, st or ()):
            stats[i] = one  # type: ignore[index]
        pos += len(idx)
        if on_progress is not None:
            on_progress(len(idx))
    return out


def _batch_sq(model: torch.nn.Module, rows: list[list[int]], pad_id: int,
              keep_stats: bool = False) -> tuple[dict[int, np.ndarray], list[TokenStats] | None]:
    """Each row's squared gradient norm per parameter (by id; float64 [rows]): one padded forward, one backward to
    the outputs of the layers that own trainable parameters, then the per-sample formulas of `_parts`. With
    `keep_stats`, also each row's TokenStats from that forward's logits."""
    device = next(model.parameters()).device
    inputs, targets, mask = (t.to(device) for t in padded(rows, pad_id))
    copy = _COPY_OUTPUTS.get(model, False)
    with _Taps(model, len(rows), copy) as taps:
        logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits.float()
    if taps.edited_in_place():  # the gradient would be the edited tensor's: once more, handing on copies
        if copy:
            raise _Unsupported("a layer's output is edited in place")
        _COPY_OUTPUTS[model] = True
        return _batch_sq(model, rows, pad_id, keep_stats)
    stats = None
    if keep_stats:
        with torch.no_grad():
            stats = stats_per_sample(logits.detach(), targets, [len(r) - 1 for r in rows])
    # Each row's mean NLL over its own tokens, summed: the gradient at row r's activations is its own loss's.
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
    loss = (nll.sum(1) / mask.sum(1)).sum()
    grads = torch.autograd.grad(loss, [c.out for c in taps.calls], allow_unused=True)
    del logits, nll, loss
    parts: dict[int, list] = {}
    with torch.no_grad():
        for call, g in zip(taps.calls, grads):
            if g is not None:
                for pid, part in _parts(call, g, len(rows), inputs.shape[1]):
                    parts.setdefault(pid, []).append(part)
        return {pid: _sq_norm(ps) for pid, ps in parts.items()}, stats


# Models that edit a layer's output in place after the layer returned it (Falcon adds the attention output to
# the MLP's): their layers hand on copies, so the gradient taken is that of the tensor the layer produced.
_COPY_OUTPUTS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


@dataclass
class _Call:
    """One call of a module that owns trainable parameters: its inputs and the output its gradient is taken for."""
    module: torch.nn.Module
    args: tuple
    kwargs: dict
    out: torch.Tensor
    version: int  # out._version when the module returned it


class _Taps:
    """Forward hooks on every module owning trainable parameters; each call is kept. An output of batch size 1 in
    a batch of `batch` rows (position embeddings, broadcast over rows) is handed on expanded to every row, so each
    row's share of its gradient stays apart. With `copy` every other output is handed on as a copy, for models
    that edit outputs in place (`edited_in_place`)."""

    def __init__(self, model: torch.nn.Module, batch: int, copy: bool = False):
        self.model, self.batch, self.copy = model, batch, copy
        self.calls: list[_Call] = []
        self.handles: list = []

    def __enter__(self) -> "_Taps":
        for m in self.model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def edited_in_place(self) -> bool:
        return any(c.out._version != c.version for c in self.calls)

    def _hook(self, module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            raise _Unsupported(f"{type(module).__name__} returns {type(output).__name__}, not one tensor")
        if not output.requires_grad:
            return None
        expand = self.batch > 1 and output.dim() > 0 and output.shape[0] == 1
        if expand:
            output = output.expand(self.batch, *output.shape[1:])
            args = tuple(a.expand(self.batch, *a.shape[1:]) if isinstance(a, torch.Tensor) and a.dim() > 0
                         and a.shape[0] == 1 else a for a in args)
        self.calls.append(_Call(module, args, kwargs, output, output._version))
        return output if expand else output.clone() if self.copy else None


@dataclass
class _Outer:
    """A per-sample gradient sum_t u_t v_t^T of a parameter viewed as [a, b]: u [B, N, a] (or, for an embedding
    table, ids [B, N] meaning one-hot rows of width a), v [B, N, b]."""
    u: torch.Tensor
    v: torch.Tensor
    a: int

    @property
    def one_hot(self) -> bool:
        return self.u.dim() == 2


@dataclass
class _Dense:
    """Per-sample gradients [B, *parameter shape]."""
    g: torch.Tensor


def _flat(t: torch.Tensor, batch: int, width: int, floats: bool = True) -> torch.Tensor:
    """[B, ..., d], or the rows' positions flattened first ([B * width, d], as OPT's MLP reads them), as [B, N, d];
    in float32 (at least) when `floats`. Anything else cannot be split by sample."""
    if t.dim() < 2 or t.shape[0] not in (batch, batch * width):
        raise _Unsupported(f"a layer input of shape {tuple(t.shape)} has no batch dimension first")
    t = t.reshape(batch, -1, t.shape[-1])
    return t if not floats or t.dtype == torch.float64 else t.float()


def _parts(call: _Call, g: torch.Tensor, batch: int, width: int) -> list[tuple[int, _Outer | _Dense]]:
    """The per-sample gradient of each trainable parameter `call.module` owns, from this call's input and output
    gradient (a batch of `batch` rows `width` positions wide): outer-product factors for linear layers and
    embedding tables, elementwise sums for layer norms, torch.func for anything else."""
    m, x = call.module, (call.args[0] if call.args else None)
    out: list[tuple[int, _Outer | _Dense]] = []
    kind = type(m)
    if kind in (torch.nn.Linear, Conv1D) and isinstance(x, torch.Tensor):
        xs, gs = _flat(x.detach(), batch, width), _flat(g, batch, width)
        if m.weight.requires_grad:  # Linear's weight is [out, in], Conv1D's [in, out]
            out.append((id(m.weight), _Outer(gs, xs, gs.shape[-1]) if kind is torch.nn.Linear
                        else _Outer(xs, gs, xs.shape[-1])))
        if m.bias is not None and m.bias.requires_grad:
            out.append((id(m.bias), _Dense(gs.sum(1))))
    elif kind is torch.nn.Embedding and m.max_norm is None and not m.scale_grad_by_freq \
            and isinstance(x, torch.Tensor) and m.weight.requires_grad:
        ids, gs = _flat(x.unsqueeze(-1), batch, width, floats=False)[..., 0], _flat(g, batch, width)
        if m.padding_idx is not None:  # the padding row gets no gradient
            gs = gs * (ids != m.padding_idx).unsqueeze(-1)
        out.append((id(m.weight), _Outer(ids, gs, m.num_embeddings)))
    elif kind is torch.nn.LayerNorm and isinstance(x, torch.Tensor) and len(m.normalized_shape) == 1 \
            and not call.kwargs and len(call.args) == 1:
        xs, gs = _flat(x.detach(), batch, width), _flat(g, batch, width)
        if m.weight is not None and m.weight.requires_grad:
            xhat = torch.nn.functional.layer_norm(xs, m.normalized_shape, eps=m.eps)
            out.append((id(m.weight), _Dense((gs * xhat).sum(1))))
        if m.bias is not None and m.bias.requires_grad:
            out.append((id(m.bias), _Dense(gs.sum(1))))
    else:
        out += _module_grads(call, g, batch)
    return out


def _module_grads(call: _Call, g: torch.Tensor, batch: int) -> list[tuple[int, _Dense]]:
    """Per-sample gradients of the module's own trainable parameters by torch.func: the module is re-run on each
    row of its inputs (those with the batch dimension first) under vmap, and its output contracted with the
    row's output gradient."""
    own = {n: p for n, p in call.module.named_parameters(recurse=False) if p.requires_grad}
    if g.dim() == 0 or g.shape[0] != batch:
        raise _Unsupported(f"{type(call.module).__name__}'s output has no batch dimension first")
    flat, spec = tree_flatten((call.args, call.kwargs))
    flat = [a.detach() if isinstance(a, torch.Tensor) else a for a in flat]
    rowed = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch for a in flat]

    def contracted(params: dict, g_row: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        it = iter(rows)
        args, kwargs = tree_unflatten([next(it).unsqueeze(0) if r else a for a, r in zip(flat, rowed)], spec)
        out = torch.func.functional_call(call.module, params, args, kwargs)
        return (out * g_row.unsqueeze(0)).sum()

    rows = [a for a, r in zip(flat, rowed) if r]
    grads = torch.func.vmap(torch.func.grad(contracted), in_dims=(None, 0) + (0,) * len(rows))(
        {n: p.detach() for n, p in own.items()}, g.detach(), *rows)
    return [(id(p), _Dense(grads[n])) for n, p in own.items()]


def _sq_norm(parts: list) -> np.ndarray:
    """Per sample, the squared norm of the sum of one parameter's gradient parts (float64 [B])."""
    if len(parts) == 1 and isinstance(parts[0], _Dense):
        return parts[0].g.flatten(1).double().square().sum(1).cpu().numpy()
    outers = [p for p in parts if isinstance(p, _Outer)]
    if len({(p.a, p.v.shape[-1]) for p in outers}) > 1:
        raise _Unsupported("one parameter used by layers that lay it out differently")
    if len(outers) == len(parts):
        n = sum(p.v.shape[1] for p in parts)
        a, b = parts[0].a, parts[0].v.shape[-1]
        if n * (a + b) <= a * b:  # the N x N Gram matrices cost less than the a x b gradient
            return _ghost_sq(parts)
    return _dense_sq(parts)


def _ghost_sq(parts: list[_Outer]) -> np.ndarray:
    """||sum_t u_t v_t^T||^2 = sum_{t,s} (u_t . u_s)(v_t . v_s) over every pair of parts (tied weights have cross
    terms), without forming the gradient. The Gram matrices in float32 (as a weight gradient is formed), their
    products summed in float64, as the terms may cancel."""
    total = 0
    for i, p in enumerate(parts):
        for j, q in enumerate(parts[i:], start=i):
            uu = _gram_u(p, q)
            vv = torch.bmm(p.v, q.v.transpose(1, 2))
            total = total + (1 if i == j else 2) * (uu.double() * vv.double()).sum((1, 2))
    return total.cpu().numpy()


def _gram_u(p: _Outer, q: _Outer) -> torch.Tensor:
    """u_p . u_q for every pair of positions [B, Np, Nq], one-hot rows as indices."""
    if p.one_hot and q.one_hot:
        return (p.u.unsqueeze(2) == q.u.unsqueeze(1)).to(q.v.dtype)
    if p.one_hot:
        return _gram_u(q, p).transpose(1, 2)
    if q.one_hot:  # u_p . onehot(id) = u_p[id]
        return torch.gather(p.u, 2, q.u.unsqueeze(1).expand(-1, p.u.shape[1], -1))
    return torch.bmm(p.u, q.u.transpose(1, 2))


def _dense_sq(parts: list) -> np.ndarray:
    """Form each sample's gradient (one sample at a time, to bound memory) and take its squared norm."""
    batch = parts[0].g.shape[0] if isinstance(parts[0], _Dense) else parts[0].v.shape[0]
    out = np.empty(batch)
    for r in range(batch):
        grad = None
        for p in parts:
            if isinstance(p, _Dense):
                g = p.g[r].reshape(-1).float()
            elif p.one_hot:
                g = torch.zeros(p.a, p.v.shape[-1], dtype=p.v.dtype, device=p.v.device).index_add_(0, p.u[r], p.v[r])
            else:
                g = p.u[r].T @ p.v[r]
            grad = g.reshape(-1) if grad is None else grad + g.reshape(-1)
        out[r] = float(grad.double().square().sum())
    return out
