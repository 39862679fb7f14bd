"""Membership-inference attacks: a registry of name -> function(AttackInputs, ...) -> one score per sample.

Every score is oriented so that HIGHER means "more likely a member" (METHODS.md section 2). All attacks
but `gradnorm` are arithmetic on the scoring engine's per-token arrays (TokenStats): the target pass, plus
the reference model's pass for `reference` and a second, shots-conditioned pass for `recall`.
"""
from __future__ import annotations

import math
import zlib as _zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import zstandard

from .errors import MemauditError
from .scoring import TokenStats

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


def gradient_norms(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, bos_id: int | None,
                   on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Per sample, the L2 norm over all parameters of d(mean NLL of its scored tokens)/d(theta).

    One forward and backward per sample (the gradient is per sample, so nothing is batched); scored tokens
    as in the scoring engine: every token after BOS, or all but the first without BOS.
    """
    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty(len(sequences))
    try:
        for i, seq in enumerate(sequences):
            ids = torch.tensor([([bos_id] if bos_id is not None else []) + list(seq)], device=device)
            logits = model(input_ids=ids[:, :-1]).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
            grads = torch.autograd.grad(nll, params, allow_unused=True)
            out[i] = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
            if on_progress is not None:
                on_progress(1)
    finally:
        model.train(was_training)
    return out
