"""Memorization sinks, the headline at small scale (Ghosal, Maini, Raghunathan 2025, arXiv 2507.09937).

The paper's headline setting (METHODS.md section 5): TinyStories, 100 sequences repeated 128 times among 20K
unique stories, i.e. about one pass in which each unique story is seen once and only the chosen sequences
repeat. Here, at small scale: documents are ~160-character chunks of the standard library's source docstrings
(memaudit.corpus.stdlib_source_docstrings, ~7K chunks; data/README.md), split at random into held-out
validation chunks, the repeated chunks and the unique chunks. The training stream is every unique chunk once
plus each repeated chunk `--repeats` times, shuffled by the trainer, so the repeats are spread over the whole
run; `--epochs` passes over it (default 1, as in the paper). Three tiny GPT-2 models, same settings:
  standard   the standard loss on the stream
  sinks      --objective sinks on the same stream, measured with the sinks dropped (its release model)
  never-saw  the standard loss on the unique chunks only (the repeated ones never seen), trained the same way
All three share one tokenizer, trained on the unique chunks only (which every model sees), so per-token losses
compare. Measured with memaudit.scoring.score: the mean per-token loss (nats) on the repeated chunks and on the
held-out chunks (validation). Headline: with the sinks dropped the loss on the repeated chunks moves at least
half way from standard training's toward the never-saw model's, while validation loss stays within 5% of
standard's.

Run:  python reports/sinks/reproduce.py --epochs 5 --sink-fraction 0.6 --jobs 3   (the headline in results.md;
      writes results.csv and results.md here; the defaults are the one-pass, paper-default starting point)
Other settings: --results-dir DIR writes elsewhere; copied to explore/<label>/ they join results.md's table of
settings tried (README.md says how the headline setting was chosen).
A model already trained in the work dir with the same settings and input files is reused (only measured).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from memaudit.data import read_documents, tokenize, train_tokenizer, write_documents
from memaudit.models import load_model
from memaudit.report import markdown_table
from memaudit.scoring import score
from memaudit.training import TrainConfig, train_or_reuse

HERE = Path(__file__).resolve().parent
RUN_NAMES = ("standard", "sinks", "never-saw")


def chunks(text: str, size: int) -> list[str]:
    """Cut a document at word boundaries into pieces of about `size` characters (the last short one dropped)."""
    out, cur = [], []
    for word in text.split():
        cur.append(word)
        if sum(len(w) + 1 for w in cur) >= size:
            out.append(" ".join(cur))
            cur = []
    return out


def corpus(name: str) -> list[str]:
    from memaudit import corpus as c

    if name == "source":
        return c.stdlib_source_docstrings()
    if name == "docstrings":
        return c.stdlib_docstrings()
    raise SystemExit(f"unknown corpus {name!r}: use source or docstrings")


def mean_loss(model_dir: Path, data: Path, seq_len: int) -> float:
    """Token-weighted mean next-token loss (nats) of a model on documents, every token scored after BOS."""
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    toks = [t[:seq_len - 1] for t in tokenize(loaded.tokenizer, read_documents(data)["text"].tolist())]
    stats = score(loaded.model, toks, bos_id=loaded.tokenizer.bos_token_id, batch_size=64)
    lp = np.concatenate([s.logprob for s in stats])
    return float(-lp.mean())


def write_if_changed(path: Path, texts: list[str]) -> Path:
    """write_documents, but leave an identical file alone (runs sharing a work dir read it concurrently)."""
    import os

    tmp = write_documents(path.with_suffix(f".tmp{os.getpid()}.jsonl"), texts)
    if path.is_file() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(path)
    return path


def run_one(name: str, kw: dict, common: dict, work: Path, files: dict) -> list[dict]:
    """Train (or reuse: same settings and same input files) one model and measure it."""
    import torch

    torch.set_num_threads(1)  # runs go in parallel processes, one core each
    is_sinks = kw.get("objective") == "sinks"
    out = work / (f"sinks-s{kw['sink_fraction']}-p{kw['sink_density']}" if is_sinks else name)
    t0 = time.time()
    res = train_or_reuse(TrainConfig(out=str(out), **common, **kw))  # same settings and inputs: reused
    steps = res.steps
    seconds = float(pd.read_csv(out / "training_log.csv")["seconds"].iloc[-1]) if res.reused else \
        round(time.time() - t0, 1)
    model_dir = out / ("release" if is_sinks else "")
    seq = common["seq_len"]
    rows = [{"model": name + (" (sinks dropped)" if is_sinks else ""),
             "loss_repeated_nats": mean_loss(model_dir, files["repeated"], seq),
             "loss_val_nats": mean_loss(model_dir, files["val"], seq), "steps": steps,
             "train_seconds": seconds}]
    if is_sinks:  # the same model with every sink on, i.e. before the release fold
        rows.append({"model": "sinks (all neurons on, not a release mode)",
                     "loss_repeated_nats": mean_loss(out, files["repeated"], seq),
                     "loss_val_nats": mean_loss(out, files["val"], seq), "steps": steps,
                     "train_seconds": 0.0})
    print(json.dumps(rows), flush=True)
    return rows


def explorations_section(root: Path) -> str:
    """A table of every other setting tried: the results.csv/results.md each run of this script wrote under
    `root`/<label>/ (copied there from its --results-dir), so no figure here is typed by hand."""
    rows = []
    for csv in sorted(root.glob("*/results.csv")):
        df = pd.read_csv(csv).set_index("model")
        md = (csv.parent / "results.md").read_text()
        cmd = md.split("Written by `", 1)[1].split("`", 1)[0] if "Written by `" in md else "?"
        std, snk = df.loc["standard"], df.loc["sinks (sinks dropped)"]
        rows.append(f"| {csv.parent.name} | `{cmd}` | {std.loss_repeated_nats:.3f} | {snk.loss_repeated_nats:.3f} | "
                    f"{df.loc['never-saw'].loss_repeated_nats:.3f} | {snk.gap_closed:.2f} | "
                    f"{100.0 * (snk.loss_val_nats / std.loss_val_nats - 1.0):+.1f}% |")
    if not rows:
        return ""
    return ("\n## Settings tried\n\nEvery setting this script was run with while designing the experiment "
            "(each row from that run's own results.csv in `explore/`; gap_closed = the fraction of the way the "
            "sinks-dropped model's loss on the repeated chunks moved from standard's toward never-saw's):\n\n"
            "| label | command | standard | sinks dropped | never-saw | gap_closed | val vs standard |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="source", choices=("source", "docstrings"))
    ap.add_argument("--chunk-chars", type=int, default=160)
    ap.add_argument("--n-unique", type=int, default=0, help="unique chunks (0 = all that are left)")
    ap.add_argument("--n-repeated", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--config", default="2x64")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sink-fraction", type=float, default=0.3)
    ap.add_argument("--sink-density", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=",".join(RUN_NAMES), help="comma list of models to train (print only "
                    "unless all three)")
    ap.add_argument("--jobs", type=int, default=3, help="models trained at once (one core each)")
    ap.add_argument("--work", default="/tmp/memaudit-sinks")
    ap.add_argument("--no-write", action="store_true", help="print only (for trying settings)")
    ap.add_argument("--results-dir", default=str(HERE), help="where results.csv and results.md go")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pieces = [c for d in corpus(args.corpus) for c in chunks(d, args.chunk_chars)]
    pieces = list(dict.fromkeys(pieces))  # exact duplicate chunks would be hidden repeats
    rng = np.random.default_rng(args.seed)
    pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    n_fixed = args.n_val + args.n_repeated
    n_unique = args.n_unique or len(pieces) - n_fixed
    if len(pieces) < n_fixed + n_unique:
        raise SystemExit(f"only {len(pieces)} chunks, need {n_fixed + n_unique}")
    val = pieces[:args.n_val]
    repeated = pieces[args.n_val:n_fixed]
    unique = pieces[n_fixed:n_fixed + n_unique]
    stream = unique + [r for r in repeated for _ in range(args.repeats)]
    files = {"stream": write_if_changed(work / "stream.jsonl", stream),
             "unique": write_if_changed(work / "unique.jsonl", unique),
             "repeated": write_if_changed(work / "repeated.jsonl", repeated),
             "val": write_if_changed(work / "val.jsonl", val)}
    # one tokenizer for all three models (per-token losses compare), from text every model sees; kept when
    # it was trained on the same unique chunks (models in this work dir may be reused)
    source = work / "tokenizer.source.sha256"
    digest = hashlib.sha256(files["unique"].read_bytes()).hexdigest()
    if not (source.is_file() and source.read_text() == digest and (work / "tokenizer").is_dir()):
        train_tokenizer(unique, vocab_size=2048).save_pretrained(work / "tokenizer")
        source.write_text(digest)
    common = dict(val_data=str(files["val"]), config=args.config, epochs=args.epochs, lr=args.lr,
                  batch_size=args.batch_size, seq_len=args.seq_len, rows="first", warmup_steps=args.warmup,
                  seed=args.seed, device="cpu", tokenizer=str(work / "tokenizer"))
    runs = {"standard": dict(data=str(files["stream"])),
            "sinks": dict(data=str(files["stream"]), objective="sinks", sink_fraction=args.sink_fraction,
                          sink_density=args.sink_density),
            "never-saw": dict(data=str(files["unique"]))}
    wanted = args.runs.split(",")
    runs = {k: v for k, v in runs.items() if k in wanted}
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(args.jobs, len(runs))) as pool:
        results = pool.starmap(run_one, [(name, kw, common, work, files) for name, kw in runs.items()])
    df = pd.DataFrame([r for rs in results for r in rs])
    print(df.to_string(index=False))
    if len(runs) < 3:
        return
    by = df.set_index("model")
    std, snk, never = by.loc["standard"], by.loc["sinks (sinks dropped)"], by.loc["never-saw"]
    moved = (snk.loss_repeated_nats - std.loss_repeated_nats) / (never.loss_repeated_nats - std.loss_repeated_nats)
    val_pct = 100.0 * (snk.loss_val_nats / std.loss_val_nats - 1.0)
    table = markdown_table(df.columns, df.itertuples(index=False),
                           cell=lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)) + "\n"
    cmd = " ".join(["python reports/sinks/reproduce.py"] + [
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("runs", "jobs", "work", "no_write", "results_dir") and v != ap.get_default(k)])
    text = (f"# Memorization sinks: headline at small scale\n\nTiny GPT-2 ({args.config}), {args.epochs} "
            f"epoch(s) over the stream, lr {args.lr} (warmup {args.warmup} steps, cosine to 10%), batch "
            f"{args.batch_size}, rows of at most {args.seq_len} tokens; stream = {len(unique)} unique chunks "
            f"(each seen once per epoch) + {args.n_repeated} chunks x {args.repeats} repeats, shuffled together; "
            f"validation = {args.n_val} held-out chunks; corpus `{args.corpus}` in ~{args.chunk_chars}-character "
            f"chunks; sink fraction {args.sink_fraction}, density {args.sink_density}; never-saw = the same "
            f"training on the unique chunks only. Written by `{cmd}`. train_seconds: wall time, on a machine "
            f"shared with other jobs (0 for the row that re-measures the sinks model).\n\n{table}\n"
            f"## Targets\n\n"
            f"- loss on repeated documents moves >= half way from standard toward never-saw with sinks dropped: "
            f"{moved:.2f} of the way ({std.loss_repeated_nats:.3f} -> {snk.loss_repeated_nats:.3f}, never-saw "
            f"{never.loss_repeated_nats:.3f}) -> {'met' if moved >= 0.5 else 'NOT met'}\n"
            f"- validation loss within 5% of standard's: {snk.loss_val_nats:.4f} vs {std.loss_val_nats:.4f} "
            f"({val_pct:+.1f}%) -> {'met' if abs(val_pct) <= 5 else 'NOT met'}\n")
    if Path(args.results_dir).resolve() == HERE:
        text += explorations_section(HERE / "explore")
    print(text)
    if not args.no_write:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        df.assign(gap_closed=[moved if m == "sinks (sinks dropped)" else None for m in df.model]).to_csv(
            out / "results.csv", index=False)
        (out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
