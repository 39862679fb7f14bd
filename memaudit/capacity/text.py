"""Real text: fixed models on growing numbers of 64-token windows (double descent) and the MIA scaling law.

Morris et al. (arXiv 2505.24832), METHODS.md section 3. For each model shape and each dataset size N the model
trains on the first N windows of one shuffled pool of deduplicated 64-token windows; a reference model of the
same shape trains on the whole pool. All of them (every N and the reference) train together in one ensemble,
for a fixed step budget (text has no known H(data), so the random-data plateau rule does not apply).
Measured with the scoring engine on the exported models:
  - test loss (nats/token) on held-out windows, and train loss;
  - per-sample unintended memorization mem_U = max(0, bits(x|reference) - bits(x|model)) of the training windows;
  - dataset bits = sum_x bits(x|reference) over the training windows; x-axis = dataset bits / (3.6 * params),
    and dataset bits / the capacity the budget reached (the largest total mem_U of any dataset size);
  - loss-threshold MIA F1: members = the N training windows, non-members = as many held-out windows, the
    threshold that maximises F1 (an optimistic attacker, as a scaling-law fit needs one rule for every point).
The sigmoid law of `memaudit.capacity.laws` is fitted to (N/P, F1) and compared with the published constants.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import torch

from ..data import file_hash, read_documents, tokenize, train_tokenizer
from ..errors import MemauditError
from ..figures import pyplot
from ..rundir import RunDir, check_output, summary_header
from ..samples import tiles
from ..scoring import score
from .ensemble_model import EnsembleGPT, GPTShape
from .ensemble_train import EnsembleConfig, ModelRecord, train_ensemble
from .laws import PUBLISHED_ALPHA, PUBLISHED_CONSTANTS, fit_mia_law, mia_law

WINDOW = 64


@dataclass
class TextCapacityConfig:
    """The text experiment as it runs, made by `CapacitySettings.text_config` (which holds every default and check).
    config.json records it as the run's settings; --resume compares the recorded dict, so these fields, their
    names and their order stay."""
    text: str
    widths: list[int]
    layers: int
    vocab_size: int
    sizes: list[int]
    n_test: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int
    threads: int | None
    text_field: str
    torch_compile: str | None  # on, off, or unset: auto (see EnsembleConfig.torch_compile)


class TextCapacitySummary(TypedDict, total=False):
    """summary.json of `memaudit capacity --text` (schema rundir.SUMMARY_SCHEMA_VERSION)."""
    schema_version: int
    command: str  # "capacity-text"
    method: str  # the first paragraph of this module's docstring
    tokenizer_vocab: int  # tokens of the tokenizer trained on the text
    n_windows_pool: int  # training windows the dataset sizes are cut from
    n_test_windows: int  # held-out windows
    capacity_alpha_for_x_axis: float  # bits/param behind the dataset bits / capacity axis
    mia_law_fit: dict[str, Any]  # the MIA law fitted to (N/P, F1): c1, c2, c3, ... or {"error": why not}
    mia_law_published: dict[str, Any]  # the published constants, named
    mia_f1_rmse_vs_published_law: float
    results: list[dict[str, Any]]  # text_results.csv as records
    test_loss_peak_at_data_over_capacity: list[dict[str, Any]]  # per width: where the test loss peaks
    measured_capacity: list[dict[str, Any]]  # per width: the most total mem_U of any dataset size
    message: str  # the headline the CLI prints


@dataclass
class _Corpus:
    """The text cut into windows: held-out test windows and the pool the dataset sizes take their first N of."""
    test: np.ndarray
    pool: np.ndarray
    sizes: list[int]  # the dataset sizes the pool holds
    bos: int
    vocab: int  # the tokenizer's

    def info(self) -> dict[str, int]:
        return {"tokenizer_vocab": self.vocab, "n_windows_pool": int(len(self.pool)),
                "n_test_windows": int(len(self.test))}


def text_windows(texts: list[str], tokenizer, window: int = WINDOW) -> np.ndarray:
    """Every non-overlapping `window`-token chunk of every document, duplicates dropped (first kept)."""
    chunks = tiles(tokenize(tokenizer, texts), window)
    if not len(chunks):
        raise MemauditError(f"no document has {window} tokens: give a longer text file")
    return chunks.array(window)


def best_f1(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Max F1 over thresholds of `score >= t => member` (scores: higher = more likely a member)."""
    s = np.concatenate([member_scores, nonmember_scores])
    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # only thresholds between distinct scores
    tp, fp = tp[last], fp[last]
    f1 = 2 * tp / (tp + fp + len(member_scores))
    return float(f1.max())


def run_text(cfg: TextCapacityConfig, out: str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False) -> tuple[TextCapacitySummary, Path, pd.DataFrame]:
    """Double descent and the MIA law on real text; writes text_results.csv, summary.json, figures.

    Returns the summary, the run directory and the results table."""
    out = out or RunDir.default_out("capacity-text")
    check_output(out, "capacity-text", inputs=[cfg.text], resume=resume, overwrite=overwrite)
    texts = read_documents(cfg.text, text_field=cfg.text_field)["text"].tolist()
    run = RunDir(out, "capacity-text", asdict(cfg),
                 inputs={"text": cfg.text, "text_sha256": file_hash(cfg.text)}, resume=resume, overwrite=overwrite)
    if resume and (run.path / "text_results.csv").exists():  # a finished run: refit and redraw only
        return _finish_text(run, pd.read_csv(run.path / "text_results.csv"), {})
    corpus = _corpus(cfg, texts)
    results = pd.concat([_width_results(run, cfg, corpus, width) for width in cfg.widths], ignore_index=True)
    return _finish_text(run, results, corpus.info())


def _corpus(cfg: TextCapacityConfig, texts: list[str]) -> _Corpus:
    """A tokenizer trained on the text, its windows shuffled and split into test windows and the training pool."""
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    windows = text_windows(texts, tok)
    rng = np.random.default_rng(cfg.seed)
    windows = windows[rng.permutation(len(windows))]
    n_test = min(cfg.n_test, len(windows) // 4)
    test, pool = windows[:n_test], windows[n_test:]
    sizes = sorted({n for n in cfg.sizes if n <= len(pool)})
    if len(sizes) < 3:
        raise MemauditError(f"only {len(pool)} training windows of {WINDOW} tokens: too few for 3 dataset sizes")
    return _Corpus(test=test, pool=pool, sizes=sizes, bos=tok.bos_token_id, vocab=len(tok))


def _width_results(run: RunDir, cfg: TextCapacityConfig, corpus: _Corpus, width: int) -> pd.DataFrame:
    """One width's rows: its models trained (one per dataset size, and the reference) and measured, saved as a
    partial result; a width saved before (--resume) is read back."""
    done = [d for d in run.load_partials() if len(d) and d["width"].iloc[0] == width]
    if done:
        return done[0]
    shape = GPTShape(layers=cfg.layers, width=width, heads=max(1, width // 16), vocab=corpus.vocab,
                     positions=WINDOW)
    pool, sizes = corpus.pool, corpus.sizes
    datasets = [pool[:n] for n in sizes] + [pool]  # the last one is the reference (whole corpus pool)
    ecfg = EnsembleConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                          warmup_steps=cfg.warmup_steps, eval_every=cfg.steps, drop_converged=False,
                          threads=cfg.threads, torch_compile=cfg.torch_compile)
    recs = train_ensemble(shape, datasets, [cfg.seed * 100 + i for i in range(len(datasets))], ecfg,
                          bos_id=corpus.bos)
    df = pd.DataFrame(_measure(shape, recs, corpus))
    run.save_partial(f"text-W{width}", df)
    return df


def _measure(shape: GPTShape, recs: list[ModelRecord], corpus: _Corpus) -> list[dict[str, Any]]:
    """Per dataset size: train and test loss, mem_U against the reference (the last record), the loss attack's F1."""
    one = EnsembleGPT(shape, [0])
    test, pool, P = corpus.test, corpus.pool, shape.parameters

    def bits_of(rec: ModelRecord, data: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            for k, v in rec.final_state.items():
                one.params[k].copy_(v[None])
        stats = score(one.to_hf(0, bos_id=corpus.bos), data.tolist(), batch_size=128, bos_id=corpus.bos,
                      pad_id=corpus.bos)
        return np.array([s.bits for s in stats])

    ref = recs[-1]
    ref_test = bits_of(ref, test)
    ref_pool = bits_of(ref, pool[:max(corpus.sizes)])
    rows = []
    for n, rec in zip(corpus.sizes, recs[:-1]):
        train_bits = bits_of(rec, pool[:n])
        test_bits = bits_of(rec, test)
        mem = np.maximum(0.0, ref_pool[:n] - train_bits)
        k = min(n, len(test))
        f1 = best_f1(-train_bits[:k], -test_bits[:k])  # loss attack: lower loss = member
        data_bits = float(ref_pool[:n].sum())
        rows.append({"width": shape.width, "layers": shape.layers, "params": P, "n_sequences": n,
                     "n_over_p": n / P, "dataset_bits_ref": data_bits,
                     "data_over_capacity": data_bits / (PUBLISHED_ALPHA * P),
                     "train_loss_nats": float(train_bits.sum() * math.log(2) / (n * WINDOW)),
                     "test_loss_nats": float(test_bits.sum() * math.log(2) / (len(test) * WINDOW)),
                     "ref_test_loss_nats": float(ref_test.sum() * math.log(2) / (len(test) * WINDOW)),
                     "mem_u_bits_total": float(mem.sum()), "mem_u_bits_per_sample": float(mem.mean()),
                     "mia_f1": f1, "mia_pairs": k, "steps": rec.steps})
    return rows


def _finish_text(run: RunDir, results: pd.DataFrame,
                 info: dict[str, int]) -> tuple[TextCapacitySummary, Path, pd.DataFrame]:
    """Fit and write: text_results.csv, summary.json, figures. `info` empty: a refit, which keeps the corpus
    figures of the recorded summary."""
    old = run.path / "summary.json"
    if not info and old.exists():
        prev = json.loads(old.read_text())
        info = {k: prev[k] for k in ("tokenizer_vocab", "n_windows_pool", "n_test_windows") if k in prev}
    # The capacity a width reached under this step budget: the most unintended memorization any of its models
    # holds. The 3.6 bits/param axis assumes training to saturation; a fixed budget stops well short of it.
    reached = results.groupby("width")["mem_u_bits_total"].transform("max")
    results = results.assign(data_over_measured_capacity=results["dataset_bits_ref"] / reached)
    run.write_csv("text_results.csv", results)
    try:
        fit = fit_mia_law(results["n_over_p"], results["mia_f1"])
    except MemauditError as exc:
        fit = {"error": str(exc)}
    pub = mia_law(results["n_over_p"], **PUBLISHED_CONSTANTS)
    summary: TextCapacitySummary = {
        **summary_header("capacity-text"), "method": __doc__.split("\n\n")[0], **info,
        "capacity_alpha_for_x_axis": PUBLISHED_ALPHA,
        "mia_law_fit": fit, "mia_law_published": {"name": "morris2025", **PUBLISHED_CONSTANTS},
        "mia_f1_rmse_vs_published_law": float(np.sqrt(np.mean((results["mia_f1"] - pub) ** 2))),
        "results": results.to_dict(orient="records")}
    peak = results.loc[results.groupby("width")["test_loss_nats"].idxmax()]
    summary["test_loss_peak_at_data_over_capacity"] = peak[
        ["width", "n_sequences", "data_over_capacity", "data_over_measured_capacity"]].to_dict(orient="records")
    most = results.loc[results.groupby("width")["mem_u_bits_total"].idxmax()]
    summary["measured_capacity"] = [{"width": int(r.width), "bits": float(r.mem_u_bits_total),
                                     "bits_per_param": float(r.mem_u_bits_total / r.params),
                                     "at_n_sequences": int(r.n_sequences)} for r in most.itertuples()]
    summary["message"] = (f"{len(results)} text runs; MIA law fit c1={fit.get('c1', float('nan')):.3g} "
                          f"c2={fit.get('c2', float('nan')):.3g} c3={fit.get('c3', float('nan')):.3g} "
                          f"(published morris2025: {PUBLISHED_CONSTANTS['c1']:.3g}, {PUBLISHED_CONSTANTS['c2']:.3g}, "
                          f"{PUBLISHED_CONSTANTS['c3']:.3g})")
    run.write_summary(summary)
    for name, fig in text_figures(results, fit).items():
        run.save_figure(fig, name)
    run.finish()
    return summary, run.path, results


def text_figures(results: pd.DataFrame, fit: dict) -> dict:
    plt = pyplot()

    figs = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for w, g in results.groupby("width"):
        g = g.sort_values("data_over_capacity")
        for ax, x in ((axes[0], "data_over_capacity"), (axes[2], "data_over_measured_capacity")):
            ax.plot(g[x], g["test_loss_nats"], "o-", label=f"test, width {w}")
            ax.plot(g[x], g["train_loss_nats"], "x--", label=f"train, width {w}")
        axes[1].plot(g["data_over_capacity"], g["mem_u_bits_per_sample"], "o-", label=f"width {w}")
    for ax in axes:
        ax.set_xscale("log")
        ax.axvline(1.0, color="grey", ls=":")
        ax.set_xlabel(f"dataset bits / capacity ({PUBLISHED_ALPHA} bits/param)")
        ax.legend(fontsize=7)
    axes[2].set_xlabel("dataset bits / capacity reached (max total mem_U)")
    axes[0].set_ylabel("loss (nats/token)")
    axes[1].set_ylabel("mem_U per training sample (bits)")
    axes[2].set_ylabel("loss (nats/token)")
    figs["double_descent.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.scatter(results["n_over_p"], results["mia_f1"], label="measured (loss attack)")
    x = np.logspace(np.log10(results["n_over_p"].min() / 2), np.log10(max(results["n_over_p"].max() * 2, 0.2)), 100)
    ax.plot(x, mia_law(x, **PUBLISHED_CONSTANTS), "k--", label="published law")
    if "c1" in fit:
        ax.plot(x, mia_law(x, fit["c1"], fit["c2"], fit["c3"]), "b-", label="fitted law")
    ax.set_xscale("log")
    ax.set_xlabel("training sequences / parameters")
    ax.set_ylabel("MIA F1")
    ax.legend(fontsize=8)
    figs["mia_law.png"] = fig
    return figs
