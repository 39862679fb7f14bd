"""Pilots beyond the grid: schedule, vocabulary, sequence length and the paper's smallest shape, one shape at a time.

One ensemble per command; its models share one random dataset (size `mult` x the 3.6 bits/param prediction) and
differ only in learning rate (train_ensemble's lr_scales). Prints memorized bits per parameter every 500 steps
(`*`: annealing) and a FINAL line per model. The commands behind pilot_shapes.log:

    # A: constant LR, never annealed (TOL=-1), widths 8 and 16 (stopped after 32K and 35K steps)
    TOL=-1 python reports/capacity/pilot_shapes.py 8 32 2e-2,5e-2,1e-1 40000 2
    TOL=-1 python reports/capacity/pilot_shapes.py 16 32 2e-2,5e-2,1e-1 40000 2
    # B: warmup-stable-decay: constant LR to step 20,000, then a linear decay to 0 over 20,000 steps
    TOL=10 WINDOW=19900 ANNEAL=1.0 python reports/capacity/pilot_shapes.py 16 32 1e-2,2e-2,3e-2 40000 2
    # C: the paper's smallest shape (1 layer, width 32, V=2048, S=64: 80,384 parameters), the grid's rule
    V=2048 S=64 WINDOW=4000 ANNEAL=0.5 python reports/capacity/pilot_shapes.py 32 32 1e-2 40000 1.5
    # E: the same shape and rule as C at lr 5e-3 and 2e-2 (one process each, side by side)
    V=2048 S=64 WINDOW=4000 ANNEAL=0.5 python reports/capacity/pilot_shapes.py 32 32 5e-3 40000 1.5
    V=2048 S=64 WINDOW=4000 ANNEAL=0.5 python reports/capacity/pilot_shapes.py 32 32 2e-2 40000 1.5
    # F: batch 16, pilot C's rule in epochs (window 8,000 steps), lr 1e-2 and 2e-2 (one process each; stopped early)
    V=2048 S=64 WINDOW=8000 ANNEAL=0.5 python reports/capacity/pilot_shapes.py 32 16 1e-2 70000 1.5
    # G: batch 64, window 4,000 steps, lr 2e-2 and 4e-2 (one process each; stopped at 11,000 steps)
    V=2048 S=64 WINDOW=4000 ANNEAL=0.5 python reports/capacity/pilot_shapes.py 32 64 2e-2 70000 1.5
    # H: batch 64, lr 2e-2, warmup-stable-decay to the epochs the headline grid gave widths 44 and 36 (2,700 and
    #    3,440 epochs of the 617 rows), to see whether the grid's per-width values follow epochs rather than width
    V=2048 S=64 TOL=10 WINDOW=12650 ANNEAL=1.0 python reports/capacity/pilot_shapes.py 32 64 2e-2 26000 1.5
    V=2048 S=64 TOL=10 WINDOW=16400 ANNEAL=1.0 python reports/capacity/pilot_shapes.py 32 64 2e-2 34000 1.5
    # I: batch 128 at constant LR, lr 2e-2 and 3e-2 (one process each), to the epochs G reached
    V=2048 S=64 TOL=-1 python reports/capacity/pilot_shapes.py 32 128 2e-2 5500 1.5
    V=2048 S=64 TOL=-1 python reports/capacity/pilot_shapes.py 32 128 3e-2 5500 1.5
    # D: not this script: the grid's own command and rule at width 8 with another V or S
    memaudit capacity --layers 1 --batch-size 32 --lr 5e-2 --warmup-steps 100 --plateau-tol 0.005 --threads 1 \
        --widths 8 --sizes 1.25x,2x --max-steps 24000 --plateau-window 2000 --anneal-fraction 1.0 \
        --vocab 2048 --seq-len 32 --out v2048_s32_w8     # and --vocab 512 --seq-len 64 --out v512_s64_w8

arguments: width batch lrs max_steps mult; environment: V (512), S (32), WINDOW (plateau window, 2000),
TOL (plateau tolerance, 0.005), ANNEAL (anneal fraction, 1.0). All at OMP_NUM_THREADS=1.
"""
import math
import os
import sys
import time

import torch

from memaudit.capacity import EnsembleConfig, model_shape, random_dataset, train_ensemble

torch.set_num_threads(1)
env = os.environ.get
width, batch, steps, mult = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4]), float(sys.argv[5])
lrs = [float(x) for x in sys.argv[3].split(",")]
V, S = int(env("V", "512")), int(env("S", "32"))
shape = model_shape(1, width, V, S)
P = shape.parameters
n = int(round(mult * 3.6 * P / (S * math.log2(V))))
H = n * S * math.log2(V)
print(f"params {P} sequences {n} data bits {H:.0f}", flush=True)
data = random_dataset(n, S, V, 123)
cfg = EnsembleConfig(max_steps=steps, batch_size=batch, lr=1.0, warmup_steps=100, betas=(0.9, 0.98), eval_every=500,
                     plateau_window=int(env("WINDOW", "2000")), plateau_tol=float(env("TOL", "0.005")),
                     anneal_fraction=float(env("ANNEAL", "1.0")))
t0 = time.time()


def tick(step, recs):
    print(step, " ".join(f"{(H - r.history[-1][2]) / P:.3f}{'*' if r.anneal_start else ''}" for r in recs),
          f"{time.time() - t0:.0f}s", flush=True)


recs = train_ensemble(shape, [data] * len(lrs), [1] * len(lrs), cfg, bos_id=V, data_bits=[H] * len(lrs),
                      lr_scales=lrs, on_eval=tick)
for lr, r in zip(lrs, recs):
    print(f"FINAL width={width} V={V} S={S} params={P} n={n} batch={batch} lr={lr}: {(H - r.history[-1][2]) / P:.3f} "
          f"bits/param, steps {r.steps}, anneal from {r.anneal_start}, converged {r.converged}", flush=True)
