"""Checks of user input at the boundary, before any model is loaded or trained: one helper per kind of value, so
every command words the same mistake the same way. Each raises MemauditError (one line, exit 2 from the CLI)."""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Iterable

from .errors import MemauditError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32/64-bit; the smaller range holds for both


def number(name: str, value: float | int | None, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> None:
    """A finite number within [low, high] (an open end with `low_open` / `high_open`); None passes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise MemauditError(f"{name} must be a finite number, not {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        if high is None:
            raise MemauditError(f"{name} must be {'>' if low_open else '>='} {low:g}, not {value:g}")
        if low is None:
            raise MemauditError(f"{name} must be {'<' if high_open else '<='} {high:g}, not {value:g}")
        raise MemauditError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, not {value:g}")


def integer(name: str, value: int | None, *, low: int | None = 1, high: int | None = None) -> None:
    """A whole number within [low, high] (default: a positive count); None passes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MemauditError(f"{name} must be a whole number, not {value!r}")
    number(name, value, low=low, high=high)


def fraction(name: str, value: float | None, *, zero: bool = False, one: bool = False) -> None:
    """A fraction in (0, 1), with 0 and/or 1 allowed when `zero` / `one`."""
    number(name, value, low=0.0, high=1.0, low_open=not zero, high_open=not one)


def seed(value: int | None, name: str = "--seed") -> None:
    integer(name, value, low=0, high=SEED_MAX)


def limit(value: int | None) -> None:
    integer("--limit", value, low=1)


def batch_size(value: int | str) -> None:
    if value != "auto":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise MemauditError(f"--batch-size must be auto or a positive integer, not {value!r}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def device(value: str) -> None:
    if not DEVICE_PATTERN.match(str(value)):
        raise MemauditError(f"unknown --device {value!r}: use auto, cpu, mps or cuda[:N]")


def dtype(value: str, allowed: Iterable[str] = DTYPES) -> None:
    choice("--dtype", value, allowed)


def context_length(config: dict) -> int | None:
    """The longest sequence a model config accepts, when it says (learned positions, or rotary models' trained
    context); None when it does not."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def choice(name: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise MemauditError(f"unknown {name} {value!r}: use {', '.join(allowed)}")


def readable_file(path: str | os.PathLike | None, what: str = "data file") -> None:
    """An existing, readable regular file; None passes."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise MemauditError(f"{what} not found: {p}")
    if not p.is_file():
        raise MemauditError(f"{what} {p} is a directory, not a file" if p.is_dir() else f"{what} {p} is not a file")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise MemauditError(f"cannot read {what} {p}: {exc.strerror or exc}") from None


# Files that make a directory a tokenizer a transformers AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json", "sentencepiece.bpe.model")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def model_dir(path: str | os.PathLike, *, allow_pickle: bool = False, what: str = "model directory",
              tokenizer: bool = True) -> dict:
    """A local model directory that can be loaded: a JSON-object config.json, weights memaudit may read (safetensors,
    or pickles with `allow_pickle`) and, with `tokenizer`, tokenizer files. Returns the config."""
    p = Path(path)
    if not p.exists():
        raise MemauditError(f"{what} not found: {p}")
    if not p.is_dir():
        raise MemauditError(f"not a {what} (a file was given): {p}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise MemauditError(f"not a {what} (no config.json): {p}")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MemauditError(f"unreadable config.json in {p}: {str(exc).splitlines()[0][:120]}") from None
    except OSError as exc:
        raise MemauditError(f"cannot read {cfg_file}: {exc.strerror or exc}") from None
    if not isinstance(cfg, dict):
        raise MemauditError(f"config.json in {p} is not a JSON object (it holds a {type(cfg).__name__})")
    if cfg.get("command") and not cfg.get("model_type"):
        raise MemauditError(f"{p} is a memaudit {cfg['command']} run directory, not a model directory")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise MemauditError(f"config.json in {p}: 'architectures' is not a list")
    if archs and not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise MemauditError(f"model in {p} is not a causal language model (architectures: "
                            f"{', '.join(map(str, archs))})")
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise MemauditError(f"config.json in {p}: {key} is {value} (not a finite number)")
    for key in ("n_layer", "num_hidden_layers", "num_layers"):
        if isinstance(cfg.get(key), int) and cfg[key] < 1:
            raise MemauditError(f"config.json in {p}: {key} is {cfg[key]}: the model has no layers")
    if not any(p.glob("*.safetensors")):
        if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
            raise MemauditError(f"no weights in {p} (expected model.safetensors)")
        if not allow_pickle:
            raise MemauditError(f"{p} has only pickled weights (.bin), which can run arbitrary code when loaded; "
                                "pass --allow-pickle if you trust this file")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise MemauditError(f"{what} {p} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): "
                            "save the tokenizer beside the weights")
    return cfg


def int_list(name: str, text: str, *, low: int = 1) -> list[int]:
    """`8,16,24` -> [8, 16, 24]: whole numbers >= low, at least one."""
    parts = [v.strip() for v in str(text).split(",")]
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise MemauditError(f"{name} must be comma-separated whole numbers, not {text!r}") from None
    if not values:
        raise MemauditError(f"{name} needs at least one value")
    if dup := next((v for i, v in enumerate(values) if v in values[:i]), None):
        raise MemauditError(f"{name} lists {dup} twice")
    for v in values:
        integer(name, v, low=low)
    return values
