"""Compiled vs eager ensemble training steps, per shape: what `memaudit capacity --compile on` buys and costs.

For each shape, one ensemble's training step (loss, backward, per-model clipping, Adam) is timed eagerly and
through torch.compile, alternating in blocks so the host's drift cancels, at 1 thread. Prints ms per step, the
median ratio, the first compiled step (compiling included, from an empty Inductor cache, as on a fresh machine) and
the steps after which compiling has paid for itself (per ensemble size: each compiles once); `speedup=<x>` last is the ratio at the bench's
default capacity shape (width 16, as in bench_capacity.py).

    python bench/bench_compile.py [--repeats 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# a cold compile, as a fresh machine pays it: Inductor's on-disk cache would otherwise make repeats look free
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from memaudit.capacity import ensemble_model, ensemble_train, model_shape  # noqa: E402
from memaudit.capacity.allocator import keep_freed_memory  # noqa: E402

# (width, vocab, seq_len, batch, models, steps per timing): the default grid's shapes, then the paper-regime ones
SHAPES = [(8, 512, 32, 32, 2, 200), (16, 512, 32, 32, 4, 100), (32, 512, 32, 32, 3, 100),
          (32, 2048, 64, 64, 2, 20), (44, 2048, 64, 64, 1, 20)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_compile.txt")
    args = ap.parse_args()
    if ensemble_train.compile_unavailable():
        raise SystemExit(f"error: {ensemble_train.compile_unavailable()}")
    keep_freed_memory()  # as train_ensemble does
    torch.set_num_threads(1)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"1 layer, 1 thread, torch {torch.__version__}; {args.repeats} alternating blocks per shape")
    say(f"{'width':>5}{'V':>6}{'S':>4}{'batch':>6}{'models':>7}{'eager ms':>10}{'compiled ms':>12}{'ratio':>7}"
        f"{'compile s':>10}{'repaid after':>13}")
    default_ratio = float("nan")
    for width, vocab, seq_len, batch, models, steps in SHAPES:
        model = ensemble_model.EnsembleGPT(model_shape(1, width, vocab, seq_len), list(range(models)))
        opt, lrs = ensemble_train.StackedAdam(model), torch.full((models,), 1e-4)
        idx, tg = torch.randint(0, vocab, (models, batch, seq_len)), torch.randint(0, vocab, (models, batch, seq_len))

        def step() -> None:
            ensemble_train._loss_and_backward(model, idx, tg)
            ensemble_train._clip_per_model(model, 1.0)
            opt.step(lrs)

        model.compiled = True
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for compiled in (False, True):
                model.compiled = compiled
                step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                times[compiled].append((time.perf_counter() - t0) / steps * 1e3)
        eager, comp = float(np.median(times[False])), float(np.median(times[True]))
        ratio = float(np.median(np.array(times[False]) / np.array(times[True])))
        saved_ms = eager - eager / ratio
        even = f"{first * 1e3 / saved_ms:,.0f} steps" if saved_ms > 0 else "never"
        say(f"{width:>5}{vocab:>6}{seq_len:>4}{batch:>6}{models:>7}{eager:>10.2f}{comp:>12.2f}{ratio:>7.3f}"
            f"{first:>10.1f}{even:>13}")
        if (width, vocab, seq_len) == (16, 512, 32):
            default_ratio = ratio
    say(f"speedup={default_ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
