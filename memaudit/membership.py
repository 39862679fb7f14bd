"""Membership inference: run the attacks on members vs non-members, measure them honestly, write a run dir.

`mia(MiaSettings(...))` (or `mia(model_dir=..., members=..., nonmembers=..., ...)`) goes validate -> load ->
passes -> attacks and metrics -> summary -> write. Passes over the model (each sharded across ranks under torchrun,
gathered on rank 0, and saved in resumable chunks):
  1. target scoring pass (memaudit.scoring) -> every logit-based attack but recall
  2. reference model's scoring pass        -> `reference`
  3. x scored after the shots' KV cache     -> `recall` (same engine; the shots are read once)
  4. per-sample gradient norms, batched     -> `gradnorm` (one backward each where a model needs it)
Metrics per score column: ROC AUC with a bootstrap interval, oracle TPR at 1% / 0.1% FPR (threshold picked on
all samples, as peers report), and TPR / FPR, balanced accuracy and F1 at thresholds calibrated on a held-out,
stratified split and applied to the rest (what an auditor can really achieve).
With `stride` the samples are every `window`-token window starting each `stride` tokens (with `windows_per_doc`,
that many windows per document at seeded random starts): the passes score windows (windows.parquet), a
document's score is the mean of its windows' (samples.parquet), and the metrics are reported per document
(`attacks`) and per window (`window_attacks`). With `collection` the per-sample scores feed a
dataset-inference test of "the members file was trained on" (memaudit.collection). Pre-tokenized files (.npy,
.bin, input_ids columns; `token_dtype`, `seq_len`) are read as stored ids and never tokenized; attacks that need
text (zlib, zstd) read it decoded from the ids, as they always do.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypedDict

import numpy as np
import pandas as pd
import torch

from . import checks, distributed
from .attacks import ATTACKS, DCPDD_CAP, AttackInputs, choose_gradient_method, gradient_norms, parse_attacks, \
    parse_ks, run_attacks, score_and_gradient_norms, token_log_frequencies
from .collection import CollectionTest, check_sizes, dataset_inference
from .data import Documents, check_token_options, file_hash, load_documents
from .devices import check_placement, gradient_blocker, placement
from .errors import MemauditError
from .figures import pyplot
from .labels import attack_label
from .metrics import (binary_metrics, bootstrap_roc, roc_auc, roc_curve, stratified_split, threshold_at_fpr,
                      threshold_max_balanced_accuracy, tpr_at_fpr)
from .models import (LoadedModel, check_trained_first_token, first_token, load_model, load_tokenizer,
                     record_first_token, tokenizers_match, weights_hash)
from .progress import progress_bar
from .rundir import RunDir, check_output, summary_header
from .samples import Samples, Sampling, document_samples, sampled_windows
from .scoring import TokenStats, score_sharded
from .settings import settings_from

FPR_TARGETS = (0.01, 0.001)
# Samples per saved unit of a pass: an interrupted run redoes at most this many. Each unit is one scoring call,
# so it must hold several of the largest batches (512 on GPU) or chunking would shrink the batches themselves.
RESUME_CHUNK = 4096
MIN_RECALL_PREFIX = 8  # fewer shot tokens than this is not a prefix worth the name
# Private switches of the passes' fast paths, so bench/bench_mia.py can time the ways before them in one process.
_RECALL_PREFIX_CACHED = True  # False: recall re-reads the shots before every sample
_GRADNORM_METHOD = "auto"  # "loop": one backward per sample (attacks.gradient_norms)


@dataclass(kw_only=True)
class MiaSettings:
    """Every option of `memaudit mia`: the CLI flags' names and defaults (the CLI only parses)."""
    model_dir: str | Path  # the target model directory
    members: str | Path  # documents the model was trained on (.jsonl, .txt, .parquet, .csv; pre-tokenized .npy,
    # .bin, input_ids in .jsonl/.parquet: data.load_documents)
    nonmembers: str | Path  # documents from the same source it never saw
    reference: str | Path | None = None  # reference model (same tokenizer) for the reference attack
    attacks: str | Sequence[str] = "all"  # all, or a comma list / sequence of attack names (attacks.ATTACKS)
    k: str | Sequence[float] = "10,20,30"  # percentages for min_k and min_k_pp (one score column per k)
    window: int | None = None  # each document's first N tokens; None: whole documents truncated to the context
    stride: int | None = None  # with window: every window starting each N tokens; a document scores its mean
    windows_per_doc: int | None = None  # with window: N windows per document at seeded random starts (as stride)
    bos: bool = True  # prepend the tokenizer's BOS so every token is scored
    recall_shots: int = 5  # non-member samples joined as recall's prefix (left out of recall's metrics)
    dcpdd_corpus: str | Path | None = None  # dc_pdd's token frequencies; None: the non-member file
    bootstrap: int = 1000  # resamples for the confidence intervals (0: none)
    calibration_fraction: float = 0.5  # of each class, to calibrate thresholds; the rest measures them
    seed: int = 0  # calibration split, bootstrap and recall shots
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # auto, balanced, cpu-offload: accelerate places the model (None: all on device)
    max_memory: str | None = None  # device_map's limit per device: "0=20GiB,cpu=60GiB", or one size for each
    quantize: str | None = None  # 8bit or 4bit through bitsandbytes (None: full precision)
    text_field: str = "text"
    id_field: str = "id"
    limit: int | None = None  # only the first N documents of each file
    token_dtype: str = "uint16"  # a .bin's token width: uint16 or uint32
    seq_len: int | None = None  # tokens per row a .bin is cut into (needed for a .bin, refused otherwise)
    collection: bool = False  # dataset inference: members = the suspect set, non-members = the validation set
    out: str | Path | None = None  # None: RunDir.default_out("mia")
    resume: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # Not a CLI flag: False is the Python API's results-only path (no run directory, so no --resume either).
    write: bool = True

    def validate(self) -> None:
        """Cheap checks before anything is loaded: one MemauditError line each."""
        names, is_all = parse_attacks(self.attacks)
        parse_ks(self.k)
        checks.integer("--window", self.window, low=2)
        checks.integer("--stride", self.stride, low=1)
        if self.stride is not None and self.window is None:
            raise MemauditError("--stride needs --window N: the length of the windows that start every --stride "
                                "tokens")
        self.sampling().validate()
        if self.windows_per_doc is not None and self.window is None:
            raise MemauditError("--windows-per-doc needs --window N: the length of the windows drawn in each document")
        checks.integer("--recall-shots", self.recall_shots, low=0)
        checks.integer("--bootstrap", self.bootstrap, low=0)
        checks.fraction("--calibration-fraction", self.calibration_fraction)
        checks.seed(self.seed)
        checks.device(self.device)
        check_placement(self.device_map, self.max_memory, self.quantize, self.device)
        checks.dtype(self.dtype)
        checks.limit(self.limit)
        checks.batch_size(self.batch_size)
        checks.readable_file(self.members, "members file")
        checks.readable_file(self.nonmembers, "non-members file")
        checks.readable_file(self.dcpdd_corpus, "--dcpdd-corpus file")
        check_token_options([self.members, self.nonmembers, self.dcpdd_corpus], self.token_dtype, self.seq_len)
        if Path(self.members).resolve() == Path(self.nonmembers).resolve():
            raise MemauditError("--members and --nonmembers are the same file: membership inference needs documents "
                                "the model never saw")
        checks.model_dir(self.model_dir, allow_pickle=self.allow_pickle)
        if self.reference is not None:
            checks.model_dir(self.reference, allow_pickle=self.allow_pickle, what="--reference model directory")
        if self.reference is None and not is_all and _needs_reference(names):  # `all` skips it instead (_plan)
            raise MemauditError("the reference attack needs --reference MODEL_DIR")
        if self.collection and names == ["dc_pdd"] and self.dcpdd_corpus is None:
            raise MemauditError("--collection leaves dc_pdd out when its frequencies come from the non-member file: "
                                "add --dcpdd-corpus FILE or other --attacks")
        if self.resume and (self.out is None or not self.write):
            raise MemauditError("--resume needs --out (the run directory to continue)")

    def sampling(self) -> Sampling:
        """Which windows of each document are scored with --window (samples.Sampling): the first (default), every
        --stride tokens, or --windows-per-doc seeded random starts."""
        return Sampling(stride=self.stride, windows_per_doc=self.windows_per_doc, seed=self.seed)

    @property
    def whole_document(self) -> bool:
        """Several windows per document (--stride or --windows-per-doc): windows.parquet, per-document means."""
        return self.sampling().whole_document


# --- summary.json: the declared schema -----------------------------------------------------------------------

class ThresholdFigures(TypedDict):
    """A calibrated threshold and what it achieves on the evaluation split."""
    threshold: float
    tpr: float
    fpr: float


class BinaryFigures(ThresholdFigures):
    """metrics.binary_metrics at one threshold."""
    precision: float
    balanced_accuracy: float
    f1: float


# One key per FPR_TARGETS entry (and its bootstrap interval when --bootstrap > 0); the keys hold dots, hence the
# functional form.
OracleMetrics = TypedDict("OracleMetrics", {
    "tpr_at_fpr_0.01": float, "tpr_at_fpr_0.01_ci95": list[float],
    "tpr_at_fpr_0.001": float, "tpr_at_fpr_0.001_ci95": list[float],
}, total=False)
# Thresholds picked on the calibration split, measured on the evaluation split; `error` (and nothing measured)
# when a split lacks members or non-members.
CalibratedMetrics = TypedDict("CalibratedMetrics", {
    "n_calibration": int, "n_evaluation": int, "error": str,
    "at_fpr_0.01": ThresholdFigures, "at_fpr_0.001": ThresholdFigures, "max_balanced_accuracy": BinaryFigures,
}, total=False)


class AttackMetrics(TypedDict, total=False):
    """One score column's block under summary["attacks"] (what report.py and risk.py read)."""
    n_members: int  # samples with a score (recall's shots have none)
    n_nonmembers: int
    auc: float  # ROC AUC, higher score = member
    auc_ci95: list[float]  # percentile bootstrap interval; only with --bootstrap > 0
    oracle: OracleMetrics  # TPR at FPR with the threshold picked on all samples (what peers report)
    calibrated: CalibratedMetrics


class SampleCounts(TypedDict):
    documents: int
    samples: int
    skipped_too_short: int
    truncated_to_context: int
    duplicates_dropped: int


class MiaSampleCounts(TypedDict):
    members: SampleCounts
    nonmembers: SampleCounts


class MiaOverlap(TypedDict):
    ids_in_both_files: int
    identical_samples_in_both_sets: int


class RecallInfo(TypedDict):
    shots: int
    shot_ids: list[str]  # the non-member samples joined as the prefix
    prefix_tokens: int
    separator: str | None  # "eos", or None when the tokenizer has no EOS
    note: str


class DcPddCorpus(TypedDict):
    file: str
    sha256: str
    documents: int
    tokens: int
    default_nonmember_file: bool  # no --dcpdd-corpus: the non-member file
    smoothing: str
    cap_a: float


class MiaSummary(TypedDict, total=False):
    """summary.json of `memaudit mia` (schema rundir.SUMMARY_SCHEMA_VERSION)."""
    schema_version: int  # rundir.SUMMARY_SCHEMA_VERSION
    command: str  # "mia"
    attacks: dict[str, AttackMetrics]  # score column -> its metrics (per document: with --stride, its windows' mean)
    columns: list[str]  # score columns, in order (samples.parquet holds score_<column>)
    skipped_attacks: dict[str, str]  # attack -> why `all` skipped it
    n_members: int  # documents scored (with --stride too)
    n_nonmembers: int
    samples: MiaSampleCounts  # how each file's documents became samples
    overlap: MiaOverlap  # ids and identical samples found in both sets (both kept)
    windows: dict[str, Any]  # {"mode": "window", "tokens": N, ...} or {"mode": "document", "max_tokens": N, ...}
    bos: dict[str, Any]  # {"prepended": bool, "scored_tokens": str}
    model_context: int  # positions the model(s) take
    k_percent: list[float]  # the k of min_k and min_k_pp
    recall: RecallInfo | None  # None when recall did not run
    dc_pdd_corpus: DcPddCorpus | None  # None when dc_pdd did not run
    metrics_definition: dict[str, str]  # how each figure is defined, in words
    world_size: int  # torchrun processes
    seconds: float
    figures: list[str]  # figure files in the run directory (only when written)
    # With --stride only: every column measured per window (no bootstrap interval, as windows of one document are
    # not independent; the calibration split keeps each document's windows together).
    window_attacks: dict[str, AttackMetrics]
    collection: CollectionTest  # with --collection only: dataset inference (memaudit.collection)


@dataclass
class MiaResult:
    summary: MiaSummary  # exactly what summary.json holds
    path: Path | None  # the run directory (None with write=False)
    samples: pd.DataFrame  # id, member, n_tokens, score_<column>; with --stride also n_windows, per document
    windows: pd.DataFrame | None = None  # with --stride: doc_id, offset, member, n_tokens, score_<column>


# --- the entry --------------------------------------------------------------------------------------------------

def mia(settings: MiaSettings | None = None, /, **options: Any) -> MiaResult | None:
    """Score members and non-members with the attacks and measure how well each separates them.

    Takes a MiaSettings or its fields as keywords (`mia(model_dir=..., members=..., nonmembers=...)`). Returns the
    summary (AUC with a bootstrap interval, oracle and calibrated TPR at low FPR per score column) and the
    per-sample scores; with `write=True` (the default) it also writes the run directory `out`. Under torchrun every
    rank scores a shard and rank 0 gathers, measures and writes; the other ranks return None. Each pass is saved
    in chunks of RESUME_CHUNK samples as it goes, so `resume` continues an interrupted run in `out`.
    """
    t0 = time.time()
    s = settings_from(MiaSettings, settings, options)
    s.validate()
    loaded = _load(s)
    passes = _run_passes(s, loaded)
    if not distributed.is_main():  # rank 0 holds every gathered pass: it alone measures and writes
        return None
    table, cols, corpus = _attack_scores(s, loaded, passes)
    m = _measure_all(s, loaded.samples, table, cols)
    summary = _summary(s, loaded, passes, m, corpus, seconds=round(time.time() - t0, 2))
    return MiaResult(summary=summary, path=_write(loaded.run, m, summary), samples=m.samples, windows=m.windows)


def mia_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The MIA figures a report row or a risk gate shows, in this order, missing ones skipped: n_members,
    n_nonmembers, best_attack and best_auc (the column with the highest AUC; the first on a tie), loss_auc and
    loss_tpr_at_1pct_fpr (the loss attack's oracle TPR at 1% FPR). Reads a returned summary or a summary.json."""
    out: dict[str, Any] = {k: summary[k] for k in ("n_members", "n_nonmembers") if summary.get(k) is not None}
    attacks = summary.get("attacks") or {}
    aucs = {a: m["auc"] for a, m in attacks.items() if isinstance(m, Mapping) and _is_number(m.get("auc"))}
    if aucs:
        best = max(aucs, key=aucs.__getitem__)
        out["best_attack"], out["best_auc"] = best, aucs[best]
    loss = attacks.get("loss")
    if isinstance(loss, Mapping):
        if _is_number(loss.get("auc")):
            out["loss_auc"] = loss["auc"]
        oracle = loss.get("oracle")
        if isinstance(oracle, Mapping) and _is_number(oracle.get("tpr_at_fpr_0.01")):
            out["loss_tpr_at_1pct_fpr"] = oracle["tpr_at_fpr_0.01"]
    return out


def format_summary(summary: Mapping[str, Any]) -> str:
    """The console lines of `memaudit mia`: the set sizes, then each column's AUC and TPR at 1% FPR."""
    lines = [f"{summary['n_members']} members vs {summary['n_nonmembers']} non-members"]
    win = summary.get("windows") or {}
    if win.get("mode") == "stride":
        lines[0] += (f" (documents; {win['member_windows']} vs {win['nonmember_windows']} windows of {win['tokens']} "
                     f"tokens every {win['stride']})")
    elif win.get("mode") == "random":
        lines[0] += (f" (documents; {win['member_windows']} vs {win['nonmember_windows']} windows of {win['tokens']} "
                     f"tokens, {win['windows_per_doc']} per document at random starts)")
    windows = summary.get("window_attacks") or {}
    for c, m in summary["attacks"].items():
        ci = m.get("auc_ci95")
        ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        cal = m["calibrated"].get("at_fpr_0.01", {})
        cal_s = f"; calibrated TPR {cal['tpr']:.3f} at FPR {cal['fpr']:.3f}" if cal else ""
        win_s = f"  (per window AUC {windows[c]['auc']:.3f})" if c in windows else ""
        lines.append(f"  {c:<14} AUC {m['auc']:.3f}{ci_s}  TPR@1%FPR {m['oracle']['tpr_at_fpr_0.01']:.3f}{cal_s}"
                     f"{win_s}")
    if (col := summary.get("collection")) is not None:
        sus, val = col["suspect"], col["validation"]
        lines.append(f"collection test (members = suspect set): p = {col['p_value']:.3g}, Welch t = "
                     f"{col['statistic']:.2f} (df {col['df']:.1f}) on {sus['test_documents']} vs "
                     f"{val['test_documents']} held-out documents ({sus['test_windows']} vs {val['test_windows']} "
                     f"samples); seed {col['seed']}")
    return "\n".join(lines)


def _is_number(x: Any) -> bool:
    """A finite figure (summary.json writes an undefined one as null; a returned summary may hold NaN)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _needs_reference(names: Sequence[str]) -> bool:
    return any("reference" in ATTACKS[n].needs for n in names)


def _warn(msg: str) -> None:
    if distributed.is_main():
        print(f"warning: {msg}", file=sys.stderr)


# --- load: attacks to run, output folder, documents, models, samples, run directory ----------------------------

@dataclass
class _Plan:
    names: list[str]  # the attacks to run; a skipped one leaves (recall only once its pass finds no room)
    is_all: bool  # `all` skips what cannot run; a named attack that cannot run is an error
    ks: list[float]
    skipped: dict[str, str]  # attack -> why


@dataclass
class _Samples:
    ids: list[str]  # each sample's document id
    member: np.ndarray  # bool
    tokens: list[list[int]]  # the sample's tokens (before BOS)
    scored: list[np.ndarray]  # the tokens its scores cover: all of them with BOS, all but the first without
    counts: MiaSampleCounts
    offsets: list[int]  # where each sample starts in its document (0 without --stride)
    doc: np.ndarray  # each sample's document: an index into the doc_* lists
    doc_ids: list[str]  # per document with at least one sample, members first
    doc_member: np.ndarray  # bool, per document
    doc_tokens: list[int]  # per document: its length in tokens


@dataclass
class _Loaded:
    plan: _Plan
    target: LoadedModel
    ref: LoadedModel | None  # dropped once its pass is done
    bos_id: int | None
    ctx: int  # positions the target (and reference) take
    max_tokens: int  # the longest sample that fits: ctx with BOS, ctx + 1 without
    samples: _Samples
    overlap: MiaOverlap
    run: RunDir | None  # rank 0 with write=True only
    dcpdd: tuple[np.ndarray, DcPddCorpus] | None  # dc_pdd's ln f(v) and what it was read from, when it runs


def _load(s: MiaSettings) -> _Loaded:
    """Everything the passes need, in the order that refuses bad input soonest: the attack plan and the output
    folder, then the documents, the models and the samples; the run directory is claimed last."""
    plan = _plan(s)
    dev, out = _start(s)
    docs, overlap_ids = _read(s)
    if s.collection:  # checked again once too-short documents and recall's shots are known
        _check_collection(len(docs[0]), len(docs[1]))
    tok = load_tokenizer(s.model_dir, s.trust_remote_code)  # alone, before any model
    tokens = [d.tokens(tok) for d in docs]  # stored ids are checked against the vocabulary (an error names the row)
    # dc_pdd's frequency corpus is read now too, so a damaged one is refused before the passes, not after
    dcpdd = _dcpdd_frequencies(s, tok) if "dc_pdd" in plan.names else None
    target, ref = _load_models(s, plan, dev)
    bos_id, ctx, max_tokens = _context(s, target, ref)
    samples, overlap_samples = _cut_samples(s, plan, docs, tokens, bos_id, max_tokens)
    run = _open_run(s, plan, out) if out is not None and distributed.is_main() else None
    if run is not None:
        record_first_token(run, target.tokenizer, bos_id)
    return _Loaded(plan=plan, target=target, ref=ref, bos_id=bos_id, ctx=ctx, max_tokens=max_tokens,
                   samples=samples, run=run, dcpdd=dcpdd, overlap=MiaOverlap(ids_in_both_files=overlap_ids,
                                                                identical_samples_in_both_sets=overlap_samples))


def _plan(s: MiaSettings) -> _Plan:
    names, is_all = parse_attacks(s.attacks)
    skipped: dict[str, str] = {}
    if s.reference is None and _needs_reference(names):  # only under `all`: validate refused a named list
        for n in [n for n in names if "reference" in ATTACKS[n].needs]:
            names.remove(n)
            skipped[n] = "no --reference model given"
    if is_all and s.whole_document and "gradnorm" in names:  # named, it runs per window
        names.remove("gradnorm")
        skipped["gradnorm"] = ("a backward pass over every window (about 2x the loss attack's pass): name it in "
                               "--attacks to run it on every window")
    return _Plan(names=names, is_all=is_all, ks=parse_ks(s.k), skipped=skipped)


def _start(s: MiaSettings) -> tuple[str, Path | None]:
    """Join torchrun's processes (if any) and refuse an output folder that may not be written, before any work.
    Returns this rank's device and the run directory (None with write=False)."""
    dev = distributed.start(s.device)
    if not s.write:
        return dev, None
    out = Path(s.out) if s.out is not None else distributed.broadcast_object(RunDir.default_out("mia"))
    if distributed.is_main():
        inputs = [p for p in (s.model_dir, s.members, s.nonmembers, s.reference, s.dcpdd_corpus) if p is not None]
        check_output(out, "mia", inputs=inputs, resume=s.resume, overwrite=s.overwrite)
    return dev, out


def _read(s: MiaSettings) -> tuple[tuple[Documents, Documents], int]:
    """Both document files (text, or pre-tokenized ids: data.load_documents) and how many ids they share (0 when
    both use row numbers, which always coincide)."""
    mem, non = (load_documents(path, text_field=s.text_field, id_field=s.id_field, limit=s.limit,
                               token_dtype=s.token_dtype, seq_len=s.seq_len) for path in (s.members, s.nonmembers))
    overlap_ids = 0
    if not (_auto_ids(mem) and _auto_ids(non)):
        overlap_ids = len(set(mem.ids) & set(non.ids))
        if overlap_ids:
            _warn(f"{overlap_ids} id(s) appear in both the member and the non-member file; "
                  "keeping both rows (rows are keyed by id and member)")
    return (mem, non), overlap_ids


def _auto_ids(docs: Documents) -> bool:
    return all(i == str(n) for n, i in enumerate(docs.ids))


def _load_models(s: MiaSettings, plan: _Plan, dev: str) -> tuple[LoadedModel, LoadedModel | None]:
    """The target, and the reference when its attack runs (refused unless it shares the target's tokenizer)."""
    target = load_model(s.model_dir, device=dev, dtype=s.dtype, allow_pickle=s.allow_pickle,
                        trust_remote_code=s.trust_remote_code, **placement(s))
    if "gradnorm" in plan.names and (why := gradient_blocker(target.model)):  # its norm would miss those weights
        if not plan.is_all:
            raise MemauditError(f"gradnorm needs the gradient of every weight, but {why}: leave gradnorm out of "
                                "--attacks, or load the model whole (no --quantize, a larger --max-memory)")
        plan.names.remove("gradnorm")
        plan.skipped["gradnorm"] = f"needs every weight's gradient, but {why}"
    if not _needs_reference(plan.names):
        return target, None
    tok, ref_tok = target.tokenizer, load_tokenizer(s.reference, s.trust_remote_code)
    if not tokenizers_match(tok, ref_tok):
        raise MemauditError(f"the reference model in {s.reference} has a different tokenizer than the target "
                            f"model (vocabularies of {len(ref_tok)} and {len(tok)} tokens, or their BOS or EOS, "
                            "differ): the reference attack compares per-token log-likelihoods, so both must "
                            "share it")
    ref = load_model(s.reference, device=dev, dtype=s.dtype, allow_pickle=s.allow_pickle,
                     trust_remote_code=s.trust_remote_code, **placement(s))
    return target, ref


def _context(s: MiaSettings, target: LoadedModel, ref: LoadedModel | None) -> tuple[int | None, int, int]:
    """(BOS id or None, the context both models take, the longest sample that fits)."""
    bos_id = first_token(target.tokenizer) if s.bos else None  # the trainer's convention: BOS, else EOS
    if s.bos and bos_id is None:
        _warn("the tokenizer has neither a BOS nor an EOS token: scoring without one (each sample's first token is "
              "context only)")
    check_trained_first_token(target, bos_id)
    ctx = target.max_length if ref is None else min(target.max_length, ref.max_length)
    # The model input is [BOS] + tokens minus the last one, so `ctx` tokens fit with BOS and ctx + 1 without.
    max_tokens = ctx if bos_id is not None else ctx + 1
    if s.window is not None and s.window > max_tokens:
        raise MemauditError(f"--window {s.window} is longer than the model's context ({ctx} positions)")
    return bos_id, ctx, max_tokens


def _cut_samples(s: MiaSettings, plan: _Plan, docs: tuple[Documents, Documents],
                 tokens: list[Sequence[list[int]]], bos_id: int | None, max_tokens: int) -> tuple[_Samples, int]:
    """Members then non-members: one sample per document or, with --stride or --windows-per-doc, several windows;
    and how many samples are identical in both sets."""
    min_tokens = 1 if bos_id is not None else 2
    sides = [(d, toks, *_cut(s, toks, max_tokens, min_tokens)) for d, toks in zip(docs, tokens)]
    (_, _, m, _), (_, _, n, _) = sides
    if not len(m) or not len(n):
        which = "member" if not len(m) else "non-member"
        raise MemauditError(f"no {which} sample left to score (documents shorter than --window {s.window} are "
                            "skipped)" if s.window else f"no {which} sample left to score")
    n_docs = [len(set(c.doc_ids)) for _, _, c, _ in sides]
    if min(n_docs) < 2:
        raise MemauditError("need at least 2 members and 2 non-members (a calibration and an evaluation split)")
    if s.collection:  # recall's shot documents, when its pass will run, are left out of the test
        room = max_tokens - max(len(t) for t in m.tokens + n.tokens) >= MIN_RECALL_PREFIX
        _check_collection(n_docs[0], n_docs[1], s.recall_shots if "recall" in plan.names and room else 0)
    overlap = len({tuple(t) for t in m.tokens} & {tuple(t) for t in n.tokens})
    if overlap:
        _warn(f"{overlap} sample(s) are identical in the member and the non-member set; keeping both")
    return _assemble(sides, bos_id), overlap


def _check_collection(n_suspect: int, n_validation: int, shots: int = 0) -> None:
    """--collection's minimum documents a side; recall's `shots` documents do not count (the test leaves them out)."""
    check_sizes(n_suspect, n_validation - shots, f" once recall's {shots} shot documents are left out" if shots else "")


def _cut(s: MiaSettings, token_lists: Sequence[list[int]], max_tokens: int,
         min_tokens: int) -> tuple[Samples, SampleCounts]:
    """One sample per document (`samples.document_samples`) or, with --stride or --windows-per-doc, the windows the
    sampling takes (`samples.sampled_windows`), identical samples kept once; and the counts. Samples name their
    document by its position in the file."""
    if s.whole_document:
        c = sampled_windows(s.sampling(), token_lists, s.window, dedup=True)
    else:
        c = document_samples(token_lists, max_tokens=max_tokens, min_tokens=min_tokens, window=s.window, dedup=True)
    return c, {"documents": len(token_lists), "samples": len(c), "skipped_too_short": c.n_skipped,
               "truncated_to_context": c.n_truncated, "duplicates_dropped": c.n_duplicates}


def _assemble(sides: list, bos_id: int | None) -> _Samples:
    """_Samples from the members' and the non-members' cuts ((documents, their tokens, cut, counts) each):
    documents with at least one sample are numbered in order, members first."""
    ids, member, tokens, offsets, doc, doc_ids, doc_member, doc_tokens = [], [], [], [], [], [], [], []
    for is_member, (docs, toks, c, _) in zip((True, False), sides):
        number: dict[int, int] = {}
        for pos, t, off in zip(c.doc_ids, c.tokens, c.offsets):
            if pos not in number:
                number[pos] = len(doc_ids)
                doc_ids.append(docs.ids[pos])
                doc_member.append(is_member)
                doc_tokens.append(len(toks[pos]))
            ids.append(docs.ids[pos])
            member.append(is_member)
            tokens.append(t)
            offsets.append(off)
            doc.append(number[pos])
    return _Samples(ids=ids, member=np.asarray(member, bool), tokens=tokens,
                    scored=[np.asarray(t[1:] if bos_id is None else t, dtype=np.int64) for t in tokens],
                    counts=MiaSampleCounts(members=sides[0][3], nonmembers=sides[1][3]), offsets=offsets,
                    doc=np.asarray(doc, np.int64), doc_ids=doc_ids, doc_member=np.asarray(doc_member, bool),
                    doc_tokens=doc_tokens)


def _open_run(s: MiaSettings, plan: _Plan, out: Path) -> RunDir:
    """Claim the run directory; `settings` is what --resume compares, so it must not change (its `attacks` are the
    plan's: a reference that `all` skipped is out, recall is in even if its pass later finds no room)."""
    settings = {"attacks": list(plan.names), "k": plan.ks, "window": s.window, "bos": s.bos,
                "recall_shots": s.recall_shots, "bootstrap": s.bootstrap,
                "calibration_fraction": s.calibration_fraction, "seed": s.seed, "batch_size": s.batch_size,
                "device": s.device, "dtype": s.dtype, "text_field": s.text_field, "id_field": s.id_field,
                "limit": s.limit}
    # Recorded only when set, so a run without them records (and resumes) exactly as before they existed.
    settings |= {k: v for k, v in (("stride", s.stride), ("windows_per_doc", s.windows_per_doc),
                                   ("collection", s.collection or None), ("seq_len", s.seq_len),
                                   ("token_dtype", s.token_dtype if s.seq_len is not None else None),
                                   ("quantize", s.quantize))
                 if v is not None}  # token_dtype: for a .bin only
    inputs = {"model": str(s.model_dir), "model_weights_sha256": weights_hash(s.model_dir),
              "members": str(s.members), "members_sha256": file_hash(s.members),
              "nonmembers": str(s.nonmembers), "nonmembers_sha256": file_hash(s.nonmembers)}
    if s.reference is not None:
        inputs |= {"reference": str(s.reference), "reference_weights_sha256": weights_hash(s.reference)}
    if s.dcpdd_corpus is not None:
        inputs |= {"dcpdd_corpus": str(s.dcpdd_corpus)}
    return RunDir(out, "mia", settings, inputs=inputs, resume=s.resume, overwrite=s.overwrite)


# --- the passes: each sharded under torchrun, gathered on rank 0, saved in resumable chunks --------------------

@dataclass
class _Passes:
    """Per sample, aligned with _Samples; None off rank 0 and for a pass that did not run."""
    stats: list[TokenStats] | None  # the target pass
    ref_stats: list[TokenStats] | None
    recall_stats: list[TokenStats | None] | None  # None for a shot
    recall_info: RecallInfo | None
    gradnorms: np.ndarray | None


def _run_passes(s: MiaSettings, L: _Loaded) -> _Passes:
    n = len(L.samples.ids)
    score_kw = dict(batch_size=s.batch_size, bos_id=L.bos_id, pad_id=L.target.tokenizer.pad_token_id or 0,
                    max_length=L.ctx)
    # Pass 1: the target model, one scoring pass for every logit-based attack (and gradnorm's batched norms from
    # the same forward, when it runs).
    grad = _Gradnorm(L, s.batch_size) if "gradnorm" in L.plan.names else None
    step = _scoring(L.target.model, L.samples.tokens, score_kw)
    stats = _resumable(L.run, "target", n, "mia: target pass", grad.target_step(step) if grad else step)
    ref_stats = None
    if L.ref is not None:  # pass 2
        ref_stats = _resumable(L.run, "reference", n, "mia: reference pass",
                               _scoring(L.ref.model, L.samples.tokens, score_kw))
        L.ref = None  # frees the reference model for the passes that follow
    recall_stats, recall_info = _recall_pass(s, L, score_kw) if "recall" in L.plan.names else (None, None)
    gradnorms = None
    if grad is not None:  # pass 4
        full = _resumable(L.run, "gradnorm", n, "mia: gradnorm (per-sample gradients)", grad.step)
        gradnorms = np.asarray(full) if full is not None else None
    return _Passes(stats=stats, ref_stats=ref_stats, recall_stats=recall_stats, recall_info=recall_info,
                   gradnorms=gradnorms)


def _scoring(model: torch.nn.Module, seqs: Sequence[Sequence[int]], kw: dict[str, Any]) -> Callable:
    """A _resumable step: one scoring-engine call on a chunk of `seqs`, sharded across ranks."""
    return lambda chunk, advance: score_sharded(model, [seqs[i] for i in chunk], on_progress=advance, **kw)


def _recall_pass(s: MiaSettings, L: _Loaded, score_kw: dict[str, Any]) -> tuple[list | None, RecallInfo | None]:
    """Pass 3: the same engine on [BOS] + prefix + x, the prefix being non-member shots; the last len(x scored)
    entries are x's tokens. Under `all`, skipped (with a warning) when no prefix fits before the longest sample."""
    samples, n, tok = L.samples, len(L.samples.ids), L.target.tokenizer
    longest = max(len(t) for t in samples.tokens)
    budget = L.max_tokens - longest  # room before the longest sample
    if budget < MIN_RECALL_PREFIX:
        reason = (f"no room for the non-member prefix: the longest sample has {longest} tokens and the model's "
                  f"context {L.ctx}; `memaudit mia --window {max(2, L.ctx // 2)}` scores shorter samples")
        if not L.plan.is_all:
            raise MemauditError(f"recall: {reason}")
        L.plan.names.remove("recall")
        L.plan.skipped["recall"] = reason
        _warn(f"skipping recall: {reason}")
        return None, None
    shots, prefix = _recall_prefix(samples, s.recall_shots, s.seed, tok.eos_token_id, budget)
    # Every sample of a shot's document is left out: with --stride its other windows overlap the prefix's text.
    shot_docs = set(samples.doc[shots].tolist())
    todo = [i for i in range(n) if samples.doc[i] not in shot_docs]
    start = [L.bos_id] if L.bos_id is not None else []
    kw = {**score_kw, "bos_id": None, "max_length": L.ctx}
    if _RECALL_PREFIX_CACHED:  # the prefix is read once; every sample is scored after its cache
        cond, kw["prefix"] = [samples.tokens[i] for i in todo], start + prefix
    else:  # the way before the cache (kept to time against): the prefix re-read before every sample
        cond = [start + prefix + samples.tokens[i] for i in todo]
    got = _resumable(L.run, "recall", len(cond), "mia: recall pass", _scoring(L.target.model, cond, kw))
    recall_stats: list[TokenStats | None] | None = None
    if got is not None:
        recall_stats = [None] * n
        for i, st in zip(todo, got):
            recall_stats[i] = _tail(st, len(samples.scored[i]))
    info = RecallInfo(shots=len(shots), shot_ids=[samples.ids[i] for i in shots], prefix_tokens=len(prefix),
                      separator="eos" if tok.eos_token_id is not None else None,
                      note="shots are non-member samples (seeded draw); they are left out of recall's metrics"
                      if not s.whole_document else
                      "shots are the first windows of non-member documents (seeded draw); every window of those "
                      "documents is left out of recall's metrics")
    return recall_stats, info


def _recall_prefix(samples: _Samples, n_shots: int, seed: int, sep: int | None,
                   budget: int) -> tuple[list[int], list[int]]:
    """Indices of the non-member samples used as shots (each the first sample of a distinct document), and the
    prefix: their tokens joined by `sep` (the EOS document separator), cut from the left to `budget` tokens so it
    fits before every sample."""
    first = np.unique(samples.doc, return_index=True)[1]  # each document's first sample, in order
    non = first[~samples.member[first]]
    if n_shots < 1 or n_shots >= len(non):
        raise MemauditError("--recall-shots must be between 1 and the number of non-members minus one "
                            f"({len(non) - 1})")
    shots = sorted(np.random.default_rng(seed).choice(non, size=n_shots, replace=False).tolist())
    prefix: list[int] = []
    for i in shots:
        prefix += samples.tokens[i] + ([sep] if sep is not None else [])
    return shots, prefix[-budget:] if budget > 0 else []


def _tail(st: TokenStats, m: int) -> TokenStats:
    """The last m tokens' stats of a conditioned pass (the sample's own tokens)."""
    return TokenStats(logprob=st.logprob[-m:], hit=st.hit[-m:], argmax=st.argmax[-m:],
                      mean_lp=st.mean_lp[-m:], var_lp=st.var_lp[-m:])


class _Gradnorm:
    """gradnorm's passes. Its method (attacks.choose_gradient_method: a batch at once where the model allows it,
    else one backward per sample) is chosen once, when a chunk first needs it. With the batched method the target
    pass computes each chunk's norms from its own forward (`target_step`) and keeps them for pass 4 (`step`) by the
    chunk's first index; every rank keeps the index (rank 0 alone the values), so all take the same branch."""

    def __init__(self, L: _Loaded, batch_size: int | str):
        self.L, self.batch_size = L, batch_size
        self.pad_id = L.target.tokenizer.pad_token_id or 0
        self.method: str | None = None
        self.early: dict[int, list | None] = {}

    def chosen(self) -> str:
        if self.method is None:
            method, why = (_GRADNORM_METHOD, None) if _GRADNORM_METHOD != "auto" else choose_gradient_method(
                self.L.target.model, self.L.samples.tokens, bos_id=self.L.bos_id, pad_id=self.pad_id)
            if why:
                _warn(f"gradnorm: one backward per sample (slower): {why}")
            self.method = distributed.broadcast_object(method)
        return self.method

    def target_step(self, plain: Callable) -> Callable:
        """A _resumable step of the target pass: `plain` scoring, or with the batched method stats and norms."""
        def step(chunk, advance):
            if self.chosen() != "batched":
                return plain(chunk, advance)
            pos = distributed.shard_indices(len(chunk))  # this rank's positions within the chunk
            stats, norms = score_and_gradient_norms(self.L.target.model, [self.L.samples.tokens[chunk[p]] for p in pos],
                                                    bos_id=self.L.bos_id, on_progress=advance,
                                                    batch_size=self.batch_size, pad_id=self.pad_id)
            self.early[chunk[0]] = distributed.gather_sharded(norms.tolist(), pos, len(chunk))
            return distributed.gather_sharded(stats, pos, len(chunk))
        return step

    def step(self, chunk, advance):
        """A _resumable step of pass 4: the norms the target pass kept, else computed now."""
        if chunk[0] in self.early:
            advance(len(chunk))
            return self.early.pop(chunk[0])
        pos = distributed.shard_indices(len(chunk))
        local = gradient_norms(self.L.target.model, [self.L.samples.tokens[chunk[p]] for p in pos],
                               bos_id=self.L.bos_id, on_progress=advance, method=self.chosen(),
                               batch_size=self.batch_size, pad_id=self.pad_id)
        return distributed.gather_sharded(local.tolist(), pos, len(chunk))


_STAT_FIELDS = {"logprob": np.float32, "hit": bool, "argmax": np.int32, "mean_lp": np.float32, "var_lp": np.float32}


def _to_frame(items: list) -> pd.DataFrame:
    if items and isinstance(items[0], TokenStats):
        return pd.DataFrame({f: [getattr(st, f) for st in items] for f in _STAT_FIELDS})
    return pd.DataFrame({"value": items})


def _from_frame(df: pd.DataFrame) -> list:
    if "value" in df:
        return df["value"].tolist()
    return [TokenStats(**{f: np.asarray(row[f], dtype=t) for f, t in _STAT_FIELDS.items()})
            for row in df.to_dict("records")]


def _resumable(run, name: str, n: int, label: str, compute) -> list | None:
    """Run one pass over n items in chunks of RESUME_CHUNK: compute(chunk_indices, advance) returns the chunk's
    results on rank 0 (None elsewhere). With a run directory each finished chunk is saved under partial/, and a
    resumed run loads the chunks it already has instead of recomputing them."""
    starts = range(0, n, RESUME_CHUNK)
    saved = {s: run.load_partial(f"{name}-{s:09d}") if run is not None else None for s in starts}
    done = distributed.broadcast_object(sorted(s for s, df in saved.items() if df is not None))
    out: list | None = [None] * n if distributed.is_main() else None
    with progress_bar(n, label) as advance:
        for s in starts:
            chunk = list(range(s, min(n, s + RESUME_CHUNK)))
            if s in done:
                if out is not None:
                    out[s:s + len(chunk)] = _from_frame(saved[s])
                advance(len(chunk))
                continue
            got = compute(chunk, advance)
            if out is not None:
                out[s:s + len(chunk)] = got
                if run is not None:
                    run.save_partial(f"{name}-{s:09d}", _to_frame(got))
    return out


# --- attacks and metrics (rank 0) ------------------------------------------------------------------------------

def _attack_scores(s: MiaSettings, L: _Loaded, P: _Passes) -> tuple[pd.DataFrame, dict[str, np.ndarray],
                                                                    DcPddCorpus | None]:
    """samples.parquet's table (id, member, n_tokens, score_<column>), its score columns, and dc_pdd's corpus."""
    tok, scored = L.target.tokenizer, L.samples.scored
    token_log_freq, corpus = L.dcpdd or (None, None)
    inp = AttackInputs(stats=P.stats, scored_tokens=scored, texts=[tok.decode(t) for t in scored],
                       reference_stats=P.ref_stats, recall_stats=P.recall_stats, token_log_freq=token_log_freq,
                       gradnorms=P.gradnorms)
    cols = run_attacks(L.plan.names, inp, L.plan.ks)
    df = pd.DataFrame({"id": L.samples.ids, "member": L.samples.member,
                       "n_tokens": [len(t) for t in scored]} | {f"score_{c}": v for c, v in cols.items()})
    return df, cols, corpus


def _dcpdd_frequencies(s: MiaSettings, tok) -> tuple[np.ndarray, DcPddCorpus]:
    """ln f(v) over the reference corpus (--dcpdd-corpus, else the non-member file), and what it was."""
    path = Path(s.dcpdd_corpus) if s.dcpdd_corpus is not None else Path(s.nonmembers)
    cdocs = load_documents(path, text_field=s.text_field, id_field=s.id_field, token_dtype=s.token_dtype,
                           seq_len=s.seq_len)
    ctoks = cdocs.tokens(tok)  # text tokenized, or stored ids checked against the vocabulary
    return token_log_frequencies(ctoks, len(tok)), DcPddCorpus(
        file=str(path), sha256=file_hash(path), documents=len(cdocs), tokens=int(sum(map(len, ctoks))),
        default_nonmember_file=s.dcpdd_corpus is None, smoothing="Laplace: f(v) = (count(v) + 1) / (N + V)",
        cap_a=DCPDD_CAP)


@dataclass
class _Measured:
    samples: pd.DataFrame  # samples.parquet: one row per document
    windows: pd.DataFrame | None  # windows.parquet (--stride): one row per window
    metrics: dict[str, AttackMetrics]  # per document
    window_metrics: dict[str, AttackMetrics] | None  # per window (--stride)
    collection: CollectionTest | None  # --collection


def _measure_all(s: MiaSettings, smp: _Samples, table: pd.DataFrame, cols: dict[str, np.ndarray]) -> _Measured:
    """Metrics per document (today's table and figures without --stride) and, with --stride, per window; then
    the collection test on the per-sample scores."""
    if not s.whole_document:
        out = _Measured(samples=table, windows=None, metrics=_measure(s, smp.member, cols), window_metrics=None,
                        collection=None)
    else:
        docs, doc_cols = _documents(smp, cols)
        cal_docs, _ = stratified_split(smp.doc_member, s.calibration_fraction, s.seed)  # as _measure splits
        cal = np.flatnonzero(np.isin(smp.doc, cal_docs))  # a document's windows stay on one side
        windows = table.rename(columns={"id": "doc_id"})
        windows.insert(1, "offset", np.asarray(smp.offsets, np.int64))
        out = _Measured(samples=docs, windows=windows, metrics=_measure(s, smp.doc_member, doc_cols),
                        window_metrics={c: _metrics(v, smp.member, n_bootstrap=0, seed=s.seed, cal_idx=cal)
                                        for c, v in cols.items()}, collection=None)
    if s.collection:
        out.collection = _collection(s, smp, cols)
    return out


def _documents(smp: _Samples, cols: Mapping[str, np.ndarray]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """samples.parquet under --stride: per document its windows' count and mean score per column (NaN when its
    windows have none: recall's shot documents)."""
    n_windows = np.bincount(smp.doc, minlength=len(smp.doc_ids))
    means = {c: np.bincount(smp.doc, weights=v, minlength=len(n_windows)) / n_windows for c, v in cols.items()}
    df = pd.DataFrame({"id": smp.doc_ids, "member": smp.doc_member, "n_windows": n_windows,
                       "n_tokens": smp.doc_tokens} | {f"score_{c}": v for c, v in means.items()})
    return df, means


def _collection(s: MiaSettings, smp: _Samples, cols: Mapping[str, np.ndarray]) -> CollectionTest:
    """Dataset inference on the per-sample (per-window) scores: members are the suspect side. dc_pdd with its
    default corpus (the validation file) is left out, and so are documents with an undefined score."""
    left_out: dict[str, str] = {}
    feats = dict(cols)
    if "dc_pdd" in feats and s.dcpdd_corpus is None:
        del feats["dc_pdd"]
        left_out["dc_pdd"] = ("its token frequencies come from the validation file (no --dcpdd-corpus), which "
                              "makes suspect text look rarer: a bias towards 'trained on'")
    finite = np.isfinite(np.column_stack(list(feats.values()))).all(axis=1)
    bad_docs = np.unique(smp.doc[~finite])
    keep = ~np.isin(smp.doc, bad_docs)
    if len(bad_docs):
        left_out["documents"] = (f"{len(bad_docs)} document(s) with an undefined score (recall's shots, whose text "
                                 "is recall's prefix)")
    res = dataset_inference({c: v[keep] for c, v in feats.items()}, smp.member[keep], smp.doc[keep], seed=s.seed)
    res["left_out"] = left_out
    return res


def _measure(s: MiaSettings, member: np.ndarray, cols: Mapping[str, np.ndarray]) -> dict[str, AttackMetrics]:
    cal_idx, _ = stratified_split(member, s.calibration_fraction, s.seed)
    return {c: _metrics(v, member, n_bootstrap=s.bootstrap, seed=s.seed, cal_idx=cal_idx) for c, v in cols.items()}


def _metrics(scores: np.ndarray, member: np.ndarray, *, n_bootstrap: int, seed: int,
             cal_idx: np.ndarray) -> AttackMetrics:
    """AUC (+ bootstrap interval), oracle TPR@FPR on all samples, calibrated figures on the evaluation split.
    Samples with a NaN score (recall's shots) are left out."""
    ok = ~np.isnan(scores)
    s, y = scores[ok], member[ok]
    fpr, tpr, _ = roc_curve(s, y)
    out: dict[str, Any] = {"n_members": int(y.sum()), "n_nonmembers": int((~y).sum()),
                           "auc": roc_auc(s, y)}
    boot = bootstrap_roc(s, y, n=n_bootstrap, seed=seed, fpr_targets=FPR_TARGETS) if n_bootstrap > 0 else {}
    if boot:
        out["auc_ci95"] = boot["auc"]
    out["oracle"] = {}
    for t in FPR_TARGETS:
        key = f"tpr_at_fpr_{t:g}"
        out["oracle"][key] = tpr_at_fpr(fpr, tpr, t)
        if boot:
            out["oracle"][key + "_ci95"] = boot[key]
    out["calibrated"] = _calibrated(scores, member, ok, cal_idx)
    return AttackMetrics(**out)


def _calibrated(scores: np.ndarray, member: np.ndarray, ok: np.ndarray, cal_idx: np.ndarray) -> CalibratedMetrics:
    """Thresholds picked on the calibration split, measured on the evaluation split."""
    keep = np.zeros(len(scores), bool)
    keep[cal_idx] = True
    cal = keep & ok
    ev = ~keep & ok
    cal_s, cal_y, ev_s, ev_y = scores[cal], member[cal], scores[ev], member[ev]
    calib: dict[str, Any] = {"n_calibration": int(cal.sum()), "n_evaluation": int(ev.sum())}
    if cal_y.all() or not cal_y.any() or ev_y.all() or not ev_y.any():
        calib["error"] = "a split lacks members or non-members"
    else:
        for t in FPR_TARGETS:
            m = binary_metrics(ev_s, ev_y, threshold_at_fpr(cal_s, cal_y, t))
            calib[f"at_fpr_{t:g}"] = {"threshold": m["threshold"], "tpr": m["tpr"], "fpr": m["fpr"]}
        calib["max_balanced_accuracy"] = binary_metrics(ev_s, ev_y, threshold_max_balanced_accuracy(cal_s, cal_y))
    return CalibratedMetrics(**calib)


# --- summary and run directory ---------------------------------------------------------------------------------

def _summary(s: MiaSettings, L: _Loaded, P: _Passes, m: _Measured, corpus: DcPddCorpus | None,
             *, seconds: float) -> MiaSummary:
    member = m.samples["member"].to_numpy()  # per document
    out = MiaSummary(
        **summary_header("mia"),
        attacks=m.metrics,
        columns=list(m.metrics),
        skipped_attacks=L.plan.skipped,
        n_members=int(member.sum()), n_nonmembers=int((~member).sum()),
        samples=L.samples.counts,
        overlap=L.overlap,
        windows=_windows_block(s, L),
        bos={"prepended": L.bos_id is not None,
             "scored_tokens": "every token of the sample" if L.bos_id is not None else "all but the first"},
        model_context=L.ctx,
        k_percent=L.plan.ks,
        recall=P.recall_info,
        dc_pdd_corpus=corpus,
        metrics_definition={
            "orientation": "higher score = member; predicted member iff score >= threshold",
            "auc_ci95": f"percentile bootstrap, {s.bootstrap} stratified resamples, seed {s.seed}",
            "oracle": "threshold picked on all samples' own ROC (what peers report)",
            "calibrated": (f"stratified split: {s.calibration_fraction:g} of each class calibrates (seed {s.seed}); "
                           "at_fpr_X: the lowest threshold with FPR <= X on the calibration split; "
                           "max_balanced_accuracy: the threshold maximizing balanced accuracy on it; "
                           "all reported figures are measured on the evaluation split")},
        world_size=distributed.world_size(),
        seconds=seconds,
    )
    if m.window_metrics is not None:
        out["window_attacks"] = m.window_metrics
        out["metrics_definition"]["window_attacks"] = (
            "the same figures with each window as a sample: no bootstrap interval (windows of one document are not "
            "independent); the calibration split is the documents' (each document's windows on one side)")
    if m.collection is not None:
        out["collection"] = m.collection
    return out


def _windows_block(s: MiaSettings, L: _Loaded) -> dict[str, Any]:
    """summary["windows"]: how documents became samples."""
    if s.stride is not None:
        member = L.samples.member
        return {"mode": "stride", "tokens": s.window, "stride": s.stride,
                "member_windows": int(member.sum()), "nonmember_windows": int((~member).sum()),
                "how": (f"every {s.window}-token window starting each {s.stride} tokens (identical windows kept once; "
                        "documents shorter than a window skipped); a document's score is the mean of its windows'")}
    if s.windows_per_doc is not None:
        member = L.samples.member
        return {"mode": "random", "tokens": s.window, "windows_per_doc": s.windows_per_doc, "seed": s.seed,
                "member_windows": int(member.sum()), "nonmember_windows": int((~member).sum()),
                "how": (f"{s.windows_per_doc} {s.window}-token windows per document at distinct starts drawn "
                        "uniformly from a generator seeded with (seed, the document's position); all of them when "
                        "fewer fit (identical windows kept once; documents shorter than a window skipped); a "
                        "document's score is the mean of its windows'")}
    if s.window is not None:
        return {"mode": "window", "tokens": s.window,
                "how": "one window per document: its first N tokens; shorter documents skipped"}
    return {"mode": "document", "max_tokens": L.max_tokens, "how": "whole documents, truncated to the model's context"}


def _write(run: RunDir | None, m: _Measured, summary: MiaSummary) -> Path | None:
    """samples.parquet (windows.parquet with --stride), the figures (named in the summary), summary.json; None
    when nothing is written."""
    if run is None:
        return None
    run.write_samples(m.samples)
    if m.windows is not None:
        run.write_samples(m.windows, "windows.parquet")
    summary["figures"] = _figures(run, m.samples, summary["columns"], m.metrics)
    run.write_summary(summary)
    run.finish()
    return run.path


def _figures(run: RunDir, df: pd.DataFrame, columns: list[str], metrics: Mapping[str, AttackMetrics]) -> list[str]:
    """roc.png, roc_loglog.png and histograms.png."""
    plt = pyplot()

    member = df["member"].to_numpy()
    names = []
    for loglog in (False, True):
        fig, ax = plt.subplots(figsize=(6, 5))
        for c in columns:
            s = df[f"score_{c}"].to_numpy()
            ok = ~np.isnan(s)
            fpr, tpr, _ = roc_curve(s[ok], member[ok])
            ax.plot(fpr, tpr, label=f"{attack_label(c)} (AUC {metrics[c]['auc']:.3f})", drawstyle="steps-post")
        if loglog:
            lo = 1.0 / max(2, int((~member).sum()))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo / 2, 1)
            ax.set_ylim(lo / 2, 1.05)
            ax.plot([lo / 2, 1], [lo / 2, 1], "k:", lw=0.8)
        else:
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false positive rate" + (" (log scale)" if loglog else ""))
        ax.set_ylabel("true positive rate" + (" (log scale)" if loglog else ""))
        ax.set_title("ROC curves, log-log axes (low false-positive rates)" if loglog else "ROC curves")
        ax.legend(fontsize=7, loc="lower right")
        name = "roc_loglog.png" if loglog else "roc.png"
        run.save_figure(fig, name)
        names.append(name)
    cols = min(4, len(columns))
    rows = (len(columns) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, c in zip(axes.flat, columns):
        s = df[f"score_{c}"].to_numpy()
        ok = ~np.isnan(s)
        bins = np.histogram_bin_edges(s[ok], bins=30)
        ax.hist(s[ok & member], bins=bins, alpha=0.6, label="member")
        ax.hist(s[ok & ~member], bins=bins, alpha=0.6, label="non-member")
        ax.set_title(attack_label(c), fontsize=9)
        ax.set_xlabel("score (higher = member)", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Attack scores of members and non-members")
    fig.tight_layout()
    run.save_figure(fig, "histograms.png")
    names.append("histograms.png")
    return names
