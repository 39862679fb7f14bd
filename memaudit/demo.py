"""`memaudit demo`: the embedded default, end to end on CPU in about a minute with nothing downloaded.

Builds the stdlib-docstring corpus (memaudit.corpus), trains one tiny GPT-2 per objective (standard, goldfish,
sinks) on the train part, runs the extraction probe on the trained documents (and, for the standard model, on
held-out ones from the same source: the memorized-vs-unseen contrast), membership inference and unintended
memorization on each, and writes one comparison report.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import checks
from .corpus import demo_corpus
from .data import write_documents
from .extraction import extract
from .membership import mia
from .memorization import memorization
from .models import load_model
from .report import report as write_report
from .rundir import Owned
from .training import TrainConfig, train, train_or_reuse

# The window the probe uses (Pythia's 32 + 32) and the rows the model trains on: BOS + the first 71 tokens
# cover the window (the trainer trains only each document's start, as the probe prompts it).
PREFIX, SUFFIX, SEQ_LEN = 32, 32, 72


SHOWCASE_OBJECTIVES = ("standard", "goldfish", "sinks")
SHOWCASE_ATTACKS = "loss,zlib,min_k,min_k_pp"  # one pass each; recall/gradnorm/dc_pdd are left to `memaudit mia`


@dataclass
class _Probed:
    """One objective's measured model: its runs (for the report) and headline figures (for the console table)."""
    figures: dict[str, Any]
    run_dirs: list[Path]
    labels: list[str]


def run_demo(out: str | os.PathLike = "runs/demo", *, epochs: int = 50, n_train: int = 64, n_heldout: int = 64,
             seed: int = 0, config: str = "tiny", objectives: tuple[str, ...] = SHOWCASE_OBJECTIVES,
             overwrite: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Train one tiny model per objective on the same docstrings, run extraction, membership inference (trained
    vs held-out docstrings) and unintended memorization (vs zstd) on each, and write one comparison report.
    Sinks models are measured as released (OUT/models/sinks/release: sinks removed). Returns the headline figures
    per objective and the report's paths."""
    t_start = time.time()
    out = Path(out)
    checks.integer("--epochs", epochs)
    checks.integer("--n-train", n_train, low=2)
    checks.integer("--n-heldout", n_heldout, low=2)  # membership inference needs 2 of each side
    checks.seed(seed)
    for objective in objectives:
        checks.choice("objective", objective, SHOWCASE_OBJECTIVES)
    owned = Owned(out, "demo", reuse=True)  # a demo folder is written again on every run (models reused)
    owned.record(dirs=["data", "models", "runs", "report"])
    train_file, heldout_file = _write_corpus(out, n_train, n_heldout, seed, echo)
    probed: dict[str, _Probed] = {}
    for objective in objectives:
        model_dir = _train_or_reuse(out, objective, train_file, epochs=epochs, seed=seed, config=config,
                                    overwrite=overwrite, echo=echo)
        probed[objective] = _probe(out, objective, model_dir, train_file, heldout_file, seed, echo)
    rep = write_report(run_dirs=[d for p in probed.values() for d in p.run_dirs], out=out / "report",
                       labels=[label for p in probed.values() for label in p.labels],
                       title="memaudit demo: standard vs goldfish vs sinks on stdlib docstrings")
    figures = {objective: p.figures for objective, p in probed.items()}
    _echo_table(figures, echo)
    echo(f"demo done in {time.time() - t_start:.0f} s; report as Markdown: {rep.markdown}")
    echo(f"report -> {rep.html}")
    return {"figures": figures, "report": {"markdown": str(rep.markdown), "html": str(rep.html)},
            "seconds": time.time() - t_start}


def _write_corpus(out: Path, n_train: int, n_heldout: int, seed: int,
                  echo: Callable[[str], None]) -> tuple[Path, Path]:
    members, heldout = demo_corpus(n_train=n_train, n_heldout=n_heldout, seed=seed)
    train_file = write_documents(out / "data" / "train.jsonl", members, [f"train-{i}" for i in range(len(members))])
    heldout_file = write_documents(out / "data" / "heldout.jsonl", heldout,
                                   [f"heldout-{i}" for i in range(len(heldout))])
    echo(f"corpus: {len(members)} training and {len(heldout)} held-out stdlib docstrings -> {out / 'data'}")
    return train_file, heldout_file


def _train_or_reuse(out: Path, objective: str, train_file: Path, *, epochs: int, seed: int, config: str,
                    overwrite: bool, echo: Callable[[str], None]) -> Path:
    model_dir = out / "models" / objective
    cfg = TrainConfig(data=str(train_file), out=str(model_dir), objective=objective, config=config, epochs=epochs,
                      lr=3e-3, batch_size=16, seq_len=SEQ_LEN, rows="first", val_fraction=0.0, seed=seed, device="cpu",
                      overwrite=True)  # a model of ours trained with other settings is replaced
    t0 = time.time()
    res = train(cfg) if overwrite else train_or_reuse(cfg)
    if res.reused:
        echo(f"[{objective}] reusing the trained model in {model_dir}")
    else:
        echo(f"[{objective}] trained {res.parameters:,} parameters for {epochs} epochs in "
             f"{time.time() - t0:.0f} s (train loss {res.train_loss:.3f})")
    return model_dir


def _probe(out: Path, objective: str, model_dir: Path, train_file: Path, heldout_file: Path, seed: int,
           echo: Callable[[str], None]) -> _Probed:
    """Extraction (and, for the standard model, on held-out docs), membership inference and memorization."""
    measured = model_dir / "release" if (model_dir / "release" / "config.json").is_file() else model_dir
    runs = out / "runs" / objective
    loaded = load_model(measured, device="cpu")
    ext = extract(model_dir=loaded, data=train_file, prefix=PREFIX, suffix=SUFFIX, out=runs / "extract",
                  overwrite=True).summary
    held = None
    if objective == "standard":  # the contrast that says the probe measures memorization, not fluency
        held = extract(model_dir=loaded, data=heldout_file, prefix=PREFIX, suffix=SUFFIX,
                       out=runs / "extract-heldout", overwrite=True).summary
        echo(f"[standard] extraction, greedy, prefix {PREFIX} -> suffix {SUFFIX}: trained-on "
             f"{ext['n_exact']}/{ext['n_samples']} exact, held-out {held['n_exact']}/{held['n_samples']} exact")
    res_mia = mia(model_dir=measured, members=train_file, nonmembers=heldout_file, attacks=SHOWCASE_ATTACKS,
                  bootstrap=200, seed=seed, device="cpu", out=runs / "mia", overwrite=True)
    mem = memorization(model_dir=measured, data=train_file, reference="zstd", device="cpu",
                       out=runs / "memorization", overwrite=True).summary
    figures = {"exact_rate": ext["exact_rate"], "mean_rouge_l": ext["mean_rouge_l"],
               "heldout_exact_rate": held and held["exact_rate"],
               "loss_auc": res_mia.summary["attacks"]["loss"]["auc"],
               "mem_u_bits_per_token": mem["mem_u_bits_per_token"]}
    echo(f"[{objective}] exact {ext['exact_rate']:.2f}, ROUGE-L {ext['mean_rouge_l']:.3f}, loss-attack AUC "
         f"{figures['loss_auc']:.3f}, mem_U {mem['mem_u_bits_per_token']:.2f} bits/token")
    run_dirs = [model_dir, runs / "extract", runs / "mia", runs / "memorization"]
    labels = [objective] * 4
    if held:
        run_dirs.append(runs / "extract-heldout")
        labels.append("standard, held-out docs")
    return _Probed(figures=figures, run_dirs=run_dirs, labels=labels)


def _echo_table(figures: dict[str, dict[str, Any]], echo: Callable[[str], None]) -> None:
    echo("")
    echo(f"{'objective':<10}{'exact':>8}{'ROUGE-L':>9}{'MIA AUC':>9}{'mem_U bits/tok':>16}")
    for objective, f in figures.items():
        echo(f"{objective:<10}{f['exact_rate']:>8.2f}{f['mean_rouge_l']:>9.3f}{f['loss_auc']:>9.3f}"
             f"{f['mem_u_bits_per_token']:>16.2f}")
