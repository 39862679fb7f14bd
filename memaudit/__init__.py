"""memaudit: audit and measure what language models memorize.

The commands' Python functions live in `memaudit.api` (one per command: extract, mia, memorization, exposure,
capacity, train, risk, report). This package also offers the building blocks below; they are imported on first
use, so `memaudit --help` and a usage error do not wait seconds for torch and transformers to load.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import MemauditError
from .version import __version__

# name -> the module that defines it (PEP 562 lazy attributes)
_EXPORTS = {
    "extract": "extraction", "ExtractSettings": "extraction", "ExtractResult": "extraction",
    "extract_windows": "extraction",
    "mia": "membership", "MiaSettings": "membership", "MiaResult": "membership", "ATTACKS": "attacks",
    "train": "training", "TrainConfig": "training", "TrainResult": "training",
    "export_release_model": "training",
    "LoadedModel": "models", "load_model": "models", "build_config": "models",
    "read_documents": "data", "write_documents": "data", "tokenize": "data", "train_tokenizer": "data",
    "make_windows": "samples",
    "TokenStats": "scoring", "score": "scoring", "iter_scored_batches": "scoring",
    "read_canaries": "canaries",
}

__all__ = ["__version__", "MemauditError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
