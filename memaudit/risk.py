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
- predicted_memorization_bits = min(capacity_bits, data_bits) (docs/methods.md, unintended memorization).
- predicted_mia_f1 from the MIA scaling law (memaudit.capacity.laws.predict_mia_f1): the published one
  ("morris2025"), and beside it the other transcription docs/methods.md discusses ("methods-md") and every law
  fitted by `memaudit capacity` found under `laws_dir` (JSON files with a mia_law_fit key).
After training, the measuring commands run on the model and their headline figures go beside the prediction;
the verdict compares them with thresholds, and `fail_above` makes the command exit with FAIL_EXIT_CODE.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypedDict

from . import checks, distributed
from .canaries import default_canary_file, read_canaries
from .capacity.laws import (LAW_SOURCES, LAWS, PUBLISHED_ALPHA, PUBLISHED_ALPHA_BF16, PUBLISHED_ALPHA_FP32,
                            predict_mia_f1)
from .data import file_hash, read_documents, tokenize
from .devices import check_placement, placement
from .errors import MemauditError
from .gate import FAIL_EXIT_CODE, parse_thresholds, verdict
from .exposure import exposure
from .extraction import extract
from .membership import mia, mia_headline
from .memorization import memorization
from .models import LoadedModel, count_parameters, load_model, weights_hash
from .report import report as write_report
from .rundir import RunDir, check_output, summary_header
from .settings import settings_from

ALPHA_BITS_PER_PARAM = {"published": PUBLISHED_ALPHA, "float32": PUBLISHED_ALPHA_FP32, "bfloat16": PUBLISHED_ALPHA_BF16}
DEFAULT_TEXT_BITS_PER_TOKEN = 4.0
MIA_LAW_WINDOW = 64  # the law was fitted on 64-token sequences
MEASUREMENT_RUNS = ("extract", "mia", "memorization", "exposure")  # sub-folders of a post-training risk run
MAX_COUNT = 1e18  # parameters, sequences, tokens: far beyond any model, and every product stays finite
def _silent(line: str) -> None:
    """The Python API's default `echo`: results come back in RiskResult, nothing is printed."""


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


def _measured_extract(summary: Mapping[str, Any]) -> dict[str, float]:
    return {k: summary[k] for k in ("exact_rate", "mean_rouge_l", "mean_token_match") if k in summary}


def _measured_mia(summary: Mapping[str, Any]) -> dict[str, float]:
    """The gateable MIA figures, named from the one MIA headline (membership.mia_headline)."""
    head = mia_headline(summary)
    names = {"loss_auc": "mia_auc", "loss_tpr_at_1pct_fpr": "mia_tpr_at_1pct_fpr", "best_auc": "mia_best_auc"}
    return {gate: head[key] for key, gate in names.items() if key in head}


def _measured_memorization(summary: Mapping[str, Any]) -> dict[str, float]:
    return {k: summary[k] for k in ("mem_u_bits_per_token", "fraction_samples_with_mem_u", "total_mem_u_bits")
            if k in summary}


def _measured_exposure(summary: Mapping[str, Any]) -> dict[str, float]:
    return {k: summary[k] for k in ("max_exposure_bits", "mean_exposure_bits", "mean_control_exposure_bits")
            if summary.get(k) is not None}


@dataclass(kw_only=True)
class RiskSettings:
    """Every option of `memaudit risk`. Pre-training: `params` with `train_sequences` or `train_tokens`.
    Post-training: `model` and `data` (its training documents), optionally `nonmembers` and `canaries`."""
    params: float | None = None
    train_sequences: float | None = None
    train_tokens: float | None = None
    window: int = MIA_LAW_WINDOW
    precision: str = "published"
    bits_per_token: float | None = None
    random_vocab: int | None = None
    model: str | os.PathLike | None = None
    data: str | os.PathLike | None = None
    nonmembers: str | os.PathLike | None = None
    canaries: str | os.PathLike | None = None
    fail_above: str | None = None  # "name=limit,..." over GATEABLE
    laws_dir: str | os.PathLike | None = None  # searched for laws fitted by `memaudit capacity`
    prefix: int = 32
    suffix: int = 32
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # auto, balanced, cpu-offload: accelerate places the model (None: all on device)
    max_memory: str | None = None  # device_map's limit per device: "0=20GiB,cpu=60GiB", or one size for each
    quantize: str | None = None  # 8bit or 4bit through bitsandbytes (None: full precision)
    limit: int | None = None
    text_field: str = "text"
    id_field: str = "id"
    out: str | os.PathLike | None = None  # default: runs/risk-<time>
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    report: bool = True  # also write OUT/report (Markdown + HTML)

    @property
    def mode(self) -> str:
        return "pre-training" if self.model is None and self.data is None else "post-training"

    def limits(self) -> dict[str, float]:
        return parse_thresholds(self.fail_above)

    def validate(self) -> None:
        gate = self.limits()
        if self.mode == "pre-training":
            if self.nonmembers is not None or self.canaries is not None:
                raise MemauditError("--nonmembers and --canaries need --model and --data")
            if self.params is None or (self.train_sequences is None and self.train_tokens is None):
                raise MemauditError("give --params and --train-sequences (or --train-tokens), or --model and --data")
            if measured := sorted(set(gate) - {"predicted_mia_f1"}):
                raise MemauditError(f"--fail-above {', '.join(measured)}: measured only after training (give "
                                    "--model and --data); before it, only predicted_mia_f1 can be limited")
            self.predict(self.params, self.train_sequences, self.train_tokens)
        elif self.model is None or self.data is None:
            raise MemauditError("post-training risk needs both --model and --data")
        else:
            _check_prediction_settings(self.train_sequences, self.train_tokens, self.window, self.precision,
                                       self.bits_per_token, self.random_vocab)
            checks.device(self.device)
            self._check_measuring_inputs(gate)
        checks.number("--params", self.params, low=1, high=MAX_COUNT)

    def predict(self, params: float, train_sequences: float | None, train_tokens: float | None) -> dict[str, Any]:
        return predict(params, train_sequences=train_sequences, train_tokens=train_tokens, window=self.window,
                       precision=self.precision, bits_per_token=self.bits_per_token, random_vocab=self.random_vocab,
                       laws_dir=self.laws_dir)

    def canary_file(self) -> Path:
        return Path(self.canaries) if self.canaries is not None else default_canary_file(self.model)

    def _check_measuring_inputs(self, gate: dict[str, float]) -> None:
        """Everything the measuring commands will read, checked before the first of them starts."""
        checks.model_dir(self.model, allow_pickle=self.allow_pickle)
        checks.readable_file(self.data)
        checks.readable_file(self.nonmembers, "non-members file")
        checks.integer("--prefix", self.prefix)
        checks.integer("--suffix", self.suffix)
        checks.limit(self.limit)
        checks.batch_size(self.batch_size)
        check_placement(self.device_map, self.max_memory, self.quantize, self.device)
        if self.canaries is not None or self.canary_file().is_file():
            checks.readable_file(self.canary_file(), "canary file")
            read_canaries(self.canary_file())
        elif limited := sorted(k for k in gate if k.endswith("exposure_bits")):
            raise MemauditError(f"--fail-above {', '.join(limited)}: no canaries to measure (--canaries FILE)")
        if self.nonmembers is None and (limited := sorted(k for k in gate if k.startswith("mia_"))):
            raise MemauditError(f"--fail-above {', '.join(limited)}: membership inference needs --nonmembers FILE")


class RiskSummary(TypedDict, total=False):
    """summary.json of `memaudit risk` (schema rundir.SUMMARY_SCHEMA_VERSION)."""
    schema_version: int
    command: str
    mode: str  # pre-training or post-training
    params: float
    train_sequences: float
    capacity_bits: float  # alpha * params
    data_bits: float  # train_sequences * window * bits_per_token
    data_to_capacity_ratio: float
    regime: str  # memorizing (ratio < 1) or generalizing
    predicted_mia_f1: float  # from the law named in mia_law
    mia_law: str
    mia_laws: list[dict[str, Any]]  # every law: name, predicted_mia_f1, uncapped_f1, source
    prediction: dict[str, Any]  # everything `predict` returned but mia_laws
    measured: dict[str, float]  # the gateable figures the measuring runs gave
    thresholds: dict[str, float]  # --fail-above
    gated: list[str]
    exceeded: dict[str, float]  # figures above their limit
    verdict: str  # the VERDICT line
    runs: list[str]  # the measuring runs nested in this one
    exit_code: int  # FAIL_EXIT_CODE when a limit was exceeded, else 0


@dataclass
class RiskResult:
    summary: RiskSummary
    path: Path  # the run directory
    report: Path | None  # report.html, when written
    exit_code: int  # what the CLI exits with


@dataclass
class _Target:
    """Post-training: the loaded model, its input hashes, and the counts the prediction takes from the data."""
    loaded: LoadedModel
    inputs: dict[str, Any]
    params: float
    train_tokens: float | None


def risk(settings: RiskSettings | None = None, /, *, echo: Callable[[str], None] = _silent,
         **options: Any) -> RiskResult | None:
    """`memaudit risk`: prediction only (params + sequences/tokens) or prediction + measurements (model + data).
    `echo` receives the progress lines the command line prints. Under torchrun every measurement is sharded over
    the ranks and rank 0 writes; the other ranks return None."""
    s = settings_from(RiskSettings, settings, options)
    s.validate()
    if s.mode == "post-training":  # under torchrun every measuring command shards its work over the ranks
        distributed.start(s.device)
    out = Path(s.out) if s.out is not None else distributed.broadcast_object(RunDir.default_out("risk"))
    main = distributed.is_main()
    if main:
        check_output(out, "risk", inputs=[p for p in (s.model, s.data, s.nonmembers, s.canaries) if p is not None],
                     overwrite=s.overwrite)
    target = _load_target(s) if s.mode == "post-training" else None
    params = target.params if target else s.params
    train_tokens = target.train_tokens if target else s.train_tokens
    prediction = s.predict(params, s.train_sequences, train_tokens)
    if not main:  # the other ranks take their share of each measurement; rank 0 writes and decides
        _measure(out, target.loaded, s, _silent)
        return None
    run = RunDir(out, "risk", _recorded_settings(s, params, train_tokens), inputs=target.inputs if target else {},
                 overwrite=s.overwrite)
    run.owned.record(dirs=list(MEASUREMENT_RUNS) + ["report"])  # the runs it nests are its own
    _echo_prediction(prediction, s.precision, echo)
    measured, runs = _measure(run.path, target.loaded, s, echo) if target else ({}, [])
    summary = _summary(s, prediction, measured, runs)
    run.write_summary(summary)
    run.finish()
    echo(summary["verdict"])
    report = None
    if s.report:
        res = write_report(run_dirs=[run.path] + runs, out=run.path / "report", title="memaudit pre-release risk")
        report = res.html  # the command line prints its path last
    return RiskResult(summary=summary, path=run.path, report=report, exit_code=summary["exit_code"])


def _load_target(s: RiskSettings) -> _Target:
    loaded = load_model(s.model, device=distributed.rank_device(s.device), dtype=s.dtype, allow_pickle=s.allow_pickle,
                        trust_remote_code=s.trust_remote_code, **placement(s))
    docs = read_documents(s.data, text_field=s.text_field, id_field=s.id_field, limit=s.limit)
    lengths = [len(t) for t in tokenize(loaded.tokenizer, docs["text"].tolist())]
    train_tokens = s.train_tokens
    if s.train_sequences is None and s.train_tokens is None:
        train_tokens = float(sum(lengths))  # the data file as the training set, cut in windows
    inputs = {"model": str(s.model), "model_weights_sha256": weights_hash(s.model), "data": str(s.data),
              "data_sha256": file_hash(s.data)}
    if s.nonmembers is not None:
        inputs |= {"nonmembers": str(s.nonmembers), "nonmembers_sha256": file_hash(s.nonmembers)}
    return _Target(loaded=loaded, inputs=inputs, params=s.params or count_parameters(loaded.model),
                   train_tokens=train_tokens)


def _recorded_settings(s: RiskSettings, params: float, train_tokens: float | None) -> dict[str, Any]:
    """config.json's settings (the keys runs have always recorded)."""
    return {"mode": s.mode, "params": params, "train_sequences": s.train_sequences, "train_tokens": train_tokens,
            "window": s.window, "precision": s.precision, "bits_per_token": s.bits_per_token,
            "random_vocab": s.random_vocab, "fail_above": s.limits(), "prefix": s.prefix, "suffix": s.suffix,
            "batch_size": s.batch_size, "device": s.device, "dtype": s.dtype, "limit": s.limit}


def _echo_prediction(prediction: dict[str, Any], precision: str, echo: Callable[[str], None]) -> None:
    echo(f"MIA law used: {prediction['mia_law']} -> predicted MIA F1 {prediction['predicted_mia_f1']:.3f}")
    for law in prediction["mia_laws"][1:]:
        echo(f"  beside it, {law['name']} ({law['source']}): {law['predicted_mia_f1']:.3f}")
    echo(f"capacity {prediction['capacity_bits']:.4g} bits ({prediction['alpha_bits_per_param']} bits/parameter, "
         f"{precision}); data {prediction['data_bits']:.4g} bits ({prediction['bits_per_token']:.3g} bits/token); "
         f"ratio {prediction['data_to_capacity_ratio']:.3g}: {prediction['regime']}")


def _summary(s: RiskSettings, prediction: dict[str, Any], measured: dict[str, float],
             runs: list[Path]) -> RiskSummary:
    gate = s.limits()
    line, exceeded = verdict({"predicted_mia_f1": prediction["predicted_mia_f1"]} | measured, gate)
    summary: RiskSummary = {
        **summary_header("risk"),  # type: ignore[typeddict-item]
        "mode": s.mode, "params": prediction["params"], "train_sequences": prediction["train_sequences"],
        "capacity_bits": prediction["capacity_bits"], "data_bits": prediction["data_bits"],
        "data_to_capacity_ratio": prediction["data_to_capacity_ratio"], "regime": prediction["regime"],
        "predicted_mia_f1": prediction["predicted_mia_f1"], "mia_law": prediction["mia_law"],
        "mia_laws": prediction["mia_laws"], "prediction": {k: v for k, v in prediction.items() if k != "mia_laws"},
        "measured": measured, "thresholds": dict(gate), "gated": sorted(gate),
        "exceeded": {k: v for k, (v, _) in exceeded.items()}, "verdict": line, "runs": [str(p) for p in runs],
        "exit_code": FAIL_EXIT_CODE if exceeded else 0}
    return summary


def _measure(root: Path, loaded: LoadedModel, s: RiskSettings,
             echo: Callable[[str], None]) -> tuple[dict[str, float], list[Path]]:
    """Run extraction, MIA (with non-members), memorization vs zstd and exposure (with canaries); collect figures.
    Under torchrun every rank runs each command (each takes its shard); only rank 0 gets results to collect."""
    common = dict(batch_size=s.batch_size, device=s.device, dtype=s.dtype, allow_pickle=s.allow_pickle,
                  trust_remote_code=s.trust_remote_code, **placement(s))
    docs = dict(limit=s.limit, text_field=s.text_field, id_field=s.id_field)
    measured: dict[str, float] = {}
    runs: list[Path] = []

    def collect(name: str, result, figures: Callable[[Mapping[str, Any]], dict[str, float]]) -> None:
        if result is not None:  # None on the other ranks under torchrun
            measured.update(figures(result.summary))
            runs.append(root / name)

    ext = extract(model_dir=loaded, data=s.data, prefix=s.prefix, suffix=s.suffix, out=root / "extract",
                  overwrite=True, batch_size=s.batch_size, **docs)
    collect("extract", ext, _measured_extract)
    echo(f"extraction: exact rate {measured.get('exact_rate', float('nan')):.3f}")
    if s.nonmembers is not None:
        res = mia(model_dir=s.model, members=s.data, nonmembers=s.nonmembers, out=root / "mia", overwrite=True,
                  bootstrap=200, **docs, **common)
        collect("mia", res, _measured_mia)
        echo(f"membership inference: loss-attack AUC {measured.get('mia_auc', float('nan')):.3f}")
    mem = memorization(model_dir=s.model, data=s.data, reference="zstd", out=root / "memorization", overwrite=True,
                       **docs, **{k: v for k, v in common.items() if k != "dtype"})
    collect("memorization", mem, _measured_memorization)
    echo(f"unintended memorization vs zstd: {measured.get('total_mem_u_bits', float('nan')):.1f} bits")
    if s.canary_file().is_file():
        exp = exposure(model_dir=s.model, canaries=s.canary_file(), out=root / "exposure", overwrite=True, **common)
        collect("exposure", exp, _measured_exposure)
        if exp is not None:
            echo(f"canary exposure: max {exp.summary['max_exposure_bits']:.2f} of "
                 f"{exp.summary['max_possible_exposure_bits']:.2f} bits")
    return measured, runs
