"""`memaudit demo`: the embedded default, end to end on CPU in about a minute with nothing downloaded.

Builds the stdlib-docstring corpus (memaudit.corpus), trains one tiny GPT-2 per objective (standard, goldfish,
sinks) on the train part, runs the extraction probe on the trained documents (and, for the standard model, on
held-out ones from the same source: the memorized-vs-unseen contrast), membership inference and unintended
memorization on each, and writes one comparison report.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from . import checks
from .corpus import demo_corpus
from .data import write_documents
from .extraction import extract
from .models import load_model
from .rundir import Owned, write_json
from .training import TrainConfig, train

# The window the probe uses (Pythia's 32 + 32) and the rows the model trains on: BOS + the first 71 tokens
# cover the window (the trainer trains only each document's start, as the probe prompts it).
PREFIX, SUFFIX, SEQ_LEN = 32, 32, 72


SHOWCASE_OBJECTIVES = ("standard", "goldfish", "sinks")
SHOWCASE_ATTACKS = "loss,zlib,min_k,min_k_pp"  # one pass each; recall/gradnorm/dc_pdd are left to `memaudit mia`


def run_demo(out: str | os.PathLike = "runs/demo", *, epochs: int = 50, n_train: int = 64, n_heldout: int = 64,
             seed: int = 0, config: str = "tiny", objectives: tuple[str, ...] = SHOWCASE_OBJECTIVES,
             overwrite: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Train one tiny model per objective on the same docstrings, run extraction, membership inference (trained
    vs held-out docstrings) and unintended memorization (vs zstd) on each, and write one comparison report.
    Sinks models are measured as released (OUT/models/sinks/release: sinks removed). Returns the headline figures
    per objective and the report's paths."""
    from .memorization import measure_memorization
    from .membership import mia
    from .report import build_report

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
    members, heldout = demo_corpus(n_train=n_train, n_heldout=n_heldout, seed=seed)
    train_file = write_documents(out / "data" / "train.jsonl", members, [f"train-{i}" for i in range(len(members))])
    heldout_file = write_documents(out / "data" / "heldout.jsonl", heldout,
                                   [f"heldout-{i}" for i in range(len(heldout))])
    echo(f"corpus: {len(members)} training and {len(heldout)} held-out stdlib docstrings -> {out / 'data'}")
    figures: dict[str, dict] = {}
    report_dirs: list[Path] = []
    labels: list[str] = []
    for objective in objectives:
        model_dir = out / "models" / objective
        stamp = {"epochs": epochs, "n_train": n_train, "seed": seed, "seq_len": SEQ_LEN, "config": config,
                 "objective": objective}
        stamp_file = out / "models" / f"{objective}.demo.json"  # beside the model dir: train owns the inside
        if overwrite or not stamp_file.exists() or json.loads(stamp_file.read_text()) != stamp:
            t0 = time.time()
            res = train(TrainConfig(data=str(train_file), out=str(model_dir), objective=objective, config=config,
                                    epochs=epochs, lr=3e-3, batch_size=16, seq_len=SEQ_LEN, val_fraction=0.0,
                                    seed=seed, device="cpu", overwrite=model_dir.exists()))
            write_json(stamp_file, stamp)
            echo(f"[{objective}] trained {res.parameters:,} parameters for {epochs} epochs in "
                 f"{time.time() - t0:.0f} s (train loss {res.train_loss:.3f})")
        else:
            echo(f"[{objective}] reusing the trained model in {model_dir}")
        measured = model_dir / "release" if (model_dir / "release" / "config.json").is_file() else model_dir
        runs = out / "runs" / objective
        loaded = load_model(measured, device="cpu")
        ext = extract(loaded, train_file, prefix=PREFIX, suffix=SUFFIX, out=runs / "extract", overwrite=True)
        held = None
        if objective == "standard":  # the contrast that says the probe measures memorization, not fluency
            held = extract(loaded, heldout_file, prefix=PREFIX, suffix=SUFFIX, out=runs / "extract-heldout",
                           overwrite=True).attrs["summary"]
            echo(f"[standard] extraction, greedy, prefix {PREFIX} -> suffix {SUFFIX}: trained-on "
                 f"{ext.attrs['summary']['n_exact']}/{ext.attrs['summary']['n_samples']} exact, held-out "
                 f"{held['n_exact']}/{held['n_samples']} exact")
        res_mia = mia(measured, train_file, heldout_file, attacks=SHOWCASE_ATTACKS, bootstrap=200, seed=seed,
                      device="cpu", out=runs / "mia", overwrite=True)
        mem = measure_memorization(measured, train_file, "zstd", device="cpu", out=runs / "memorization",
                                   overwrite=True)
        s = ext.attrs["summary"]
        figures[objective] = {"exact_rate": s["exact_rate"], "mean_rouge_l": s["mean_rouge_l"],
                              "heldout_exact_rate": held and held["exact_rate"],
                              "loss_auc": res_mia.summary["attacks"]["loss"]["auc"],
                              "mem_u_bits_per_token": mem["mem_u_bits_per_token"]}
        echo(f"[{objective}] exact {s['exact_rate']:.2f}, ROUGE-L {s['mean_rouge_l']:.3f}, loss-attack AUC "
             f"{figures[objective]['loss_auc']:.3f}, mem_U {mem['mem_u_bits_per_token']:.2f} bits/token")
        report_dirs += [model_dir, runs / "extract", runs / "mia", runs / "memorization"]
        labels += [objective] * 4
        if held:
            report_dirs.append(runs / "extract-heldout")
            labels.append("standard, held-out docs")
    rep = build_report(report_dirs, out / "report", labels=labels,
                       title="memaudit demo: standard vs goldfish vs sinks on stdlib docstrings")
    echo("")
    echo(f"{'objective':<10}{'exact':>8}{'ROUGE-L':>9}{'MIA AUC':>9}{'mem_U bits/tok':>16}")
    for objective, f in figures.items():
        echo(f"{objective:<10}{f['exact_rate']:>8.2f}{f['mean_rouge_l']:>9.3f}{f['loss_auc']:>9.3f}"
             f"{f['mem_u_bits_per_token']:>16.2f}")
    echo(f"report -> {rep['markdown']}, {rep['html']} ({time.time() - t_start:.0f} s in all)")
    return {"figures": figures, "report": rep, "seconds": time.time() - t_start}
