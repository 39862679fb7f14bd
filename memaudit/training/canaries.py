"""Canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets in a fixed template, inserted into training.

Each canary is its own training document (a row: BOS + the secret), repeated `repeats` times, in the training
split only. `canaries.jsonl` beside the model lists them, one JSON object a line:
  {"id": "canary-0", "secret": "my secret number is 123456789", "template": "my secret number is {}",
   "prefix": "my secret number is ", "digits": "123456789", "n_digits": 9, "repeats": 10,
   "inserted_as": "own document"}
Exposure is measured on `digits` given `prefix`, against candidates of the same `n_digits`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import MemauditError

CANARY_TEMPLATE = "my secret number is {}"
CANARY_FILE = "canaries.jsonl"


def make_canaries(n: int, repeats: int, seed: int = 0, n_digits: int = 9,
                  template: str = CANARY_TEMPLATE) -> list[dict]:
    """`n` distinct secrets with uniformly random digits (seeded), each to be inserted `repeats` times."""
    if n < 0 or (n > 0 and repeats < 1):
        raise MemauditError("--canaries must be >= 0 and --canary-repeats >= 1")
    if template.count("{}") != 1 or not template.endswith("{}"):
        raise MemauditError("the canary template must end with one '{}' where the digits go")
    if n > 10 ** n_digits // 2:
        raise MemauditError(f"--canaries {n} is too many for {n_digits}-digit secrets")
    rng = np.random.default_rng([seed, 0xCA4A])
    seen: set[str] = set()
    out = []
    while len(out) < n:
        digits = "".join(str(d) for d in rng.integers(0, 10, size=n_digits))
        if digits in seen:
            continue
        seen.add(digits)
        out.append({"id": f"canary-{len(out)}", "secret": template.format(digits), "template": template,
                    "prefix": template[:-2], "digits": digits, "n_digits": n_digits, "repeats": repeats,
                    "inserted_as": "own document"})
    return out


def write_canaries(model_dir: str | Path, canaries: list[dict]) -> Path:
    path = Path(model_dir) / CANARY_FILE
    path.write_text("".join(json.dumps(c) + "\n" for c in canaries), encoding="utf-8")
    return path
