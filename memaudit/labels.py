"""The one table of human labels and units for summary keys and sample columns, and how their values read.

The Markdown and HTML reports and every figure name a figure through this table, so a column header, an axis
and a sentence call the same number the same thing: `heading("mem_u_bits_per_token")` is "unintended memorization
per token (bits/token)", `value("exact_rate", 0.0088)` is "0.88%". A key missing here reads as its words
(`fraction_samples_with_x` -> "fraction samples with x"), never as a raw snake_case key.

Value kinds: count (whole numbers, thousands separated), rate (a fraction shown as a percentage), bits (thousands
separated, 2 decimals below 1,000), score (a 0-1 score such as AUC, ROUGE-L or F1, 3 decimals), tokens (a mean
number of tokens, 1 decimal), number (anything else, 3-4 significant digits, never an exponent above 1e-4), text.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Label:
    text: str  # what a reader sees
    unit: str = ""  # shown in headers and on axes: "bits/token", "tokens"; rates carry "%" in the value instead
    kind: str = "number"  # count | rate | bits | score | tokens | number | text | attack


_C, _R, _B, _S, _T, _N, _X = "count", "rate", "bits", "score", "tokens", "number", "text"

LABELS: dict[str, Label] = {
    # extraction (summary and per-sample columns)
    "n_samples": Label("samples", "", _C),
    "n_skipped": Label("documents too short", "", _C),
    "n_duplicates": Label("duplicate windows dropped", "", _C),
    "exact_rate": Label("reproduced verbatim", "", _R),
    "n_exact": Label("samples reproduced verbatim", "", _C),
    "mean_token_match": Label("continuation tokens reproduced", "", _R),
    "mean_match_prefix": Label("mean correct tokens before the first divergence", "tokens", _T),
    "mean_rouge_l": Label("ROUGE-L, tokens", "", _S),
    "mean_rouge_l_text": Label("ROUGE-L, text", "", _S),
    "decoding": Label("decoding", "", _X),
    "prefix": Label("prompt", "tokens", _C),
    "suffix": Label("continuation", "tokens", _C),
    "offset": Label("token offset", "", _C),
    "bos": Label("BOS prepended", "", _X),
    "num_beams": Label("beams", "", _C),
    "num_samples": Label("draws per sample (n)", "", _C),
    "temperature": Label("temperature", "", _N),
    "np_threshold": Label("(n, p) threshold p", "", _N),
    "np_discoverable_rate": Label("(n, p)-discoverable", "", _R),
    "any_exact_rate": Label("reproduced by at least one draw", "", _R),
    "mean_p_hat": Label("draws that reproduced the continuation (mean)", "", _R),
    "mean_p_seq": Label("probability one draw reproduces it (mean)", "", _R),
    "mean_p_extract": Label("probability one of n draws reproduces it (mean)", "", _R),
    "id": Label("sample", "", _X),
    "doc_id": Label("document", "", _X),
    "exact": Label("verbatim", "", _X),
    "token_match": Label("tokens reproduced", "", _R),
    "match_prefix": Label("correct tokens before the first divergence", "tokens", _C),
    "rouge_l": Label("ROUGE-L, tokens", "", _S),
    "rouge_l_text": Label("ROUGE-L, text", "", _S),
    # extraction over whole documents (documents.parquet and the summary's documents block)
    "n_tokens": Label("tokens", "", _C),
    "n_windows": Label("windows", "", _C),
    "exact_fraction": Label("windows reproduced verbatim", "", _R),
    "reproduced_tokens": Label("tokens reproduced", "", _C),
    "longest_reproduced_run": Label("longest reproduced run", "tokens", _C),
    "document.id": Label("document", "", _X),
    "document.n_tokens": Label("tokens", "", _C),
    "document.n_windows": Label("windows", "", _C),
    "document.exact_fraction": Label("windows verbatim", "", _R),
    "document.reproduced_tokens": Label("tokens reproduced", "", _C),
    "document.longest_reproduced_run": Label("longest reproduced run", "tokens", _C),
    "document.mean_rouge_l": Label("mean ROUGE-L", "", _S),
    # memorization over whole documents (its documents.parquet)
    "document.mem_u_bits": Label("unintended memorization", "bits", _B),
    "document.mem_u_bits_per_token": Label("per token", "bits/token", _B),
    "document.max_window_mem_u_bits": Label("most in one window", "bits", _B),
    "document.windows_with_mem_u": Label("windows with some", "", _C),
    "max_window_mem_u_bits": Label("unintended memorization, most in one window", "bits", _B),
    "windows_with_mem_u": Label("windows with unintended memorization", "", _C),
    "documents.n_documents": Label("documents", "", _C),
    "documents.documents_with_exact": Label("documents with a verbatim window", "", _C),
    "documents.mean_exact_fraction": Label("windows reproduced verbatim per document (mean)", "", _R),
    "documents.reproduced_token_fraction": Label("document tokens reproduced", "", _R),
    # membership inference
    "n_members": Label("members", "", _C),
    "n_nonmembers": Label("non-members", "", _C),
    "best_attack": Label("strongest attack", "", "attack"),
    "best_auc": Label("AUC, strongest attack", "", _S),
    "loss_auc": Label("AUC, loss attack", "", _S),
    "loss_tpr_at_1pct_fpr": Label("true positives at 1% false positives, loss attack", "", _R),
    "auc": Label("AUC", "", _S),
    "tpr_at_1pct_fpr": Label("true positives at 1% false positives", "", _R),
    "tpr_at_0.1pct_fpr": Label("true positives at 0.1% false positives", "", _R),
    "member": Label("member", "", _X),
    # unintended memorization
    "reference": Label("reference", "", _X),
    "total_mem_u_bits": Label("unintended memorization, total", "bits", _B),
    "mem_u_bits_per_token": Label("unintended memorization per token", "bits/token", _B),
    "fraction_samples_with_mem_u": Label("samples with unintended memorization", "", _R),
    "mem_u_bits.mean": Label("mean unintended memorization per sample", "bits", _B),
    "mem_u_bits": Label("unintended memorization", "bits", _B),
    "bits_model": Label("code length under the model", "bits", _B),
    "bits_reference": Label("code length under the reference", "bits", _B),
    "bits_model_per_byte": Label("code length under the model", "bits/byte", _B),
    "bits_reference_per_byte": Label("code length under the reference", "bits/byte", _B),
    "total_bits_model": Label("code length under the model, total", "bits", _B),
    "total_bits_reference": Label("code length under the reference, total", "bits", _B),
    "n_bytes": Label("bytes", "", _C),
    # canary exposure
    "n_canaries": Label("canaries", "", _C),
    "n_controls": Label("control secrets", "", _C),
    "exposure": Label("exposure", "bits", _B),
    "mean_exposure_bits": Label("mean canary exposure", "bits", _B),
    "max_exposure_bits": Label("highest canary exposure", "bits", _B),
    "max_possible_exposure_bits": Label("highest possible exposure", "bits", _B),
    "mean_control_exposure_bits": Label("mean control exposure", "bits", _B),
    "methods": Label("rank computed", "", _X),
    # pre-release risk and the gate
    "mode": Label("mode", "", _X),
    "params": Label("parameters", "", _C),
    "train_sequences": Label("training sequences", "", _N),
    "train_tokens": Label("training tokens", "", _C),
    "window": Label("tokens per sequence", "", _C),
    "precision": Label("capacity figure used", "", _X),
    "alpha_bits_per_param": Label("capacity per parameter", "bits/parameter", _N),
    "capacity_bits": Label("predicted capacity", "bits", _B),
    "bits_per_token": Label("information per training token", "bits/token", _B),
    "bits_per_token_source": Label("information per token, from", "", _X),
    "data_bits": Label("information in the training data", "bits", _B),
    "data_to_capacity_ratio": Label("data / capacity", "", _N),
    "regime": Label("regime", "", _X),
    "predicted_memorization_bits": Label("predicted memorization", "bits", _B),
    "predicted_memorization_bits_per_sequence": Label("predicted memorization per sequence", "bits", _B),
    "predicted_mia_f1": Label("predicted MIA F1, loss attack", "", _S),
    "uncapped_f1": Label("law's value before the cap at 1", "", _S),
    "mia_law": Label("MIA law", "", _X),
    "verdict": Label("verdict", "", _X),
    "mia_auc": Label("MIA AUC, loss attack", "", _S),
    "mia_best_auc": Label("MIA AUC, strongest attack", "", _S),
    "mia_tpr_at_1pct_fpr": Label("MIA true positives at 1% false positives", "", _R),
    # trained models
    "objective": Label("objective", "", _X),
    "config": Label("model size", "", _X),
    "family": Label("architecture", "", _X),
    "epochs": Label("epochs", "", _C),
    "steps": Label("optimizer steps", "", _C),
    "seq_len": Label("row length", "tokens", _C),
    "rows": Label("rows", "", _X),
    "train_documents": Label("training documents", "", _C),
    "final_train_loss": Label("final training loss", "nats/token", _N),
    "final_val_loss": Label("final validation loss", "nats/token", _N),
    "parameters_stored": Label("parameters", "", _C),
    "goldfish_k": Label("goldfish: 1 in k tokens dropped, k", "", _C),
    "goldfish_mode": Label("goldfish mask", "", _X),
    "sink_fraction": Label("sinks: fraction of rows", "", _N),
    "sink_density": Label("sinks: density", "", _N),
    "canaries": Label("canaries inserted", "", _C),
    "canary_repeats": Label("canary repeats", "", _C),
}

# Membership-inference attacks by registry name; min_k_<k> and min_k_pp_<k> are read by attack_label.
ATTACKS = {"loss": "loss", "zlib": "zlib ratio", "zstd": "zstd ratio", "reference": "reference model",
           "recall": "ReCaLL", "dc_pdd": "DC-PDD", "gradnorm": "gradient norm"}


def label(key: str) -> Label:
    """The label of a summary key or column (dotted for nested summary keys); unknown keys read as their words."""
    if key in LABELS:
        return LABELS[key]
    if key.startswith("score_"):
        return Label(f"{attack_label(key[len('score_'):])} score", "", _N)
    return Label(re.sub(r"[_.]+", " ", key).strip() or key)


def heading(key: str) -> str:
    """A column header or axis label: the label and its unit, "unintended memorization per token (bits/token)"."""
    lab = label(key)
    return f"{lab.text} ({lab.unit})" if lab.unit else lab.text


def attack_label(name: str) -> str:
    """"min_k_pp_20" -> "Min-K%++, k = 20%"."""
    m = re.fullmatch(r"min_k(_pp)?_(\d+(?:\.\d+)?)", name)
    if m:
        return f"Min-K%{'++' if m.group(1) else ''}, k = {m.group(2)}%"
    return ATTACKS.get(name, name.replace("_", " "))


def value(key: str, v: Any, unit: bool = False) -> str:
    """A value as a reader reads it; with `unit`, followed by the label's unit ("19.09 bits/token")."""
    lab = label(key)
    text = format_value(v, lab.kind)
    return f"{text} {lab.unit}" if unit and lab.unit and text and lab.kind != "text" else text


def format_value(v: Any, kind: str = _N) -> str:
    """One value of a kind (see the module docstring); None and NaN read as an empty string."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x, kind) for x in v)
    if kind == "attack" and isinstance(v, str):
        return attack_label(v)
    if not isinstance(v, (int, float)) or kind == _X:
        return str(v)
    if math.isinf(v):
        return "infinite" if v > 0 else "minus infinite"
    return _FORMATS.get(kind, number)(float(v))


def percent(v: float) -> str:
    """A fraction as a percentage with 3 significant digits: 1 -> "100%", 0.008789 -> "0.88%"."""
    x = 100.0 * v
    if x == 0:
        return "0%"
    if abs(x) < 0.01:
        return "<0.01%" if x > 0 else ">-0.01%"
    s = f"{x:.3g}"
    if s == "100" and x < 100:
        s = "99.9"
    return f"{s}%"


def count(v: float) -> str:
    return f"{v:,.0f}" if v == int(v) else number(v)


def bits(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) >= 1 else number(v)


def score(v: float) -> str:
    return f"{v:.3f}"


def tokens(v: float) -> str:
    return f"{v:,.0f}" if v == int(v) else f"{v:,.1f}"


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def number(v: float) -> str:
    """Thousands separated above 1,000, 4 significant digits above 1, 3 below, "3.5×10⁻⁵" below 1e-4."""
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.4g}"
    if abs(v) >= 1e-4:
        return f"{v:.3g}"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa}×10{str(int(exponent)).translate(_SUPERSCRIPT)}"


_FORMATS = {_C: count, _R: percent, _B: bits, _S: score, _T: tokens, _N: number}
