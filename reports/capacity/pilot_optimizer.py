"""Optimizer pilot for the random-data capacity grid (one shape: 1 layer, width 16, V=512, S=32; 2x data).

One ensemble per (batch size, betas, anneal fraction); the models share one dataset and seed and differ only in
learning rate (train_ensemble's lr_scales). The convergence rule of the grid applies (plateau over 1,000 steps at
constant LR, then a linear anneal to 0 over `anneal_fraction` x the steps so far). Prints memorized bits per
parameter every 250 steps (`*`: annealing) and a FINAL line per model. Runs behind pilot_optimizer.log:

    OMP_NUM_THREADS=1 python reports/capacity/pilot_optimizer.py 32 3e-3,1e-2,2e-2,4e-2,7e-2           # A
    OMP_NUM_THREADS=1 python reports/capacity/pilot_optimizer.py 128 1e-2,2e-2,4e-2,7e-2                # B
    OMP_NUM_THREADS=1 python reports/capacity/pilot_optimizer.py 32 5e-2,7e-2,1e-1,1.5e-1 0.9,0.98 7000 1.0  # C

arguments: batch lrs [betas] [max_steps] [anneal_fraction]
"""
import sys, time, json, math, torch, numpy as np
from memaudit.capacity import EnsembleConfig, model_shape, random_dataset, train_ensemble
torch.set_num_threads(1)
batch = int(sys.argv[1]); lrs = [float(x) for x in sys.argv[2].split(",")]
betas = tuple(float(x) for x in sys.argv[3].split(",")) if len(sys.argv) > 3 else (0.9, 0.98)
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6000
width = 16; V=512; S=32
shape = model_shape(1, width, V, S); P = shape.parameters
n = int(round(2 * 3.6 * P / (S * math.log2(V)))); H = n * S * math.log2(V)
data = random_dataset(n, S, V, 123)
base = lrs[0]
cfg = EnsembleConfig(max_steps=steps, batch_size=batch, lr=1.0, warmup_steps=100, betas=betas, eval_every=250,
                     plateau_window=1000, plateau_tol=0.005, anneal_fraction=float(sys.argv[5]) if len(sys.argv) > 5 else 0.25)
t0 = time.time()
def tick(step, recs):
    print(step, " ".join(f"{(H - r.history[-1][2]) / P:.3f}{'*' if r.anneal_start else ''}" for r in recs), f"{time.time()-t0:.0f}s", flush=True)
recs = train_ensemble(shape, [data]*len(lrs), [1]*len(lrs), cfg, bos_id=V, data_bits=[H]*len(lrs), lr_scales=lrs, on_eval=tick)
for lr, r in zip(lrs, recs):
    print(f"FINAL b={batch} lr={lr} betas={betas}: {(H - r.history[-1][2]) / P:.3f} bits/param, steps {r.steps}, anneal {r.anneal_start}, conv {r.converged}")
