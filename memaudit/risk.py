"""Pre-release risk: what to expect before training, and what was measured after, with a gateable verdict.

Before training (from the parameter count P and the number N of training sequences of `window` tokens):
- capacity_bits = alpha * P, alpha the bits per parameter of Morris et al. (arXiv 2505.24832): 3.6 as published,
  3.83 measured in fp32, 3.51 in bf16 (`precision`), as `memaudit.capacity.laws` holds them.
- data_bits = N * window * bits_per_token. For uniformly random tokens over a vocabulary of V this is exact with
  bits_per_token = log2 V (`random_vocab`). For real text it is an estimate of the text's information content;
  the default, DEFAULT_TEXT_BITS_PER_TOKEN = 4.0, is roughly the code length GPT-2-class models give English web
  text with a ~50K BPE vocabulary (about 2.8 nats/token). Pass `bits_per_token` for your data (e.g. from
  `memaudit memorization --reference zstd`, whose bits_reference per token is an upper bound).
- regime: "memorizing" while data_bits / capacity_bits < 1 (the model can store the data), else "generalizing"
  (double descent sits at a ratio of ~1; past it per-sample unintended memorization falls).
- predicted_memorization_bits = min(capacity_bits, data_bits) (METHODS.md section 3).
- predicted_mia_f1 from the MIA scaling law (memaudit.capacity.laws.predict_mia_f1): the published one
  ("morris2025"), and beside it METHODS.md's transcription ("methods-md") and every law fitted by
  `memaudit capacity` found in reports/capacity/*.json (key mia_law_fit).
After training, the measuring commands run on the model and their headline figures go beside the prediction;
the verdict compares them with thresholds, and `fail_above` makes the command exit with FAIL_EXIT_CODE.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from . import checks
from .capacity.laws import (LAW_SOURCES, LAWS, PUBLISHED_ALPHA, PUBLISHED_ALPHA_BF16, PUBLISHED_ALPHA_FP32,
                            predict_mia_f1)
from .errors import MemauditError

ALPHA_BITS_PER_PARAM = {"published": PUBLISHED_ALPHA, "float32": PUBLISHED_ALPHA_FP32, "bfloat16": PUBLISHED_ALPHA_BF16}
DEFAULT_TEXT_BITS_PER_TOKEN = 4.0
MIA_LAW_WINDOW = 64  # the law was fitted on 64-token sequences
FAIL_EXIT_CODE = 3
MEASUREMENT_RUNS = ("extract", "mia", "memorization", "exposure")  # sub-folders of a post-training risk run
MAX_COUNT = 1e18  # parameters, sequences, tokens: far beyond any model, and every product stays finite
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


def fitted_laws(search: str | os.PathLike = "reports/capacity") -> list[Path]:
    """JSON files holding a fitted MIA law (key mia_law_fit with c1, c2, c3), newest first."""
    folder = Path(search)
    if not folder.is_dir():
        return []
    found = []
    for f in folder.rglob("*.json"):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            continue
        fit = data.get("mia_law_fit") if isinstance(data, dict) else None
        if isinstance(fit, dict) and all(isinstance(fit.get(k), (int, float)) and math.isfinite(fit[k])
                                         for k in ("c1", "c2", "c3")):
            found.append(f)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _check_prediction_settings(train_sequences: float | None, train_tokens: float | None, window: int,
                               precision: str, bits_per_token: float | None, random_vocab: int | None) -> None:
    checks.number("--train-sequences", train_sequences, low=1, high=MAX_COUNT)
    checks.number("--train-tokens", train_tokens, low=1, high=MAX_COUNT)
    checks.number("--bits-per-token", bits_per_token, low=0, high=64, low_open=True)
    checks.integer("--random-vocab", random_vocab, low=2, high=2**32)
    checks.integer("--window", window)
    checks.choice("--precision", precision, ALPHA_BITS_PER_PARAM)
    if random_vocab is not None and bits_per_token is not None:
        raise MemauditError("give --random-vocab (random tokens: log2 V bits each) or --bits-per-token, not both")


def predict(params: float, *, train_sequences: float | None = None, train_tokens: float | None = None,
            window: int = MIA_LAW_WINDOW, precision: str = "published", bits_per_token: float | None = None,
            random_vocab: int | None = None, laws_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The pre-training prediction (see the module docstring)."""
    if params is None:
        raise MemauditError("--params must be a positive number of parameters")
    checks.number("--params", params, low=1, high=MAX_COUNT)
    _check_prediction_settings(train_sequences, train_tokens, window, precision, bits_per_token, random_vocab)
    if (train_sequences is None) == (train_tokens is None):
        raise MemauditError("give exactly one of --train-sequences or --train-tokens")
    if train_tokens is not None:
        if train_tokens <= 0:
            raise MemauditError("--train-tokens must be positive")
        train_sequences = train_tokens / window
    elif train_sequences <= 0:
        raise MemauditError("--train-sequences must be positive")
    if precision not in ALPHA_BITS_PER_PARAM:
        raise MemauditError(f"unknown --precision {precision!r}: use {', '.join(ALPHA_BITS_PER_PARAM)}")
    if random_vocab is not None and bits_per_token is not None:
        raise MemauditError("give --random-vocab (random tokens: log2 V bits each) or --bits-per-token, not both")
    if random_vocab is not None:
        if random_vocab < 2:
            raise MemauditError("--random-vocab must be >= 2")
        bpt, bpt_source = math.log2(random_vocab), f"uniform random tokens: log2 {random_vocab} (exact)"
    elif bits_per_token is not None:
        if bits_per_token <= 0:
            raise MemauditError("--bits-per-token must be positive")
        bpt, bpt_source = float(bits_per_token), "given (--bits-per-token)"
    else:
        bpt, bpt_source = DEFAULT_TEXT_BITS_PER_TOKEN, ("default for English text: ~GPT-2-class code length "
                                                        "(4 bits/token); set --bits-per-token for your data")
    alpha = ALPHA_BITS_PER_PARAM[precision]
    capacity = alpha * params
    data_bits = train_sequences * window * bpt
    ratio = data_bits / capacity
    def law(name: str, spec, source: str) -> dict:
        # the law's form reaches 0.5 (1 + c1) > 1 for few sequences per parameter; an F1 is at most 1
        f1 = predict_mia_f1(params, train_sequences, spec)
        return {"name": name, "predicted_mia_f1": min(1.0, f1), "uncapped_f1": f1, "source": source}

    laws = [law(name, name, LAW_SOURCES[name]) for name in LAWS]  # the published law first: it is the one used
    laws += [law(f"fitted:{f.stem}", f, str(f)) for f in fitted_laws(laws_dir)] if laws_dir is not None else []
    notes = []
    if window != MIA_LAW_WINDOW:
        notes.append(f"the MIA law was fitted on {MIA_LAW_WINDOW}-token sequences; these are {window} tokens")
    return {
        "params": float(params), "train_sequences": float(train_sequences), "window": window,
        "train_tokens": float(train_sequences * window), "precision": precision,
        "alpha_bits_per_param": alpha, "capacity_bits": capacity,
        "bits_per_token": bpt, "bits_per_token_source": bpt_source, "data_bits": data_bits,
        "data_to_capacity_ratio": ratio, "regime": "memorizing" if ratio < 1 else "generalizing",
        "predicted_memorization_bits": min(capacity, data_bits),
        "predicted_memorization_bits_per_sequence": min(capacity, data_bits) / train_sequences,
        "predicted_mia_f1": laws[0]["predicted_mia_f1"], "mia_law": laws[0]["name"], "mia_laws": laws,
        "notes": notes,
    }


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


def _measured_extract(summary: dict) -> dict[str, float]:
    return {k: summary[k] for k in ("exact_rate", "mean_rouge_l", "mean_token_match") if k in summary}


def _measured_mia(summary: dict) -> dict[str, float]:
    attacks = summary.get("attacks") or {}
    out = {}
    loss = attacks.get("loss") or {}
    if "auc" in loss:
        out["mia_auc"] = loss["auc"]
    tpr = (loss.get("oracle") or {}).get("tpr_at_fpr_0.01")
    if tpr is not None:
        out["mia_tpr_at_1pct_fpr"] = tpr
    aucs = [m["auc"] for m in attacks.values() if isinstance(m, dict) and isinstance(m.get("auc"), (int, float))]
    if aucs:
        out["mia_best_auc"] = max(aucs)
    return out


def _measured_memorization(summary: dict) -> dict[str, float]:
    return {k: summary[k] for k in ("mem_u_bits_per_token", "fraction_samples_with_mem_u", "total_mem_u_bits")
            if k in summary}


def _measured_exposure(summary: dict) -> dict[str, float]:
    return {k: summary[k] for k in ("max_exposure_bits", "mean_exposure_bits", "mean_control_exposure_bits")
            if summary.get(k) is not None}


def run_risk(*, out: str | os.PathLike | None = None, params: float | None = None,
             train_sequences: float | None = None, train_tokens: float | None = None, window: int = MIA_LAW_WINDOW,
             precision: str = "published", bits_per_token: float | None = None, random_vocab: int | None = None,
             model: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
             nonmembers: str | os.PathLike | None = None, canaries: str | os.PathLike | None = None,
             fail_above: str | None = None, laws_dir: str | os.PathLike | None = None,
             prefix: int = 32, suffix: int = 32, batch_size: int | str = "auto", device: str = "auto",
             dtype: str = "auto", limit: int | None = None, text_field: str = "text", id_field: str = "id",
             allow_pickle: bool = False, trust_remote_code: bool = False, overwrite: bool = False,
             report: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`memaudit risk`: prediction only (params + sequences/tokens) or prediction + measurements (model + data)."""
    from .rundir import RunDir, check_output

    gate = parse_thresholds(fail_above)
    if model is None and data is None:
        mode = "pre-training"
        if nonmembers is not None or canaries is not None:
            raise MemauditError("--nonmembers and --canaries need --model and --data")
        if params is None or (train_sequences is None and train_tokens is None):
            raise MemauditError("give --params and --train-sequences (or --train-tokens), or --model and --data")
        if measured := sorted(set(gate) - {"predicted_mia_f1"}):
            raise MemauditError(f"--fail-above {', '.join(measured)}: measured only after training (give --model "
                                "and --data); before it, only predicted_mia_f1 can be limited")
        predict(params, train_sequences=train_sequences, train_tokens=train_tokens, window=window,
                precision=precision, bits_per_token=bits_per_token, random_vocab=random_vocab, laws_dir=laws_dir)
    elif model is None or data is None:
        raise MemauditError("post-training risk needs both --model and --data")
    else:
        mode = "post-training"
        _check_prediction_settings(train_sequences, train_tokens, window, precision, bits_per_token, random_vocab)
        _check_measuring_inputs(model, data, nonmembers, canaries, gate, prefix=prefix, suffix=suffix, limit=limit,
                                batch_size=batch_size, allow_pickle=allow_pickle)
    checks.number("--params", params, low=1, high=MAX_COUNT)
    out = out or RunDir.default_out("risk")
    check_output(out, "risk", inputs=[p for p in (model, data, nonmembers, canaries) if p is not None],
                 overwrite=overwrite)
    inputs: dict[str, Any] = {}
    loaded = None
    if mode == "post-training":
        from .data import file_hash, read_documents, tokenize
        from .models import count_parameters, load_model, weights_hash

        loaded = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
        docs = read_documents(data, text_field=text_field, id_field=id_field, limit=limit)
        lengths = [len(t) for t in tokenize(loaded.tokenizer, docs["text"].tolist())]
        params = params or count_parameters(loaded.model)
        if train_sequences is None and train_tokens is None:
            train_tokens = float(sum(lengths))  # the data file as the training set, cut in windows
        inputs = {"model": str(model), "model_weights_sha256": weights_hash(model), "data": str(data),
                  "data_sha256": file_hash(data)}
        if nonmembers is not None:
            inputs |= {"nonmembers": str(nonmembers), "nonmembers_sha256": file_hash(nonmembers)}
    prediction = predict(params, train_sequences=train_sequences, train_tokens=train_tokens, window=window,
                         precision=precision, bits_per_token=bits_per_token, random_vocab=random_vocab,
                         laws_dir=laws_dir)
    settings = {"mode": mode, "params": params, "train_sequences": train_sequences, "train_tokens": train_tokens,
                "window": window, "precision": precision, "bits_per_token": bits_per_token,
                "random_vocab": random_vocab, "fail_above": gate, "prefix": prefix,
                "suffix": suffix, "batch_size": batch_size, "device": device, "dtype": dtype, "limit": limit}
    run = RunDir(out, "risk", settings, inputs=inputs, overwrite=overwrite)
    run.owned.record(dirs=list(MEASUREMENT_RUNS) + ["report"])  # the runs it nests are its own
    echo(f"MIA law used: {prediction['mia_law']} -> predicted MIA F1 {prediction['predicted_mia_f1']:.3f}")
    for law in prediction["mia_laws"][1:]:
        echo(f"  beside it, {law['name']} ({law['source']}): {law['predicted_mia_f1']:.3f}")
    echo(f"capacity {prediction['capacity_bits']:.4g} bits ({prediction['alpha_bits_per_param']} bits/parameter, "
         f"{precision}); data {prediction['data_bits']:.4g} bits ({prediction['bits_per_token']:.3g} bits/token); "
         f"ratio {prediction['data_to_capacity_ratio']:.3g}: {prediction['regime']}")

    measured: dict[str, float] = {}
    runs: list[Path] = []
    if mode == "post-training":
        measured, runs = _measure(run.path, loaded, model, data, nonmembers, canaries, prefix=prefix, suffix=suffix,
                                  batch_size=batch_size, device=device, dtype=dtype, limit=limit,
                                  text_field=text_field, id_field=id_field, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code, echo=echo)
    figures = {"predicted_mia_f1": prediction["predicted_mia_f1"]} | measured
    line, exceeded = verdict(figures, gate)
    summary = {"mode": mode, "params": prediction["params"], "train_sequences": prediction["train_sequences"],
               "capacity_bits": prediction["capacity_bits"], "data_bits": prediction["data_bits"],
               "data_to_capacity_ratio": prediction["data_to_capacity_ratio"], "regime": prediction["regime"],
               "predicted_mia_f1": prediction["predicted_mia_f1"], "mia_law": prediction["mia_law"],
               "mia_laws": prediction["mia_laws"], "prediction": {k: v for k, v in prediction.items()
                                                                   if k != "mia_laws"},
               "measured": measured, "thresholds": dict(gate),
               "gated": sorted(gate), "exceeded": {k: v for k, (v, _) in exceeded.items()},
               "verdict": line, "runs": [str(p) for p in runs]}
    summary["exit_code"] = FAIL_EXIT_CODE if exceeded else 0
    run.write_summary(summary)
    run.finish()
    echo(line)
    if report:
        from .report import build_report

        res = build_report([run.path] + runs, run.path / "report", title="memaudit pre-release risk")
        summary["report"] = res["html"]
        echo(f"report -> {res['markdown']}, {res['html']}")
    summary["out"] = str(run.path)
    return summary


def _check_measuring_inputs(model, data, nonmembers, canaries, gate: dict[str, float], *, prefix: int, suffix: int,
                            limit: int | None, batch_size: int | str, allow_pickle: bool) -> None:
    """Everything the measuring commands will read, checked before the first of them starts."""
    from .canaries import default_canary_file, read_canaries

    checks.model_dir(model, allow_pickle=allow_pickle)
    checks.readable_file(data)
    checks.readable_file(nonmembers, "non-members file")
    checks.integer("--prefix", prefix)
    checks.integer("--suffix", suffix)
    checks.limit(limit)
    checks.batch_size(batch_size)
    canary_file = Path(canaries) if canaries is not None else default_canary_file(model)
    if canaries is not None or canary_file.is_file():
        checks.readable_file(canary_file, "canary file")
        read_canaries(canary_file)
    elif limited := sorted(k for k in gate if k.endswith("exposure_bits")):
        raise MemauditError(f"--fail-above {', '.join(limited)}: no canaries to measure (--canaries FILE)")
    if nonmembers is None and (limited := sorted(k for k in gate if k.startswith("mia_"))):
        raise MemauditError(f"--fail-above {', '.join(limited)}: membership inference needs --nonmembers FILE")


def _measure(root: Path, loaded, model, data, nonmembers, canaries, *, prefix, suffix, batch_size, device, dtype,
             limit, text_field, id_field, allow_pickle, trust_remote_code, echo) -> tuple[dict, list[Path]]:
    """Run extraction, MIA (with non-members), memorization vs zstd and exposure (with canaries); collect figures."""
    from .memorization import measure_memorization
    from .canaries import default_canary_file
    from .exposure import run_exposure
    from .extraction import extract

    common = dict(batch_size=batch_size, device=device, dtype=dtype, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code)
    measured: dict[str, float] = {}
    runs: list[Path] = []
    df = extract(loaded, data, prefix=prefix, suffix=suffix, limit=limit, text_field=text_field, id_field=id_field,
                 out=root / "extract", overwrite=True, batch_size=batch_size)
    measured |= _measured_extract(df.attrs["summary"])
    runs.append(root / "extract")
    echo(f"extraction: exact rate {measured.get('exact_rate', float('nan')):.3f}")
    if nonmembers is not None:
        from .membership import mia

        res = mia(model, data, nonmembers, limit=limit, text_field=text_field, id_field=id_field, out=root / "mia",
                  overwrite=True, bootstrap=200, **common)
        measured |= _measured_mia(res.summary)
        runs.append(root / "mia")
        echo(f"membership inference: loss-attack AUC {measured.get('mia_auc', float('nan')):.3f}")
    mem = measure_memorization(model, data, "zstd", out=root / "memorization", overwrite=True, limit=limit,
                               text_field=text_field, id_field=id_field,
                               **{k: v for k, v in common.items() if k != "dtype"})
    measured |= _measured_memorization(mem)
    runs.append(root / "memorization")
    echo(f"unintended memorization vs zstd: {mem['total_mem_u_bits']:.1f} bits")
    canary_file = Path(canaries) if canaries is not None else default_canary_file(model)
    if canary_file.is_file():
        s = run_exposure(model, canaries=canary_file, out=root / "exposure", overwrite=True, **common)
        measured |= _measured_exposure(s)
        runs.append(root / "exposure")
        echo(f"canary exposure: max {s['max_exposure_bits']:.2f} of {s['max_possible_exposure_bits']:.2f} bits")
    return measured, runs
