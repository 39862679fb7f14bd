"""Morris et al. (arXiv 2505.24832), METHODS.md section 3: the published capacity figures and the
membership-inference scaling law.

Capacity: GPT-style models store about PUBLISHED_ALPHA = 3.6 bits per parameter (3.83 trained in fp32, 3.51 in
bf16; single models about 2.9-4.2). These constants live here only; risk, the capacity runs and the capacity
report import them.

The MIA law: loss-threshold attack F1 on 64-token sequences for a model of P parameters trained on N sequences:
    F1 = 0.5 * (1 + c1 * sigmoid(-c2 * (N / P - c3)))

Two sets of constants, both named in every output that uses one:
- "morris2025" (the default): c1 = 1.34 as published, and (c2, c3) the unique slope and midpoint with which this
  form reproduces the paper's validation table (GPT-2 small, 123.7M parameters: 1.50M sequences -> F1 0.980,
  13.57M -> 0.534). They are solved from those two rows in `_solve_from_checks` (c2 ~ 39.5, c3 ~ 0.0355).
- "methods-md": the constants as METHODS.md transcribes them (c2 = 33.14, c3 = 0.034). They do not reproduce the
  table METHODS.md quotes beside them (they give 0.951 and 0.550), so they are kept only for comparison.
`fit_mia_law` fits (c1, c2, c3) to measured (N/P, F1) points with scipy's curve_fit.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from scipy.special import expit

from ..errors import MemauditError

PUBLISHED_ALPHA = 3.6  # bits per parameter, the headline figure
PUBLISHED_ALPHA_FP32 = 3.83  # measured training in fp32
PUBLISHED_ALPHA_BF16 = 3.51  # measured training in bf16
PUBLISHED_ALPHA_PER_MODEL_RANGE = (2.9, 4.2)  # bits per parameter of single models

PUBLISHED_C1 = 1.34
PUBLISHED_CHECKS = [(123.7e6, 1.50e6, 0.980), (123.7e6, 13.57e6, 0.534)]  # (params, sequences, F1)
METHODS_MD_CONSTANTS = {"c1": PUBLISHED_C1, "c2": 33.14, "c3": 0.034}


def _solve_from_checks(c1: float = PUBLISHED_C1, checks=PUBLISHED_CHECKS) -> dict:
    """(c2, c3) through two published (params, sequences, F1) rows: the sigmoid's logit is linear in N/P."""
    (p1, n1, f1), (p2, n2, f2) = checks
    logit = lambda f: math.log((2 * f - 1) / c1 / (1 - (2 * f - 1) / c1))  # noqa: E731
    x1, x2, z1, z2 = n1 / p1, n2 / p2, logit(f1), logit(f2)
    c2 = (z1 - z2) / (x2 - x1)  # sigmoid(-c2 (x - c3)) = sigmoid(z)  =>  z = -c2 x + c2 c3
    return {"c1": c1, "c2": c2, "c3": x1 + z1 / c2}


PUBLISHED_CONSTANTS = _solve_from_checks()
LAWS = {"morris2025": PUBLISHED_CONSTANTS, "methods-md": METHODS_MD_CONSTANTS}
LAW_SOURCES = {
    "morris2025": "Morris et al. 2025 (arXiv 2505.24832): F1 = 0.5 (1 + 1.34 sigmoid(-c2 (N/P - c3))), c2 and c3 "
                  "solved from the paper's GPT-2 small validation rows (1.50M seq -> 0.980, 13.57M -> 0.534)",
    "methods-md": "METHODS.md section 3 as transcribed: F1 = 0.5 (1 + 1.34 sigmoid(-33.14 (N/P - 0.034))); "
                  "does not reproduce the published rows (0.951, 0.550)",
}


def mia_law(ratio, c1: float, c2: float, c3: float):
    """F1 as a function of N / P (training sequences per parameter)."""
    # expit: 1 / (1 + e^z) without overflow warnings at extreme constants. scipy is imported here, not at the top:
    # the CLI imports this module (through risk) at start, and scipy would add ~0.2 s to every command

    ratio = np.asarray(ratio, dtype=float)
    return 0.5 * (1.0 + c1 * expit(-c2 * (ratio - c3)))


def fit_mia_law(ratios, f1s, p0: tuple[float, float, float] | None = None) -> dict:
    """Least-squares fit of (c1, c2, c3) to measured F1; returns the constants and their standard errors."""
    from scipy.optimize import curve_fit  # lazy: ~0.4 s to import, kept off the CLI's start (see mia_law)

    x, y = np.asarray(ratios, float), np.asarray(f1s, float)
    if len(x) < 3:
        raise MemauditError("fitting the MIA law needs at least 3 (N/P, F1) points")
    p0 = p0 or (PUBLISHED_CONSTANTS["c1"], PUBLISHED_CONSTANTS["c2"], PUBLISHED_CONSTANTS["c3"])
    try:
        popt, pcov = curve_fit(mia_law, x, y, p0=p0, bounds=([0.0, 0.0, -10.0], [2.0, 1e6, 10.0]), maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        raise MemauditError(f"the MIA law fit did not converge: {exc}") from None
    err = np.sqrt(np.clip(np.diag(pcov), 0, None))
    resid = y - mia_law(x, *popt)
    return {"c1": float(popt[0]), "c2": float(popt[1]), "c3": float(popt[2]),
            "stderr": {"c1": float(err[0]), "c2": float(err[1]), "c3": float(err[2])},
            "rmse": float(np.sqrt(np.mean(resid ** 2))), "n_points": int(len(x))}


def _constants(law) -> dict:
    if isinstance(law, dict):
        return law
    if isinstance(law, str) and law in LAWS:
        return LAWS[law]
    path = Path(law)
    if not path.is_file():
        raise MemauditError(f"law must be one of {', '.join(LAWS)}, a dict of constants or a fit JSON file; "
                            f"{law} not found")
    data = json.loads(path.read_text())
    data = data.get("mia_law_fit", data)
    if not all(k in data for k in ("c1", "c2", "c3")):
        raise MemauditError(f"{law} holds no fitted MIA law (keys c1, c2, c3)")
    return data


def predict_mia_f1(params: float, train_sequences: float, law: str | dict | os.PathLike = "morris2025") -> float:
    """Predicted loss-attack F1 for a model of `params` parameters trained on `train_sequences` 64-token sequences.

    `law`: a name in LAWS ("morris2025", "methods-md"), a dict {c1, c2, c3} from `fit_mia_law`, or a JSON file
    holding one (e.g. reports/capacity/capacity.json, key `mia_law_fit`).
    """
    if params <= 0 or train_sequences <= 0:
        raise MemauditError("params and train_sequences must be positive")
    c = _constants(law)
    return float(mia_law(train_sequences / params, c["c1"], c["c2"], c["c3"]))
