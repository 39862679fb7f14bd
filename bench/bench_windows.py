"""Benchmark: `memaudit extract --stride` over whole documents vs every window through batched HF `generate`.

Same model, same windows, same batch size, same process, one run. The peer way is Pythia's memorization study
carried over whole documents: tokenize, cut every window of prefix + suffix tokens at the stride, greedy
`generate` of each suffix from BOS + its prefix in batches, then the same metrics (exact, token_match,
match_prefix, ROUGE-L on ids and on text) and the same per-document table (windows, exact windows, tokens inside an
exactly reproduced suffix, longest run of them, mean ROUGE-L). Both sides are checked to give the same rows.

Two corpora of at least 200K tokens each, --stride 32 with prefix 32 + suffix 32 (every token after a document's
first 32 is in exactly one suffix):
- mostly memorized: a base text of ~6,600 tokens (stdlib docstrings) that a tiny GPT-2 memorized, behind 32
  short headers whose token lengths differ modulo 32, so that every window of the corpus is a different stretch of
  the base text (no two windows are identical, so memaudit's probing identical windows once plays no part; the
  summary's n_repeats is printed). The model is trained (cached, `train_or_reuse`) on 8 of the 32 documents
  (packed rows), so it continues the base text from any phase.
- none memorized: 32 documents of held-out docstrings of the same source, the same sizes.

Then peak memory: `extract --stride` (a run directory, as the CLI writes) in a fresh process on N and on 10 N
documents (a tiny random model, which decodes every window), against the growth of its result rows (samples and
documents tables, pandas' deep memory). Results go to bench/results/bench_windows.txt; the last line is
`speedup=<x>`, the memorized case's ratio of wall times.

    python bench/bench_windows.py [--batch-size 16] [--repeats 1] [--cache DIR] [--memory-docs 100]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memaudit import extract, load_model, read_documents, write_documents
from memaudit.corpus import stdlib_source_docstrings
from memaudit.data import train_tokenizer
from memaudit.extraction import sample_metrics
from memaudit.metrics import rouge_l_text
from memaudit.training import train_or_reuse

PREFIX = SUFFIX = STRIDE = 32
WINDOW = PREFIX + SUFFIX
COPIES = 32  # documents of the memorized corpus (one per phase modulo the stride)
BASE_TOKENS = 6_600  # the memorized base text: COPIES x BASE_TOKENS >= 200K tokens
TRAINED = range(0, COPIES, 4)  # the documents the model is trained on


# --- the corpora and the model -----------------------------------------------------------------------------------

def corpora(cache: Path) -> tuple[Path, Path, Path, Path]:
    """The tokenizer, the memorized corpus, the training file (8 of its documents) and the held-out corpus."""
    tok_dir = cache / "tokenizer"
    files = (cache / "memorized.jsonl", cache / "train.jsonl", cache / "heldout.jsonl")
    if (tok_dir / "tokenizer.json").is_file() and all(f.is_file() for f in files):
        return (tok_dir, *files)  # built before (deterministic: the same stdlib gives the same files)
    texts = stdlib_source_docstrings()
    random.Random(0).shuffle(texts)
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(texts).save_pretrained(tok_dir)
    tok = load_tokenizer(tok_dir)
    base, rest = _take(texts, tok, BASE_TOKENS)
    n_base = len(tok(base, add_special_tokens=False)["input_ids"])
    memorized = [_header(j, base, n_base, tok) + base for j in range(COPIES)]
    heldout = []
    for _ in range(COPIES):
        doc, rest = _take(rest, tok, n_base)
        heldout.append(doc)
    mem = write_documents(cache / "memorized.jsonl", memorized, [f"copy{j}" for j in range(COPIES)])
    train = write_documents(cache / "train.jsonl", [memorized[j] for j in TRAINED], [f"copy{j}" for j in TRAINED])
    held = write_documents(cache / "heldout.jsonl", heldout, [f"held{j}" for j in range(COPIES)])
    return tok_dir, mem, train, held


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def _take(texts: list[str], tok, n_tokens: int) -> tuple[str, list[str]]:
    """Docstrings joined by blank lines until the text holds n_tokens tokens; and the docstrings left."""
    out, n = [], 0
    while n < n_tokens:
        t = texts.pop(0)
        out.append(t)
        n += len(tok(t, add_special_tokens=False)["input_ids"]) + 1
    return "\n\n".join(out), texts


def _header(j: int, base: str, n_base: int, tok) -> str:
    """A header line whose tokens number j modulo the stride, leaving the base text's tokens as they are alone."""
    base_ids = tok(base, add_special_tokens=False)["input_ids"]
    for k in range(400):
        head = f"Copy {j}." + " copy" * k + "\n"
        ids = tok(head + base, add_special_tokens=False)["input_ids"]
        if ids[-n_base:] == base_ids and (len(ids) - n_base) % STRIDE == j:
            return head
    raise RuntimeError(f"no header found for phase {j}")


def trained_model(cache: Path, tok_dir: Path, train_file: Path, epochs: int) -> Path:
    out = cache / "model"
    train_or_reuse(data=train_file, out=out, tokenizer=tok_dir, epochs=epochs, lr=3e-3, batch_size=16, seq_len=128,
                   rows="packed", val_fraction=0.0, seed=0, device="cpu", overwrite=True)
    return out


# --- the peer way ------------------------------------------------------------------------------------------------

def peer_extract(m, data: Path, batch_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every window at the stride through batched greedy `generate`, the metrics row by row, the documents table."""
    from transformers import GenerationConfig

    docs = read_documents(data)
    token_lists = m.tokenizer(docs["text"].tolist(), add_special_tokens=False)["input_ids"]  # the standard call
    where = [(d, s) for d, t in enumerate(token_lists) for s in range(0, len(t) - WINDOW + 1, STRIDE)]
    # eos_token_id=[]: never stop at EOS (None would fall back to the model's own EOS, which a model trained on
    # packed rows emits, and the row would be cut short and padded)
    cfg = GenerationConfig(max_new_tokens=SUFFIX, do_sample=False, eos_token_id=[], bos_token_id=None,
                           pad_token_id=m.tokenizer.pad_token_id)
    bos = m.tokenizer.bos_token_id
    rows = []
    for a in range(0, len(where), batch_size):
        part = where[a:a + batch_size]
        prompts = torch.tensor([[bos] + token_lists[d][s:s + PREFIX] for d, s in part])
        with torch.no_grad():
            out = m.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
        generated = out[:, prompts.shape[1]:].numpy()
        targets = np.array([token_lists[d][s + PREFIX:s + WINDOW] for d, s in part])
        gen_text = m.tokenizer.batch_decode(generated.tolist())
        tgt_text = m.tokenizer.batch_decode(targets.tolist())
        for k, (d, s) in enumerate(part):
            rows.append({"doc": d, "offset": s, **sample_metrics(generated[k], targets[k]),
                         "rouge_l_text": rouge_l_text(tgt_text[k], gen_text[k]), "generated_ids": generated[k]})
    samples = pd.DataFrame(rows)
    return samples, peer_documents(samples, docs["id"].tolist(), [len(t) for t in token_lists])


def peer_documents(samples: pd.DataFrame, ids: list[str], n_tokens: list[int]) -> pd.DataFrame:
    out = []
    for d, (i, n) in enumerate(zip(ids, n_tokens)):
        mine = samples[samples["doc"] == d]
        covered = np.zeros(n, dtype=bool)
        for s in mine.loc[mine["exact"], "offset"]:
            covered[s + PREFIX:s + WINDOW] = True
        edges = np.diff(np.r_[0, covered.astype(np.int8), 0])
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        out.append({"id": i, "n_tokens": n, "n_windows": len(mine), "n_exact": int(mine["exact"].sum()),
                    "reproduced_tokens": int(covered.sum()), "longest_reproduced_run": int(runs.max(initial=0)),
                    "mean_rouge_l": float(mine["rouge_l"].mean()) if len(mine) else float("nan")})
    return pd.DataFrame(out)


def same(ma, peer) -> bool:
    """memaudit's rows and documents table equal the peer's."""
    samples, documents = peer
    rows_equal = (len(samples) == len(ma.samples)
                  and [tuple(g) for g in samples.generated_ids] == [tuple(g) for g in ma.samples.generated_ids]
                  and (samples.offset.to_numpy() == ma.samples.offset.to_numpy()).all()
                  and (samples.exact.to_numpy() == ma.samples.exact.to_numpy()).all()
                  and np.allclose(samples.rouge_l_text, ma.samples.rouge_l_text, atol=1e-12))
    cols = ["n_windows", "n_exact", "reproduced_tokens", "longest_reproduced_run"]
    return bool(rows_equal and (documents[cols].to_numpy() == ma.documents[cols].to_numpy()).all())


# --- timing --------------------------------------------------------------------------------------------------------

def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def compare(m, data: Path, batch_size: int, repeats: int) -> dict:
    """Best wall time of each side over `repeats` runs, the two alternating (a shared machine's load hits both)."""
    t_ma = t_peer = float("inf")
    for _ in range(repeats):
        t, ma = timed(lambda: extract(model_dir=m, data=data, prefix=PREFIX, suffix=SUFFIX, stride=STRIDE,
                                      batch_size=batch_size, write=False))
        t_ma = min(t_ma, t)
        t, peer = timed(lambda: peer_extract(m, data, batch_size))
        t_peer = min(t_peer, t)
    tokens = int(ma.documents["n_tokens"].sum())
    return {"t_ma": t_ma, "t_peer": t_peer, "tokens": tokens, "windows": len(ma.samples),
            "exact": float(ma.samples.exact.mean()), "repeats": ma.summary["n_repeats"],
            "reproduced": ma.summary["documents"]["reproduced_token_fraction"], "same": same(ma, peer)}


# --- memory: a fresh process per size -------------------------------------------------------------------------

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud forest winter "
         "summer garden window engine paper signal vector matrix kernel buffer socket thread parser token model "
         "secret number memory audit canary value table column record index format string bytes").split()


def memory_model(cache: Path) -> Path:
    """A tiny random GPT-2 (2 layers, width 32) with a tokenizer trained on random words, saved once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = cache / "memory-model"
    if not (out / "model.safetensors").is_file():
        rng = random.Random(0)
        tok = train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(200)], vocab_size=512)
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def memory_child(model: Path, n_docs: int, workdir: Path) -> None:
    """In a fresh process: extract --stride over n_docs random-word documents into a run directory; print the
    peak resident memory and the result tables' own memory."""
    rng = random.Random(1)
    data = write_documents(workdir / f"docs-{n_docs}.jsonl",
                           [" ".join(rng.choice(WORDS) for _ in range(400)) for _ in range(n_docs)])
    res = extract(model_dir=model, data=data, prefix=PREFIX, suffix=SUFFIX, stride=STRIDE, batch_size=64,
                  device="cpu", out=workdir / f"run-{n_docs}")
    rows = int(res.samples.memory_usage(deep=True).sum() + res.documents.memory_usage(deep=True).sum())
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rows_bytes": rows,
                      "windows": len(res.samples)}))


def memory(cache: Path, n_docs: int) -> list[dict]:
    memory_model(cache)  # trains (or reuses) the model every child process reads
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (n_docs, 10 * n_docs):
            r = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--cache", str(cache),
                                "--workdir", tmp], capture_output=True, text=True, check=True,
                               env={**os.environ, "MEMAUDIT_NO_PROGRESS": "1"})
            out.append({"docs": n, **json.loads(r.stdout.strip().splitlines()[-1])})
    return out


# --- main ---------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of the memorizing model")
    ap.add_argument("--memory-docs", type=int, default=100, help="documents of the smaller memory run (x10: larger)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "memaudit-bench-windows")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_windows.txt")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.memory_child:
        memory_child(memory_model(args.cache), args.memory_child, args.workdir)
        return

    load = os.getloadavg()
    tok_dir, mem_file, train_file, held_file = corpora(args.cache)
    t_train, _ = timed(lambda: trained_model(args.cache, tok_dir, train_file, args.epochs))
    m = load_model(args.cache / "model", device="cpu")
    extract(model_dir=m, data=held_file, prefix=PREFIX, suffix=SUFFIX, stride=STRIDE, limit=1, write=False)  # warm-up
    bs = args.batch_size
    lines = [f"memaudit extract --stride {STRIDE} (prefix {PREFIX} + suffix {SUFFIX}) vs every window through HF "
             f"generate (greedy), batch {bs}, device cpu ({torch.get_num_threads()} threads), best of {args.repeats}; "
             f"load average at start {load[0]:.1f} on {os.cpu_count()} CPUs (shared machine); model trained or "
             f"reused in {t_train:.0f} s",
             f"{'corpus':<20}{'tokens':>8}{'windows':>8}{'exact':>7}{'repeats':>8}{'reproduced':>11}"
             f"{'memaudit s':>11}{'HF gen s':>10}{'memaudit tok/s':>15}{'HF gen tok/s':>13}{'speedup':>9}"
             f"{'identical':>10}"]
    ratios = {}
    for name, f in (("mostly memorized", mem_file), ("none memorized", held_file)):
        r = compare(m, f, bs, args.repeats)
        ratios[name] = r["t_peer"] / r["t_ma"]
        lines.append(f"{name:<20}{r['tokens']:>8}{r['windows']:>8}{r['exact']:>7.2f}{r['repeats']:>8}"
                     f"{r['reproduced']:>11.3f}{r['t_ma']:>11.2f}{r['t_peer']:>10.2f}{r['tokens'] / r['t_ma']:>15.0f}"
                     f"{r['tokens'] / r['t_peer']:>13.0f}{ratios[name]:>8.2f}x{str(r['same']):>10}")
    lines.append("tok/s: corpus tokens per second of wall time (every token after a document's first 32 lies in one "
                 "suffix); both sides include reading, tokenizing, windowing, the metrics and the documents table.")
    mem = memory(args.cache, args.memory_docs)
    small, large = mem
    grow, rows = (large["peak_kb"] - small["peak_kb"]) * 1024, large["rows_bytes"] - small["rows_bytes"]
    lines.append(f"peak memory, extract --stride {STRIDE} in a fresh process with a run directory (tiny random model, "
                 f"every window decoded): {small['docs']} documents ({small['windows']} windows) "
                 f"{small['peak_kb'] / 1024:.1f} MiB, {large['docs']} documents ({large['windows']} windows) "
                 f"{large['peak_kb'] / 1024:.1f} MiB; growth {grow / 2**20:.1f} MiB, of which result rows "
                 f"{rows / 2**20:.1f} MiB; beyond the rows: {(grow - rows) / 2**20:.1f} MiB = "
                 f"{100 * (grow - rows) / (small['peak_kb'] * 1024):.1f}% of the smaller run's peak")
    lines.append(f"speedup when none are memorized: {ratios['none memorized']:.2f}x")
    lines.append(f"speedup={ratios['mostly memorized']:.2f}")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
