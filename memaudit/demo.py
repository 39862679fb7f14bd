"""`memaudit demo`: the embedded default, end to end on CPU in minutes with nothing downloaded.

Builds the stdlib-docstring corpus (memaudit.corpus), trains a tiny GPT-2 on the train part until it has
memorized it, and runs the extraction probe on the trained documents and on held-out ones from the same source.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from .corpus import demo_corpus
from .data import write_documents
from .extraction import extract
from .models import load_model
from .training import TrainConfig, train

# The window the probe uses (Pythia's 32 + 32) and the rows the model trains on: BOS + the first 71 tokens
# cover the window (the trainer trains only each document's start, as the probe prompts it).
PREFIX, SUFFIX, SEQ_LEN = 32, 32, 72


def run_demo(out: str | os.PathLike = "runs/demo", *, epochs: int = 60, n_train: int = 100, n_heldout: int = 100,
             seed: int = 0, overwrite: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Returns {"train": summary, "heldout": summary} of the two extraction runs."""
    out = Path(out)
    members, heldout = demo_corpus(n_train=n_train, n_heldout=n_heldout, seed=seed)
    train_file = write_documents(out / "data" / "train.jsonl", members, [f"train-{i}" for i in range(len(members))])
    heldout_file = write_documents(out / "data" / "heldout.jsonl", heldout,
                                   [f"heldout-{i}" for i in range(len(heldout))])
    echo(f"corpus: {len(members)} training and {len(heldout)} held-out docstrings of the Python standard library "
         f"-> {out / 'data'}")
    model_dir = out / "model"
    stamp = {"epochs": epochs, "n_train": n_train, "seed": seed, "seq_len": SEQ_LEN}
    stamp_file = model_dir / "demo_stamp.json"
    if overwrite or not stamp_file.exists() or json.loads(stamp_file.read_text()) != stamp:
        t0 = time.time()
        res = train(TrainConfig(data=str(train_file), out=str(model_dir), config="tiny", epochs=epochs, lr=3e-3,
                                batch_size=16, seq_len=SEQ_LEN, val_fraction=0.0, seed=seed, device="cpu"))
        stamp_file.write_text(json.dumps(stamp))
        echo(f"trained a tiny GPT-2 ({res.parameters:,} parameters) for {epochs} epochs in {time.time() - t0:.0f} s: "
             f"final train loss {res.train_loss:.3f} -> {model_dir}")
    else:
        echo(f"reusing the trained model in {model_dir}")
    loaded = load_model(model_dir, device="cpu")
    summaries = {}
    for name, f in (("train", train_file), ("heldout", heldout_file)):
        df = extract(loaded, f, prefix=PREFIX, suffix=SUFFIX, out=out / f"extract-{name}", overwrite=True)
        summaries[name] = df.attrs["summary"]
    echo("")
    echo(f"extraction, greedy, prefix {PREFIX} -> suffix {SUFFIX} tokens:")
    echo(f"  {'documents':<22}{'exact':>12}{'token match':>13}{'ROUGE-L':>9}{'ROUGE-L text':>14}")
    for name, label in (("train", "trained on"), ("heldout", "held out")):
        s = summaries[name]
        echo(f"  {label:<22}{s['n_exact']:>4}/{s['n_samples']:<3} {s['exact_rate']:>4.2f}"
             f"{s['mean_token_match']:>13.3f}{s['mean_rouge_l']:>9.3f}{s['mean_rouge_l_text']:>14.3f}")
    echo(f"runs: {out / 'extract-train'}, {out / 'extract-heldout'} (samples.parquet, summary.json, histograms)")
    return summaries
