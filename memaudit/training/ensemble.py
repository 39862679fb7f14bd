"""Many small GPT-2 models of one shape trained together: parameters stacked on a leading model axis.

Every weight of `EnsembleGPT` has shape [M, ...] (M models) and every matmul is one `bmm` over the model
axis, so M models cost one set of kernels per step instead of M. The architecture is exactly Hugging Face
GPT-2 (learned positions, pre-LayerNorm blocks, fused qkv, gelu_new MLP of width 4d, final LayerNorm, LM
head tied to the token embedding); `to_hf(m)` exports model m as a `GPT2LMHeadModel` with identical logits,
and `parameters_per_model` equals that model's parameter count.

Models differ by seed (initialisation, data order) and by dataset: each model draws its own batch of row
indices from its own dataset every step, so datasets of different sizes train in the same ensemble.
Adam is elementwise and gradient clipping is per model, so stacking changes no model's optimisation.
"""
from __future__ import annotations

import functools
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
import torch.nn.functional as F

from ..errors import MemauditError
from ..rundir import atomic_write_bytes
from .allocator import keep_freed_memory


@dataclass(frozen=True)
class GPTShape:
    layers: int
    width: int
    heads: int
    vocab: int  # embedding rows (including BOS if the data uses one)
    positions: int

    def hf_config(self, bos_id: int | None = None):
        from transformers import GPT2Config

        return GPT2Config(vocab_size=self.vocab, n_positions=self.positions, n_embd=self.width,
                          n_layer=self.layers, n_head=self.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, bos_token_id=bos_id, eos_token_id=bos_id,
                          activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True)

    @property
    def parameters(self) -> int:
        """Parameters of one model, counted as a HF GPT2LMHeadModel counts them (tied head once)."""
        d, L = self.width, self.layers
        block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return self.vocab * d + self.positions * d + L * block + 2 * d


def _names(layers: int) -> list[str]:
    names = ["wte", "wpe"]
    for i in range(layers):
        names += [f"h{i}.{n}" for n in ("ln1_w", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b",
                                        "ln2_w", "ln2_b", "fc_w", "fc_b", "fc2_w", "fc2_b")]
    return names + ["lnf_w", "lnf_b"]


class HeadCrossEntropy(torch.autograd.Function):
    """Tied LM head + mean cross-entropy per model, fused and chunked over tokens.

    x [M, n, d] (final LayerNorm output), w [M, V, d] (token embedding), targets [M, n] -> loss [M] in nats.
    Standard autograd materialises the [M, n, V] logits, then log-softmax and its backward each stream them
    through memory; at these sizes that is most of a step. Here each chunk of logits is made, turned into its
    gradient (softmax - one-hot) and multiplied back into dx and dw while it is still in cache; the forward
    keeps dx and dw (small) and the backward only scales them. Same loss and gradients, up to rounding.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        M, n, _ = x.shape
        wt = w.transpose(1, 2)
        p_target = torch.empty(M, n, 1, dtype=torch.float32)  # softmax at the targets; logged once at the end
        minus_one = torch.full((M, chunk, 1), -1.0)
        gx, gw = torch.empty_like(x), torch.zeros_like(w)
        for s in range(0, n, chunk):
            xs, ts = x[:, s:s + chunk], targets[:, s:s + chunk, None]
            z = torch.bmm(xs, wt)
            zf = z if z.dtype == torch.float32 else z.float()
            g = torch.softmax(zf, -1)  # one fused kernel (torch.exp alone is ~5x slower on this CPU)
            torch.gather(g, -1, ts, out=p_target[:, s:s + chunk])
            g.scatter_add_(-1, ts, minus_one[:, : ts.shape[1]])  # softmax - one-hot
            g = g if g.dtype == x.dtype else g.to(x.dtype)
            gx[:, s:s + chunk] = torch.bmm(g, w)
            gw.baddbmm_(g.transpose(1, 2), xs)
        ctx.save_for_backward(gx, gw)
        ctx.n = n
        return -p_target.log().sum((1, 2)) / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx, gw = ctx.saved_tensors
        scale = (grad / ctx.n).view(-1, 1, 1)
        return gx * scale.to(gx.dtype), gw * scale.to(gw.dtype), None, None


_GELU_K, _GELU_C = 2 * math.sqrt(2 / math.pi), 0.044715


class GeluTanh(torch.autograd.Function):
    """GPT-2's gelu_new, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as x sigmoid(2u).

    The same function (tanh(u) = 2 sigmoid(2u) - 1). torch's float32 tanh is about 5x slower than its sigmoid on
    CPU, so this forward and backward together take about half the time of F.gelu(approximate="tanh"). Values and
    gradients agree with it to about 1e-6 (float32 rounding).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.addcmul(x, x * x, x, value=_GELU_C).mul_(_GELU_K).sigmoid_()  # sigmoid(2u)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        # d(x s)/dx = s (1 + x v' (1 - s)) with v = 2u. Beyond |x| = 20, s (1 - s) is 0 in float32, and clamping
        # there keeps x v' finite (no inf * 0). 1 - s is exact for s >= 1/2, so nothing cancels.
        xc = x.clamp(-20.0, 20.0)
        t = torch.addcmul(torch.tensor(_GELU_K, dtype=x.dtype), xc, xc, value=3 * _GELU_C * _GELU_K).mul_(xc)
        return t.mul_(1.0 - s).add_(1.0).mul_(s).mul_(grad)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """gelu_new: float32 through GeluTanh; other dtypes through F.gelu, which computes in float32 internally."""
    return GeluTanh.apply(x) if x.dtype == torch.float32 else F.gelu(x, approximate="tanh")


def _hidden(p: dict[str, torch.Tensor], idx: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """EnsembleGPT.hidden as a function of its (compute-dtype) parameters: one compiled version then serves every
    ensemble of a shape, as torch.compile guards on tensor shapes rather than on which tensors they are."""
    M, B, T = idx.shape
    wte = p["wte"]
    V, d = wte.shape[1], wte.shape[2]  # row idx of model m is row m*V + idx of the flat tables (index_select beats gather)
    flat = (idx.reshape(M, B * T) + torch.arange(0, M * V, V)[:, None]).view(-1)
    tok = wte.reshape(M * V, d).index_select(0, flat)
    x = (tok.view(M, B, T, d) + p["wpe"][:, None, :T, :]).reshape(M, B * T, d)
    for i in range(layers):
        a = _ln(x, p[f"h{i}.ln1_w"], p[f"h{i}.ln1_b"])
        qkv = _linear(a, p[f"h{i}.attn_w"], p[f"h{i}.attn_b"])
        qkv = qkv.view(M * B, T, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 3, MB, h, T, hd
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        y = y.transpose(1, 2).reshape(M, B * T, d)
        x = x + _linear(y, p[f"h{i}.proj_w"], p[f"h{i}.proj_b"])
        a = _ln(x, p[f"h{i}.ln2_w"], p[f"h{i}.ln2_b"])
        a = gelu_tanh(_linear(a, p[f"h{i}.fc_w"], p[f"h{i}.fc_b"]))
        x = x + _linear(a, p[f"h{i}.fc2_w"], p[f"h{i}.fc2_b"])
    return _ln(x, p["lnf_w"], p["lnf_b"])


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = F.layer_norm(x, x.shape[-1:], eps=1e-5)
    return torch.addcmul(b[:, None, :], x, w[:, None, :])  # per-model affine in one kernel


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(b[:, None, :], x, w)  # x [M, n, in] @ w [M, in, out] + b


@functools.cache
def _compiled_hidden() -> Callable:
    """_hidden through torch.compile (Inductor fuses the LayerNorms, gelu and residual adds into C++ loops).

    Static shapes: each ensemble size (models drop out as they converge) gets its own compiled graph, the same
    one whether a run is resumed or not, so a resumed run still ends exactly as an uninterrupted one; the
    recompile limit is raised so large ensembles do not fall back to eager part way."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(_hidden, dynamic=False)


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (None when it can): Inductor builds C++ on the CPU, so it needs a compiler."""
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else ["g++", "c++", "clang++"])):
        return "no C++ compiler found (set CXX or install g++)"
    return None


class EnsembleGPT(torch.nn.Module):
    """M GPT-2 models of one shape; forward(idx [M, B, T]) -> logits [M, B, T, vocab]."""

    def __init__(self, shape: GPTShape, seeds: Sequence[int], compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if shape.width % shape.heads:
            raise MemauditError(f"width {shape.width} is not divisible by {shape.heads} heads")
        self.shape = shape
        self.compute_dtype = compute_dtype
        self.compiled = False  # run hidden() through torch.compile (train_ensemble decides)
        self.params = torch.nn.ParameterDict()
        per_model = [self._init_one(seed) for seed in seeds]
        for name in _names(shape.layers):
            self.params[name.replace(".", "_")] = torch.nn.Parameter(torch.stack([p[name] for p in per_model]))

    @property
    def n_models(self) -> int:
        return self.params["wte"].shape[0]

    def _init_one(self, seed: int) -> dict[str, torch.Tensor]:
        """GPT-2 initialisation: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), LayerNorm 1/0."""
        s, d = self.shape, self.shape.width
        g = torch.Generator().manual_seed(int(seed))
        normal = lambda *size, std=0.02: torch.randn(*size, generator=g) * std  # noqa: E731
        res_std = 0.02 / math.sqrt(2 * s.layers)
        p = {"wte": normal(s.vocab, d), "wpe": normal(s.positions, d)}
        for i in range(s.layers):
            p |= {f"h{i}.ln1_w": torch.ones(d), f"h{i}.ln1_b": torch.zeros(d),
                  f"h{i}.attn_w": normal(d, 3 * d), f"h{i}.attn_b": torch.zeros(3 * d),
                  f"h{i}.proj_w": normal(d, d, std=res_std), f"h{i}.proj_b": torch.zeros(d),
                  f"h{i}.ln2_w": torch.ones(d), f"h{i}.ln2_b": torch.zeros(d),
                  f"h{i}.fc_w": normal(d, 4 * d), f"h{i}.fc_b": torch.zeros(4 * d),
                  f"h{i}.fc2_w": normal(4 * d, d, std=res_std), f"h{i}.fc2_b": torch.zeros(d)}
        p |= {"lnf_w": torch.ones(d), "lnf_b": torch.zeros(d)}
        return p

    def _p(self, name: str) -> torch.Tensor:
        t = self.params[name.replace(".", "_")]
        return t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    def hidden(self, idx: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
        """Final-LayerNorm output [M, B*T, d] for idx [M, B, T] (everything but the tied LM head), compiled when
        `compiled` (default: self.compiled)."""
        params = {name: self._p(name) for name in _names(self.shape.layers)}
        fn = _compiled_hidden() if (self.compiled if compiled is None else compiled) else _hidden
        return fn(params, idx, self.shape.layers, self.shape.heads)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        M, B, T = idx.shape
        return torch.bmm(self.hidden(idx), self._p("wte").transpose(1, 2)).view(M, B, T, -1)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Per-model mean next-token loss in nats ([M]) through the fused head (same value and gradient as
        cross_entropy(forward(idx)), without ever holding the full [M, B*T, vocab] logits)."""
        M, B, T = idx.shape
        return HeadCrossEntropy.apply(self.hidden(idx), self._p("wte"), targets.reshape(M, B * T), chunk)

    def token_nll(self, idx: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """-log p(target) in nats per token, [M, B, T], chunked (no gradient)."""
        M, B, T = idx.shape
        with torch.no_grad():  # evaluation: eager (its many batch shapes would each compile once more)
            x, w = self.hidden(idx, compiled=False), self._p("wte")
            tg = targets.reshape(M, B * T)
            out = torch.empty(M, B * T, dtype=torch.float32)
            for s in range(0, B * T, chunk):
                z = torch.bmm(x[:, s:s + chunk], w.transpose(1, 2)).float()
                out[:, s:s + chunk] = torch.logsumexp(z, -1) - z.gather(-1, tg[:, s:s + chunk, None]).squeeze(-1)
        return out.view(M, B, T)

    def keep(self, models: Sequence[int]) -> None:
        """Drop every model not listed (training continues on the rest at lower cost)."""
        index = torch.as_tensor(list(models), dtype=torch.long)
        for name, p in list(self.params.items()):
            self.params[name] = torch.nn.Parameter(p.detach()[index].clone())

    def to_hf(self, m: int, bos_id: int | None = None):
        """Model m as a transformers GPT2LMHeadModel (float32) with the same weights."""
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel(self.shape.hf_config(bos_id))
        sd = {"transformer.wte.weight": "wte", "transformer.wpe.weight": "wpe",
              "transformer.ln_f.weight": "lnf_w", "transformer.ln_f.bias": "lnf_b"}
        for i in range(self.shape.layers):
            pre = f"transformer.h.{i}."
            sd |= {pre + "ln_1.weight": f"h{i}.ln1_w", pre + "ln_1.bias": f"h{i}.ln1_b",
                   pre + "attn.c_attn.weight": f"h{i}.attn_w", pre + "attn.c_attn.bias": f"h{i}.attn_b",
                   pre + "attn.c_proj.weight": f"h{i}.proj_w", pre + "attn.c_proj.bias": f"h{i}.proj_b",
                   pre + "ln_2.weight": f"h{i}.ln2_w", pre + "ln_2.bias": f"h{i}.ln2_b",
                   pre + "mlp.c_fc.weight": f"h{i}.fc_w", pre + "mlp.c_fc.bias": f"h{i}.fc_b",
                   pre + "mlp.c_proj.weight": f"h{i}.fc2_w", pre + "mlp.c_proj.bias": f"h{i}.fc2_b"}
        state = {k: self.params[v.replace(".", "_")][m].detach().float().clone() for k, v in sd.items()}
        state["lm_head.weight"] = state["transformer.wte.weight"]
        missing, unexpected = hf.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("attn.bias") and not k.endswith("masked_bias") for k in missing):
            raise RuntimeError(f"weight export mismatch: missing {missing}, unexpected {unexpected}")
        return hf.eval()


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
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.compute_dtype]
    model = EnsembleGPT(shape, seeds, compute_dtype=dtype)
    model.compiled = use_compile(cfg)
    n_max = max(len(d) for d in datasets)
    targets = torch.zeros(len(datasets), n_max, S, dtype=torch.long)
    for m, d in enumerate(datasets):
        targets[m, : len(d)] = torch.as_tensor(d, dtype=torch.long)
    bos = torch.full((len(datasets), n_max, 1), bos_id, dtype=torch.long)
    inputs = torch.cat([bos, targets[:, :, :-1]], dim=2)
    sizes = [len(d) for d in datasets]
    records = [ModelRecord(index=m, seed=int(s), n_rows=sizes[m]) for m, s in enumerate(seeds)]
    active = list(range(len(datasets)))  # record index of each ensemble slot
    gens = [np.random.default_rng(int(s) + 7919) for s in seeds]
    orders: list[list[int]] = [[] for _ in datasets]

    def next_batch(m: int) -> np.ndarray:
        n, b = sizes[m], cfg.batch_size  # a dataset smaller than a batch repeats within it (= full batch)
        out = []
        while len(out) < b:  # epochs of fresh permutations, so every row is seen once per epoch
            if not orders[m]:
                orders[m] = gens[m].permutation(n).tolist()
            take = min(b - len(out), len(orders[m]))
            out += orders[m][:take]
            del orders[m][:take]
        return np.asarray(out)

    opt = StackedAdam(model, betas=cfg.betas, eps=cfg.eps)
    anneal: dict[int, tuple[int, int]] = {}  # record -> (first annealing step, annealing steps)
    start, t0 = 0, time.time()
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        key = _fingerprint(shape, datasets, seeds, cfg, bos_id, data_bits, lr_scales)
        if checkpoint.is_file():
            start, active, anneal = _load_checkpoint(checkpoint, key, model, opt, records, gens, orders)
            t0 -= max(r.seconds for r in records)
            if not active:
                return records
    for step in range(start + 1, cfg.max_steps + 1):
        lrs = []
        for m in active:  # warmup, constant, then (after its plateau) a linear decay to 0 for this model only
            lr = cfg.lr * (lr_scales[m] if lr_scales is not None else 1.0) * min(1.0, step / max(1, cfg.warmup_steps))
            if m in anneal:
                start, length = anneal[m]
                lr *= max(0.0, 1.0 - (step - start) / length)
            lrs.append(lr)
        b = cfg.batch_size
        rows = torch.as_tensor(np.stack([next_batch(m) for m in active]))  # [A, b]
        slots = torch.as_tensor(active)[:, None]
        idx_in, idx_tg = inputs[slots, rows], targets[slots, rows]  # [A, b, S], no copy of whole datasets
        per_model = _loss_and_backward(model, idx_in, idx_tg)
        if cfg.grad_clip > 0:
            _clip_per_model(model, cfg.grad_clip)
        opt.step(torch.tensor(lrs))
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            bits = code_lengths_bits(model, inputs[active], targets[active], [sizes[m] for m in active])
            done = []
            for slot, m in enumerate(active):
                rec = records[m]
                rec.steps, rec.seconds = step, time.time() - t0
                rec.history.append((step, float(per_model[slot].detach()), float(bits[slot])))
                hb = data_bits[m] if data_bits is not None else None
                if m in anneal:
                    if step >= anneal[m][0] + anneal[m][1]:
                        rec.converged, rec.converged_step = True, step
                        done.append(slot)
                elif hb is not None and hb - rec.history[-1][2] >= cfg.full_fraction * hb:
                    rec.converged, rec.converged_step = True, step  # memorised (nearly) all of its data
                    done.append(slot)
                elif _plateaued(rec, cfg, hb):
                    length = max(cfg.eval_every, int(cfg.anneal_fraction * step))
                    anneal[m] = (step, length)
                    rec.anneal_start = step
            if on_eval is not None:
                on_eval(step, records)
            if done and cfg.drop_converged:
                for slot in done:
                    records[active[slot]].final_state = _slice_state(model, slot)
                keep = [s for s in range(len(active)) if s not in done]
                if not keep:
                    active = []
                    break
                opt.keep(keep)
                model.keep(keep)
                opt.rebind(model)
                active = [active[s] for s in keep]
            if checkpoint is not None and step < cfg.max_steps:
                _save_checkpoint(checkpoint, key, step, model, opt, records, active, anneal, gens, orders)
    for slot, m in enumerate(active):
        records[m].final_state = _slice_state(model, slot)
    return records


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
