"""Memorization sinks (METHODS.md section 5; Ghosal, Maini, Raghunathan 2025) on any HF causal LM.

The MLP hidden activation of every layer is the INPUT of the MLP's output ("down") projection, so one forward
pre-hook on that projection masks it for every architecture; a small table names the projection per family.
Of the I hidden neurons the first I - round(s*I) are general (always on), the last round(s*I) are sinks.
Each training document has a sequence id >= 1 (a hash of its tokens, so repeated copies share it); the id
seeds the choice of round(p * n_sinks) sink neurons that stay on for that document (the same indices in every
layer); on packed rows each position takes its own document's id (packing.py). No rescaling in training. With the sinks dropped (evaluation and release), sinks are zeroed and the
general neurons scaled by (n_general + p * n_sinks) / n_general (the official code's "dropout" mode); the
release model has the sink rows/columns removed and the scale folded into the output projection.
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

from ..errors import MemauditError
from ..models import load_model

# The attribute of a model's `mlp` module whose input is the hidden activation, per family.
DOWN_PROJECTIONS = ("c_proj",  # GPT-2
                    "down_proj",  # Llama, Mistral, Qwen2, Gemma
                    "fc_out",  # GPT-J
                    "dense_4h_to_h",  # GPT-NeoX / Pythia
                    "fc2")  # Phi
# Config fields that hold the MLP width, in the order they are tried.
INTERMEDIATE_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "intermediate_dim")
SINKS_FILE = "sinks.json"


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


def sequence_id(tokens: Sequence[int]) -> int:
    """A document's sequence id (>= 1) from its token ids, so repeated copies share one."""
    digest = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(digest[:7], "little") + 1


def _mlp_projections(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(name, mlp module, down projection) for every transformer block."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] != "mlp":
            continue
        for attr in DOWN_PROJECTIONS:
            proj = getattr(module, attr, None)
            if isinstance(proj, torch.nn.Module):
                found.append((name, module, proj))
                break
    if not found:
        raise MemauditError(f"sinks: no MLP output projection found in {type(model).__name__} "
                            f"(looked for mlp.{{{', '.join(DOWN_PROJECTIONS)}}})")
    return found


def _in_features(proj: torch.nn.Module) -> int:
    if isinstance(proj, torch.nn.Linear):
        return proj.in_features
    weight = getattr(proj, "weight", None)
    if weight is not None and type(proj).__name__ == "Conv1D":  # HF Conv1D stores weight as [in, out]
        return weight.shape[0]
    raise MemauditError(f"sinks: unsupported MLP projection type {type(proj).__name__}")


def sink_spec(model: torch.nn.Module, fraction: float, density: float) -> SinkSpec:
    if not 0.0 < fraction < 1.0 or not 0.0 < density < 1.0:
        raise MemauditError("--sink-fraction and --sink-density must be in (0, 1)")
    widths = {_in_features(p) for _, _, p in _mlp_projections(model)}
    if len(widths) != 1:
        raise MemauditError(f"sinks: MLP widths differ across layers ({sorted(widths)})")
    inter = widths.pop()
    n_sinks = int(round(fraction * inter))
    if n_sinks < 1 or n_sinks >= inter:
        raise MemauditError(f"sinks: --sink-fraction {fraction} leaves no sink or no general neuron of {inter}")
    return SinkSpec(inter, inter - n_sinks, n_sinks, max(1, int(round(density * n_sinks))), fraction, density)


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
    """Forward pre-hooks multiplying every MLP hidden activation by a per-row mask.

    `set_rows(seq_ids)` selects training masks for a batch (one id per row), `set_tokens(seq_ids)` one id per
    position (packed rows); `set_dropped()` the eval mode.
    """

    def __init__(self, model: torch.nn.Module, spec: SinkSpec):
        self.spec = spec
        self._mask: torch.Tensor | None = None  # [B, 1, I] or [I]
        self._handles = [proj.register_forward_pre_hook(self._hook) for _, _, proj in _mlp_projections(model)]
        self._device = next(model.parameters()).device

    def _hook(self, module, args):
        if self._mask is None:
            return None
        x = args[0]
        return (x * self._mask.to(dtype=x.dtype),) + tuple(args[1:])

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


def _fold_release(model: torch.nn.Module, spec: SinkSpec) -> None:
    """In place: drop sink neurons from every MLP and fold the general scale into the output projection."""
    keep = slice(0, spec.n_general)
    with torch.no_grad():
        for _, mlp, proj in _mlp_projections(model):
            for child in mlp.children():  # the projections INTO the hidden layer: output dim == I
                if child is proj:
                    continue
                if isinstance(child, torch.nn.Linear) and child.out_features == spec.intermediate:
                    child.weight = torch.nn.Parameter(child.weight[keep].clone())
                    if child.bias is not None:
                        child.bias = torch.nn.Parameter(child.bias[keep].clone())
                    child.out_features = spec.n_general
                elif type(child).__name__ == "Conv1D" and child.weight.shape[1] == spec.intermediate:
                    child.weight = torch.nn.Parameter(child.weight[:, keep].clone())
                    child.bias = torch.nn.Parameter(child.bias[keep].clone())
                    child.nf = spec.n_general
            if isinstance(proj, torch.nn.Linear):
                proj.weight = torch.nn.Parameter(proj.weight[:, keep].clone() * spec.dropped_scale)
                proj.in_features = spec.n_general
            else:  # Conv1D [in, out]
                proj.weight = torch.nn.Parameter(proj.weight[keep].clone() * spec.dropped_scale)
                proj.nx = spec.n_general
    fields = [f for f in INTERMEDIATE_FIELDS if f in model.config.to_dict()]
    if not fields:
        raise MemauditError(f"sinks: cannot tell which config field holds the MLP width of {type(model).__name__}")
    setattr(model.config, fields[0], spec.n_general)


def export_release_model(model_dir: str | Path, out: str | Path, *, allow_pickle: bool = False) -> Path:
    """Write a release copy of a sinks-trained model: sinks removed, scale folded in, an ordinary model."""
    loaded = load_model(model_dir, device="cpu", dtype="float32", allow_pickle=allow_pickle)
    spec = read_sink_spec(model_dir)
    return release_from_model(loaded.model, loaded.tokenizer, spec, out)


def release_from_model(model: torch.nn.Module, tokenizer, spec: SinkSpec, out: str | Path) -> Path:
    release = copy.deepcopy(model).cpu().float()
    _fold_release(release, spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    release.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
