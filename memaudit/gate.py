"""The release gate: the figures a pipeline may limit, the user's limits (--fail-above), and the verdict.

Kept apart from `risk.py` (which measures) so the command line can list the names without loading the engine.
"""
from __future__ import annotations

import math

from . import checks
from .errors import MemauditError

FAIL_EXIT_CODE = 3
# What each gateable figure means, for --help and the report.
GATEABLE = {
    "predicted_mia_f1": "predicted loss-attack MIA F1 (0.5 = chance)",
    "exact_rate": "fraction of samples whose suffix greedy decoding reproduces exactly",
    "mean_rouge_l": "mean token ROUGE-L between generated and true suffix",
    "mia_auc": "ROC AUC of the loss attack, members vs non-members",
    "mia_best_auc": "highest ROC AUC over all attacks",
    "mia_tpr_at_1pct_fpr": "loss attack TPR at 1% FPR (oracle threshold)",
    "mem_u_bits_per_token": "unintended memorization per token against zstd",
    "fraction_samples_with_mem_u": "fraction of samples with unintended memorization > 0",
    "max_exposure_bits": "highest canary exposure (bits)",
    "mean_exposure_bits": "mean canary exposure (bits)",
}



def parse_thresholds(text: str | None) -> dict[str, float]:
    """`exact_rate=0.01,mia_auc=0.6` -> {"exact_rate": 0.01, "mia_auc": 0.6}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in GATEABLE:
            raise MemauditError(f"--fail-above takes name=value pairs with names among {', '.join(GATEABLE)}; "
                                f"got {part.strip()!r}")
        if name in out:
            raise MemauditError(f"--fail-above names {name} twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise MemauditError(f"--fail-above {name}: {value.strip()!r} is not a number") from None
        checks.number(f"--fail-above {name}", out[name])
    return out


def verdict(figures: dict[str, float], limits: dict[str, float]) -> tuple[str, dict[str, tuple[float, float]]]:
    """PASS/FAIL line against the user's limits (--fail-above); a figure strictly above its limit fails. With no
    limit set there is no verdict: the figures are reported as they are."""
    if not limits:
        return "VERDICT: none (no limits set; gate a release with --fail-above, e.g. exact_rate=0.01,mia_auc=0.6)", {}
    checked = {k: (float(v), limits[k]) for k, v in figures.items()
               if k in limits and isinstance(v, (int, float)) and not math.isnan(v)}
    exceeded = {k: vt for k, vt in checked.items() if vt[0] > vt[1]}
    unmeasured = sorted(set(limits) - set(checked))
    missing = f"; not measured: {', '.join(unmeasured)}" if unmeasured else ""
    if exceeded:
        what = "; ".join(f"{k} {v:.4g} > {t:g}" for k, (v, t) in exceeded.items())
        return f"VERDICT: FAIL ({what}{missing})", exceeded
    if not checked:
        return f"VERDICT: NO CHECK (no limited figure was measured{missing})", {}
    what = "; ".join(f"{k} {v:.4g} <= {t:g}" for k, (v, t) in checked.items())
    return f"VERDICT: PASS ({what}{missing})", {}
