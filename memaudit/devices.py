"""Which device and dtype a command runs on: `auto` and the names users type, resolved once for every command."""
from __future__ import annotations

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
