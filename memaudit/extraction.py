"""The extraction probe (METHODS.md section 1): prompt with `prefix` tokens, compare the continuation with the
true `suffix` tokens.

Greedy shortcut. A teacher-forced pass over prefix + suffix (the scoring engine, with BOS first when the model
has one, as the trainer trains rows) gives, at every suffix position j, whether the model's argmax given the TRUE
context equals the target (`hit`) and what that argmax is. Greedy decoding reproduces the target up to the first
miss d (there its context is the true context), and emits the pass's argmax at d. So:
  - samples with no miss are exact and need no decoding;
  - the others are decoded only from d on, continuing from the pass's KV cache cropped before position d.
The pass is staged (see `_Stages`): a first pass reads the prefix and the first k0 suffix positions (k0 chosen
per batch by a cost model fed with the first misses seen so far: 1 when samples diverge at once, the whole suffix
when nearly all are memorized); only rows still matching continue, from the cache, to the end. A row that misses
leaves at once, with its cache, for the decoding pool, so a non-memorized sample never pays for teacher forcing
the whole suffix AND decoding it. The pool gathers diverged rows across scoring batches and decodes them
together, each row joining the decoding batch at the step of its own d with its own cache (`gen.greedy_join`):
no token is read twice. A pool holds up to 4x the scoring batch's rows when that fits the same memory
(`_decode_factor`: a decoding row keeps one position's logits, a scoring row the whole window's), so fewer
sequential steps are needed. `shortcut=False` decodes every sample from the prefix instead (verification).

Sampling reports the (n, p)-discoverable extraction of Hayes et al. 2024 (see `_np_columns`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from . import backend
from . import generation as gen
from .data import file_hash, read_documents, tokenize
from . import checks
from .errors import MemauditError
from .metrics import rouge_l_ids, rouge_l_text, rouge_tokenize
from .models import LoadedModel, load_model, weights_hash
from .progress import progress_bar
from .rundir import RunDir, check_output
from .samples import Windows, make_windows
from .scoring import iter_scored_batches

DECODINGS = ("greedy", "sample", "beam")
MAX_WINDOW = 1 << 20  # tokens: beyond every model's context (the model's own context is checked on loading)


@dataclass
class ExtractionSettings:
    prefix: int = 32
    suffix: int = 32
    offset: int = 0
    decoding: str = "greedy"
    num_beams: int = 4
    num_samples: int = 10
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    np_threshold: float = 0.5  # p of the (n, p)-discoverable rate in summary.json
    batch_size: int | str = "auto"
    bos: bool | None = None  # None: prepend BOS when the tokenizer has one
    shortcut: bool = True
    seed: int = 0

    def check(self) -> None:
        checks.choice("--decoding", self.decoding, DECODINGS)
        checks.integer("--prefix", self.prefix, high=MAX_WINDOW)
        checks.integer("--suffix", self.suffix, high=MAX_WINDOW)
        checks.integer("--offset", self.offset, low=0)
        checks.integer("--num-beams", self.num_beams, high=1024)
        checks.integer("--num-samples", self.num_samples, high=100_000)
        checks.number("--temperature", self.temperature, low=0, low_open=True)  # greedy is temperature 0
        checks.integer("--top-k", self.top_k, low=0)
        checks.fraction("--top-p", self.top_p, one=True)
        checks.fraction("--np-threshold", self.np_threshold, zero=True, one=True)
        checks.batch_size(self.batch_size)
        checks.seed(self.seed)


# --- per-sample metrics ---------------------------------------------------------------------------------------

def sample_metrics(generated: np.ndarray, target: np.ndarray) -> dict:
    """exact (Carlini 2023 k-extractable), token_match (Pythia's memorization score), match_prefix, rouge_l."""
    eq = generated == target
    miss = np.flatnonzero(~eq)
    return {"exact": bool(eq.all()), "token_match": float(eq.mean()),
            "match_prefix": int(miss[0]) if len(miss) else int(len(target)),
            "rouge_l": rouge_l_ids(target, generated)}


_COLUMNS = ["index", "id", "exact", "token_match", "match_prefix", "rouge_l", "rouge_l_text", "generated", "target",
            "generated_ids"]


def _records(indices: Sequence[int], generated: np.ndarray, targets: np.ndarray, tokenizer, ids: Sequence[str],
             extra: dict[str, np.ndarray] | None = None, reproduced: bool = False) -> list[dict]:
    """One result row per sample (plain dicts: a DataFrame is built once per saved group, not per batch).
    `reproduced`: the generated suffixes are the targets themselves, so their text is decoded once."""
    tgt_text = tokenizer.batch_decode(targets.tolist())
    gen_text = tgt_text if reproduced else tokenizer.batch_decode(generated.tolist())
    rows = []
    S = targets.shape[1]
    for k, i in enumerate(indices):
        if reproduced:  # identical sequences: the metrics' values are known exactly (LCS = the whole sequence)
            m = {"exact": True, "token_match": 1.0, "match_prefix": int(S), "rouge_l": 1.0 if S else 0.0}
            rl_text = 1.0 if rouge_tokenize(tgt_text[k]) else 0.0
        else:
            m = sample_metrics(generated[k], targets[k])
            rl_text = rouge_l_text(tgt_text[k], gen_text[k])
        row = {"index": int(i), "id": ids[i], **m, "rouge_l_text": rl_text,
               "generated": gen_text[k], "target": tgt_text[k],
               "generated_ids": generated[k].astype(np.int32)}  # compact: 4 bytes a token
        for name, values in (extra or {}).items():
            row[name] = values[k]
        rows.append(row)
    return rows


# --- the greedy shortcut: staged verification and the decoding pool --------------------------------------------

# Staged verification. The first pass reads the prefix and the first k0 suffix positions; rows that miss there
# leave at once for decoding (a non-memorized sample then costs about what plain decoding costs), the others are
# checked to the end in one continuation pass from the cache. k0 is chosen per batch to minimize the expected
# cost, in row-tokens of teacher forcing: B (k0 - 1) read by the first pass past the prefix, B P(d >= k0)
# (S - k0) read by the continuation, and _FORWARD_COST per forward (the continuation runs when any row survives),
# with the distribution of first misses d estimated from the samples done so far. Mostly memorized data then
# gets one full pass per batch, non-memorized data a pass that stops right after the prefix. The choice only
# changes how the work is cut (greedy tokens are the same, up to float rounding at exact ties of the logits, as
# between any two batchings; the tests compare with plain decoding and HF generate).
_FORWARD_COST = 64
_FIRST_STAGES = (1, 2, 4, 8, 16)


@dataclass
class _Stages:
    """Counts of first misses so far (index S: none) and the per-batch choice of the first stage's length."""
    S: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.S + 1)
        self.counts[[0, self.S]] = 0.5  # prior: half diverge at once, half are memorized

    def first_stage(self, rows: int) -> int:
        S = self.S
        p = self.counts / self.counts.sum()
        survive = 1.0 - np.cumsum(p)  # survive[k - 1] = P(d >= k)
        best, best_cost = S, rows * (S - 1) + _FORWARD_COST  # one full pass
        for k0 in _FIRST_STAGES:
            if k0 >= S:
                break
            cont = 1.0 - (1.0 - survive[k0 - 1]) ** rows  # P(some row survives the first stage)
            cost = rows * (k0 - 1) + rows * survive[k0 - 1] * (S - k0) + _FORWARD_COST * (1.0 + cont)
            if cost < best_cost:
                best, best_cost = k0, cost
        return best

    def record(self, first_miss: np.ndarray) -> None:
        np.add.at(self.counts, np.minimum(np.asarray(first_miss, dtype=np.int64), self.S), 1.0)


@dataclass
class _Pool:
    """Diverged rows waiting for decoding, in groups: `d` (first miss, a suffix position), `indices` (samples),
    `tok` (the pass's argmax at d = the greedy token there), `kv` (their cache over the context before d), and,
    only without a sliceable cache, `argmax` [k, S] (the pass's argmax at every suffix position)."""
    chunks: list[dict] = field(default_factory=list)
    size: int = 0

    def add(self, chunk: dict) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk["indices"])


def _flush(pool: _Pool, model, windows: np.ndarray, P: int, S: int, bos_id: int | None) -> tuple[list[int], np.ndarray]:
    """Decode every pooled row from its own divergence point; returns (indices, generated [n, S])."""
    indices = [i for c in pool.chunks for i in c["indices"]]
    if all(c["kv"] is not None for c in pool.chunks):
        # each group joins the decoding batch at its own step, with its own cache: nothing is read twice
        outs = gen.greedy_join(model, [(c["d"], c["kv"], torch.as_tensor(c["tok"])) for c in pool.chunks], S)
        generated = np.concatenate([
            np.concatenate([windows[c["indices"], P: P + c["d"]], o[:, c["d"]:].cpu().numpy()], axis=1)
            for c, o in zip(pool.chunks, outs)])
    else:  # no reusable cache: read the context up to the pool's first divergence point again
        d = torch.tensor(np.concatenate([np.full(len(c["indices"]), c["d"]) for c in pool.chunks]))
        argmax = torch.tensor(np.concatenate([c["argmax"] for c in pool.chunks]))
        d0 = int(d.min())
        ctx = torch.as_tensor(windows[indices, : P + d0])
        if bos_id is not None:
            ctx = torch.cat([torch.full((len(indices), 1), bos_id, dtype=torch.long), ctx], dim=1)
        tail = gen.greedy(model, ctx, S - d0, forced=argmax[:, d0:], n_forced=d - d0 + 1)
        generated = np.concatenate([windows[indices, P: P + d0], tail.cpu().numpy()], axis=1)
    pool.chunks.clear()
    pool.size = 0
    return indices, generated


def _cache_is_sliceable(model, token: int) -> bool:
    """Whether the model's KV cache is a plain per-layer history we can crop and join (one 1-token forward)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True)
    return backend.kv_from_cache(backend.output_cache(out)) is not None


def _verify_batch(model, batch, W: np.ndarray, P: int, S: int, bos_id: int | None, sliceable: bool,
                  pool: _Pool) -> tuple[np.ndarray, np.ndarray]:
    """Finish the staged verification of one scoring batch (its pass read the suffix up to some k0): rows that
    miss go to `pool` with their cache, the others continue teacher-forced from the cache to the end. Returns
    the batch rows (positions in `batch.indices`) that reproduce the whole suffix, and every row's first miss
    (S when none)."""
    b = 1 if bos_id is not None else 0
    sbase = P - 1 + b  # input position that predicts suffix token 0
    idx = np.asarray(batch.indices)
    n = len(idx)
    k0 = batch.lengths[0] - sbase
    first_miss = np.full(n, S)
    argmax = np.full((n, S), -1, dtype=np.int64)
    argmax[:, :k0] = np.stack([s.argmax[sbase: sbase + k0] for s in batch.stats])
    targets = W[idx, P:]
    feed = W[idx, :-1] if bos_id is None else np.concatenate([np.full((n, 1), bos_id), W[idx, :-1]], axis=1)
    rows = np.arange(n)  # batch rows still matching; row rows[j] is row j of `cache`
    cache = batch.cache
    done = 0  # suffix positions checked so far
    end = k0  # the first stage; the continuation (if any row survives it) reads the rest of the suffix
    while True:
        hit = argmax[rows, done:end] == targets[rows, done:end]
        ok = hit.all(1)
        kv = backend.kv_from_cache(cache) if sliceable else None
        if (~ok).any():
            j_miss = np.flatnonzero(~ok)
            d = done + np.argmin(hit[j_miss], axis=1)
            first_miss[rows[j_miss]] = d
            for dv in np.unique(d):
                js = j_miss[d == dv]
                r = rows[js]
                chunk = {"indices": idx[r].tolist(), "d": int(dv), "tok": argmax[r, dv]}
                if kv is not None:
                    chunk["kv"] = backend.select_kv(kv, js.tolist(), b + P + int(dv))
                else:
                    chunk["kv"] = None
                    chunk["argmax"] = argmax[r]
                pool.add(chunk)
            rows = rows[ok]
            if len(rows) and end < S and kv is not None:  # the survivors' cache, for the continuation
                cache = backend.cache_from_kv(backend.select_kv(kv, np.flatnonzero(ok).tolist(), sbase + end))
        done = end
        if done >= S or not len(rows):
            return rows, first_miss
        assert kv is not None, "a first stage short of the suffix needs a sliceable cache"
        end = S
        x = torch.as_tensor(feed[rows, sbase + done: sbase + end], device=next(model.parameters()).device)
        with torch.inference_mode():  # continue from the cache: read only the next stage's tokens
            logits, cache = backend.forward(model, x, cache, last_only=False)
        argmax[rows, done:end] = logits.argmax(-1).cpu().numpy()
        del logits


# --- sampling: (n, p)-discoverable extraction -------------------------------------------------------------------

def _np_columns(exact_per_draw: np.ndarray, log_p_seq: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Hayes et al. 2024, (n, p)-discoverable extraction, per sample:
    - p_seq: the exact probability that ONE draw of the sampler reproduces the target, the product over suffix
      positions of the sampler's (temperature / top-k / top-p processed) probability of the target token given
      the true context (one teacher-forced pass; no Monte-Carlo error);
    - p_extract: the probability that at least one of n independent draws reproduces it, 1 - (1 - p_seq)^n;
      the sample is (n, p)-discoverably extracted when p_extract >= p;
    - p_hat: the empirical fraction of the n actual draws that reproduced it (an unbiased estimate of p_seq,
      reported as a check), and any_exact: whether at least one of them did.
    """
    p_seq = np.exp(log_p_seq)
    p_extract = -np.expm1(n * np.log1p(-np.minimum(p_seq, 1.0 - 1e-16)))
    p_extract = np.where(p_seq >= 1.0 - 1e-16, 1.0, p_extract)
    return {"p_hat": exact_per_draw.mean(1), "any_exact": exact_per_draw.any(1), "p_seq": p_seq,
            "p_extract": p_extract}


def _uniforms(seed: int, indices: Sequence[int], n: int, S: int) -> torch.Tensor:
    """Each sample's own random numbers, from (seed, sample index): batching and resume cannot change them."""
    return torch.from_numpy(np.concatenate([np.random.default_rng([seed, int(i)]).random((n, S)) for i in indices]))


# --- the probe --------------------------------------------------------------------------------------------------

def extract_windows(loaded: LoadedModel, windows: Windows, settings: ExtractionSettings | None = None, *,
                    run: RunDir | None = None,
                    on_batch: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Run the probe on prepared token windows; one row per window (input order), summary in `df.attrs`.

    With `run`, every finished group of samples is saved as a partial result, samples already saved there are
    skipped (resume), and samples.parquet, summary.json and the histograms are written at the end.
    `on_batch(k)` is called after the k-th partial result is saved.
    """
    st = settings or ExtractionSettings()
    st.check()
    model, tok = loaded.model, loaded.tokenizer
    P, S = windows.prefix, windows.suffix
    use_bos = st.bos if st.bos is not None else tok.bos_token_id is not None
    if use_bos and tok.bos_token_id is None:
        raise MemauditError("--bos was asked for but the tokenizer has no BOS token")
    bos_id = tok.bos_token_id if use_bos else None
    b = 1 if use_bos else 0
    positions = P + S - 1 + b
    if positions > loaded.max_length:
        raise MemauditError(f"windows of {P}+{S} tokens{' after BOS' if b else ''} need {positions} positions but "
                            f"the model's context is {loaded.max_length}: use a smaller --prefix/--suffix")
    W = windows.tokens
    n = len(W)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    frames: list[pd.DataFrame] = run.load_partials() if run is not None else []
    done = {int(i) for f in frames for i in f["index"]}
    n_partials = len(frames)
    pool = _Pool()
    finished: list[dict] = []  # result rows not yet saved
    records: list[dict] = []  # saved rows, without a run directory
    decode_batch = 0
    sbase = P - 1 + b  # stats index of the first suffix token

    def save(advance) -> None:
        nonlocal n_partials
        if not finished:
            return
        if run is not None:
            df = pd.DataFrame(finished)
            run.save_partial(f"{n_partials:06d}", df)
            frames.append(df)
        else:
            records.extend(finished)
        k = len(finished)
        finished.clear()
        n_partials += 1
        advance(k)
        if on_batch is not None:
            on_batch(n_partials)

    shortcut = st.decoding == "greedy" and st.shortcut
    keep_cache = st.decoding == "sample" and st.shortcut
    pass_kw: dict = {"greedy_only": st.decoding != "sample"}
    if shortcut:
        sliceable = _cache_is_sliceable(model, bos_id if bos_id is not None else int(W[0, 0]) if n else 0)
        stages = _Stages(S)
        for f in frames:  # resume: what the finished samples showed
            stages.record(f["match_prefix"].to_numpy())
        # the first stage reads BOS + prefix + k0 - 1 suffix tokens (predicting k0), logits only from the suffix
        # on; without a sliceable cache a continuation would re-read everything, so then it reads it all at once
        pass_kw = {"greedy_only": True, "score_from": sbase,
                   "max_positions": (lambda rows: sbase + stages.first_stage(rows)) if sliceable else sbase + S}
        keep_cache = sliceable
    elif st.decoding != "sample":  # beam, or plain greedy: the pass only batches the samples, so read nothing
        pass_kw = {"greedy_only": True, "max_positions": 1}
    with progress_bar(n - len(done), "extract") as advance:
        for batch in iter_scored_batches(model, W, batch_size=st.batch_size, bos_id=bos_id, keep_cache=keep_cache,
                                         pad_id=pad_id, skip=done, max_length=loaded.max_length, **pass_kw):
            idx = batch.indices
            targets = W[idx, P:]
            if shortcut:
                decode_batch = max(decode_batch, len(idx) * _decode_factor(model, P + S))
                exact_rows, first_miss = _verify_batch(model, batch, W, P, S, bos_id, sliceable, pool)
                stages.record(first_miss)
                if len(exact_rows):
                    finished += _records([idx[r] for r in exact_rows], targets[exact_rows], targets[exact_rows],
                                         tok, windows.ids, reproduced=True)
                del batch
                if pool.size >= decode_batch:
                    finished += _greedy_records(pool, model, W, P, S, bos_id, tok, windows.ids)
            elif st.decoding == "greedy":  # plain decoding from the prefix, for verification
                finished += _records(idx, _plain_greedy(model, W[idx, :P], S, bos_id), targets, tok, windows.ids)
            elif st.decoding == "sample":
                kv = backend.kv_from_cache(batch.cache) if keep_cache else None
                finished += _sample_records(model, W, idx, batch, kv, P, S, b, bos_id, st, tok, windows.ids)
                del kv
            else:
                ctx = _with_bos(W[idx, :P], bos_id)
                out = gen.beam_search(model, ctx, S, st.num_beams, pad_id).cpu().numpy()
                finished += _records(idx, out, targets, tok, windows.ids)
            save(advance)
        if pool.size:
            finished += _greedy_records(pool, model, W, P, S, bos_id, tok, windows.ids)
            save(advance)

    parts = frames + ([pd.DataFrame(records)] if records else [])
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=_COLUMNS)
    df = df.sort_values("index", kind="stable").drop(columns="index").reset_index(drop=True)
    summary = summarize(df, windows, st, use_bos)
    df.attrs["summary"] = summary
    if run is not None:
        run.write_samples(df)
        run.write_summary(summary)
        _histograms(run, df)
        run.finish()
        df.attrs["run_dir"] = str(run.path)
    return df


def _decode_factor(model, window: int) -> int:
    """How many times more rows a decoding group may hold than a scoring batch at equal memory: a scoring row
    holds the window's KV cache and ~4 vocabulary-sized float32 temporaries per position, a decoding row the same
    cache and one position's logits. Capped at 4 (larger groups stop paying off); 1 for large models."""
    vocab, width, layers = backend.dimensions(model)
    cache = 2 * layers * width * window
    return int(max(1, min(4, (cache + 4 * vocab * window) // (cache + vocab))))


def _with_bos(ctx: np.ndarray, bos_id: int | None) -> torch.Tensor:
    t = torch.as_tensor(ctx, dtype=torch.long)
    if bos_id is not None:
        t = torch.cat([torch.full((len(t), 1), bos_id, dtype=torch.long), t], dim=1)
    return t


def _plain_greedy(model, prefixes: np.ndarray, S: int, bos_id: int | None) -> np.ndarray:
    return gen.greedy(model, _with_bos(prefixes, bos_id), S).cpu().numpy()


def _greedy_records(pool: _Pool, model, W, P, S, bos_id, tok, ids) -> list[dict]:
    indices, generated = _flush(pool, model, W, P, S, bos_id)
    return _records(indices, generated, W[indices, P:], tok, ids)


def _sample_records(model, W, idx, batch, kv, P, S, b, bos_id, st: ExtractionSettings, tok, ids) -> list[dict]:
    """n draws per sample from the pass's cache over the prefix; metrics on the first draw; (n, p) columns."""
    n = st.num_samples
    targets = torch.as_tensor(W[idx, P:], dtype=torch.long)
    last = torch.as_tensor(W[idx, P - 1: P], dtype=torch.long)  # the last prefix token, read again for its logits
    if kv is not None:
        base = backend.crop_kv(kv, b + P - 1)
        feed = last
    else:
        base, feed = None, _with_bos(W[idx, :P], bos_id)
    past = backend.cache_from_kv(backend.repeat_kv(base, n)) if base is not None else None
    draws = gen.sample(model, feed.repeat_interleave(n, 0), S, _uniforms(st.seed, idx, n, S), past=past,
                       temperature=st.temperature, top_k=st.top_k, top_p=st.top_p).cpu().numpy().reshape(len(idx), n, S)
    exact_per_draw = (draws == targets.numpy()[:, None, :]).all(-1)
    if st.temperature == 1.0 and st.top_k == 0 and st.top_p == 1.0:
        # the untransformed sampler: the scoring pass already holds ln p of every target token
        sb = P - 1 + b
        log_p_seq = np.array([float(s.logprob[sb: sb + S].astype(np.float64).sum()) for s in batch.stats])
    else:
        past2 = backend.cache_from_kv(base) if base is not None else None
        log_p_seq = gen.sequence_logprob(model, feed, targets, past=past2, temperature=st.temperature,
                                         top_k=st.top_k, top_p=st.top_p).cpu().numpy()
    extra = _np_columns(exact_per_draw, log_p_seq, n)
    return _records(idx, draws[:, 0], W[idx, P:], tok, ids, extra)


def summarize(df: pd.DataFrame, windows: Windows, st: ExtractionSettings, use_bos: bool) -> dict:
    def mean(col: str) -> float | None:
        return float(df[col].mean()) if len(df) else None

    summary = {"n_samples": int(len(df)), "n_skipped": int(windows.n_skipped),
               "n_duplicates": int(windows.n_duplicates), "exact_rate": mean("exact"),
               "n_exact": int(df["exact"].sum()) if len(df) else 0,
               "mean_token_match": mean("token_match"), "mean_match_prefix": mean("match_prefix"),
               "mean_rouge_l": mean("rouge_l"), "mean_rouge_l_text": mean("rouge_l_text"),
               "prefix": windows.prefix, "suffix": windows.suffix, "decoding": st.decoding, "bos": use_bos}
    if st.decoding == "beam":
        summary["num_beams"] = st.num_beams
    if st.decoding == "sample":
        summary |= {"num_samples": st.num_samples, "temperature": st.temperature, "top_k": st.top_k,
                    "top_p": st.top_p, "mean_p_hat": mean("p_hat"), "mean_p_seq": mean("p_seq"),
                    "mean_p_extract": mean("p_extract"), "any_exact_rate": mean("any_exact"),
                    "np_threshold": st.np_threshold,
                    "np_discoverable_rate": float((df["p_extract"] >= st.np_threshold).mean()) if len(df) else None}
    return summary


def _histograms(run: RunDir, df: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = int(run.config["settings"]["suffix"])
    for col, bins, label in (("rouge_l", np.linspace(0, 1, 21), "ROUGE-L F (token ids)"),
                             ("match_prefix", np.arange(S + 2) - 0.5, "correct tokens before the first miss")):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(df[col].to_numpy(dtype=float), bins=bins, color="#4477aa")
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
        ax.set_title(f"{col} over {len(df)} samples")
        run.save_figure(fig, f"{col}.png")


# --- the user-facing function --------------------------------------------------------------------------------

def extract(model: str | os.PathLike | LoadedModel, data: str | os.PathLike, *, prefix: int = 32, suffix: int = 32,
            offset: int = 0, decoding: str = "greedy", num_beams: int = 4, num_samples: int = 10,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, np_threshold: float = 0.5,
            batch_size: int | str = "auto", device: str = "auto", dtype: str = "auto", limit: int | None = None,
            text_field: str = "text", id_field: str = "id", bos: bool | None = None, shortcut: bool = True,
            out: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
            allow_pickle: bool = False, trust_remote_code: bool = False, seed: int = 0,
            on_batch: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Extraction probe on a model directory and a data file.

    Returns one row per deduplicated window: id, exact, token_match, match_prefix, rouge_l, rouge_l_text,
    generated, target (+ generated_ids; + p_hat, any_exact, p_seq, p_extract for sampling).
    `df.attrs["summary"]` holds the summary.json figures; with `out`, a run directory is written there.
    """
    st = ExtractionSettings(prefix=prefix, suffix=suffix, offset=offset, decoding=decoding, num_beams=num_beams,
                            num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                            np_threshold=np_threshold, batch_size=batch_size, bos=bos, shortcut=shortcut, seed=seed)
    st.check()
    checks.limit(limit)
    checks.readable_file(data)
    if resume and out is None:
        raise MemauditError("--resume needs --out (the run directory to continue)")
    checks.device(device)
    checks.dtype(dtype)
    ctx = model.max_length if isinstance(model, LoadedModel) else checks.context_length(
        checks.model_dir(model, allow_pickle=allow_pickle))
    if ctx is not None and prefix + suffix > ctx:
        raise MemauditError(f"windows of {prefix}+{suffix} tokens need {prefix + suffix} positions but the model's "
                            f"context is {ctx}: use a smaller --prefix/--suffix")
    if out is not None:
        model_path = model.path if isinstance(model, LoadedModel) else model
        check_output(out, "extract", inputs=[model_path, data], resume=resume, overwrite=overwrite)
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, device=device, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    docs = read_documents(data, text_field=text_field, id_field=id_field, limit=limit)
    torch.manual_seed(seed)
    windows = make_windows(tokenize(loaded.tokenizer, docs["text"].tolist()), docs["id"].tolist(), prefix, suffix,
                           offset)
    if len(windows.ids) == 0:
        raise MemauditError(f"all {len(docs)} documents are shorter than offset + prefix + suffix = "
                            f"{offset + prefix + suffix} tokens: use a smaller --prefix/--suffix/--offset")
    run = None
    if out is not None:
        settings = {k: v for k, v in vars(st).items() if k != "batch_size"} | {"limit": limit, "text_field": text_field,
                                                           "id_field": id_field, "dtype": str(loaded.dtype)}
        inputs = {"model": str(loaded.path), "model_weights_sha256": weights_hash(loaded.path),
                  "data": str(data), "data_sha256": file_hash(data)}
        run = RunDir(out, "extract", settings, inputs=inputs, resume=resume, overwrite=overwrite)
    return extract_windows(loaded, windows, st, run=run, on_batch=on_batch)


def format_summary(summary: dict) -> str:
    """A few human lines for the terminal."""
    s = summary
    lines = [f"{s['n_samples']} samples ({s['n_skipped']} documents too short, {s['n_duplicates']} duplicate windows), "
             f"prefix {s['prefix']} + suffix {s['suffix']}, {s['decoding']} decoding",
             f"exact (verbatim suffix): {s['n_exact']}/{s['n_samples']} = {s['exact_rate']:.3f}",
             f"mean token match {s['mean_token_match']:.3f}, ROUGE-L {s['mean_rouge_l']:.3f} "
             f"(text {s['mean_rouge_l_text']:.3f}), mean correct run {s['mean_match_prefix']:.1f} tokens"]
    if s["decoding"] == "sample":
        lines.append(f"(n={s['num_samples']}, p={s['np_threshold']})-discoverable: {s['np_discoverable_rate']:.3f}; "
                     f"mean P(one draw reproduces) {s['mean_p_seq']:.3g}, mean P(any of n) {s['mean_p_extract']:.3g}")
    return "\n".join(lines)
