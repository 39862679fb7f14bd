"""Canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets in a fixed template. The one home of the
canary file format: the `Canary` record, making random canaries, writing and reading `canaries.jsonl`.

`memaudit train --canaries N` inserts each canary as its own training document (a row: BOS + the text), repeated
`repeats` times, in the training split only, and lists them in `canaries.jsonl` beside the model, one JSON object
a line:
  {"id": "canary-0", "secret": "my secret number is 123456789", "template": "my secret number is {}",
   "prefix": "my secret number is ", "digits": "123456789", "n_digits": 9, "repeats": 10,
   "inserted_as": "own document"}
`memaudit exposure` (memaudit.exposure) ranks `digits` among every string of `n_digits` digits. The reader also
takes hand-written files: `secret` = the digits with a `template` holding `{secret}`, or a `prefix` [+ `suffix`],
or a full `text` that contains the digits (see `_canary_from_record`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import iter_jsonl
from .errors import MemauditError

CANARY_FILE = "canaries.jsonl"
CANARY_TEMPLATE = "my secret number is {}"  # the trainer's template; `{}` is where the digits go
SECRET_FIELD = "{secret}"  # where the digits go in a `Canary.template`
MAX_DIGITS = 18  # exposure draws candidates as 64-bit integers


@dataclass
class Canary:
    """One inserted secret: `template` holds `{secret}` where the digits go."""
    id: str
    template: str
    secret: str
    repeats: int | None = None  # how often it was inserted into the training data (None: unknown)
    inserted_as: str | None = None  # how it was inserted ("own document" from the trainer; None: unknown)

    @property
    def digits(self) -> int:
        return len(self.secret)

    @property
    def text(self) -> str:
        return self.fill(self.secret)

    def fill(self, secret: str) -> str:
        return self.template.replace(SECRET_FIELD, secret)


def default_canary_file(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / CANARY_FILE


def make_canaries(n: int, repeats: int, seed: int = 0, n_digits: int = 9,
                  template: str = CANARY_TEMPLATE) -> list[Canary]:
    """`n` distinct secrets with uniformly random digits (seeded), each to be inserted `repeats` times as its own
    training document; `template` ends with the `{}` where the digits go."""
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
        out.append(Canary(id=f"canary-{len(out)}", template=template[:-2] + SECRET_FIELD, secret=digits,
                          repeats=repeats, inserted_as="own document"))
    return out


def canary_record(canary: Canary) -> dict:
    """One line of `canaries.jsonl` (the trainer's format above): `secret` is the full text, `digits` the secret
    digits; `prefix` only when the digits end the text, `inserted_as` only when known."""
    c = canary
    record = {"id": c.id, "secret": c.text, "template": c.template.replace(SECRET_FIELD, "{}")}
    if c.template.endswith(SECRET_FIELD):
        record["prefix"] = c.template[:-len(SECRET_FIELD)]
    record |= {"digits": c.secret, "n_digits": c.digits, "repeats": c.repeats}
    if c.inserted_as is not None:
        record["inserted_as"] = c.inserted_as
    return record


def write_canaries(path: str | os.PathLike, canaries: Sequence[Canary]) -> Path:
    """Write `canaries` to the .jsonl file `path` (a model directory's is `default_canary_file(model_dir)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(canary_record(c)) + "\n" for c in canaries), encoding="utf-8")
    return path


def _canary_from_record(obj: dict, lineno: int, path: Path) -> Canary:
    """Read the trainer's format (`digits` = the secret digits, `template` with `{}`, `secret` = the full text) or
    a hand-written one (`secret` = digits, `template` with `{secret}`, or `prefix` [+ `suffix`], or a full `text`
    containing the digits)."""
    if not isinstance(obj, dict):
        raise MemauditError(f"{path}: line {lineno} is not a JSON object")
    secret = obj.get("digits") if isinstance(obj.get("digits"), str) else obj.get("secret")
    if secret is None:
        raise MemauditError(f"{path}: line {lineno} has no 'digits' or 'secret' field")
    secret = str(secret)
    if not (secret.isdigit() and secret.isascii()):
        raise MemauditError(f"{path}: line {lineno}: the secret must be a string of decimal digits, not {secret!r}")
    n_digits = obj.get("n_digits", obj.get("digits") if isinstance(obj.get("digits"), int) else len(secret))
    if isinstance(n_digits, bool) or not isinstance(n_digits, int):
        raise MemauditError(f"{path}: line {lineno}: n_digits must be a whole number, not {n_digits!r}")
    if len(secret) > MAX_DIGITS:
        raise MemauditError(f"{path}: line {lineno}: secrets of up to {MAX_DIGITS} digits are supported, not "
                            f"{len(secret)}")
    if n_digits != len(secret):
        raise MemauditError(f"{path}: line {lineno}: n_digits is {n_digits} but the secret has {len(secret)}")
    template = obj.get("template")
    if isinstance(template, str) and "{}" in template and SECRET_FIELD not in template:
        template = template.replace("{}", SECRET_FIELD, 1)
    if isinstance(template, str):
        if SECRET_FIELD not in template:
            raise MemauditError(f"{path}: line {lineno}: the template has no {{}} or {SECRET_FIELD} placeholder")
    elif "prefix" in obj:
        template = str(obj["prefix"]) + SECRET_FIELD + str(obj.get("suffix", ""))
    elif "text" in obj and secret in str(obj["text"]):
        text = str(obj["text"])
        at = text.rindex(secret)
        template = text[:at] + SECRET_FIELD + text[at + len(secret):]
    else:
        raise MemauditError(f"{path}: line {lineno} needs a 'template' (with {{}}), a 'prefix', "
                            "or a 'text' that contains the secret")
    repeats = obj.get("repeats", obj.get("repetitions"))
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0):
        raise MemauditError(f"{path}: line {lineno}: repeats must be a whole number >= 0, not {repeats!r}")
    inserted_as = obj.get("inserted_as")
    return Canary(id=str(obj.get("id", lineno - 1)), template=template, secret=secret,
                  repeats=int(repeats) if repeats is not None else None,
                  inserted_as=inserted_as if isinstance(inserted_as, str) else None)


def read_canaries(path: str | os.PathLike) -> list[Canary]:
    """Canaries from a .jsonl file (a model directory: its canaries.jsonl), one object a line; see
    `_canary_from_record` for the fields."""
    path = Path(path)
    if path.is_dir():
        path = default_canary_file(path)
    if not path.is_file():
        raise MemauditError(f"canary file not found: {path}")
    out = [_canary_from_record(obj, lineno, path) for lineno, obj in iter_jsonl(path)]
    if not out:
        raise MemauditError(f"{path}: no canaries in the file")
    return out
