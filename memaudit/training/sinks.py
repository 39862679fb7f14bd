"""Memorization sinks (METHODS.md section 5; Ghosal, Maini, Raghunathan 2025) on any HF causal LM.

The MLP hidden layer of every transformer block is found by its structure, not by names (`locate_mlps`): a probe
forward pass records each linear projection and each parameterless module; an MLP is a projection U (or the two
halves of a fused gate/up projection) whose output feeds an elementwise activation A, and the next projection D
that reads A's output, or A's output times a second projection's output (gated MLPs), back to U's input width.
One forward pre-hook on every D masks its input, the hidden activation, neuron by neuron. Mixture-of-experts
layers are refused up front (a per-token mask cannot follow the router to the experts).
Of the I hidden neurons the first I - round(s*I) are general (always on), the last round(s*I) are sinks.
Each training document has a sequence id >= 1 (a hash of its tokens, so repeated copies share it); the id
seeds the choice of round(p * n_sinks) sink neurons that stay on for that document (the same indices in every
layer); on packed rows each position takes its own document's id (packing.py). No rescaling in training. With the
sinks dropped (evaluation and release), sinks are zeroed and the general neurons scaled by
(n_general + p * n_sinks) / n_general (the official code's "dropout" mode). The release model has the sink rows and
columns removed and the scale folded into D, with the config's MLP width set to n_general; an architecture whose
config cannot say that width (BLOOM's is 4 x hidden) keeps its width with the sinks' weights zeroed instead.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from ..errors import MemauditError
from ..models import _quiet_transformers, load_model

SINKS_FILE = "sinks.json"
_PROBE_TOKENS = 4  # the probe pass reads one row of this many tokens


@dataclass
class SinkSpec:
    intermediate: int
    n_general: int
    n_sinks: int
    n_active_sinks: int  # sink neurons kept on per sequence id (round(density * n_sinks))
    fraction: float
    density: float

    @property
    def dropped_scale(self) -> float:
        """Scale of the general neurons when the sinks are dropped: (general + p * sinks) / general."""
        return (self.n_general + self.density * self.n_sinks) / self.n_general


@dataclass
class Mlp:
    """One block's MLP hidden layer, by module path: the projections into it (`fused`: a gate/up projection of
    2 x width rows, its two halves each one row per neuron) and the projection reading it (`down`)."""
    ups: list[str]
    fused: list[bool]
    down: str
    width: int


def sequence_id(tokens: Sequence[int]) -> int:
    """A document's sequence id (>= 1) from its token ids, so repeated copies share one."""
    digest = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(digest[:7], "little") + 1


# ---------------------------------------------------------------------------------------------- locating

def _is_projection(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, Conv1D))


def _dims(proj: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of a projection (HF Conv1D stores its weight as [in, out])."""
    if isinstance(proj, Conv1D):
        return proj.weight.shape[0], proj.weight.shape[1]
    return proj.in_features, proj.out_features


def experts_module(model: torch.nn.Module) -> str | None:
    """The path of a mixture-of-experts module, or None: one holding stacked expert weights (two parameters
    [E, a, b] and [E, c, d], E > 1, that chain: b == c or a == d), or a list of MLPs inside a layer (a ModuleList
    within a ModuleList)."""
    lists = []
    for name, module in model.named_modules():
        stacked = [p.shape for p in module.parameters(recurse=False) if p.dim() == 3 and p.shape[0] > 1]
        if any(a[0] == b[0] and (a[2] == b[1] or a[1] == b[2]) for i, a in enumerate(stacked) for b in stacked[i + 1:]):
            return name
        if isinstance(module, torch.nn.ModuleList):
            if any(outer == "" or name.startswith(outer + ".") for outer in lists) and len(module) > 1 and \
                    all(any(_is_projection(m) for m in expert.modules()) for expert in module):
                return name
            lists.append(name)
    return None


def _experts_refused(arch: str, experts: str) -> MemauditError:
    return MemauditError(f"sinks: {arch} is a mixture-of-experts model ({experts} holds the experts): a token reaches "
                         "its experts through the router, where a per-token sink mask cannot follow it; train it "
                         "with --objective standard or goldfish")


@dataclass
class _Call:
    order: int  # the call's place in the probe pass
    name: str
    module: torch.nn.Module
    inp: torch.Tensor
    out: torch.Tensor


def _probe_calls(model: torch.nn.Module) -> tuple[list[_Call], list[_Call]]:
    """One eval-mode forward pass on a short row: every projection call and every parameterless leaf module call
    (the activation candidates), in call order, with their first input and output."""
    projs: list[_Call] = []
    acts: list[_Call] = []
    handles = []
    for name, module in model.named_modules():
        leaf = next(module.children(), None) is None and next(module.parameters(recurse=False), None) is None
        into = projs if _is_projection(module) else acts if leaf else None
        if into is None:
            continue

        def hook(mod, args, out, name=name, into=into):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                into.append(_Call(len(projs) + len(acts), name, mod, args[0], out))
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    device = next(model.parameters()).device
    ids = (torch.arange(_PROBE_TOKENS, device=device) % model.get_input_embeddings().num_embeddings)[None]
    try:
        model.eval()
        with torch.no_grad(), _quiet_transformers():  # its notes on this probe are not the user's concern
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return projs, acts


def _source(act: _Call, projs: list[_Call]) -> tuple[_Call, int | None] | None:
    """The projection whose output is the activation's input: whole (None) or one half (0/1) of a fused one."""
    width = act.inp.shape[-1]
    for p in reversed([p for p in projs if p.order < act.order]):
        if p.out is act.inp:
            return p, None
        same = p.out.untyped_storage().data_ptr() == act.inp.untyped_storage().data_ptr()
        if same and p.out.shape[-1] == 2 * width and p.out.shape[:-1] == act.inp.shape[:-1]:
            for half in (0, 1):
                if torch.equal(p.out[..., half * width:(half + 1) * width], act.inp):
                    return p, half
    return None


def _elementwise(act: _Call) -> bool:
    """The activation treats every neuron on its own: changing half the neurons leaves the other half's outputs."""
    half = act.inp.shape[-1] // 2
    changed = act.inp.clone()
    changed[..., :half] += 1.0
    with torch.no_grad():
        out = act.module(changed)
    return isinstance(out, torch.Tensor) and out.shape == act.out.shape and torch.equal(out[..., half:],
                                                                                         act.out[..., half:])


def _mlp_at(act: _Call, projs: list[_Call]) -> Mlp | None:
    """The MLP whose activation call this is, or None when the call is not one."""
    found = _source(act, projs) if act.inp.is_floating_point() and act.inp.shape[-1] > 1 else None
    if found is None:
        return None
    up, half = found
    width, hidden = act.inp.shape[-1], _dims(up.module)[0]
    down = next((p for p in projs if p.order > act.order and _dims(p.module)[0] == width), None)
    if down is None or _dims(down.module)[1] != hidden or not _elementwise(act):
        return None
    if half is None and torch.equal(down.inp, act.out):
        return Mlp([up.name], [False], down.name, width)
    if half is not None:
        other = up.out[..., (1 - half) * width:(2 - half) * width]
        if torch.equal(down.inp, act.out * other):
            return Mlp([up.name], [True], down.name, width)
        return None
    for gate in reversed([p for p in projs if p.order < down.order and p is not up]):
        if gate.out.shape == act.out.shape and _dims(gate.module)[0] == hidden and \
                torch.equal(down.inp, act.out * gate.out):
            return Mlp([up.name, gate.name], [False, False], down.name, width)
    return None


def locate_mlps(model: torch.nn.Module) -> list[Mlp]:
    """Every block's MLP hidden layer, found structurally (module docstring); one error line when sinks cannot be
    placed on this architecture."""
    arch = type(model).__name__
    experts = experts_module(model)
    if experts is not None:
        raise _experts_refused(arch, experts)
    projs, acts = _probe_calls(model)
    mlps, seen = [], set()
    for act in acts:
        mlp = _mlp_at(act, projs)
        if mlp is not None and mlp.down not in seen:
            seen.add(mlp.down)
            mlps.append(mlp)
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if not mlps:
        raise MemauditError(f"sinks: no MLP hidden layer found in {arch} (a linear projection, an elementwise "
                            "activation and a linear projection reading it back): sinks cannot be placed")
    if layers is not None and len(mlps) != layers:
        raise MemauditError(f"sinks: found an MLP hidden layer in {len(mlps)} places of {arch}'s {layers} layers "
                            f"({', '.join(m.down for m in mlps[:4])}): sinks need exactly one per layer")
    return mlps


# ---------------------------------------------------------------------------------------------- masks

def sink_spec(model: torch.nn.Module, fraction: float, density: float) -> SinkSpec:
    """The sink layout for this model, after checking that sinks can be placed on it (locate_mlps)."""
    if not 0.0 < fraction < 1.0 or not 0.0 < density < 1.0:
        raise MemauditError("--sink-fraction and --sink-density must be in (0, 1)")
    widths = {m.width for m in locate_mlps(model)}
    if len(widths) != 1:
        raise MemauditError(f"sinks: MLP widths differ across layers ({sorted(widths)})")
    inter = widths.pop()
    n_sinks = int(round(fraction * inter))
    if n_sinks < 1 or n_sinks >= inter:
        raise MemauditError(f"sinks: --sink-fraction {fraction} leaves no sink or no general neuron of {inter}")
    return SinkSpec(inter, inter - n_sinks, n_sinks, max(1, int(round(density * n_sinks))), fraction, density)


def check_architecture(model_dir: str | Path) -> None:
    """Before anything is loaded: refuse a model directory whose architecture cannot hold sinks (mixture of
    experts), from its config alone (the model is built on the meta device, without weights)."""
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"), _quiet_transformers():
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return  # the loader reports a config it cannot build in its own words
    experts = experts_module(model)
    if experts is not None:
        raise _experts_refused(f"{type(model).__name__} in {model_dir}", experts)


def sink_mask(spec: SinkSpec, seq_id: int) -> torch.Tensor:
    """float [I]: 1 for general neurons and this sequence's sinks, 0 for the other sinks."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seq_id))
    active = torch.randperm(spec.n_sinks, generator=gen)[: spec.n_active_sinks]
    mask = torch.ones(spec.intermediate)
    sinks = torch.zeros(spec.n_sinks)
    sinks[active] = 1.0
    mask[spec.n_general:] = sinks
    return mask


def dropped_mask(spec: SinkSpec) -> torch.Tensor:
    """float [I]: the evaluation/release multiplier (general scaled, sinks zeroed)."""
    mask = torch.zeros(spec.intermediate)
    mask[: spec.n_general] = spec.dropped_scale
    return mask


class SinkHooks:
    """Forward pre-hooks multiplying every MLP hidden activation (the input of each block's down projection) by a
    per-row mask.

    `set_rows(seq_ids)` selects training masks for a batch (one id per row), `set_tokens(seq_ids)` one id per
    position (packed rows); `set_dropped()` the eval mode.
    """

    def __init__(self, model: torch.nn.Module, spec: SinkSpec):
        self.spec = spec
        self._mask: torch.Tensor | None = None  # [B, 1, I], [B, T, I] or [I]
        downs = [model.get_submodule(m.down) for m in locate_mlps(model)]
        self._handles = [proj.register_forward_pre_hook(self._hook) for proj in downs]
        self._device = next(model.parameters()).device

    def _hook(self, module, args):
        if self._mask is None:
            return None
        x, mask = args[0], self._mask.to(dtype=args[0].dtype)
        if mask.dim() == 3 and x.dim() == 2:  # the block flattened its rows to [B * T, I] (OPT)
            mask = mask.expand(mask.shape[0], x.shape[0] // mask.shape[0], mask.shape[2]).reshape(x.shape)
        return (x * mask,) + tuple(args[1:])

    def set_rows(self, seq_ids: Sequence[int]) -> None:
        self._mask = torch.stack([sink_mask(self.spec, s) for s in seq_ids]).unsqueeze(1).to(self._device)

    def set_tokens(self, seq_ids: torch.Tensor) -> None:
        """Per-position training masks (packed rows): int64 [B, T], each position masked by its own sequence's
        sinks."""
        unique, index = torch.unique(seq_ids, return_inverse=True)
        table = torch.stack([sink_mask(self.spec, int(s)) for s in unique])
        self._mask = table[index].to(self._device)  # [B, T, I]

    def set_dropped(self) -> None:
        self._mask = dropped_mask(self.spec).to(self._device)

    def set_all_on(self) -> None:
        self._mask = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def write_sink_spec(model_dir: str | Path, spec: SinkSpec) -> None:
    (Path(model_dir) / SINKS_FILE).write_text(json.dumps(asdict(spec), indent=2))


def read_sink_spec(model_dir: str | Path) -> SinkSpec:
    path = Path(model_dir) / SINKS_FILE
    if not path.is_file():
        raise MemauditError(f"{model_dir} was not trained with --objective sinks (no {SINKS_FILE})")
    return SinkSpec(**json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------- release

def _neuron_rows(mlp_width: int, fused: bool, neurons: torch.Tensor) -> torch.Tensor:
    """A projection's output rows for these hidden neurons (both halves of a fused gate/up projection)."""
    return torch.cat([neurons, neurons + mlp_width]) if fused else neurons


def _take_outputs(proj: torch.nn.Module, rows: torch.Tensor) -> None:
    """In place: keep only these output features of a projection."""
    if isinstance(proj, Conv1D):
        proj.weight = torch.nn.Parameter(proj.weight[:, rows].clone())
        proj.bias = torch.nn.Parameter(proj.bias[rows].clone())
        proj.nf = len(rows)
        return
    proj.weight = torch.nn.Parameter(proj.weight[rows].clone())
    if proj.bias is not None:
        proj.bias = torch.nn.Parameter(proj.bias[rows].clone())
    proj.out_features = len(rows)


def _take_inputs(proj: torch.nn.Module, cols: torch.Tensor, scale: float) -> None:
    """In place: keep only these input features of a projection, their weights multiplied by `scale`."""
    if isinstance(proj, Conv1D):
        proj.weight = torch.nn.Parameter(proj.weight[cols].clone() * scale)
        proj.nx = len(cols)
        return
    proj.weight = torch.nn.Parameter(proj.weight[:, cols].clone() * scale)
    proj.in_features = len(cols)


def _zero_sinks(model: torch.nn.Module, mlps: list[Mlp], spec: SinkSpec) -> None:
    """In place, keeping the width: the sinks' weights zeroed, the general neurons' scale folded into D."""
    sinks = torch.arange(spec.n_general, spec.intermediate)
    with torch.no_grad():
        for mlp in mlps:
            for name, fused in zip(mlp.ups, mlp.fused):
                proj = model.get_submodule(name)
                rows = _neuron_rows(mlp.width, fused, sinks)
                if isinstance(proj, Conv1D):
                    proj.weight[:, rows] = 0.0
                else:
                    proj.weight[rows] = 0.0
                if proj.bias is not None:
                    proj.bias[rows] = 0.0
            down = model.get_submodule(mlp.down)
            scale = dropped_mask(spec).to(down.weight.dtype)
            if isinstance(down, Conv1D):
                down.weight.mul_(scale[:, None])
            else:
                down.weight.mul_(scale[None, :])


def _prune_sinks(model: torch.nn.Module, mlps: list[Mlp], spec: SinkSpec) -> None:
    """In place: the sink neurons removed from every MLP, the general neurons' scale folded into D."""
    general = torch.arange(spec.n_general)
    with torch.no_grad():
        for mlp in mlps:
            for name, fused in zip(mlp.ups, mlp.fused):
                _take_outputs(model.get_submodule(name), _neuron_rows(mlp.width, fused, general))
            _take_inputs(model.get_submodule(mlp.down), general, spec.dropped_scale)


def _pruned_shapes(model: torch.nn.Module, mlps: list[Mlp], spec: SinkSpec) -> dict[str, tuple]:
    """The state dict's shapes once the sinks are removed."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for mlp in mlps:
        for name, fused in zip(mlp.ups, mlp.fused):
            rows = 2 * spec.n_general if fused else spec.n_general
            conv = isinstance(model.get_submodule(name), Conv1D)
            shapes[f"{name}.weight"] = (shapes[f"{name}.weight"][0], rows) if conv else \
                (rows, shapes[f"{name}.weight"][1])
            if f"{name}.bias" in shapes:
                shapes[f"{name}.bias"] = (rows,)
        w = f"{mlp.down}.weight"
        conv = isinstance(model.get_submodule(mlp.down), Conv1D)
        shapes[w] = (spec.n_general, shapes[w][1]) if conv else (shapes[w][0], spec.n_general)
    return shapes


def _width_field(model: torch.nn.Module, mlps: list[Mlp], spec: SinkSpec) -> str | None:
    """The config field that sets the MLP width: the one with which the model's class builds (on the meta device,
    without weights) exactly the pruned model's shapes when it holds n_general; None when no field does."""
    config = model.config
    values = config.to_dict()
    fields = [k for k, v in values.items() if v == spec.intermediate and type(v) is int] + \
        [k for k, v in values.items() if v is None]
    want = _pruned_shapes(model, mlps, spec)
    for name in fields:
        trial = copy.deepcopy(config)
        setattr(trial, name, spec.n_general)
        try:
            with torch.device("meta"):
                skeleton = type(model)(trial)
        except Exception:  # a field that cannot hold a width (a dtype, a name) breaks the build: not this one
            continue
        if {k: tuple(v.shape) for k, v in skeleton.state_dict().items()} == want:
            return name
    return None


def _fold_release(model: torch.nn.Module, spec: SinkSpec) -> str:
    """In place: the release model (sinks removed, scale folded in). Returns how: "pruned" (the config's MLP
    width set to n_general) or "zeroed" (the width kept, the sinks' weights zero: the config cannot say it)."""
    mlps = locate_mlps(model)
    field = _width_field(model, mlps, spec)
    if field is None:
        _zero_sinks(model, mlps, spec)
        return "zeroed"
    _prune_sinks(model, mlps, spec)
    setattr(model.config, field, spec.n_general)
    return "pruned"


def _without_sink_hooks(model: torch.nn.Module) -> None:
    """Drop SinkHooks' pre-hooks from a (copied) model."""
    for module in model.modules():
        for key, fn in list(module._forward_pre_hooks.items()):
            if isinstance(getattr(fn, "__self__", None), SinkHooks):
                del module._forward_pre_hooks[key]


def export_release_model(model_dir: str | Path, out: str | Path, *, allow_pickle: bool = False) -> Path:
    """Write a release copy of a sinks-trained model: sinks removed, scale folded in, an ordinary model."""
    loaded = load_model(model_dir, device="cpu", dtype="float32", allow_pickle=allow_pickle)
    spec = read_sink_spec(model_dir)
    return release_from_model(loaded.model, loaded.tokenizer, spec, out)


def release_from_model(model: torch.nn.Module, tokenizer, spec: SinkSpec, out: str | Path) -> Path:
    release = copy.deepcopy(model).cpu().float()
    _without_sink_hooks(release)
    _fold_release(release, spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    release.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
