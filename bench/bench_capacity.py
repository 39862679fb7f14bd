"""Ensemble trainer vs the plain way: 8 GPT-2 models (same shape, own seed and random dataset), same steps.

Plain: each model a transformers GPT2LMHeadModel with torch.optim.Adam, trained one after another.
Ensemble: memaudit.capacity.train_ensemble, all 8 in one stacked model (one bmm per layer for all models,
the tied head and loss fused and chunked so the full logits never exist; convergence checks off, same
number of steps, same batch size and learning rate). Both on the same machine in one run, with the same
thread count. Sharded ensemble: the same trainer in one process per core at 1 thread each, half the models each,
which is how `torchrun --nproc-per-node 2 -m memaudit capacity` runs a grid (one shard of the grid per rank); the
plain loop gets the same cores as threads. Each method runs in its own worker process(es), forked before any
torch kernel runs, so each sees the process state its users get (the ensemble trainer tunes the allocator of the
process it trains in; the plain loop runs with the defaults a peer has). Prints a table (each method's best
time), models per hour, and `speedup=<x>` last: the sharded ensemble against the plain loop at the machine's
core count (when --shards > 1), as the median over repeats of the ratio of two back-to-back timings, so that the
host's drift over minutes cancels. With --compile on (the default) the sharded ensemble is also timed compiled, as
runs of 20,000+ steps train by default, and speedup= reports that row; the one-off compile time is printed apart
(a 200-step timing is a per-step throughput figure; a real run's few seconds of compiling are spread over hours).

    python bench/bench_capacity.py [--models 8] [--steps 200] [--threads 1,2] [--shards 2] [--repeats 3]
                                   [--compile on|off] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memaudit.capacity import PUBLISHED_ALPHA, EnsembleConfig, model_shape, random_dataset, train_ensemble


def plain_loop(shape, datasets, seeds, steps, batch_size, lr, bos):
    """One model at a time, the usual way: HF model, Adam, sampled batches, per-step backward."""
    from transformers import GPT2LMHeadModel

    for data, seed in zip(datasets, seeds):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(shape.hf_config(bos)).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
        rows = torch.as_tensor(data)
        inputs = torch.cat([torch.full((len(rows), 1), bos), rows[:, :-1]], 1)
        rng = np.random.default_rng(seed)
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 100)
            idx = torch.as_tensor(rng.choice(len(rows), size=min(batch_size, len(rows)), replace=False))
            logits = model(input_ids=inputs[idx]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), rows[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return float(loss.detach())


def ensemble_config(args) -> EnsembleConfig:
    """The plain loop's settings (same steps, batch, lr, warmup); no convergence checks, every model to the end."""
    return EnsembleConfig(max_steps=args.steps, batch_size=args.batch_size, lr=1e-2, warmup_steps=100,
                          eval_every=10 ** 9, drop_converged=False)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_DATA: dict = {}  # set before the worker processes fork; they read it instead of receiving copies


def _plain_job(threads: int, steps: int) -> None:
    torch.set_num_threads(threads)
    d = _DATA
    plain_loop(d["shape"], d["datasets"], d["seeds"], steps, d["batch_size"], 1e-2, d["bos"])


def _ensemble_job(threads: int, shard: int, shards: int, cfg: EnsembleConfig) -> None:
    torch.set_num_threads(threads)
    d = _DATA
    train_ensemble(d["shape"], d["datasets"][shard::shards], d["seeds"][shard::shards], cfg, bos_id=d["bos"])


def run_sharded(pool, shards: int, cfg: EnsembleConfig) -> None:
    """The ensemble trainer with the models split over `shards` single-thread processes (as under torchrun)."""
    pool.starmap(_ensemble_job, [(1, r, shards, cfg) for r in range(shards)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", default="1,2", help="thread counts to time; speedup= reports the last")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes for the sharded ensemble row (1: leave it out)")
    ap.add_argument("--compile", choices=["on", "off"], default="on",
                    help="also time the sharded ensemble compiled (what runs of 20,000+ steps get by default); "
                         "speedup= then reports it, and the compile time is printed (excluded from the timings)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_capacity.txt")
    args = ap.parse_args()
    shape = model_shape(args.layers, args.width, args.vocab, args.seq_len)
    bits_per_sequence = args.seq_len * math.log2(args.vocab)
    n = int(round(1.5 * PUBLISHED_ALPHA * shape.parameters / bits_per_sequence))
    _DATA.update(shape=shape, datasets=[random_dataset(n, args.seq_len, args.vocab, seed) for seed in range(args.models)],
                 seeds=list(range(args.models)), batch_size=args.batch_size, bos=args.vocab)
    # one process per method (and one per shard), forked before any torch kernel runs (a forked OpenMP pool is not
    # safe); a method's process is reused across its repeats, as one training process would be
    fork = multiprocessing.get_context("fork")
    plain_pool, ensemble_pool = fork.Pool(1), fork.Pool(1)
    pool = fork.Pool(args.shards) if args.shards > 1 else None
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"shape: {args.layers} layer(s) x width {args.width}, V={args.vocab}, S={args.seq_len}, "
          f"{shape.parameters:,} params/model; {args.models} models x {args.steps} steps, batch {args.batch_size}, "
          f"{n} sequences each; {args.repeats} repeats, methods interleaved; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs (shared)")
    say(f"{'method':<36}{'threads':>8}{'seconds':>10}{'models/hour':>14}")
    # Every repeat times each method back to back (the host's speed drifts by tens of percent over minutes), and the
    # speedup is the median over repeats of the ratio within a repeat; the table shows each method's best time.
    thread_counts = [int(t) for t in args.threads.split(",")]
    cfg = ensemble_config(args)
    times: dict[tuple[str, int], list[float]] = {}
    # untimed warm-up of every method (imports, first allocations, the workers' first kernels)
    warm = dataclasses.replace(cfg, max_steps=5)
    for threads in thread_counts:
        plain_pool.apply(_plain_job, (threads, 5))
        ensemble_pool.apply(_ensemble_job, (threads, 0, 1, warm))
    compiled = dataclasses.replace(cfg, torch_compile="on")
    if pool is not None:
        run_sharded(pool, args.shards, warm)
        if args.compile == "on":  # each worker compiles once for this shape; later calls reuse it
            compile_seconds = timed(lambda: run_sharded(pool, args.shards, dataclasses.replace(compiled, max_steps=5)))
    for _ in range(args.repeats):
        for threads in thread_counts:
            times.setdefault(("plain", threads), []).append(timed(lambda: plain_pool.apply(
                _plain_job, (threads, args.steps))))
            times.setdefault(("ensemble", threads), []).append(timed(lambda: ensemble_pool.apply(
                _ensemble_job, (threads, 0, 1, cfg))))
        if pool is not None:
            times.setdefault(("sharded", args.shards), []).append(timed(lambda: run_sharded(pool, args.shards, cfg)))
            if args.compile == "on":
                times.setdefault(("compiled", args.shards), []).append(timed(lambda: run_sharded(
                    pool, args.shards, compiled)))
    for p in (plain_pool, ensemble_pool, pool):
        if p is not None:
            p.close()
    names = {"plain": "plain loop (HF GPT2, one at a time)", "ensemble": "memaudit ensemble (bmm, fused head)",
             "sharded": f"memaudit ensemble, {args.shards} shards x 1 thread",
             "compiled": "  the same, compiled (torch.compile)"}
    for (method, threads), ts in times.items():
        say(f"{names[method]:<36}{threads:>8}{min(ts):>10.1f}{args.models / min(ts) * 3600:>14.0f}")

    def ratio(num: tuple[str, int], den: tuple[str, int]) -> float:
        return float(np.median([a / b for a, b in zip(times[num], times[den])]))

    for threads in thread_counts:
        speedup = ratio(("plain", threads), ("ensemble", threads))
        say(f"speedup at {threads} thread(s) (median of {args.repeats} back-to-back ratios): {speedup:.2f}")
    if pool is not None:  # against the plain loop at the last thread count (use the core count)
        key = ("plain", thread_counts[-1])
        for method, label in (("sharded", "sharded ensemble"), ("compiled", "sharded ensemble, compiled,")):
            if (method, args.shards) not in times:
                continue
            per = [a / b for a, b in zip(times[key], times[(method, args.shards)])]
            speedup = float(np.median(per))
            say(f"speedup of the {label} over the plain loop at {thread_counts[-1]} thread(s): {speedup:.2f} "
                f"(median; per repeat {', '.join(f'{r:.2f}' for r in per)})")
        if args.compile == "on":
            say(f"compiling (once per process and shape, not in the times above): {compile_seconds:.1f} s for the "
                f"first {args.shards} x 5 steps; runs of 20,000+ steps compile by default")
    say(f"speedup={speedup:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
