"""Memorization sinks, the headline at small scale (Ghosal, Maini, Raghunathan 2025, arXiv 2507.09937).

Training stream: many unique documents plus a few documents repeated many times (the paper: 100 TinyStories
repeated 128 times among 20K unique ones). Documents are ~160-character chunks of the embedded stdlib-docstring
corpus (memaudit.corpus). Three tiny GPT-2 models with the same settings and steps budget per epoch:
  standard   the standard loss on unique + repeated documents
  sinks      --objective sinks on the same stream, evaluated with the sinks dropped (its release model)
  never-saw  the standard loss on the unique documents only (the repeated ones never seen)
Measured with memaudit.scoring.score: the mean per-token loss (nats) on the repeated documents and on held-out
chunks (validation). Headline: with the sinks dropped the loss on the repeated documents moves at least half way
from standard training's toward the never-saw model's, while validation loss stays within 5% of standard's.

Run:  python reports/sinks/reproduce.py --jobs 3   (writes results.csv and results.md here)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from memaudit.corpus import stdlib_docstrings
from memaudit.data import read_documents, tokenize, train_tokenizer, write_documents
from memaudit.models import load_model
from memaudit.scoring import score
from memaudit.training import TrainConfig, train

HERE = Path(__file__).resolve().parent


def chunks(text: str, size: int) -> list[str]:
    """Cut a document at word boundaries into pieces of about `size` characters (the last short one dropped)."""
    out, cur = [], []
    for word in text.split():
        cur.append(word)
        if sum(len(w) + 1 for w in cur) >= size:
            out.append(" ".join(cur))
            cur = []
    return out


def mean_loss(model_dir: Path, data: Path) -> float:
    """Token-weighted mean next-token loss (nats) of a model on documents, every token scored after BOS."""
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    toks = [t[:63] for t in tokenize(loaded.tokenizer, read_documents(data)["text"].tolist())]
    stats = score(loaded.model, toks, bos_id=loaded.tokenizer.bos_token_id, batch_size=64)
    lp = np.concatenate([s.logprob for s in stats])
    return float(-lp.mean())


def run_one(name: str, kw: dict, common: dict, work: Path, files: dict) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # runs go in parallel processes, one core each
    t0 = time.time()
    train(TrainConfig(out=str(work / name), **common, **kw))
    model_dir = work / name / ("release" if name == "sinks" else "")
    rows = [{"model": name + (" (sinks dropped)" if name == "sinks" else ""),
             "loss_repeated_nats": mean_loss(model_dir, files["repeated"]),
             "loss_val_nats": mean_loss(model_dir, files["val"]), "train_seconds": round(time.time() - t0, 1)}]
    if name == "sinks":  # the same model with every sink on, i.e. before the release fold
        rows.append({"model": "sinks (all neurons on, not a release mode)",
                     "loss_repeated_nats": mean_loss(work / name, files["repeated"]),
                     "loss_val_nats": mean_loss(work / name, files["val"]), "train_seconds": 0.0})
    print(json.dumps(rows), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-unique", type=int, default=1000)
    ap.add_argument("--n-repeated", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--config", default="2x64")
    ap.add_argument("--jobs", type=int, default=3, help="models trained at once (one core each)")
    ap.add_argument("--work", default="/tmp/memaudit-sinks")
    ap.add_argument("--no-write", action="store_true", help="print only (for trying settings)")
    args = ap.parse_args()
    work = Path(args.work)
    pieces = [c for d in stdlib_docstrings() for c in chunks(d, 160)]
    rng = np.random.default_rng(0)
    pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    need = args.n_unique + args.n_repeated + args.n_val
    if len(pieces) < need:
        raise SystemExit(f"only {len(pieces)} chunks, need {need}")
    unique = pieces[:args.n_unique]
    repeated = pieces[args.n_unique:args.n_unique + args.n_repeated]
    val = pieces[args.n_unique + args.n_repeated:need]
    stream = unique + [r for r in repeated for _ in range(args.repeats)]
    files = {"stream": write_documents(work / "stream.jsonl", stream),
             "unique": write_documents(work / "unique.jsonl", unique),
             "repeated": write_documents(work / "repeated.jsonl", repeated),
             "val": write_documents(work / "val.jsonl", val)}
    common = dict(val_data=str(files["val"]), config=args.config, epochs=args.epochs, lr=2e-3, batch_size=16,
                  seq_len=64, warmup_steps=20, seed=0, device="cpu", vocab_size=2048)
    runs = {"standard": dict(data=str(files["stream"])),
            "sinks": dict(data=str(files["stream"]), objective="sinks", sink_fraction=0.3, sink_density=0.3),
            "never-saw": dict(data=str(files["unique"]))}
    # one tokenizer for all three models, so per-token losses compare
    train_tokenizer(stream, vocab_size=2048).save_pretrained(work / "tokenizer")
    common["tokenizer"] = str(work / "tokenizer")
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.starmap(run_one, [(name, kw, common, work, files) for name, kw in runs.items()])
    rows = [r for rs in results for r in rs]
    df = pd.DataFrame(rows)
    std, snk, never = (df.iloc[i] for i in (0, 1, 3))
    moved = (snk.loss_repeated_nats - std.loss_repeated_nats) / (never.loss_repeated_nats - std.loss_repeated_nats)
    val_pct = 100.0 * (snk.loss_val_nats / std.loss_val_nats - 1.0)
    head = "| " + " | ".join(df.columns) + " |\n|" + "|".join("---" for _ in df.columns) + "|\n"
    body = "".join("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |\n"
                   for r in df.itertuples(index=False))
    text = (f"# Memorization sinks: headline at small scale\n\nTiny GPT-2 ({args.config}), {args.epochs} epochs; "
            f"stream = {args.n_unique} unique chunks + {args.n_repeated} chunks x {args.repeats} repeats; "
            f"validation = {args.n_val} held-out chunks; sink fraction 0.3, density 0.3. Written by "
            f"`reproduce.py`.\n\n{head}{body}\n## Targets\n\n"
            f"- loss on repeated documents moves >= half way from standard toward never-saw with sinks dropped: "
            f"{moved:.2f} of the way ({std.loss_repeated_nats:.3f} -> {snk.loss_repeated_nats:.3f}, never-saw "
            f"{never.loss_repeated_nats:.3f}) -> {'met' if moved >= 0.5 else 'NOT met'}\n"
            f"- validation loss within 5% of standard's: {snk.loss_val_nats:.4f} vs {std.loss_val_nats:.4f} "
            f"({val_pct:+.1f}%) -> {'met' if abs(val_pct) <= 5 else 'NOT met'}\n")
    print(text)
    if not args.no_write:
        df.assign(gap_closed=[None, moved, None, None]).to_csv(HERE / "results.csv", index=False)
        (HERE / "results.md").write_text(text)


if __name__ == "__main__":
    main()
