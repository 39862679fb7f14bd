"""Goldfish loss, the paper's extreme setting at small scale (Hans et al. 2024, arXiv 2406.10209, section 4.1).

A tiny GPT-2 is trained for many epochs on 100 real documents (the embedded stdlib-docstring corpus,
memaudit.corpus.demo_corpus), once with the standard loss and once per goldfish mask (hash, static, random,
and the official repository's product hash) and drop rate 1/k, k in {2, 4, 8}. Each model is then probed for
exact extraction: the first 32 tokens of each document as the prompt, the next 32 as the target (METHODS.md
section 1), with memaudit's extraction probe (`memaudit extract`, greedy decoding).
The paper: standard loss 84/100 documents reproduced verbatim, goldfish k=4 0/100 (LLaMA-2-7B, 100 epochs).

Run:  python reports/goldfish/reproduce.py --jobs 2   (writes results.csv and results.md here)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from memaudit.corpus import demo_corpus
from memaudit.data import write_documents
from memaudit import report
from memaudit.extraction import extract
from memaudit.training import TrainConfig, train_or_reuse

HERE = Path(__file__).resolve().parent
PREFIX, SUFFIX = 32, 32
SEQ_LEN = 72  # BOS + 71 tokens: covers the 64-token extraction window
RUNS = [("standard", None, None)] + [(mode, k, None) for mode in ("hash", "static", "random") for k in (2, 4, 8)] \
    + [("hash-official", 4, None)]


def markdown_table(df: pd.DataFrame) -> str:
    return report.markdown_table(df.columns, df.itertuples(index=False),
                                 cell=lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))


def extraction(model_dir: Path, data: Path) -> dict:
    """The extraction probe (`memaudit extract`, greedy): 32-token prompts, 32-token targets, BOS first."""
    summary = extract(model_dir=model_dir, data=data, prefix=PREFIX, suffix=SUFFIX, device="cpu", dtype="float32",
                      batch_size=32, write=False).summary
    return {"documents": summary["n_samples"], "exact": summary["n_exact"],
            "exact_pct": 100.0 * summary["exact_rate"], "match_prefix_mean": summary["mean_match_prefix"],
            "token_match": summary["mean_token_match"], "rouge_l_text": summary["mean_rouge_l_text"]}


def drop_rates(model_dir: Path, data: Path, mode: str, k: int, h: int) -> tuple[float, float]:
    """(dropped / all real targets, dropped / eligible targets) of a deterministic mask, recomputed on the
    training rows exactly as the trainer builds them (BOS + the first SEQ_LEN - 1 tokens of each document).
    Eligible = targets the mask can drop at all (objectives.goldfish_eligible): for the hash modes those with
    a full h-token context. Each epoch sees the same mask, so one pass gives the run's rates."""
    import torch

    from memaudit.data import read_documents, tokenize
    from memaudit.models import load_tokenizer
    from memaudit.training.objectives import goldfish_drop_mask, goldfish_eligible

    tok = load_tokenizer(model_dir)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    dropped = targets = eligible_n = dropped_eligible = 0
    for t in tokenize(tok, read_documents(data)["text"].tolist()):
        if not t:
            continue
        row = torch.tensor([[bos] + t[: SEQ_LEN - 1]])
        drop = goldfish_drop_mask(row, mode, k, h)[0, 1:]
        elig = goldfish_eligible(row.shape[1], mode, h)[1:]
        dropped += int(drop.sum())
        targets += drop.numel()
        eligible_n += int(elig.sum())
        dropped_eligible += int((drop & elig).sum())
    return dropped / targets, dropped_eligible / max(1, eligible_n)


def run_one(name: str, mode: str, k: int | None, work: Path, epochs: int, config: str) -> dict:
    import torch

    torch.set_num_threads(1)  # runs go in parallel processes, one core each
    t0 = time.time()
    extra = {} if k is None else {"objective": "goldfish", "goldfish_mode": mode, "goldfish_k": k, "goldfish_h": 13}
    cfg = TrainConfig(data=str(work / "train.jsonl"), val_data=str(work / "val.jsonl"), out=str(work / name),
                      config=config, epochs=epochs, lr=3e-3, batch_size=16, seq_len=SEQ_LEN, rows="first",
                      warmup_steps=20, seed=0, device="cpu", **extra)
    res = train_or_reuse(cfg)  # a model trained before with these settings and inputs is reused
    ex = extraction(work / name, work / "train.jsonl")
    # drop rate among eligible targets: random redraws every step and can drop any target, so its logged
    # fraction already is that rate; the deterministic masks are recomputed and checked against the log
    dropped_eligible = res.dropped_fraction
    if k is not None and mode != "random":
        recomputed, dropped_eligible = drop_rates(work / name, work / "train.jsonl", mode, k, 13)
        if abs(recomputed - res.dropped_fraction) > 1e-9:
            raise SystemExit(f"{name}: recomputed drop fraction {recomputed} != trainer's {res.dropped_fraction}")
    row = {"run": name, "mask": mode if k else "-", "k": k or "-", "epochs": epochs,
           "dropped_fraction": res.dropped_fraction, "dropped_of_eligible": dropped_eligible,
           **ex, "val_loss": res.val_loss,
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once (one core each)")
    ap.add_argument("--work", default="/tmp/memaudit-goldfish")
    ap.add_argument("--only", default=None, help="comma list of run names, e.g. standard,hash-k4 (print only)")
    ap.add_argument("--write", action="store_true", help="with --only: still write results.csv/results.md")
    args = ap.parse_args()
    work = Path(args.work)
    members, heldout = demo_corpus(n_train=100, n_heldout=100, seed=0)
    write_documents(work / "train.jsonl", members, [f"m{i}" for i in range(len(members))])
    write_documents(work / "val.jsonl", heldout, [f"h{i}" for i in range(len(heldout))])
    todo = [(mode if k is None else f"{mode}-k{k}", mode, k, work, args.epochs, args.config) for mode, k, _ in RUNS]
    if args.only:
        todo = [t for t in todo if t[0] in args.only.split(",")]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.starmap(run_one, todo)
    df = pd.DataFrame(rows)
    if "standard" in set(df["run"]):
        std = float(df.loc[df["run"] == "standard", "val_loss"].iloc[0])
        df["val_loss_vs_standard_pct"] = 100.0 * (df["val_loss"] / std - 1.0)
    if args.only and not args.write:
        print(df.to_string(index=False))
        return
    df.to_csv(HERE / "results.csv", index=False)
    std_row = df[df.run == "standard"].iloc[0]
    gf4 = df[df.run == "hash-k4"].iloc[0]
    lines = ["# Goldfish loss: extreme setting at small scale", "",
             f"Tiny GPT-2 ({args.config}), {args.epochs} epochs on 100 stdlib docstrings; extraction with "
             f"{PREFIX}-token prompts and {SUFFIX}-token targets over the {int(std_row.documents)} documents long "
             "enough; validation on 100 held-out docstrings (unmasked loss). Written by "
             f"`python reports/goldfish/reproduce.py --epochs {args.epochs} --config {args.config}`.", "",
             markdown_table(df), "",
             "`dropped_fraction`: targets excluded from the loss / all targets, as the trainer logs it. "
             "`dropped_of_eligible`: the same among the targets the mask can drop at all; the hash masks never "
             "drop a document's first h - 1 = 12 targets (fewer than h = 13 tokens of context, as in the "
             "official code), so over all targets their rate is below 1/k while among eligible ones it is ~1/k. "
             "Recomputed from the saved tokenizer and the training rows, and checked to reproduce the logged "
             "fraction exactly; for `random` (redrawn each step, any target eligible) it is the logged fraction. "
             "`seconds`: this invocation's wall time per run (training and extraction; runs already trained in "
             "the work dir are only measured), with --jobs runs sharing the machine: compare within one table only.",
             "",
             "Runs not in the table were not finished in this session's time budget.\n" if args.only else "",
             "## Targets", "",
             f"- standard reproduces >= 80% exactly (paper 84/100): {std_row.exact}/{int(std_row.documents)} "
             f"({std_row.exact_pct:.0f}%) -> {'met' if std_row.exact_pct >= 80 else 'NOT met'}",
             f"- goldfish hash k=4 reproduces none (paper 0/100): {gf4.exact}/{int(gf4.documents)} -> "
             f"{'met' if gf4.exact == 0 else 'NOT met'}",
             f"- goldfish hash k=4 validation loss within 10% of standard's: {gf4.val_loss:.4f} vs "
             f"{std_row.val_loss:.4f} ({gf4.val_loss_vs_standard_pct:+.1f}%) -> "
             f"{'met' if abs(gf4.val_loss_vs_standard_pct) <= 10 else 'NOT met'}"]
    for k in (2, 4, 8):
        if not {f"random-k{k}", f"hash-k{k}"} <= set(df.run):
            continue
        r, h = df[df.run == f"random-k{k}"].iloc[0], df[df.run == f"hash-k{k}"].iloc[0]
        lines.append(f"- k={k}: random leaks {r.exact} exact / token match {r.token_match:.3f}, hash "
                     f"{h.exact} / {h.token_match:.3f} -> random leaks more: "
                     f"{'yes' if (r.exact, r.token_match) > (h.exact, h.token_match) else 'NO'}")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
