"""Training an `EnsembleGPT`: the loop, its optimizer, the plateau rule, checkpoints and compile settings.

Models differ by seed (initialisation, data order) and by dataset: each model draws its own batch of row
indices from its own dataset every step, so datasets of different sizes train in the same ensemble.
Adam is elementwise and gradient clipping is per model, so stacking changes no model's optimisation.
Each model stops on its own (the plateau rule, then a linear anneal of its LR to 0) and leaves the ensemble.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import MemauditError
from ..rundir import atomic_write_bytes
from .allocator import keep_freed_memory
from .ensemble_model import EnsembleGPT, GPTShape


@dataclass
class EnsembleConfig:
    max_steps: int = 20000
    batch_size: int = 64  # rows per model per step (full batch for datasets no larger)
    lr: float = 3e-3
    warmup_steps: int = 200
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0  # per model; 0 disables
    eval_every: int = 250
    plateau_window: int = 2000  # convergence: memorised bits grew < plateau_tol over this many steps...
    plateau_tol: float = 0.005  # ...relative to the current value; then the model's LR decays linearly to 0
    plateau_epochs: float | None = None  # if set, the window is this many epochs of each model's own data instead
    anneal_fraction: float = 0.25  # over this fraction of the steps taken so far, and training stops
    full_fraction: float = 0.995  # ...or the model already memorises this fraction of the data's bits
    compute_dtype: str = "float32"
    threads: int | None = None
    drop_converged: bool = True  # stop computing models once they have converged
    # torch.compile the model body: "on", "off", or None (auto: on for runs of COMPILE_MIN_STEPS steps or more when a
    # C++ compiler is found). It costs about 6 s per process, shape and ensemble size (models leave as they converge;
    # 15 s for the first) and makes steps 4-16% faster on CPU (bench/bench_compile.py: widths 16-32 gain most, width 8
    # and the V=2048 shapes, where the head dominates, 4-7%).
    torch_compile: str | None = None


# Where auto compiles: the one-off cost is repaid after 1,000-3,500 steps per ensemble size at widths 16-44 (about
# 50,000 at width 8, whose body is too small to gain), so runs this long gain and shorter ones are left alone.
COMPILE_MIN_STEPS = 20000


@dataclass
class ModelRecord:
    index: int
    seed: int
    n_rows: int
    converged: bool = False
    converged_step: int | None = None
    anneal_start: int | None = None  # the step its plateau was detected (annealing began)
    steps: int = 0
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss nats, bits on data)
    seconds: float = 0.0  # wall time of the ensemble's training until this model's last evaluation, across resumes
    final_state: dict[str, torch.Tensor] | None = None


def code_lengths_bits(model: EnsembleGPT, inputs: torch.Tensor, targets: torch.Tensor,
                      n_rows: Sequence[int], chunk: int = 256) -> torch.Tensor:
    """-log2 p(row) summed over each model's own first n_rows[m] rows ([M, N, T] -> [M]).

    Used for the convergence check during training; the reported figures are re-measured afterwards with
    the scoring engine on the exported models.
    """
    M, N, T = inputs.shape
    total = torch.zeros(M, dtype=torch.float64)
    limit = torch.as_tensor(list(n_rows))[:, None]
    with torch.no_grad():
        for s in range(0, N, chunk):
            nll = model.token_nll(inputs[:, s:s + chunk], targets[:, s:s + chunk]).sum(2)
            nll = nll * (torch.arange(s, s + nll.shape[1])[None, :] < limit)
            total += nll.sum(1).double() / math.log(2)
    return total


def train_ensemble(shape: GPTShape, datasets: Sequence[np.ndarray], seeds: Sequence[int], cfg: EnsembleConfig,
                   *, bos_id: int, data_bits: Sequence[float] | None = None,
                   on_eval: Callable[[int, list[ModelRecord]], None] | None = None,
                   lr_scales: Sequence[float] | None = None,
                   checkpoint: str | os.PathLike | None = None) -> list[ModelRecord]:
    """Train one model per (dataset, seed) until each one's memorisation plateaus or `max_steps`.

    `datasets[m]` is int [N_m, S] token rows; the model sees BOS + row[:-1] and predicts every token of the row.
    `data_bits[m]` (H of dataset m) enables the "memorised nearly everything" stop; `lr_scales[m]` multiplies
    model m's learning rate (one ensemble can sweep learning rates). Returns a record per model
    with its training history and final weights (`final_state`, per-model slices of the stacked parameters).

    `checkpoint`: a file the whole training state is written to at every evaluation. If it exists, training
    continues from it instead of starting over, and ends exactly as the uninterrupted run would (same thread
    count and compiling); a checkpoint of other data, seeds or settings is refused. The caller deletes it when done.
    """
    if len(datasets) != len(seeds) or not datasets:
        raise MemauditError("train_ensemble needs one seed per dataset and at least one dataset")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # no page faults on every step's activations
    S = datasets[0].shape[1]
    if any(d.shape[1] != S for d in datasets) or S > shape.positions:
        raise MemauditError(f"every dataset needs rows of {S} tokens, at most the model's {shape.positions} positions")
    run = _EnsembleTraining(shape, datasets, seeds, cfg, bos_id=bos_id, data_bits=data_bits, lr_scales=lr_scales)
    start, t0 = 0, time.time()
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        key = _fingerprint(shape, datasets, seeds, cfg, bos_id, data_bits, lr_scales)
        if checkpoint.is_file():
            start = run.load(checkpoint, key)
            t0 -= max(r.seconds for r in run.records)
            if not run.active:
                return run.records
    for step in range(start + 1, cfg.max_steps + 1):
        per_model = run.train_step(step)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            done = run.evaluate(step, per_model, t0)
            if on_eval is not None:
                on_eval(step, run.records)
            if done and cfg.drop_converged and not run.drop(done):
                break  # every model has converged and left
            if checkpoint is not None and step < cfg.max_steps:
                run.save(checkpoint, key, step)
    run.keep_final_states()
    return run.records


class _EnsembleTraining:
    """The state of one `train_ensemble` call: the ensemble, its optimizer, each model's record and batch order.

    `active[slot]` is the record index of ensemble slot `slot`: models leave the ensemble as they converge.
    """

    def __init__(self, shape: GPTShape, datasets: Sequence[np.ndarray], seeds: Sequence[int], cfg: EnsembleConfig,
                 *, bos_id: int, data_bits: Sequence[float] | None, lr_scales: Sequence[float] | None):
        self.cfg, self.data_bits, self.lr_scales = cfg, data_bits, lr_scales
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.compute_dtype]
        self.model = EnsembleGPT(shape, seeds, compute_dtype=dtype)
        self.model.compiled = use_compile(cfg)
        self.inputs, self.targets = _stacked_rows(datasets, bos_id)
        self.sizes = [len(d) for d in datasets]
        self.records = [ModelRecord(index=m, seed=int(s), n_rows=self.sizes[m]) for m, s in enumerate(seeds)]
        self.active = list(range(len(datasets)))
        self.gens = [np.random.default_rng(int(s) + 7919) for s in seeds]
        self.orders: list[list[int]] = [[] for _ in datasets]
        self.opt = StackedAdam(self.model, betas=cfg.betas, eps=cfg.eps)
        self.anneal: dict[int, tuple[int, int]] = {}  # record -> (first annealing step, annealing steps)

    def next_batch(self, m: int) -> np.ndarray:
        n, b = self.sizes[m], self.cfg.batch_size  # a dataset smaller than a batch repeats within it (= full batch)
        out = []
        while len(out) < b:  # epochs of fresh permutations, so every row is seen once per epoch
            if not self.orders[m]:
                self.orders[m] = self.gens[m].permutation(n).tolist()
            take = min(b - len(out), len(self.orders[m]))
            out += self.orders[m][:take]
            del self.orders[m][:take]
        return np.asarray(out)

    def learning_rates(self, step: int) -> list[float]:
        """Warmup, constant, then (after its plateau) a linear decay to 0 for each model on its own."""
        cfg, scales, lrs = self.cfg, self.lr_scales, []
        for m in self.active:
            lr = cfg.lr * (scales[m] if scales is not None else 1.0) * min(1.0, step / max(1, cfg.warmup_steps))
            if m in self.anneal:
                start, length = self.anneal[m]
                lr *= max(0.0, 1.0 - (step - start) / length)
            lrs.append(lr)
        return lrs

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step of every active model; returns their losses on the batch."""
        lrs = self.learning_rates(step)
        rows = torch.as_tensor(np.stack([self.next_batch(m) for m in self.active]))  # [A, b]
        slots = torch.as_tensor(self.active)[:, None]
        idx_in, idx_tg = self.inputs[slots, rows], self.targets[slots, rows]  # [A, b, S], no copy of whole datasets
        per_model = _loss_and_backward(self.model, idx_in, idx_tg)
        if self.cfg.grad_clip > 0:
            _clip_per_model(self.model, self.cfg.grad_clip)
        self.opt.step(torch.tensor(lrs))
        return per_model

    def evaluate(self, step: int, per_model: torch.Tensor, t0: float) -> list[int]:
        """Record every active model's bits on its data and apply the stopping rules; returns the converged slots."""
        cfg, active = self.cfg, self.active
        bits = code_lengths_bits(self.model, self.inputs[active], self.targets[active], [self.sizes[m] for m in active])
        done = []
        for slot, m in enumerate(active):
            rec = self.records[m]
            rec.steps, rec.seconds = step, time.time() - t0
            rec.history.append((step, float(per_model[slot].detach()), float(bits[slot])))
            hb = self.data_bits[m] if self.data_bits is not None else None
            if m in self.anneal:
                if step >= self.anneal[m][0] + self.anneal[m][1]:
                    rec.converged, rec.converged_step = True, step
                    done.append(slot)
            elif hb is not None and hb - rec.history[-1][2] >= cfg.full_fraction * hb:
                rec.converged, rec.converged_step = True, step  # memorised (nearly) all of its data
                done.append(slot)
            elif _plateaued(rec, cfg, hb):
                length = max(cfg.eval_every, int(cfg.anneal_fraction * step))
                self.anneal[m] = (step, length)
                rec.anneal_start = step
        return done

    def drop(self, done: list[int]) -> bool:
        """Converged slots leave the ensemble with their final weights; False when none is left."""
        for slot in done:
            self.records[self.active[slot]].final_state = _slice_state(self.model, slot)
        keep = [s for s in range(len(self.active)) if s not in done]
        if not keep:
            self.active = []
            return False
        self.opt.keep(keep)
        self.model.keep(keep)
        self.opt.rebind(self.model)
        self.active = [self.active[s] for s in keep]
        return True

    def keep_final_states(self) -> None:
        for slot, m in enumerate(self.active):
            self.records[m].final_state = _slice_state(self.model, slot)

    def save(self, path: Path, key: str, step: int) -> None:
        _save_checkpoint(path, key, step, self.model, self.opt, self.records, self.active, self.anneal, self.gens,
                         self.orders)

    def load(self, path: Path, key: str) -> int:
        """Continue from a checkpoint; returns the step it was written at."""
        step, self.active, self.anneal = _load_checkpoint(path, key, self.model, self.opt, self.records, self.gens,
                                                          self.orders)
        return step


def _stacked_rows(datasets: Sequence[np.ndarray], bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (BOS + row[:-1]) and targets (the row) of every dataset, zero-padded to the largest: [M, N_max, S]."""
    n_max, S = max(len(d) for d in datasets), datasets[0].shape[1]
    targets = torch.zeros(len(datasets), n_max, S, dtype=torch.long)
    for m, d in enumerate(datasets):
        targets[m, : len(d)] = torch.as_tensor(d, dtype=torch.long)
    bos = torch.full((len(datasets), n_max, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, targets[:, :, :-1]], dim=2), targets


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (None when it can): Inductor builds C++ on the CPU, so it needs a compiler."""
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else ["g++", "c++", "clang++"])):
        return "no C++ compiler found (set CXX or install g++)"
    return None


def check_compile_setting(value: str | None) -> None:
    """Refuse a --compile value other than on, off or unset, and "on" where torch.compile cannot work."""
    if value not in (None, "on", "off"):
        raise MemauditError(f"--compile must be on or off (or left out for auto), not {value!r}")
    if value == "on" and (why_not := compile_unavailable()):
        raise MemauditError(f"--compile on cannot work here: {why_not}")


def use_compile(cfg: EnsembleConfig) -> bool:
    """Whether training compiles the model body (see EnsembleConfig.torch_compile)."""
    check_compile_setting(cfg.torch_compile)
    if cfg.torch_compile == "off" or (cfg.torch_compile is None and cfg.max_steps < COMPILE_MIN_STEPS):
        return False
    return compile_unavailable() is None


def _loss_and_backward(model: EnsembleGPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-model losses of one batch, gradients in .grad. If the compiled body fails (a compiler or Inductor
    problem, found at its first use for each shape), the step is redone without compiling, and so is the rest of
    the run; nothing has changed the model or optimizer state by then."""
    try:
        per_model = model.loss(idx, targets)
        model.zero_grad(set_to_none=True)
        per_model.sum().backward()  # models share no parameters: each gets its own gradient
        return per_model
    except Exception as e:  # noqa: BLE001 - any compile failure falls back to the eager model
        if not model.compiled:
            raise
        model.compiled = False
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: torch.compile failed ({type(e).__name__}: {first}); training continues uncompiled",
              file=sys.stderr)
        return _loss_and_backward(model, idx, targets)


def _fingerprint(shape: GPTShape, datasets: Sequence[np.ndarray], seeds: Sequence[int], cfg: EnsembleConfig,
                 bos_id: int, data_bits: Sequence[float] | None, lr_scales: Sequence[float] | None) -> str:
    """What a checkpoint must have been made from: shape, data, seeds and every setting but the thread count and
    compiling (each changes only the rounding)."""
    h = hashlib.sha256(repr((shape, list(map(int, seeds)),
                             {k: v for k, v in asdict(cfg).items() if k not in ("threads", "torch_compile")},
                             bos_id, None if data_bits is None else list(map(float, data_bits)),
                             None if lr_scales is None else list(map(float, lr_scales)))).encode())
    for d in datasets:
        h.update(repr(d.shape).encode())
        h.update(np.ascontiguousarray(d, dtype=np.int64).tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, key: str, step: int, model: EnsembleGPT, opt: StackedAdam,
                     records: list[ModelRecord], active: list[int], anneal: dict[int, tuple[int, int]],
                     gens: list[np.random.Generator], orders: list[list[int]]) -> None:
    state = {"key": key, "step": step, "active": list(active), "anneal": {int(k): list(v) for k, v in anneal.items()},
             "params": {k: v.detach().clone() for k, v in model.params.items()},
             "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq, "adam_t": opt.t,
             "records": [asdict(r) for r in records], "gens": [g.bit_generator.state for g in gens],
             "orders": orders}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())  # a kill while writing leaves the previous checkpoint whole


def _load_checkpoint(path: Path, key: str, model: EnsembleGPT, opt: StackedAdam, records: list[ModelRecord],
                     gens: list[np.random.Generator], orders: list[list[int]]
                     ) -> tuple[int, list[int], dict[int, tuple[int, int]]]:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise MemauditError(f"cannot read the training checkpoint {path}: {e}") from None
    if state.get("key") != key:
        raise MemauditError(f"the training checkpoint {path} was made from other data, seeds or settings; "
                            "delete it to start this training over")
    active = list(state["active"])
    if active:
        model.keep(active)  # slot i of a new ensemble is record i
        with torch.no_grad():
            for k, v in state["params"].items():
                model.params[k].copy_(v)
        opt.keep(active)
        opt.rebind(model)
        for k in opt.exp_avg:
            opt.exp_avg[k].copy_(state["exp_avg"][k])
            opt.exp_avg_sq[k].copy_(state["exp_avg_sq"][k])
        opt.t = int(state["adam_t"])
    for rec, saved in zip(records, state["records"]):
        for name, value in saved.items():
            setattr(rec, name, [tuple(h) for h in value] if name == "history" else value)
    for g, s in zip(gens, state["gens"]):
        g.bit_generator.state = s
    orders[:] = [list(o) for o in state["orders"]]
    return int(state["step"]), active, {int(k): (int(v[0]), int(v[1])) for k, v in state["anneal"].items()}


class StackedAdam:
    """Adam (no weight decay) on stacked parameters with one learning rate per model (the leading axis)."""

    def __init__(self, model: EnsembleGPT, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8):
        self.betas, self.eps, self.t = betas, eps, 0
        self.names = list(model.params.keys())
        self.exp_avg = {k: torch.zeros_like(p) for k, p in model.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in model.params.items()}
        self.model = model

    def rebind(self, model: EnsembleGPT) -> None:
        self.model = model

    def keep(self, slots: list[int]) -> None:
        index = torch.as_tensor(slots, dtype=torch.long)
        self.exp_avg = {k: v[index].clone() for k, v in self.exp_avg.items()}
        self.exp_avg_sq = {k: v[index].clone() for k, v in self.exp_avg_sq.items()}

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        names = [k for k in self.names if self.model.params[k].grad is not None]
        if not names:
            return
        ps = [self.model.params[k] for k in names]
        gs = [p.grad for p in ps]
        ms, vs = [self.exp_avg[k] for k in names], [self.exp_avg_sq[k] for k in names]
        # the same elementwise ops as one tensor at a time, as one call per op over all tensors (~30 tensors
        # of a few hundred floats each: per-call overhead is most of the cost)
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        denom = torch._foreach_div(vs, c2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        step = lrs / c1
        steps = [step.to(p.dtype).view(-1, *([1] * (p.dim() - 1))) for p in ps]
        torch._foreach_addcdiv_(ps, torch._foreach_mul(ms, steps), denom, value=-1.0)


def plateau_window_steps(cfg: EnsembleConfig, n_rows: int) -> int:
    """The convergence window of a model trained on n_rows sequences, in steps.

    In epochs (`plateau_epochs`), a larger dataset gets a proportionally longer window, so models of one grid
    are judged after equal training per sequence rather than equal steps.
    """
    if cfg.plateau_epochs is None:
        return cfg.plateau_window
    return max(1, int(cfg.plateau_epochs * n_rows / cfg.batch_size))


def _plateaued(rec: ModelRecord, cfg: EnsembleConfig, data_bits: float | None) -> bool:
    step, _, bits = rec.history[-1]
    window = plateau_window_steps(cfg, rec.n_rows)
    if data_bits is None or step < window + cfg.warmup_steps:
        return False
    past = [h for h in rec.history if h[0] <= step - window]
    if not past:
        return False
    mem_now, mem_then = data_bits - bits, data_bits - past[-1][2]
    return mem_now > 0 and (mem_now - mem_then) < cfg.plateau_tol * mem_now


def _clip_per_model(model: EnsembleGPT, max_norm: float) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten(1) for g in grads], 1).float()  # [M, parameters per model]: one reduction
    scale = (max_norm / (flat.square().sum(1).sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in grads])


def _slice_state(model: EnsembleGPT, slot: int) -> dict[str, torch.Tensor]:
    return {k: v.detach()[slot].clone() for k, v in model.params.items()}
