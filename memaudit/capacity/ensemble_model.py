"""Many small GPT-2 models of one shape as one module: parameters stacked on a leading model axis.

Every weight of `EnsembleGPT` has shape [M, ...] (M models) and every matmul is one `bmm` over the model
axis, so M models cost one set of kernels per step instead of M. The architecture is exactly Hugging Face
GPT-2 (learned positions, pre-LayerNorm blocks, fused qkv, gelu_new MLP of width 4d, final LayerNorm, LM
head tied to the token embedding); `to_hf(m)` exports model m as a `GPT2LMHeadModel` with identical logits,
and `GPTShape.parameters` equals that model's parameter count.

Two autograd kernels make a CPU step cheap: `HeadCrossEntropy` (the tied head and the loss, fused and chunked,
so the [M, n, vocab] logits are never held) and `GeluTanh` (gelu_new through its sigmoid form). The body can run
through torch.compile (`_compiled_hidden`); whether it does is the trainer's decision (`ensemble_train`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import MemauditError


@dataclass(frozen=True)
class GPTShape:
    layers: int
    width: int
    heads: int
    vocab: int  # embedding rows (including BOS if the data uses one)
    positions: int

    def hf_config(self, bos_id: int | None = None):
        from transformers import GPT2Config  # lazy: ~0.6 s to import, kept off the CLI's start

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
    import torch._dynamo.config as dynamo_config  # lazy: ~1 s to import, paid only by runs that compile

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(_hidden, dynamic=False)


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
        from transformers import GPT2LMHeadModel  # lazy: see hf_config

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
