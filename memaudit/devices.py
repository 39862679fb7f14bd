"""Which device and dtype a command runs on: `auto` and the names users type, resolved once for every command;
and how a model larger than one device is placed (--device-map, --max-memory, --quantize), checked up front."""
from __future__ import annotations

import importlib.metadata
import os
import re
from typing import Any

import torch

from . import checks
from .errors import MemauditError


def resolve_device(device: str = "auto") -> torch.device:
    checks.device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MemauditError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MemauditError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a CUDA device that supports it, fp32 otherwise."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise MemauditError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


# --- placing a model larger than one device: --device-map, --max-memory, --quantize ------------------------------

DEVICE_MAPS = ("auto", "balanced", "cpu-offload")
QUANTIZATIONS = ("8bit", "4bit")
# bitsandbytes' CPU kernels: the release memaudit's quantized CPU path was tested with (earlier ones: CUDA only).
BNB_CPU_VERSION = (0, 50)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)
EACH = "*"  # --max-memory given as one size: that limit on every device the model runs on


def placement(settings: Any) -> dict[str, str | None]:
    """The three placement options of a command's settings, as `load_model` takes them."""
    return {"device_map": settings.device_map, "max_memory": settings.max_memory, "quantize": settings.quantize}


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """`0=20GiB,cpu=60GiB` -> {0: bytes, "cpu": bytes}; one size (`20GiB`) -> {EACH: bytes}. Decimal (KB, MB,
    GB) and binary (KiB, MiB, GiB) units, plain numbers are bytes."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1 and "=" not in parts[0]:
        return {EACH: _size(parts[0])}
    limits: dict[int | str, int] = {}
    for part in parts:
        name, eq, size = part.partition("=")
        key = _memory_key(name.strip().lower(), part if eq else None)
        if key in limits:
            raise MemauditError(f"--max-memory names {name.strip()} twice")
        limits[key] = _size(size)
    return limits


def _memory_key(name: str, part: str | None) -> int | str:
    if part is None:
        raise MemauditError("--max-memory takes one size (20GiB: each device) or DEVICE=SIZE pairs "
                            "(0=20GiB,cpu=60GiB), not a mix")
    if name == "cpu" or name == "mps":
        return name
    index = name.removeprefix("cuda:")
    if index.isdigit():
        return int(index)
    if name == "disk":
        raise MemauditError("--max-memory cannot limit disk: what exceeds the other limits is offloaded there")
    raise MemauditError(f"--max-memory: unknown device {name!r} in {part!r}: use a GPU index (0, 1, ...), cpu or mps")


def _size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    unit = (m.group(2) or "b").lower() if m else ""
    if not m or unit not in _UNITS:
        raise MemauditError(f"--max-memory: {text!r} is not a size such as 20GiB, 500MB or 300KB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise MemauditError(f"--max-memory: {text!r} must be more than 0 bytes")
    return n


def check_placement(device_map: str | None, max_memory: str | None, quantize: str | None,
                    device: str = "auto") -> None:
    """The placement options and how they combine, before anything is loaded: one MemauditError line each."""
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise MemauditError(f"unknown --device-map {device_map!r}: use auto, balanced or cpu-offload (or leave it "
                            "out: the whole model on --device)")
    limits = parse_max_memory(max_memory)
    if limits is not None and device_map is None:
        raise MemauditError("--max-memory limits what --device-map places on each device: add --device-map "
                            "cpu-offload (or auto, balanced)")
    if device_map in ("auto", "balanced"):
        if device not in ("auto", "cuda"):
            raise MemauditError(f"--device-map {device_map} chooses the devices itself (every visible GPU, then CPU "
                                f"memory, then disk): leave --device at auto, or use --device-map cpu-offload to keep "
                                f"the model on --device {device}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MemauditError(f"--device-map {device_map} spreads one model over every GPU, but torchrun runs one "
                                "model per GPU: use one or the other (--device-map cpu-offload works per rank)")
    gpus = sorted(k for k in (limits or {}) if isinstance(k, int))
    if gpus and gpus[-1] >= torch.cuda.device_count():
        raise MemauditError(f"--max-memory names GPU {gpus[-1]}, but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    if quantize is not None:
        _check_quantize(quantize, device_map)


def _check_quantize(quantize: str, device_map: str | None) -> None:
    if quantize not in QUANTIZATIONS:
        raise MemauditError(f"unknown --quantize {quantize!r}: use 8bit or 4bit (or leave it out: full precision)")
    if device_map == "cpu-offload":
        raise MemauditError("--quantize cannot be combined with --device-map cpu-offload: bitsandbytes' quantized "
                            "weights are not offloaded (use --quantize alone, or with --device-map auto over GPUs)")
    installed = _bitsandbytes_version()
    if installed is None:
        raise MemauditError(f"--quantize {quantize} needs bitsandbytes, which is not installed: "
                            "pip install 'memaudit[quantize]'")
    if not torch.cuda.is_available() and installed < BNB_CPU_VERSION:
        raise MemauditError(f"--quantize {quantize} without a CUDA device needs bitsandbytes >= "
                            f"{'.'.join(map(str, BNB_CPU_VERSION))} (its CPU kernels); installed: "
                            f"{'.'.join(map(str, installed))}")


def _bitsandbytes_version() -> tuple[int, ...] | None:
    """The installed bitsandbytes release as numbers, None when it is not installed (not imported: that loads
    its kernels)."""
    try:
        text = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def accelerate_limits(device_map: str, limits: dict[int | str, int] | None,
                      main: torch.device) -> dict[int | str, int] | None:
    """accelerate's `max_memory`: the user's limits over accelerate's own estimate of what each device has free
    (a device left out of `max_memory` would get nothing); for cpu-offload only the main device and CPU memory."""
    if not limits and device_map != "cpu-offload":
        return None  # accelerate's own estimate for every device
    from accelerate.utils import get_max_memory  # imported only when --device-map asks for it (0.4 s)

    free = get_max_memory()
    if device_map == "cpu-offload":
        main_key: int | str = (main.index or 0) if main.type == "cuda" else main.type
        free = {k: v for k, v in free.items() if k in (main_key, "cpu")}
        free.setdefault(main_key, 0)
        stray = [k for k in (limits or {}) if k not in (main_key, "cpu", EACH)]
        if stray:
            raise MemauditError(f"--device-map cpu-offload keeps the model on {main} (and offloads to CPU memory, "
                                f"then disk): --max-memory cannot limit {stray[0]}")
    each = (limits or {}).get(EACH)
    gpu_or_main = [k for k in free if k != "cpu"] or ["cpu"]  # one size limits the devices the model runs on
    out = {k: (each if each is not None and k in gpu_or_main else v) for k, v in free.items()}
    return out | {k: v for k, v in (limits or {}).items() if k != EACH}


def gradient_blocker(model: torch.nn.Module) -> str | None:
    """Why per-weight gradients of `model` would be incomplete, or None: weights offloaded by accelerate (they
    are swapped in for each forward, so their gradients never reach the model's parameters) or quantized weights
    (they take none)."""
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return "its weights are quantized (--quantize), and quantized weights take no gradient"
    params = list({id(p): p for p in model.parameters()}.values())
    away = sum(p.device.type == "meta" for p in params)
    if away:
        return (f"{away} of its {len(params)} weight tensors are offloaded (--device-map with --max-memory), and "
                "offloaded weights get no gradient")
    return None
