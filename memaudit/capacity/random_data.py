"""Model capacity in bits per parameter on uniform random tokens (Morris et al., arXiv 2505.24832, METHODS.md 3).

Data: N sequences of S i.i.d. uniform tokens from V, so H(data) = N * S * log2 V exactly. Each model reads
BOS + the first S-1 tokens and is charged for all S tokens (the first conditioned on BOS; BOS is one extra
embedding row, id V, counted in the parameters). Memorization = H(data) - sum_x bits(x | model), with the code
lengths measured by the scoring engine on each trained model exported to a HF GPT2LMHeadModel. A model's
capacity is the plateau: the maximum over dataset sizes N, valid only when (a) every run it rests on met the
convergence rule (memorized bits grew < plateau_tol over plateau_window steps at constant LR, then the LR was
annealed to 0) and (b) the largest dataset exceeds what the model stores (< 90% of its bits memorized).
Otherwise the figure is a lower bound and is reported as one.

All models of one shape (every dataset size and seed) train together in one `EnsembleGPT`. Under torchrun,
each rank trains its share of the shapes and rank 0 assembles the results.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypedDict

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from .. import distributed
from ..errors import MemauditError
from ..figures import pyplot
from ..progress import progress_bar
from ..rundir import RunDir, summary_header
from ..scoring import score
from .ensemble_model import EnsembleGPT, GPTShape
from .ensemble_train import EnsembleConfig, ModelRecord, train_ensemble
from .laws import PUBLISHED_ALPHA, PUBLISHED_ALPHA_BF16, PUBLISHED_ALPHA_FP32, PUBLISHED_ALPHA_PER_MODEL_RANGE

SATURATION_FRACTION = 0.9  # the largest dataset must be memorized below this fraction for a plateau


@dataclass
class RandomGridConfig:
    """The random-data grid as it runs: `CapacitySettings` after --paper-grid (`CapacitySettings.grid`), which
    holds every default and check. config.json records it as the run's settings and summary.json as `grid`;
    --resume compares the recorded dict, so these fields, their names and their order stay."""
    layers: list[int]
    widths: list[int]
    vocab: int
    seq_len: int
    sizes: list[str]  # N, or multiples of 3.6*P bits
    seeds: int
    max_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    plateau_window: int
    plateau_tol: float
    anneal_fraction: float
    plateau_epochs: float | None  # window in epochs of each model's data (overrides plateau_window)
    head_dim: int
    dtype: str
    threads: int | None
    data_seed: int
    torch_compile: str | None  # on, off, or unset: auto (see EnsembleConfig.torch_compile)


class BitsPerParamFit(TypedDict):
    """Capacity = alpha * params, fitted over the grid's shapes (summary.json `bits_per_param`)."""
    estimate: float  # alpha, bits per parameter
    ci95: list[float]  # bootstrap over the models
    n_models: int  # shapes fitted
    per_model_min: float
    per_model_max: float
    is_lower_bound: bool  # some shape did not reach its plateau
    status: str  # the same in words


class RandomCapacitySummary(TypedDict, total=False):
    """summary.json of `memaudit capacity` (schema rundir.SUMMARY_SCHEMA_VERSION)."""
    schema_version: int
    command: str  # "capacity"
    method: str  # the paper and the METHODS.md section followed
    first_token: str  # how each sequence's first token is coded (on BOS)
    data_bits_formula: str  # H(data) of uniform random tokens
    grid: dict[str, Any]  # the RandomGridConfig the grid ran with (as config.json's settings)
    bits_per_param: BitsPerParamFit
    published: dict[str, Any]  # the published alpha: overall, fp32, bf16, per-model range
    below_capacity_min_memorized_fraction: float | None  # the least memorized model of those below 0.9 x 3.6 bits/param
    below_capacity_rule: str  # that rule in words
    below_measured_capacity_min_memorized_fraction: float | None  # ... below 0.9 x its own shape's measured capacity
    below_measured_capacity_n_models: int  # how many models that is
    n_models: int  # trained models (shapes x sizes x seeds)
    n_converged: int  # of them, those that met the convergence rule
    capacities: list[dict[str, Any]]  # capacities.csv as records: one per shape
    capacity_reached: bool  # every shape reached its plateau: bits_per_param is a capacity, not a lower bound
    message: str  # the headline the CLI prints


PAPER_GRID = dict(layers=[1, 2, 4, 8], widths=[32, 64, 128, 256], vocab=2048, seq_len=64,
                  sizes=["0.25x", "0.5x", "1x", "1.5x", "2x", "4x"], seeds=1, max_steps=100000, batch_size=2048,
                  lr=1e-3, warmup_steps=500)


def parse_size(text: str, params: int, seq_len: int, vocab: int) -> int:
    """`1000` sequences, or `1.5x`: enough sequences for 1.5 * 3.6 bits per parameter of data."""
    try:
        if text.endswith("x"):
            mult = float(text[:-1])
            n = int(round(mult * PUBLISHED_ALPHA * params / (seq_len * math.log2(vocab))))
        else:
            n = int(text)
    except (ValueError, OverflowError):  # OverflowError: an infinite multiple
        raise MemauditError(f"bad dataset size {text!r}: use a number of sequences or a multiple like 1.5x") from None
    if n < 1:
        raise MemauditError(f"dataset size {text!r} gives fewer than 1 sequence")
    return n


def model_shape(layers: int, width: int, vocab: int, seq_len: int, head_dim: int = 16) -> GPTShape:
    heads = max(1, width // head_dim)
    while width % heads:
        heads -= 1
    return GPTShape(layers=layers, width=width, heads=heads, vocab=vocab + 1, positions=seq_len)


def random_dataset(n: int, seq_len: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len), dtype=np.int64)


def _score_bits(hf_model, rows: np.ndarray, bos_id: int, dtype: str) -> float:
    """Total code length (bits) of the rows under the model, by the scoring engine, first token on BOS."""
    if dtype == "bfloat16":
        hf_model = hf_model.to(torch.bfloat16)
    stats = score(hf_model, rows.tolist(), batch_size=256, bos_id=bos_id, pad_id=bos_id)
    return float(sum(s.bits for s in stats))


@dataclass
class _Job:
    """One model of a shape: its dataset size (as given and in sequences), seed and data."""
    size: str
    n: int
    seed: int
    data: np.ndarray


def _jobs(cfg: RandomGridConfig, layers: int, width: int, params: int) -> list[_Job]:
    """Every dataset size x seed of one shape, each with its own random data."""
    jobs = []
    for size in cfg.sizes:
        n = parse_size(size, params, cfg.seq_len, cfg.vocab)
        for seed in range(cfg.seeds):
            data_seed = hash((cfg.data_seed, layers, width, n, seed)) % (2 ** 31)
            jobs.append(_Job(size, n, seed, random_dataset(n, cfg.seq_len, cfg.vocab, data_seed)))
    return jobs


def _ensemble_config(cfg: RandomGridConfig) -> EnsembleConfig:
    return EnsembleConfig(max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                          warmup_steps=cfg.warmup_steps, eval_every=cfg.eval_every,
                          plateau_window=cfg.plateau_window, plateau_tol=cfg.plateau_tol,
                          plateau_epochs=cfg.plateau_epochs,
                          anneal_fraction=cfg.anneal_fraction, compute_dtype=cfg.dtype, threads=cfg.threads,
                          torch_compile=cfg.torch_compile)


def train_shape(cfg: RandomGridConfig, layers: int, width: int,
                on_eval: Callable[[int, list[ModelRecord]], None] | None = None,
                checkpoint: str | os.PathLike | None = None) -> pd.DataFrame:
    """All dataset sizes x seeds of one shape in one ensemble; one results row per model.

    `checkpoint`: train_ensemble's checkpoint file, so an interrupted shape continues from its last evaluation.
    """
    shape = model_shape(layers, width, cfg.vocab, cfg.seq_len, cfg.head_dim)
    jobs = _jobs(cfg, layers, width, shape.parameters)
    bits_per_token = math.log2(cfg.vocab)
    H = [job.n * cfg.seq_len * bits_per_token for job in jobs]
    records = train_ensemble(shape, [job.data for job in jobs], [1000 * layers + width + 7 * job.seed for job in jobs],
                             _ensemble_config(cfg), bos_id=cfg.vocab, data_bits=H, on_eval=on_eval,
                             checkpoint=checkpoint)
    seconds = max(r.seconds for r in records)  # training time, summed over resumed sessions
    one = EnsembleGPT(shape, [0])
    rows = []
    for rec, job, h in zip(records, jobs, H):
        with torch.no_grad():
            for k, v in rec.final_state.items():
                one.params[k].copy_(v[None])
        bits = _score_bits(one.to_hf(0, bos_id=cfg.vocab), job.data, cfg.vocab, cfg.dtype)
        rows.append(_result_row(cfg, shape, job, rec, h, bits, seconds))
    return pd.DataFrame(rows)


def _result_row(cfg: RandomGridConfig, shape: GPTShape, job: _Job, rec: ModelRecord, h: float, bits: float,
                seconds: float) -> dict[str, Any]:
    """One model's row of results.csv: `h` bits of data, `bits` of them left under the model."""
    P = shape.parameters
    return {"layers": shape.layers, "width": shape.width, "heads": shape.heads, "params": P, "size": job.size,
            "n_sequences": job.n, "seed": job.seed, "vocab": cfg.vocab, "seq_len": cfg.seq_len, "dtype": cfg.dtype,
            "data_bits": h, "model_bits": bits, "memorized_bits": h - bits,
            "memorized_fraction": (h - bits) / h, "bits_per_param": (h - bits) / P,
            "final_loss_nats": rec.history[-1][1] if rec.history else float("nan"),
            "steps": rec.steps, "anneal_start": rec.anneal_start, "converged": rec.converged,
            "ensemble_seconds": seconds,
            "history": ";".join(f"{s}:{h - b:.1f}" for s, _, b in rec.history)}


def capacities(results: pd.DataFrame) -> pd.DataFrame:
    """Per shape: capacity = max over dataset sizes of memorized bits (mean over seeds), with validity flags."""
    out = []
    for (L, W), g in results.groupby(["layers", "width"], sort=True):
        by_n = g.groupby("n_sequences").agg(memorized_bits=("memorized_bits", "mean"),
                                            data_bits=("data_bits", "first"),
                                            converged=("converged", "all")).reset_index()
        best = by_n.loc[by_n["memorized_bits"].idxmax()]
        largest = by_n.loc[by_n["n_sequences"].idxmax()]
        saturated = bool(largest["memorized_bits"] < SATURATION_FRACTION * largest["data_bits"])
        converged = bool(g["converged"].all())
        P = int(g["params"].iloc[0])
        out.append({"layers": L, "width": W, "params": P, "capacity_bits": float(best["memorized_bits"]),
                    "bits_per_param": float(best["memorized_bits"]) / P,
                    "at_n_sequences": int(best["n_sequences"]), "converged": converged,
                    "saturated": saturated, "lower_bound": not (converged and saturated)})
    return pd.DataFrame(out)


def fit_bits_per_param(caps: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> BitsPerParamFit:
    """Capacity = alpha * params, least squares through the origin; 95% CI by bootstrap over the models."""
    P = caps["params"].to_numpy(float)
    C = caps["capacity_bits"].to_numpy(float)
    if len(P) == 0:
        raise MemauditError("no models to fit")
    alpha = float((P * C).sum() / (P * P).sum())
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(P), len(P))
        boots.append((P[i] * C[i]).sum() / (P[i] * P[i]).sum())
    lo, hi = np.quantile(boots, [0.025, 0.975]) if len(P) > 1 else (alpha, alpha)
    lower = bool(caps["lower_bound"].any())
    return {"estimate": alpha, "ci95": [float(lo), float(hi)], "n_models": int(len(P)),
            "per_model_min": float(caps["bits_per_param"].min()), "per_model_max": float(caps["bits_per_param"].max()),
            "is_lower_bound": lower,
            "status": ("lower bound: some models did not reach their plateau (not converged in --max-steps, or "
                       "the largest dataset was still memorized >= 90%)") if lower else "capacity (all plateaus reached)"}


def run_grid(cfg: RandomGridConfig, out: str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False) -> tuple[RandomCapacitySummary, Path, pd.DataFrame]:
    """The random-data grid: train, measure, fit; writes results.csv, capacities.csv, summary.json, figures.

    Returns the summary, the run directory and the results table; under torchrun, ranks other than 0 return an
    empty summary and table once their shapes are saved.
    """
    rank, world = distributed.env_rank(), distributed.env_world()
    run = _open_run(cfg, out or RunDir.default_out("capacity"), rank, world, resume=resume, overwrite=overwrite)
    if resume and (run.path / "results.csv").exists():  # a finished run: refit and redraw only (rank 0)
        if rank > 0:
            return {}, run.path, pd.DataFrame()
        return _finish(run, cfg, pd.read_csv(run.path / "results.csv"))
    _train_shapes(run, cfg, rank, world)
    if world > 1:
        dist.barrier()
        if rank > 0:
            return {}, run.path, pd.DataFrame()
    results = pd.concat(run.load_partials(), ignore_index=True).sort_values(["params", "n_sequences", "seed"])
    return _finish(run, cfg, results)


def _open_run(cfg: RandomGridConfig, out: str | os.PathLike, rank: int, world: int, *, resume: bool,
              overwrite: bool) -> RunDir:
    """Rank 0 creates (or checks) the run directory; under torchrun the other ranks then join it."""
    if world > 1:
        # gloo: ranks only meet at the end, so no short timeout
        distributed.init_from_env(timeout=datetime.timedelta(hours=48))
    settings = asdict(cfg)
    if rank == 0:
        run = RunDir(out, "capacity", settings, resume=resume, overwrite=overwrite)
    if world > 1:
        dist.barrier()  # rank 0 has created (or checked) the run directory; the others join it
    if rank > 0:
        run = RunDir(out, "capacity", settings, resume=True)
    return run


def _train_shapes(run: RunDir, cfg: RandomGridConfig, rank: int, world: int) -> None:
    """This rank's share of the shapes not yet saved, each saved as a partial result when trained."""
    shapes = [(L, W) for L in cfg.layers for W in cfg.widths]
    done = {(int(d["layers"].iloc[0]), int(d["width"].iloc[0])) for d in run.load_partials() if len(d)}
    mine = [s for i, s in enumerate(shapes) if i % world == rank and s not in done]
    with progress_bar(len(mine) * cfg.max_steps, "capacity grid") as advance:
        for L, W in mine:
            last = [0]

            def tick(step, _recs, last=last):
                advance(step - last[0])
                last[0] = step

            ckpt = run.partial_path(f"shape-L{L}-W{W}.ckpt")  # --resume goes on from the last evaluation
            df = train_shape(cfg, L, W, on_eval=tick, checkpoint=ckpt)
            run.save_partial(f"shape-L{L}-W{W}", df)
            ckpt.unlink(missing_ok=True)
            advance(cfg.max_steps - last[0])


def _finish(run: RunDir, cfg: RandomGridConfig,
            results: pd.DataFrame) -> tuple[RandomCapacitySummary, Path, pd.DataFrame]:
    """Fit and write: results, capacities, summary.json, figures."""
    caps = capacities(results)
    fit = fit_bits_per_param(caps)
    run.write_samples(results.drop(columns=["history"]), "results.parquet")
    run.write_csv("results.csv", results)
    run.write_csv("capacities.csv", caps)
    summary = _summary(cfg, results, caps, fit)
    run.write_summary(summary)
    figs = capacity_figures(results, caps, fit)
    for name, fig in figs.items():
        run.save_figure(fig, name)
    run.finish()
    return summary, run.path, results


def _summary(cfg: RandomGridConfig, results: pd.DataFrame, caps: pd.DataFrame,
             fit: BitsPerParamFit) -> RandomCapacitySummary:
    below = results[results["data_bits"] <= 0.9 * results["params"] * PUBLISHED_ALPHA]
    # below this shape's own measured capacity (90% of it), the stricter reading when capacity < 3.6 bits/param
    cap_of = {(int(c["layers"]), int(c["width"])): c["capacity_bits"] for _, c in caps.iterrows()}
    below_own = results[[d <= 0.9 * cap_of[(int(L), int(W))]
                         for d, L, W in zip(results["data_bits"], results["layers"], results["width"])]]
    summary: RandomCapacitySummary = {
        **summary_header("capacity"),
        "method": "Morris et al. (arXiv 2505.24832) random-data capacity; METHODS.md section 3",
        "first_token": "conditioned on BOS (id = vocab, one extra embedding row, counted in params)",
        "data_bits_formula": "N * S * log2(V)",
        "grid": asdict(cfg),
        "bits_per_param": fit,
        "published": {"alpha": PUBLISHED_ALPHA, "fp32": PUBLISHED_ALPHA_FP32, "bf16": PUBLISHED_ALPHA_BF16,
                      "per_model_range": list(PUBLISHED_ALPHA_PER_MODEL_RANGE)},
        "below_capacity_min_memorized_fraction": float(below["memorized_fraction"].min()) if len(below) else None,
        "below_capacity_rule": f"data bits <= 0.9 x {PUBLISHED_ALPHA} x params (published capacity)",
        "below_measured_capacity_min_memorized_fraction":
            float(below_own["memorized_fraction"].min()) if len(below_own) else None,
        "below_measured_capacity_n_models": int(len(below_own)),
        "n_models": int(len(results)), "n_converged": int(results["converged"].sum()),
        "capacities": caps.to_dict(orient="records"),
    }
    if fit["is_lower_bound"]:
        summary["capacity_reached"] = False
        summary["message"] = (f"no capacity reported: {int((caps['lower_bound']).sum())} of {len(caps)} shapes did not "
                              f"reach their plateau within --max-steps {cfg.max_steps}; "
                              f"{fit['estimate']:.2f} bits/parameter is a lower bound")
    else:
        summary["capacity_reached"] = True
        summary["message"] = (f"capacity {fit['estimate']:.2f} bits/parameter "
                              f"(95% CI {fit['ci95'][0]:.2f}-{fit['ci95'][1]:.2f})")
    return summary


def capacity_figures(results: pd.DataFrame, caps: pd.DataFrame, fit: BitsPerParamFit) -> dict:
    figs = {"memorization_vs_data.png": _memorization_vs_data_figure(results, caps),
            "capacity_vs_params.png": _capacity_vs_params_figure(caps, fit)}
    if "history" in results.columns:
        figs["training_curves.png"] = _training_curves_figure(results, caps)
    return figs


def _memorization_vs_data_figure(results: pd.DataFrame, caps: pd.DataFrame):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(caps))))
    for color, (_, c) in zip(colors, caps.iterrows()):
        g = results[(results["layers"] == c["layers"]) & (results["width"] == c["width"])]
        g = g.groupby("n_sequences").agg(x=("data_bits", "first"), y=("memorized_bits", "mean"),
                                         conv=("converged", "all")).reset_index()
        ax.plot(g["x"], g["y"], "-", color=color, label=f"{c['layers']}x{c['width']} ({c['params']:,} params)")
        conv = g["conv"].to_numpy(bool)
        ax.scatter(g["x"][conv], g["y"][conv], color=color, marker="o")
        ax.scatter(g["x"][~conv], g["y"][~conv], facecolors="none", edgecolors=color, marker="o")
        ax.axhline(c["capacity_bits"], color=color, ls=":", lw=0.8)
    lim = results["data_bits"].max()
    ax.plot([0, lim], [0, lim], "k--", lw=0.8, label="memorized = data bits")
    ax.set_xlabel("dataset bits H(data)")
    ax.set_ylabel("memorized bits")
    ax.set_title("Memorization vs data (hollow: not converged); dotted: capacity", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _capacity_vs_params_figure(caps: pd.DataFrame, fit: BitsPerParamFit):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(caps["params"], caps["capacity_bits"], c=np.where(caps["lower_bound"], "tab:orange", "tab:blue"),
               zorder=3, label="capacity per model (orange: lower bound)")
    x = np.linspace(0, caps["params"].max() * 1.1, 50)
    tag = " (lower bound)" if fit["is_lower_bound"] else ""
    ax.plot(x, fit["estimate"] * x, "b-", label=f"fit {fit['estimate']:.2f} bits/param "
            f"[{fit['ci95'][0]:.2f}, {fit['ci95'][1]:.2f}]{tag}")
    ax.plot(x, PUBLISHED_ALPHA * x, "k--", label=f"published {PUBLISHED_ALPHA} bits/param")
    ax.set_xlabel("parameters")
    ax.set_ylabel("capacity (bits)")
    ax.legend(fontsize=8)
    ax.set_title("Capacity vs parameters", fontsize=10)
    return fig


def _training_curves_figure(results: pd.DataFrame, caps: pd.DataFrame):
    """Memorized bits per parameter vs step, one panel per shape."""
    plt = pyplot()
    from matplotlib.ticker import EngFormatter  # lazy, as pyplot (memaudit.figures)

    shapes = list(caps[["layers", "width"]].itertuples(index=False, name=None))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3.2), squeeze=False, sharey=True)
    for ax, (L, W) in zip(axes[0], shapes):
        g = results[(results["layers"] == L) & (results["width"] == W)].sort_values("n_sequences")
        for color, (_, r) in zip(plt.cm.plasma(np.linspace(0, 0.8, max(1, len(g)))), g.iterrows()):
            _training_curve(ax, r, color)
        ax.axhline(PUBLISHED_ALPHA, color="k", ls="--", lw=0.7)
        ax.set_title(f"{L}x{W} ({int(g['params'].iloc[0]):,} params)", fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, not 20000: long runs' labels ran together
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("memorized bits / parameter")
    fig.suptitle("Training curves (dotted: plateau found, LR annealed from there; dashed curve: not converged; "
                 f"black: published {PUBLISHED_ALPHA})", fontsize=8)
    fig.tight_layout()
    return fig


def _training_curve(ax, r: pd.Series, color) -> None:
    """One model's curve from its `history` column; dashed when it did not converge, its anneal start dotted."""
    pts = [tuple(map(float, h.split(":"))) for h in str(r["history"]).split(";") if ":" in h]
    if not pts:
        return
    st, mb = zip(*pts)
    ls = "-" if r["converged"] else "--"
    ax.plot(st, np.asarray(mb) / r["params"], ls, color=color, lw=1,
            label=f"{r['size']} ({r['data_bits'] / r['params']:.1f} b/p){'' if r['converged'] else ' not conv.'}")
    if isinstance(r.get("anneal_start"), (int, float)) and r["anneal_start"] == r["anneal_start"]:
        ax.axvline(r["anneal_start"], color=color, ls=":", lw=0.7)
