"""Membership inference: run the attacks on members vs non-members, measure them honestly, write a run dir.

Passes over the model (each sharded across ranks under torchrun, gathered on rank 0):
  1. target scoring pass (memaudit.scoring) -> every logit-based attack but recall
  2. reference model's scoring pass        -> `reference`
  3. shots + x scoring pass (same engine)   -> `recall` (the x part of each conditioned sequence)
  4. one backward per sample                -> `gradnorm`
Metrics per score column: ROC AUC with a bootstrap interval, oracle TPR at 1% / 0.1% FPR (threshold picked on
all samples, as peers report), and TPR / FPR, balanced accuracy and F1 at thresholds calibrated on a held-out,
stratified split and applied to the rest (what an auditor can really achieve).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from . import distributed
from .attacks import ATTACKS, DCPDD_CAP, DEFAULT_K, AttackInputs, gradient_norms, parse_attacks, parse_ks, \
    run_attacks, token_log_frequencies
from .data import file_hash, read_documents, tokenize
from . import checks
from .errors import MemauditError
from .rundir import RunDir, check_output
from .metrics import (binary_metrics, bootstrap_roc, roc_auc, roc_curve, stratified_split, threshold_at_fpr,
                      threshold_max_balanced_accuracy, tpr_at_fpr)
from .models import load_model, load_tokenizer, tokenizers_match, weights_hash
from .progress import progress_bar
from .samples import document_samples
from .scoring import TokenStats, score_sharded

FPR_TARGETS = (0.01, 0.001)
# Samples per saved unit of a pass: an interrupted run redoes at most this many. Each unit is one scoring call,
# so it must hold several of the largest batches (512 on GPU) or chunking would shrink the batches themselves.
RESUME_CHUNK = 4096
MIN_RECALL_PREFIX = 8  # fewer shot tokens than this is not a prefix worth the name


@dataclass
class MiaResult:
    samples: pd.DataFrame  # id, member, n_tokens, score_<column>
    summary: dict[str, Any]
    path: Path | None


@dataclass
class _Samples:
    ids: list[str]
    member: np.ndarray  # bool
    tokens: list[list[int]]  # the sample's tokens (before BOS)
    counts: dict[str, Any]


def _warn(msg: str) -> None:
    if distributed.is_main():
        print(f"warning: {msg}", file=sys.stderr)


def _cut(token_lists: Sequence[list[int]], ids: Sequence[str], window: int | None, max_tokens: int,
         min_tokens: int) -> tuple[list[str], list[list[int]], dict[str, int]]:
    """One sample per document (`samples.document_samples`), identical samples kept once, and its counts."""
    s = document_samples(token_lists, ids, max_tokens=max_tokens, min_tokens=min_tokens, window=window, dedup=True)
    return s.doc_ids, s.tokens, {"documents": len(ids), "samples": len(s), "skipped_too_short": s.n_skipped,
                                 "truncated_to_context": s.n_truncated, "duplicates_dropped": s.n_duplicates}


def _auto_ids(df: pd.DataFrame) -> bool:
    return df["id"].tolist() == [str(i) for i in range(len(df))]


def _recall_prefix(samples: _Samples, n_shots: int, seed: int, sep: int | None, budget: int) -> tuple[list[int], list[int]]:
    """Indices of the non-member samples used as shots, and the prefix: their tokens joined by `sep`
    (the EOS document separator), cut from the left to `budget` tokens so it fits before every sample."""
    non = np.flatnonzero(~samples.member)
    if n_shots < 1 or n_shots >= len(non):
        raise MemauditError(f"--recall-shots must be between 1 and the number of non-members minus one ({len(non) - 1})")
    shots = sorted(np.random.default_rng(seed).choice(non, size=n_shots, replace=False).tolist())
    prefix: list[int] = []
    for i in shots:
        prefix += samples.tokens[i] + ([sep] if sep is not None else [])
    return shots, prefix[-budget:] if budget > 0 else []


def _metrics(scores: np.ndarray, member: np.ndarray, *, n_bootstrap: int, seed: int,
             cal_idx: np.ndarray) -> dict[str, Any]:
    """AUC (+ bootstrap interval), oracle TPR@FPR on all samples, calibrated figures on the evaluation split.
    Samples with a NaN score (recall's shots) are left out."""
    ok = ~np.isnan(scores)
    s, y = scores[ok], member[ok]
    fpr, tpr, _ = roc_curve(s, y)
    out: dict[str, Any] = {"n_members": int(y.sum()), "n_nonmembers": int((~y).sum()),
                           "auc": roc_auc(s, y)}
    boot = bootstrap_roc(s, y, n=n_bootstrap, seed=seed, fpr_targets=FPR_TARGETS) if n_bootstrap > 0 else {}
    if boot:
        out["auc_ci95"] = boot["auc"]
    out["oracle"] = {}
    for t in FPR_TARGETS:
        key = f"tpr_at_fpr_{t:g}"
        out["oracle"][key] = tpr_at_fpr(fpr, tpr, t)
        if boot:
            out["oracle"][key + "_ci95"] = boot[key]
    # Calibrated: thresholds picked on the calibration split, measured on the evaluation split.
    keep = np.zeros(len(scores), bool)
    keep[cal_idx] = True
    cal = keep & ok
    ev = ~keep & ok
    cal_s, cal_y, ev_s, ev_y = scores[cal], member[cal], scores[ev], member[ev]
    calib: dict[str, Any] = {"n_calibration": int(cal.sum()), "n_evaluation": int(ev.sum())}
    if cal_y.all() or not cal_y.any() or ev_y.all() or not ev_y.any():
        calib["error"] = "a split lacks members or non-members"
    else:
        for t in FPR_TARGETS:
            m = binary_metrics(ev_s, ev_y, threshold_at_fpr(cal_s, cal_y, t))
            calib[f"at_fpr_{t:g}"] = {"threshold": m["threshold"], "tpr": m["tpr"], "fpr": m["fpr"]}
        calib["max_balanced_accuracy"] = binary_metrics(ev_s, ev_y, threshold_max_balanced_accuracy(cal_s, cal_y))
    out["calibrated"] = calib
    return out


def _figures(run, df: pd.DataFrame, columns: list[str], metrics: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    member = df["member"].to_numpy()
    names = []
    for loglog in (False, True):
        fig, ax = plt.subplots(figsize=(6, 5))
        for c in columns:
            s = df[f"score_{c}"].to_numpy()
            ok = ~np.isnan(s)
            fpr, tpr, _ = roc_curve(s[ok], member[ok])
            ax.plot(fpr, tpr, label=f"{c} (AUC {metrics[c]['auc']:.3f})", drawstyle="steps-post")
        if loglog:
            lo = 1.0 / max(2, int((~member).sum()))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo / 2, 1)
            ax.set_ylim(lo / 2, 1.05)
            ax.plot([lo / 2, 1], [lo / 2, 1], "k:", lw=0.8)
        else:
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC (log-log)" if loglog else "ROC")
        ax.legend(fontsize=7, loc="lower right")
        name = "roc_loglog.png" if loglog else "roc.png"
        run.save_figure(fig, name)
        names.append(name)
    cols = min(4, len(columns))
    rows = (len(columns) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, c in zip(axes.flat, columns):
        s = df[f"score_{c}"].to_numpy()
        ok = ~np.isnan(s)
        bins = np.histogram_bin_edges(s[ok], bins=30)
        ax.hist(s[ok & member], bins=bins, alpha=0.6, label="member")
        ax.hist(s[ok & ~member], bins=bins, alpha=0.6, label="non-member")
        ax.set_title(c, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("score histograms (higher = member)")
    fig.tight_layout()
    run.save_figure(fig, "histograms.png")
    names.append("histograms.png")
    return names


def mia(model_dir: str | Path, members: str | Path, nonmembers: str | Path, *,
        reference: str | Path | None = None, attacks: str | Sequence[str] = "all",
        k: str | Sequence[float] = DEFAULT_K, window: int | None = None, bos: bool = True,
        recall_shots: int = 5, dcpdd_corpus: str | Path | None = None, bootstrap: int = 1000,
        calibration_fraction: float = 0.5, seed: int = 0, batch_size: int | str = "auto",
        device: str = "auto", dtype: str = "auto", text_field: str = "text", id_field: str = "id",
        limit: int | None = None, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
        write: bool = True, allow_pickle: bool = False, trust_remote_code: bool = False) -> MiaResult | None:
    """Score members and non-members with the attacks and measure how well each separates them.

    Under torchrun every rank scores a shard and rank 0 gathers, computes the metrics and writes `out`;
    the other ranks return None. Each pass is saved in chunks of RESUME_CHUNK samples as it goes, so `resume`
    continues an interrupted run in `out` from its last finished chunk.
    """
    t0 = time.time()
    names, is_all = parse_attacks(attacks)
    ks = parse_ks(k)
    checks.integer("--window", window, low=2)
    checks.integer("--recall-shots", recall_shots, low=0)
    checks.integer("--bootstrap", bootstrap, low=0)
    checks.fraction("--calibration-fraction", calibration_fraction)
    checks.seed(seed)
    checks.device(device)
    checks.dtype(dtype)
    checks.limit(limit)
    checks.batch_size(batch_size)
    checks.readable_file(members, "members file")
    checks.readable_file(nonmembers, "non-members file")
    checks.readable_file(dcpdd_corpus, "--dcpdd-corpus file")
    if Path(members).resolve() == Path(nonmembers).resolve():
        raise MemauditError("--members and --nonmembers are the same file: membership inference needs documents "
                            "the model never saw")
    checks.model_dir(model_dir, allow_pickle=allow_pickle)
    if reference is not None:
        checks.model_dir(reference, allow_pickle=allow_pickle, what="--reference model directory")
    skipped: dict[str, str] = {}
    if any("reference" in ATTACKS[n].needs for n in names) and reference is None:
        if not is_all:
            raise MemauditError("the reference attack needs --reference MODEL_DIR")
        names.remove("reference")
        skipped["reference"] = "no --reference model given"
    dev = distributed.rank_device(device)
    distributed.init_from_env(torch.device("cpu" if dev == "auto" else dev))
    if resume and (out is None or not write):
        raise MemauditError("--resume needs --out (the run directory to continue)")
    out_path = None
    if write:  # write=False: the results only, no run directory (the Python API)
        out_path = Path(out) if out is not None else distributed.broadcast_object(_default_out())
        if distributed.is_main():
            check_output(out_path, "mia", inputs=[p for p in (model_dir, members, nonmembers, reference,
                                                              dcpdd_corpus) if p is not None],
                         resume=resume, overwrite=overwrite)

    mem_df = read_documents(members, text_field=text_field, id_field=id_field, limit=limit)
    non_df = read_documents(nonmembers, text_field=text_field, id_field=id_field, limit=limit)
    overlap_ids = 0
    if not (_auto_ids(mem_df) and _auto_ids(non_df)):
        overlap_ids = len(set(mem_df["id"]) & set(non_df["id"]))
        if overlap_ids:
            _warn(f"{overlap_ids} id(s) appear in both the member and the non-member file; "
                  "keeping both rows (rows are keyed by id and member)")

    target = load_model(model_dir, device=dev, dtype=dtype, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code)
    tok = target.tokenizer
    ref = None
    if "reference" in names:
        ref_tok = load_tokenizer(reference, trust_remote_code)
        if not tokenizers_match(tok, ref_tok):
            raise MemauditError(f"the reference model in {reference} has a different tokenizer than the target "
                                f"model (vocabularies of {len(ref_tok)} and {len(tok)} tokens, or their BOS or EOS, "
                                "differ): the reference attack compares per-token log-likelihoods, so both must "
                                "share it")
        ref = load_model(reference, device=dev, dtype=dtype, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)

    bos_id = tok.bos_token_id if bos else None
    if bos and bos_id is None:
        _warn("the tokenizer has no BOS token: scoring without one (each sample's first token is context only)")
    ctx = target.max_length if ref is None else min(target.max_length, ref.max_length)
    # The model input is [BOS] + tokens minus the last one, so `ctx` tokens fit with BOS and ctx + 1 without.
    max_tokens = ctx if bos_id is not None else ctx + 1
    if window is not None and window > max_tokens:
        raise MemauditError(f"--window {window} is longer than the model's context ({ctx} positions)")
    min_tokens = 1 if bos_id is not None else 2
    m_ids, m_toks, m_counts = _cut(tokenize(tok, mem_df["text"]), mem_df["id"].tolist(), window, max_tokens, min_tokens)
    n_ids, n_toks, n_counts = _cut(tokenize(tok, non_df["text"]), non_df["id"].tolist(), window, max_tokens, min_tokens)
    if not m_toks or not n_toks:
        which = "member" if not m_toks else "non-member"
        raise MemauditError(f"no {which} sample left to score (documents shorter than --window {window} are skipped)"
                            if window else f"no {which} sample left to score")
    if len(m_toks) < 2 or len(n_toks) < 2:
        raise MemauditError("need at least 2 members and 2 non-members (a calibration and an evaluation split)")
    overlap_samples = len({tuple(t) for t in m_toks} & {tuple(t) for t in n_toks})
    if overlap_samples:
        _warn(f"{overlap_samples} sample(s) are identical in the member and the non-member set; keeping both")
    samples = _Samples(ids=m_ids + n_ids, member=np.r_[np.ones(len(m_ids), bool), np.zeros(len(n_ids), bool)],
                       tokens=m_toks + n_toks, counts={"members": m_counts, "nonmembers": n_counts})
    n = len(samples.ids)
    run = None
    if write and distributed.is_main():
        settings = {"attacks": list(names), "k": ks, "window": window, "bos": bos, "recall_shots": recall_shots,
                    "bootstrap": bootstrap, "calibration_fraction": calibration_fraction, "seed": seed,
                    "batch_size": batch_size, "device": device, "dtype": dtype, "text_field": text_field,
                    "id_field": id_field, "limit": limit}
        inputs = {"model": str(model_dir), "model_weights_sha256": weights_hash(model_dir),
                  "members": str(members), "members_sha256": file_hash(members),
                  "nonmembers": str(nonmembers), "nonmembers_sha256": file_hash(nonmembers)}
        if reference is not None:
            inputs |= {"reference": str(reference), "reference_weights_sha256": weights_hash(reference)}
        if dcpdd_corpus is not None:
            inputs |= {"dcpdd_corpus": str(dcpdd_corpus)}
        run = RunDir(out_path, "mia", settings, inputs=inputs, resume=resume, overwrite=overwrite)
    score_kw = dict(batch_size=batch_size, bos_id=bos_id, pad_id=tok.pad_token_id or 0, max_length=ctx)
    scored = [np.asarray(t[1:] if bos_id is None else t, dtype=np.int64) for t in samples.tokens]

    # Pass 1: the target model, one scoring pass for every logit-based attack.
    def score_pass(model, seqs, kw):
        return lambda chunk, advance: score_sharded(model, [seqs[i] for i in chunk], on_progress=advance, **kw)

    stats = _resumable(run, "target", n, "mia: target pass", score_pass(target.model, samples.tokens, score_kw))
    ref_stats = None
    if ref is not None:
        ref_stats = _resumable(run, "reference", n, "mia: reference pass", score_pass(ref.model, samples.tokens,
                                                                                      score_kw))
        del ref

    recall_info: dict[str, Any] | None = None
    recall_stats = None
    if "recall" in names:
        longest = max(len(t) for t in samples.tokens)
        budget = max_tokens - longest  # room before the longest sample
        if budget < MIN_RECALL_PREFIX:
            reason = (f"no room for the non-member prefix: the longest sample has {longest} tokens and the model's "
                      f"context {ctx}; `memaudit mia --window {max(2, ctx // 2)}` scores shorter samples")
            if not is_all:
                raise MemauditError(f"recall: {reason}")
            names.remove("recall")
            skipped["recall"] = reason
            _warn(f"skipping recall: {reason}")
        else:
            shots, prefix = _recall_prefix(samples, recall_shots, seed, tok.eos_token_id, budget)
            shot_set = set(shots)
            todo = [i for i in range(n) if i not in shot_set]
            # Pass 3: the same engine on [BOS] + prefix + x; the last len(x scored) entries are x's tokens.
            start = [bos_id] if bos_id is not None else []
            cond = [start + prefix + samples.tokens[i] for i in todo]
            got = _resumable(run, "recall", len(cond), "mia: recall pass",
                             score_pass(target.model, cond, {**score_kw, "bos_id": None, "max_length": ctx}))
            if got is not None:
                recall_stats = [None] * n
                for i, st in zip(todo, got):
                    recall_stats[i] = _tail(st, len(scored[i]))
            recall_info = {"shots": len(shots), "shot_ids": [samples.ids[i] for i in shots],
                           "prefix_tokens": len(prefix), "separator": "eos" if tok.eos_token_id is not None else None,
                           "note": "shots are non-member samples (seeded draw); they are left out of recall's metrics"}

    gradnorms = None
    if "gradnorm" in names:
        def grad_chunk(chunk, advance):
            pos = distributed.shard_indices(len(chunk))  # this rank's positions within the chunk
            local = gradient_norms(target.model, [samples.tokens[chunk[p]] for p in pos], bos_id=bos_id,
                                   on_progress=advance)
            return distributed.gather_sharded(local.tolist(), pos, len(chunk))

        full = _resumable(run, "gradnorm", n, "mia: gradnorm (one backward per sample)", grad_chunk)
        gradnorms = np.asarray(full) if full is not None else None

    if not distributed.is_main():
        return None

    token_log_freq = None
    corpus_info = None
    if "dc_pdd" in names:
        corpus = Path(dcpdd_corpus) if dcpdd_corpus is not None else Path(nonmembers)
        cdf = read_documents(corpus, text_field=text_field, id_field=id_field)
        ctoks = tokenize(tok, cdf["text"])
        token_log_freq = token_log_frequencies(ctoks, len(tok))
        corpus_info = {"file": str(corpus), "sha256": file_hash(corpus), "documents": len(cdf),
                       "tokens": int(sum(map(len, ctoks))), "default_nonmember_file": dcpdd_corpus is None,
                       "smoothing": "Laplace: f(v) = (count(v) + 1) / (N + V)", "cap_a": DCPDD_CAP}

    inp = AttackInputs(stats=stats, scored_tokens=scored, texts=[tok.decode(t) for t in scored],
                       reference_stats=ref_stats, recall_stats=recall_stats, token_log_freq=token_log_freq,
                       gradnorms=gradnorms)
    cols = run_attacks(names, inp, ks)
    df = pd.DataFrame({"id": samples.ids, "member": samples.member,
                       "n_tokens": [len(s) for s in scored]} | {f"score_{c}": v for c, v in cols.items()})

    cal_idx, _ = stratified_split(samples.member, calibration_fraction, seed)
    metrics = {c: _metrics(v, samples.member, n_bootstrap=bootstrap, seed=seed, cal_idx=cal_idx)
               for c, v in cols.items()}
    summary: dict[str, Any] = {
        "attacks": metrics,
        "columns": list(cols),
        "skipped_attacks": skipped,
        "n_members": int(samples.member.sum()), "n_nonmembers": int((~samples.member).sum()),
        "samples": samples.counts,
        "overlap": {"ids_in_both_files": overlap_ids, "identical_samples_in_both_sets": overlap_samples},
        "windows": ({"mode": "window", "tokens": window,
                     "how": "one window per document: its first N tokens; shorter documents skipped"}
                    if window is not None else
                    {"mode": "document", "max_tokens": max_tokens,
                     "how": "whole documents, truncated to the model's context"}),
        "bos": {"prepended": bos_id is not None,
                "scored_tokens": "every token of the sample" if bos_id is not None else "all but the first"},
        "model_context": ctx,
        "k_percent": ks,
        "recall": recall_info,
        "dc_pdd_corpus": corpus_info,
        "metrics_definition": {
            "orientation": "higher score = member; predicted member iff score >= threshold",
            "auc_ci95": f"percentile bootstrap, {bootstrap} stratified resamples, seed {seed}",
            "oracle": "threshold picked on all samples' own ROC (what peers report)",
            "calibrated": (f"stratified split: {calibration_fraction:g} of each class calibrates (seed {seed}); "
                           "at_fpr_X: the lowest threshold with FPR <= X on the calibration split; "
                           "max_balanced_accuracy: the threshold maximizing balanced accuracy on it; "
                           "all reported figures are measured on the evaluation split")},
        "world_size": distributed.world_size(),
        "seconds": round(time.time() - t0, 2),
    }
    path = None
    if run is not None:
        run.write_samples(df)
        summary["figures"] = _figures(run, df, list(cols), metrics)
        run.write_summary(summary)
        run.finish()
        path = run.path
    return MiaResult(samples=df, summary=summary, path=path)


_STAT_FIELDS = {"logprob": np.float32, "hit": bool, "argmax": np.int32, "mean_lp": np.float32, "var_lp": np.float32}


def _to_frame(items: list) -> pd.DataFrame:
    if items and isinstance(items[0], TokenStats):
        return pd.DataFrame({f: [getattr(st, f) for st in items] for f in _STAT_FIELDS})
    return pd.DataFrame({"value": items})


def _from_frame(df: pd.DataFrame) -> list:
    if "value" in df:
        return df["value"].tolist()
    return [TokenStats(**{f: np.asarray(row[f], dtype=t) for f, t in _STAT_FIELDS.items()})
            for row in df.to_dict("records")]


def _resumable(run, name: str, n: int, label: str, compute) -> list | None:
    """Run one pass over n items in chunks of RESUME_CHUNK: compute(chunk_indices, advance) returns the chunk's
    results on rank 0 (None elsewhere). With a run directory each finished chunk is saved under partial/, and a
    resumed run loads the chunks it already has instead of recomputing them."""
    starts = range(0, n, RESUME_CHUNK)
    saved = {s: run.load_partial(f"{name}-{s:09d}") if run is not None else None for s in starts}
    done = distributed.broadcast_object(sorted(s for s, df in saved.items() if df is not None))
    out: list | None = [None] * n if distributed.is_main() else None
    with progress_bar(n, label) as advance:
        for s in starts:
            chunk = list(range(s, min(n, s + RESUME_CHUNK)))
            if s in done:
                if out is not None:
                    out[s:s + len(chunk)] = _from_frame(saved[s])
                advance(len(chunk))
                continue
            got = compute(chunk, advance)
            if out is not None:
                out[s:s + len(chunk)] = got
                if run is not None:
                    run.save_partial(f"{name}-{s:09d}", _to_frame(got))
    return out


def _tail(st, m: int):
    """The last m tokens' stats of a conditioned pass (the sample's own tokens)."""
    return TokenStats(logprob=st.logprob[-m:], hit=st.hit[-m:], argmax=st.argmax[-m:],
                      mean_lp=st.mean_lp[-m:], var_lp=st.var_lp[-m:])


def _default_out() -> Path:
    return RunDir.default_out("mia")
