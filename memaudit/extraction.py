"""The extraction probe (METHODS.md section 1): prompt with `prefix` tokens, compare the continuation with the
true `suffix` tokens.

Greedy shortcut. A teacher-forced pass over prefix + suffix (the scoring engine, with BOS first when the model
has one, as the trainer trains rows) gives, at every suffix position j, whether the model's argmax given the TRUE
context equals the target (`hit`) and what that argmax is. Greedy decoding reproduces the target up to the first
miss d (there its context is the true context), and emits the pass's argmax at d. So:
  - samples with no miss are exact and need no decoding;
  - the others are decoded only from d on, continuing from the pass's KV cache cropped before position d.
The pass is staged (see `_Stages`): a first pass reads the prefix and the first k0 suffix positions (k0 chosen
per batch by a cost model fed with the first misses seen so far: 1 when samples diverge at once, the whole suffix
when nearly all are memorized); only rows still matching continue, from the cache, to the end. A row that misses
leaves at once, with its cache, for the decoding pool, so a non-memorized sample never pays for teacher forcing
the whole suffix AND decoding it. The pool gathers diverged rows across scoring batches and decodes them
together, each row joining the decoding batch at the step of its own d with its own cache (`gen.greedy_join`):
no token is read twice. A pool holds up to 4x the scoring batch's rows when that fits the same memory
(`_decode_factor`: a decoding row keeps one position's logits, a scoring row the whole window's), so fewer
sequential steps are needed. `shortcut=False` decodes every sample from the prefix instead (verification).

Sampling reports the (n, p)-discoverable extraction of Hayes et al. 2024 (see `_np_columns`).

The entry is `extract(ExtractSettings)`: validate, load, compute, write; `extract_windows` runs the last two on
windows a caller already cut. Documents are text (tokenized here) or stored token ids (.npy, .bin, `input_ids`:
never tokenized; outputs decode the ids, as they always do). Under `torchrun` every rank probes its share of each
chunk of windows, with the same fast paths, and rank 0 gathers the chunk's rows, saves them for --resume and
writes the run: the results equal one process's.
"""
from __future__ import annotations

import collections.abc
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypedDict

import numpy as np
import pandas as pd
import torch

from . import backend
from . import checks
from . import distributed
from . import generation as gen
from .data import (Documents, TokenRows, check_token_options, count_out_of_vocab, decode_rows, file_hash,
                   load_documents, tokenize)
from .devices import check_placement, placement
from .errors import MemauditError
from .figures import pyplot
from .metrics import rouge_l_ids, rouge_l_text, rouge_tokenize
from .models import (LoadedModel, check_trained_first_token, first_token, load_model, record_first_token,
                     weights_hash)
from .progress import progress_bar
from .rundir import RunDir, check_output, summary_header
from .samples import DistinctWindows, Sampling, Windows
from .scoring import ScoredBatch, iter_scored_batches
from .settings import settings_from

DECODINGS = ("greedy", "sample", "beam")
MAX_WINDOW = 1 << 20  # tokens: beyond every model's context (the model's own context is checked on loading)


# --- settings ------------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class DecodingSettings:
    """The options of `memaudit extract` that decode prepared windows: all that `extract_windows` needs.
    ExtractSettings holds them too (it extends this class), so each option and its check has one home."""
    decoding: str = "greedy"  # greedy, sample or beam
    num_beams: int = 4  # beam only
    num_samples: int = 10  # sample only: draws per window (the n of (n, p)-discoverable)
    temperature: float = 1.0  # sample only
    top_k: int = 0  # sample only (0: off)
    top_p: float = 1.0  # sample only (1: off)
    np_threshold: float = 0.5  # sample only: the p of the (n, p)-discoverable rate in summary.json
    batch_size: int | str = "auto"
    bos: bool | None = None  # None: prepend BOS when the tokenizer has one
    shortcut: bool = True  # greedy: decode only diverged windows; sample: draw from the pass's cache
    seed: int = 0  # sample: each window's draws come from (seed, window number); extract: --windows-per-doc starts

    def validate(self) -> None:
        """One MemauditError line for the first bad option."""
        checks.choice("--decoding", self.decoding, DECODINGS)
        checks.integer("--num-beams", self.num_beams, high=1024)
        checks.integer("--num-samples", self.num_samples, high=100_000)
        checks.number("--temperature", self.temperature, low=0, low_open=True)  # greedy is temperature 0
        checks.integer("--top-k", self.top_k, low=0)
        checks.fraction("--top-p", self.top_p, one=True)
        checks.fraction("--np-threshold", self.np_threshold, zero=True, one=True)
        checks.batch_size(self.batch_size)
        checks.seed(self.seed)


@dataclass(kw_only=True)
class ExtractSettings(DecodingSettings):
    """Every option of `memaudit extract`: the CLI flags' names and defaults (the CLI only parses); the decoding
    options come from DecodingSettings."""
    model_dir: str | os.PathLike | LoadedModel  # or a model the caller loaded (device, dtype, allow_pickle and
    # trust_remote_code are then unused)
    data: str | os.PathLike  # documents to probe (.jsonl, .txt, .parquet, .csv; pre-tokenized .npy, .bin, input_ids)
    prefix: int = 32  # prompt tokens
    suffix: int = 32  # target tokens, compared with the continuation
    offset: int = 0  # token position in each document where the window starts (the first window, or --stride's)
    stride: int | None = None  # every window of prefix + suffix tokens, one starting each `stride` tokens
    windows_per_doc: int | None = None  # N windows per document at random starts (seeded by `seed`)
    tail: bool = False  # the last prefix + suffix tokens of each document
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # auto, balanced, cpu-offload: accelerate places the model (None: all on device)
    max_memory: str | None = None  # device_map's limit per device: "0=20GiB,cpu=60GiB", or one size for each
    quantize: str | None = None  # 8bit or 4bit through bitsandbytes (None: full precision)
    limit: int | None = None  # only the first N documents
    text_field: str = "text"
    id_field: str = "id"
    token_dtype: str = "uint16"  # a .bin's token width: uint16 or uint32
    seq_len: int | None = None  # tokens per row a .bin is cut into (needed for a .bin, refused otherwise)
    out: str | os.PathLike | None = None  # None: RunDir.default_out("extract")
    resume: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # Not a CLI flag: False is the Python API's results-only path (no run directory, so no --resume either).
    write: bool = True

    def validate(self) -> None:
        """Cheap checks before anything is loaded (the model's config only): one MemauditError line each."""
        super().validate()
        checks.integer("--prefix", self.prefix, high=MAX_WINDOW)
        checks.integer("--suffix", self.suffix, high=MAX_WINDOW)
        self.sampling().validate()
        checks.limit(self.limit)
        checks.readable_file(self.data)
        check_token_options(self.data, self.token_dtype, self.seq_len)
        # Only write=False refuses --resume: --resume without --out has always started a new default folder.
        if self.resume and not self.write:
            raise MemauditError("--resume needs --out (the run directory to continue)")
        checks.device(self.device)
        check_placement(self.device_map, self.max_memory, self.quantize, self.device)
        checks.dtype(self.dtype)
        ctx = self.model_dir.max_length if isinstance(self.model_dir, LoadedModel) else checks.context_length(
            checks.model_dir(self.model_dir, allow_pickle=self.allow_pickle))
        if ctx is not None and self.prefix + self.suffix > ctx:
            raise MemauditError(f"windows of {self.prefix}+{self.suffix} tokens need {self.prefix + self.suffix} "
                                f"positions but the model's context is {ctx}: use a smaller --prefix/--suffix")

    def sampling(self) -> Sampling:
        """Which windows of each document are probed (samples.Sampling)."""
        return Sampling(offset=self.offset, stride=self.stride, windows_per_doc=self.windows_per_doc,
                        tail=self.tail, seed=self.seed)


# --- what a run returns --------------------------------------------------------------------------------------------

class ExtractSummary(TypedDict, total=False):
    """summary.json of `memaudit extract` (schema rundir.SUMMARY_SCHEMA_VERSION). Rates and means are over the
    windows and None when there is none; the sample-only keys appear with --decoding sample only."""
    schema_version: int  # rundir.SUMMARY_SCHEMA_VERSION
    command: str  # "extract"
    n_samples: int  # windows probed (one per document long enough, duplicates dropped)
    n_skipped: int  # documents shorter than offset + prefix + suffix tokens
    n_duplicates: int  # windows dropped because an identical window came earlier
    exact_rate: float | None  # fraction whose whole suffix came back verbatim (k-extractable)
    n_exact: int
    mean_token_match: float | None  # mean fraction of suffix positions reproduced (Pythia's memorization score)
    mean_match_prefix: float | None  # mean number of correct tokens before the first miss
    mean_rouge_l: float | None  # ROUGE-L F on token ids
    mean_rouge_l_text: float | None  # ROUGE-L F on the decoded text (rouge-score's tokenization)
    prefix: int
    suffix: int
    decoding: str  # greedy, sample or beam
    bos: bool  # whether a first token (BOS, else EOS: models.first_token) was prepended to each window
    n_out_of_vocab_tokens: int  # generated ids beyond the tokenizer's vocabulary, shown as ⟨id N⟩ in `generated`
    num_beams: int  # beam only
    num_samples: int  # sample only: n
    temperature: float  # sample only
    top_k: int  # sample only
    top_p: float  # sample only
    mean_p_hat: float | None  # sample only: mean fraction of the n draws that reproduced the suffix
    mean_p_seq: float | None  # sample only: mean exact probability that one draw reproduces it
    mean_p_extract: float | None  # sample only: mean probability that one of n draws does
    any_exact_rate: float | None  # sample only: fraction with at least one reproducing draw
    np_threshold: float  # sample only: p
    np_discoverable_rate: float | None  # sample only: fraction with p_extract >= p
    sampling: str  # which windows: first, stride, random (--windows-per-doc) or tail
    stride: int  # --stride only
    windows_per_doc: int  # --windows-per-doc only
    n_repeats: int  # whole-document strategies: windows identical to an earlier one, probed once, row copied
    world_size: int  # torchrun processes (1: a plain process), `extract` only
    documents: DocumentsSummary  # per-document aggregates (documents.parquet), `extract` only


class DocumentsSummary(TypedDict):
    """summary.json's `documents` block: the documents read and how much of them came back verbatim."""
    n_documents: int  # documents read (those too short for any window included)
    documents_with_exact: int  # documents with at least one exactly reproduced suffix
    mean_exact_fraction: float | None  # mean over documents with a window of (exact windows / windows)
    reproduced_token_fraction: float | None  # tokens in an exactly reproduced suffix / all tokens of all documents


@dataclass
class ExtractResult:
    summary: ExtractSummary  # exactly what summary.json holds
    path: Path | None  # the run directory (None with write=False)
    samples: pd.DataFrame  # one row per window, in input order (columns: see `extract`)
    documents: pd.DataFrame | None = None  # one row per document (documents.parquet); None from extract_windows


# --- the entry ---------------------------------------------------------------------------------------------------

def extract(settings: ExtractSettings | None = None, /, *, on_batch: Callable[[int], None] | None = None,
            **options: Any) -> ExtractResult | None:
    """Extraction probe: prompt with each window's prefix and compare the continuation with its true suffix.

    Takes an ExtractSettings or its fields as keywords (`extract(model_dir=..., data=...)`). The windows are each
    document's first (at `offset`; identical windows kept once, as ever) or, with `stride`, `windows_per_doc` or
    `tail`, windows across whole documents (every window a row; one identical to an earlier window is probed once
    and its row copied, so each document's coverage counts all its windows). Returns the summary, one row per
    window (`samples`: id, exact, token_match, match_prefix, rouge_l, rouge_l_text, generated, target,
    generated_ids (+ p_hat, any_exact, p_seq, p_extract for sampling), doc_id, offset) and one row per document
    (`documents`, see `document_table`). With `write=True` (the default) it also writes the run directory `out`,
    saving each finished group of windows as it goes so `resume` continues an interrupted run. `on_batch(k)` is
    called after the k-th group is saved (not a setting: a hook for callers). Under torchrun every rank probes its
    share of the windows and rank 0 gathers, measures and writes (a group is then a chunk of windows, saved and
    hooked on rank 0); the other ranks return None.
    """
    s = settings_from(ExtractSettings, settings, options)
    s.validate()
    loaded, corpus, run = _load(s)
    plan = corpus.plan(s.prefix, s.suffix)
    rows, use_bos = _compute(loaded, plan, plan.suffix, s, run, on_batch, total=corpus.n_windows,
                             sharded=distributed.world_size() > 1)
    if not distributed.is_main():  # rank 0 holds every gathered row: it alone measures and writes
        return None
    samples, windows = _assemble(rows, plan, corpus)
    documents = document_table(windows, corpus.ids, corpus.n_tokens, s.prefix, s.suffix)
    whole = corpus.sampling.whole_document
    summary = summarize(samples, s, use_bos, prefix=s.prefix, suffix=s.suffix, n_skipped=plan.n_skipped,
                        n_duplicates=0 if whole else len(plan.repeats))
    summary |= _sampling_keys(corpus.sampling, n_repeats=len(plan.repeats) if whole else 0)
    summary["world_size"] = distributed.world_size()
    summary["documents"] = documents_summary(documents)
    return _write(run, samples, summary, documents=documents, windows=windows if whole else None)


def extract_windows(loaded: LoadedModel, windows: Windows, settings: DecodingSettings | None = None, *,
                    run: RunDir | None = None, on_batch: Callable[[int], None] | None = None) -> ExtractResult:
    """The probe on windows already cut (`samples.make_windows`): `extract` without its loading step, with the
    same samples and summary (the summary's prefix and suffix are the windows'; no documents table).

    With `run`, finished groups are saved as partial results, windows already saved there are skipped (resume),
    and samples.parquet, summary.json and the histograms are written at the end.
    """
    st = settings or DecodingSettings()
    st.validate()
    rows, use_bos = _compute(loaded, [windows], windows.suffix, st, run, on_batch, total=len(windows.ids))
    samples = rows.drop(columns=[c for c in ("index", "doc", "offset") if c in rows])
    summary = summarize(samples, st, use_bos, prefix=windows.prefix, suffix=windows.suffix,
                        n_skipped=windows.n_skipped, n_duplicates=windows.n_duplicates)
    return _write(run, samples, summary)


def format_summary(summary: ExtractSummary) -> str:
    """A few human lines for the terminal."""
    s = summary
    docs = s.get("documents")
    if s.get("sampling", "first") == "first":
        head = (f"{s['n_samples']} samples ({s['n_skipped']} documents too short, {s['n_duplicates']} duplicate "
                f"windows)")
    else:
        how = {"stride": f"every window at stride {s.get('stride')}", "tail": "the last window of each document",
               "random": f"{s.get('windows_per_doc')} random windows per document"}[s["sampling"]]
        head = (f"{s['n_samples']} windows ({how}) of {docs['n_documents'] if docs else '?'} documents "
                f"({s['n_skipped']} too short, {s.get('n_repeats', 0)} repeated windows probed once)")
    lines = [f"{head}, prefix {s['prefix']} + suffix {s['suffix']}, {s['decoding']} decoding",
             f"exact (verbatim suffix): {s['n_exact']}/{s['n_samples']} = {s['exact_rate']:.3f}",
             f"mean token match {s['mean_token_match']:.3f}, ROUGE-L {s['mean_rouge_l']:.3f} "
             f"(text {s['mean_rouge_l_text']:.3f}), mean correct run {s['mean_match_prefix']:.1f} tokens"]
    if s["decoding"] == "sample":
        lines.append(f"(n={s['num_samples']}, p={s['np_threshold']})-discoverable: {s['np_discoverable_rate']:.3f}; "
                     f"mean P(one draw reproduces) {s['mean_p_seq']:.3g}, mean P(any of n) {s['mean_p_extract']:.3g}")
    if docs and s.get("sampling", "first") != "first":
        lines.append(f"documents with an exact suffix: {docs['documents_with_exact']}/{docs['n_documents']}; mean "
                     f"exact fraction {_fmt(docs['mean_exact_fraction'])}; tokens reproduced "
                     f"{_fmt(docs['reproduced_token_fraction'])} (documents.parquet, memorization_map.png)")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# --- load: the model, the documents, the run directory -----------------------------------------------------------

CHUNK_WINDOWS = 8192  # distinct windows in memory at a time (their tokens, and the scoring engine's copies)


@dataclass
class _Corpus:
    """The documents of a run: ids, tokens (an integer array each: texts tokenized into int32, 4 bytes a token, and
    not kept; stored ids as views of their file) and the windows the sampling strategy takes from them."""
    ids: Sequence[str]
    tokens: Sequence[np.ndarray]
    sampling: Sampling
    n_windows: int = 0  # windows the strategy takes, repeated ones included

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)

    def plan(self, prefix: int, suffix: int) -> DistinctWindows:
        """The distinct windows, produced lazily in chunks (samples.DistinctWindows)."""
        stream = self.sampling.windows(self.tokens, self.ids, prefix + suffix)
        return DistinctWindows(stream, prefix, suffix, chunk=CHUNK_WINDOWS, window_ids=self.sampling.whole_document)


def _load(s: ExtractSettings) -> tuple[LoadedModel, _Corpus, RunDir | None]:
    """This rank's model, the documents' tokens (refused when no window fits), and (rank 0) the run directory
    claimed."""
    device = _join(s)
    out = _checked_out(s) if distributed.is_main() else None  # before the model is loaded: a refusal costs nothing
    docs = load_documents(s.data, text_field=s.text_field, id_field=s.id_field, limit=s.limit,
                          token_dtype=s.token_dtype, seq_len=s.seq_len)  # a damaged file fails before the model loads
    loaded = s.model_dir if isinstance(s.model_dir, LoadedModel) else load_model(
        s.model_dir, device=device, dtype=s.dtype, allow_pickle=s.allow_pickle,
        trust_remote_code=s.trust_remote_code, **placement(s))
    if s.decoding != "beam":  # a cache our loops cannot drive: refused before the run directory is claimed
        backend.cache_kind(loaded.model)
    torch.manual_seed(s.seed)
    corpus = _Corpus(docs.ids, _token_arrays(docs, loaded.tokenizer), s.sampling())
    del docs  # the texts: outputs decode the tokens
    corpus.n_windows = corpus.sampling.windows(corpus.tokens, corpus.ids, s.prefix + s.suffix).count()
    if corpus.n_windows == 0:
        where = "offset + prefix + suffix" if corpus.sampling.strategy in ("first", "stride") else "prefix + suffix"
        need = s.prefix + s.suffix + (s.offset if where.startswith("offset") else 0)
        raise MemauditError(f"all {len(corpus.ids)} documents are shorter than {where} = {need} tokens: use a "
                            f"smaller --prefix/--suffix" + ("/--offset" if where.startswith("offset") else ""))
    if out is None:
        return loaded, corpus, None
    inputs = {"model": str(loaded.path), "model_weights_sha256": weights_hash(loaded.path),
              "data": str(s.data), "data_sha256": file_hash(s.data)}
    run = RunDir(out, "extract", _recorded_settings(s, loaded), inputs=inputs, resume=s.resume, overwrite=s.overwrite)
    return loaded, corpus, run


def _join(s: ExtractSettings) -> str:
    """Join torchrun's processes, if any (gloo on CPU, NCCL on CUDA); returns this rank's device (its own GPU)."""
    return distributed.start(s.device, s.model_dir.device if isinstance(s.model_dir, LoadedModel) else None)


def _token_arrays(docs: Documents, tokenizer) -> Sequence[np.ndarray]:
    """Each document's tokens as an integer array: stored ids checked against the vocabulary and left in their
    file (a memory-mapped row is read where windows are cut), or the texts tokenized."""
    if docs.pretokenized:
        docs.tokens(tokenizer)  # refuses an id outside the vocabulary, naming its row
        return _RowArrays(docs.rows)
    return _tokenized(tokenizer, docs.texts)


class _RowArrays(collections.abc.Sequence):
    """Stored token rows as numpy views (TokenRows' items are lists): nothing is copied until a window is cut."""

    def __init__(self, rows: TokenRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.rows.row(range(len(self.rows))[i])  # an IndexError past the end ends iteration


def _tokenized(tokenizer, texts: Sequence[str], chunk: int = 1024) -> list[np.ndarray]:
    """Each text's tokens as one int32 array, tokenized `chunk` documents at a time: Python lists of ints (about
    ten times larger) never exist for the whole corpus at once."""
    out: list[np.ndarray] = []
    for a in range(0, len(texts), chunk):
        out.extend(np.asarray(t, dtype=np.int32) for t in tokenize(tokenizer, list(texts[a:a + chunk])))
    return out


def _checked_out(s: ExtractSettings) -> str | os.PathLike | None:
    """The run directory to write (None with write=False), refused now if it may not be written."""
    if not s.write:
        return None
    out = s.out if s.out is not None else RunDir.default_out("extract")
    model_path = s.model_dir.path if isinstance(s.model_dir, LoadedModel) else s.model_dir
    check_output(out, "extract", inputs=[model_path, s.data], resume=s.resume, overwrite=s.overwrite)
    return out


def _recorded_settings(s: ExtractSettings, loaded: LoadedModel) -> dict[str, Any]:
    """config.json's `settings`, key for key as earlier versions recorded them (--resume compares this dict;
    batch_size and the number of torchrun processes are left out, so a resumed run may use others). The sampling
    and .bin options are None when unused (tail too), so a run recorded before they existed still resumes."""
    keys = ("prefix", "suffix", "offset", "decoding", "num_beams", "num_samples", "temperature", "top_k", "top_p",
            "np_threshold", "bos", "shortcut", "seed", "limit", "text_field", "id_field")
    return ({k: getattr(s, k) for k in keys} | {"dtype": str(loaded.dtype)}
            | {"stride": s.stride, "windows_per_doc": s.windows_per_doc, "tail": True if s.tail else None}
            | {"seq_len": s.seq_len, "token_dtype": s.token_dtype if s.seq_len is not None else None}
            | {"quantize": s.quantize})  # quantized weights give other numbers; placement gives the same


# --- compute: every window's result row, then the summary --------------------------------------------------------

def _compute(loaded: LoadedModel, chunks: Iterable[Windows], suffix: int, st: DecodingSettings, run: RunDir | None,
             on_batch: Callable[[int], None] | None, total: int, sharded: bool = False) -> tuple[pd.DataFrame, bool]:
    """Every distinct window's result row, in window order with its number (`index`), and whether BOS was
    prepended. The windows come chunk by chunk (one chunk's tokens in memory at a time); the choice of the first
    verification stage learns across chunks. `sharded` (under torchrun): each rank probes its share of every
    chunk's windows still to do, and rank 0 gathers the chunk's rows and saves them as one group; the other
    ranks return no rows. Every rank walks the same chunks, so the gathers meet."""
    results = _Results(run, on_batch, sharded)
    stages = _Stages(suffix)
    for f in results.frames:  # resume: what the finished windows showed
        stages.record(f["match_prefix"].to_numpy())
    use_bos = False
    with progress_bar(total - len(results.done) if distributed.is_main() else 0, "extract") as advance:
        for windows in chunks:
            job = _Job.prepare(loaded, windows, st)
            use_bos = job.bos_id is not None
            if run is not None and "first_token" not in run.config:
                record_first_token(run, loaded.tokenizer, job.bos_id)
            if not sharded:
                for rows in _finished_groups(job, results, stages):
                    results.save(rows, advance)
                continue
            others = job.others_share(results.done)
            results.save_gathered([r for rows in _finished_groups(job, results, stages, others) for r in rows],
                                  advance)
    return results.frame(), use_bos


def _assemble(rows: pd.DataFrame, plan: DistinctWindows, corpus: _Corpus) -> tuple[pd.DataFrame, pd.DataFrame]:
    """samples.parquet's rows, with doc_id and offset last, and every window's (doc, offset, exact, rouge_l), the
    documents table's input. A repeated window (identical to an earlier one) counts for its document with its
    first's result: whole-document strategies also list it as a row of its own (a copy with its own id, doc_id
    and offset), the first window keeps each distinct window once, as it always did."""
    assert (rows["index"].to_numpy() == np.arange(len(rows))).all(), "a row for every distinct window, once"
    rows = _with_positions(rows, plan)
    rep = np.asarray(plan.repeats, dtype=np.int64).reshape(-1, 3)
    copies = rows.iloc[rep[:, 2]].assign(doc=rep[:, 0], offset=rep[:, 1])
    windows = pd.concat([rows[list(_WINDOW_KEYS)], copies[list(_WINDOW_KEYS)]], ignore_index=True)
    samples = rows
    if corpus.sampling.whole_document and len(copies):
        copies["id"] = [f"{corpus.ids[d]}@{o}" for d, o in rep[:, :2]]
        samples = pd.concat([rows, copies]).sort_values(["doc", "offset"], kind="stable")
    samples = samples.assign(doc_id=[corpus.ids[d] for d in samples["doc"]])
    cols = [c for c in samples.columns if c not in ("index", "doc", "doc_id", "offset")] + ["doc_id", "offset"]
    return samples[cols].reset_index(drop=True), windows


_WINDOW_KEYS = ("doc", "offset", "exact", "rouge_l")


def _with_positions(rows: pd.DataFrame, plan: DistinctWindows) -> pd.DataFrame:
    """Rows with every window's document and offset: rows saved by a version that kept neither (a run resumed
    across an upgrade) get them from the windows, cut again."""
    if "doc" in rows and not rows["doc"].isna().any():
        return rows
    docs, offsets = [], []
    for w in plan:
        docs += w.docs
        offsets += w.offsets
    index = rows["index"].to_numpy(dtype=np.int64)
    return rows.assign(doc=np.asarray(docs, dtype=np.int64)[index], offset=np.asarray(offsets, dtype=np.int64)[index])


@dataclass
class _Job:
    """What every decoding step reads: the model, the windows (`W` [n, P + S] tokens) and how they are fed."""
    model: torch.nn.Module
    tok: Any
    W: np.ndarray
    ids: list[str]
    P: int
    S: int
    bos_id: int | None  # prepended to every window when not None
    pad_id: int
    max_length: int
    st: DecodingSettings
    windows: Windows  # the chunk: `base` numbers its first window; docs and offsets, when known, go into the rows

    @classmethod
    def prepare(cls, loaded: LoadedModel, windows: Windows, st: DecodingSettings) -> _Job:
        tok = loaded.tokenizer
        first = first_token(tok) if st.bos is not False else None  # the trainer's convention: BOS, else EOS
        if st.bos and first is None:
            raise MemauditError("--bos was asked for but the tokenizer has neither a BOS nor an EOS token")
        check_trained_first_token(loaded, first)
        # our own loops drive the model's cache (beam: HF generate): refused up front when they cannot; a state-space
        # model's teacher-forced scan is not its step-by-step decoding to the last bit, so it decodes every window
        if st.decoding != "beam" and backend.cache_kind(loaded.model) == "recurrent" and st.shortcut:
            st = replace(st, shortcut=False)
        P, S, b = windows.prefix, windows.suffix, int(first is not None)
        positions = P + S - 1 + b
        if positions > loaded.max_length:
            raise MemauditError(f"windows of {P}+{S} tokens{' after BOS' if b else ''} need {positions} positions "
                                f"but the model's context is {loaded.max_length}: use a smaller --prefix/--suffix")
        return cls(model=loaded.model, tok=tok, W=windows.tokens, ids=windows.ids, P=P, S=S,
                   bos_id=first,
                   pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, max_length=loaded.max_length, st=st,
                   windows=windows)

    @property
    def b(self) -> int:
        return 1 if self.bos_id is not None else 0

    @property
    def sbase(self) -> int:
        """The input position (= stats index) that predicts suffix token 0."""
        return self.P - 1 + self.b

    def batches(self, skip: set[int], **pass_kw: Any) -> Iterator[ScoredBatch]:
        """The scoring pass over the windows not in `skip`, in length-sorted batches."""
        return iter_scored_batches(self.model, self.W, batch_size=self.st.batch_size, bos_id=self.bos_id,
                                   pad_id=self.pad_id, skip=skip, max_length=self.max_length, **pass_kw)

    def prompts(self, indices: Sequence[int]) -> torch.Tensor:
        return _with_bos(self.W[indices, : self.P], self.bos_id)

    def records(self, indices: Sequence[int], generated: np.ndarray, **kw: Any) -> list[dict]:
        """Result rows of the chunk's windows `indices`, numbered as the run's windows (`index`)."""
        rows = _records(indices, generated, self.W[indices, self.P:], self.tok, self.ids, **kw)
        w = self.windows
        for row, i in zip(rows, indices):
            row["index"] = w.base + int(i)
            if w.docs is not None:
                row["doc"], row["offset"] = w.docs[i], w.offsets[i]
        return rows

    def skipped(self, done: set[int]) -> set[int]:
        """The chunk's windows among `done` (run numbers), as chunk positions."""
        base = self.windows.base
        return {i - base for i in done if base <= i < base + len(self.W)}

    def others_share(self, done: set[int]) -> set[int]:
        """Under torchrun: the chunk's windows still to do that other ranks take (chunk positions); the ranks
        share what is left, so a resumed run stays balanced."""
        skip = self.skipped(done)
        todo = [i for i in range(len(self.W)) if i not in skip]
        return set(todo) - set(distributed.shard_todo(todo))


class _Results:
    """Finished result rows: each group is saved as a partial result of the run directory (so --resume skips
    its windows), or kept in memory without one. `sharded`: under torchrun, where rank 0 alone holds the run
    directory and every rank learns from it which windows are done."""

    def __init__(self, run: RunDir | None, on_batch: Callable[[int], None] | None, sharded: bool = False):
        self.run, self.on_batch = run, on_batch
        self.frames: list[pd.DataFrame] = run.load_partials() if run is not None else []
        done = {int(i) for f in self.frames for i in f["index"]}  # windows saved by an earlier run
        self.done: set[int] = distributed.broadcast_object(done) if sharded else done
        self.n_partials = len(self.frames)
        self.records: list[dict] = []  # rows without a run directory (a DataFrame is built once, at the end)

    def save(self, rows: list[dict], advance: Callable[[int], None]) -> None:
        if not rows:
            return
        if self.run is not None:
            df = pd.DataFrame(rows)
            self.run.save_partial(f"{self.n_partials:06d}", df)
            self.frames.append(df)
        else:
            self.records.extend(rows)
        self.n_partials += 1
        advance(len(rows))
        if self.on_batch is not None:
            self.on_batch(self.n_partials)

    def save_gathered(self, rows: list[dict], advance: Callable[[int], None]) -> None:
        """Under torchrun: every rank's rows of one chunk, gathered to rank 0 and saved there as one group, in
        the windows' order (the other ranks keep nothing)."""
        parts = distributed.gather_object(rows)
        if parts is not None:
            self.save(sorted((r for part in parts for r in part), key=lambda r: r["index"]), advance)

    def frame(self) -> pd.DataFrame:
        """Every row, in the windows' order, with its number (`index`)."""
        parts = self.frames + ([pd.DataFrame(self.records)] if self.records else [])
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=_COLUMNS)
        return df.sort_values("index", kind="stable").reset_index(drop=True)


def _finished_groups(job: _Job, results: _Results, stages: _Stages,
                     others: set[int] = frozenset()) -> Iterator[list[dict]]:
    """The result rows each scoring batch of the chunk finishes (and, for the shortcut, the last decoding pool);
    windows done before and those in `others` (other ranks' share) are skipped."""
    st, skip = job.st, job.skipped(results.done) | others
    if st.decoding == "greedy" and st.shortcut:
        yield from _Shortcut(job, stages).run(skip)
    elif st.decoding == "sample":  # the pass gives ln p of the targets, and (shortcut) the cache to draw from
        for batch in job.batches(skip, greedy_only=False, keep_cache=st.shortcut):
            yield _sample_records(job, batch, backend.kv_from_cache(batch.cache) if st.shortcut else None)
    else:  # beam, or plain greedy (verification): the pass only batches the windows, so it reads nothing
        for batch in job.batches(skip, greedy_only=True, keep_cache=False, max_positions=1):
            if st.decoding == "greedy":
                out = gen.greedy(job.model, job.prompts(batch.indices), job.S)
            else:
                out = gen.beam_search(job.model, job.prompts(batch.indices), job.S, st.num_beams, job.pad_id)
            yield job.records(batch.indices, out.cpu().numpy())


def _with_bos(ctx: np.ndarray, bos_id: int | None) -> torch.Tensor:
    t = torch.as_tensor(ctx, dtype=torch.long)
    if bos_id is not None:
        t = torch.cat([torch.full((len(t), 1), bos_id, dtype=torch.long), t], dim=1)
    return t


# --- per-sample metrics ---------------------------------------------------------------------------------------

def sample_metrics(generated: np.ndarray, target: np.ndarray) -> dict:
    """exact (Carlini 2023 k-extractable), token_match (Pythia's memorization score), match_prefix, rouge_l."""
    eq = generated == target
    miss = np.flatnonzero(~eq)
    return {"exact": bool(eq.all()), "token_match": float(eq.mean()),
            "match_prefix": int(miss[0]) if len(miss) else int(len(target)),
            "rouge_l": rouge_l_ids(target, generated)}


_COLUMNS = ["index", "id", "exact", "token_match", "match_prefix", "rouge_l", "rouge_l_text", "generated", "target",
            "generated_ids", "out_of_vocab"]


def _records(indices: Sequence[int], generated: np.ndarray, targets: np.ndarray, tokenizer, ids: Sequence[str],
             extra: dict[str, np.ndarray] | None = None, reproduced: bool = False) -> list[dict]:
    """One result row per sample (plain dicts: a DataFrame is built once per saved group, not per batch).
    `reproduced`: the generated suffixes are the targets themselves, so their text is decoded once."""
    tgt_text = decode_rows(tokenizer, targets.tolist())  # ids beyond the tokenizer show as ⟨id N⟩, counted
    gen_text = tgt_text if reproduced else decode_rows(tokenizer, generated.tolist())
    oov = count_out_of_vocab(tokenizer, generated)
    rows = []
    S = targets.shape[1]
    for k, i in enumerate(indices):
        if reproduced:  # identical sequences: the metrics' values are known exactly (LCS = the whole sequence)
            m = {"exact": True, "token_match": 1.0, "match_prefix": int(S), "rouge_l": 1.0 if S else 0.0}
            rl_text = 1.0 if rouge_tokenize(tgt_text[k]) else 0.0
        else:
            m = sample_metrics(generated[k], targets[k])
            rl_text = rouge_l_text(tgt_text[k], gen_text[k])
        row = {"index": int(i), "id": ids[i], **m, "rouge_l_text": rl_text,
               "generated": gen_text[k], "target": tgt_text[k],
               "generated_ids": generated[k].astype(np.int32),  # compact: 4 bytes a token
               "out_of_vocab": int(oov[k])}
        for name, values in (extra or {}).items():
            row[name] = values[k]
        rows.append(row)
    return rows


# --- the greedy shortcut: staged verification and the decoding pool --------------------------------------------

# Staged verification. The first pass reads the prefix and the first k0 suffix positions; rows that miss there
# leave at once for decoding (a non-memorized sample then costs about what plain decoding costs), the others are
# checked to the end in one continuation pass from the cache. k0 is chosen per batch to minimize the expected
# cost, in row-tokens of teacher forcing: B (k0 - 1) read by the first pass past the prefix, B P(d >= k0)
# (S - k0) read by the continuation, and _FORWARD_COST per forward (the continuation runs when any row survives),
# with the distribution of first misses d estimated from the samples done so far. Mostly memorized data then
# gets one full pass per batch, non-memorized data a pass that stops right after the prefix. The choice only
# changes how the work is cut (greedy tokens are the same, up to float rounding at exact ties of the logits, as
# between any two batchings; the tests compare with plain decoding and HF generate).
_FORWARD_COST = 64
_FIRST_STAGES = (1, 2, 4, 8, 16)


@dataclass
class _Stages:
    """Counts of first misses so far (index S: none) and the per-batch choice of the first stage's length."""
    S: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.S + 1)
        self.counts[[0, self.S]] = 0.5  # prior: half diverge at once, half are memorized

    def first_stage(self, rows: int) -> int:
        S = self.S
        p = self.counts / self.counts.sum()
        survive = 1.0 - np.cumsum(p)  # survive[k - 1] = P(d >= k)
        best, best_cost = S, rows * (S - 1) + _FORWARD_COST  # one full pass
        for k0 in _FIRST_STAGES:
            if k0 >= S:
                break
            cont = 1.0 - (1.0 - survive[k0 - 1]) ** rows  # P(some row survives the first stage)
            cost = rows * (k0 - 1) + rows * survive[k0 - 1] * (S - k0) + _FORWARD_COST * (1.0 + cont)
            if cost < best_cost:
                best, best_cost = k0, cost
        return best

    def record(self, first_miss: np.ndarray) -> None:
        np.add.at(self.counts, np.minimum(np.asarray(first_miss, dtype=np.int64), self.S), 1.0)


@dataclass
class _Pool:
    """Diverged rows waiting for decoding, in groups: `d` (first miss, a suffix position), `indices` (samples),
    `tok` (the pass's argmax at d = the greedy token there), `kv` (their cache over the context before d), and,
    only without a sliceable cache, `argmax` [k, S] (the pass's argmax at every suffix position)."""
    chunks: list[dict] = field(default_factory=list)
    size: int = 0

    def add(self, chunk: dict) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk["indices"])


class _Shortcut:
    """Greedy decoding by the shortcut: each scoring batch is verified in stages, its exact rows are done, its
    diverged rows join the pool, which is decoded once it holds a decoding group's rows, and at the end."""

    def __init__(self, job: _Job, stages: _Stages):
        self.job = job
        probe = job.bos_id if job.bos_id is not None else int(job.W[0, 0]) if len(job.W) else 0
        self.sliceable = _cache_is_sliceable(job.model, probe)
        self.stages = stages  # the first misses seen so far, in this chunk and earlier ones
        self.pool = _Pool()
        self.factor = _decode_factor(job.model, job.P + job.S)

    def run(self, skip: set[int]) -> Iterator[list[dict]]:
        """The rows finished after each scoring batch, then the last pool's."""
        job, pool = self.job, self.pool
        decode_batch = 0  # pool rows that make a decoding group
        for batch in self._batches(skip):
            decode_batch = max(decode_batch, len(batch.indices) * self.factor)
            exact_rows, first_miss = _verify_batch(job, batch, self.sliceable, pool)
            self.stages.record(first_miss)
            exact = [batch.indices[r] for r in exact_rows]
            del batch  # its cache, before the pool is decoded
            rows = job.records(exact, job.W[exact, job.P:], reproduced=True) if exact else []
            if pool.size >= decode_batch:
                rows += _greedy_records(job, pool)
            yield rows
        if pool.size:
            yield _greedy_records(job, pool)

    def _batches(self, skip: set[int]) -> Iterator[ScoredBatch]:
        # the first stage reads BOS + prefix + k0 - 1 suffix tokens (predicting k0), logits only from the suffix
        # on; without a sliceable cache a continuation would re-read everything, so then it reads it all at once
        sbase, stages = self.job.sbase, self.stages
        stop = (lambda rows: sbase + stages.first_stage(rows)) if self.sliceable else sbase + self.job.S
        return self.job.batches(skip, greedy_only=True, keep_cache=self.sliceable, score_from=sbase,
                                max_positions=stop)


def _cache_is_sliceable(model, token: int) -> bool:
    """Whether the model's KV cache is a plain per-layer history we can crop and join (one 1-token forward)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True)
    return backend.kv_from_cache(backend.output_cache(out)) is not None


def _decode_factor(model, window: int) -> int:
    """How many times more rows a decoding group may hold than a scoring batch at equal memory: a scoring row
    holds the window's KV cache and ~4 vocabulary-sized float32 temporaries per position, a decoding row the same
    cache and one position's logits. Capped at 4 (larger groups stop paying off); 1 for large models."""
    vocab, width, layers = backend.dimensions(model)
    cache = 2 * layers * width * window
    return int(max(1, min(4, (cache + 4 * vocab * window) // (cache + vocab))))


@dataclass
class _Verification:
    """One scoring batch under staged verification (batch rows; `idx`: their samples)."""
    idx: np.ndarray
    targets: np.ndarray  # [n, S] the true suffixes
    argmax: np.ndarray  # [n, S] the pass's argmax at the suffix positions read so far, -1 beyond
    first_miss: np.ndarray  # [n] each row's first miss, S when none (yet)
    rows: np.ndarray  # batch rows still matching; rows[j] is row j of `cache`
    cache: Any  # the model's cache over the positions read so far


def _verify_batch(job: _Job, batch: ScoredBatch, sliceable: bool, pool: _Pool) -> tuple[np.ndarray, np.ndarray]:
    """Finish the staged verification of one scoring batch (its pass read the suffix up to some k0): rows that
    miss go to `pool` with their cache, the others continue teacher-forced from the cache to the end. Returns
    the batch rows (positions in `batch.indices`) that reproduce the whole suffix, and every row's first miss
    (S when none)."""
    S, sbase = job.S, job.sbase
    idx = np.asarray(batch.indices)
    n, k0 = len(idx), batch.lengths[0] - sbase
    argmax = np.full((n, S), -1, dtype=np.int64)
    argmax[:, :k0] = np.stack([s.argmax[sbase: sbase + k0] for s in batch.stats])
    v = _Verification(idx=idx, targets=job.W[idx, job.P:], argmax=argmax, first_miss=np.full(n, S),
                      rows=np.arange(n), cache=batch.cache)
    _settle(job, v, 0, k0, sliceable, pool)
    if k0 < S and len(v.rows):  # the continuation: the survivors, from their cache, to the end of the suffix
        assert sliceable, "a first stage short of the suffix needs a sliceable cache"
        _continue(job, v, k0)
        _settle(job, v, k0, S, sliceable, pool)
    return v.rows, v.first_miss


def _settle(job: _Job, v: _Verification, done: int, end: int, sliceable: bool, pool: _Pool) -> None:
    """Check suffix positions [done, end) of the rows still matching: those that miss leave for `pool`, grouped
    by their first miss d, each with its cache cropped before d; the survivors keep theirs."""
    hit = v.argmax[v.rows, done:end] == v.targets[v.rows, done:end]
    ok = hit.all(1)
    if ok.all():
        return
    kv = backend.kv_from_cache(v.cache) if sliceable else None
    j_miss = np.flatnonzero(~ok)
    d = done + np.argmin(hit[j_miss], axis=1)
    v.first_miss[v.rows[j_miss]] = d
    for dv in np.unique(d):
        js = j_miss[d == dv]
        r = v.rows[js]
        chunk = {"indices": v.idx[r].tolist(), "d": int(dv), "tok": v.argmax[r, dv]}
        if kv is not None:
            chunk["kv"] = backend.select_kv(kv, js.tolist(), job.b + job.P + int(dv))
        else:
            chunk["kv"] = None
            chunk["argmax"] = v.argmax[r]
        pool.add(chunk)
    v.rows = v.rows[ok]
    if len(v.rows) and end < job.S and kv is not None:  # the survivors' cache, for the continuation
        v.cache = backend.cache_from_kv(backend.select_kv(kv, np.flatnonzero(ok).tolist(), job.sbase + end))


def _continue(job: _Job, v: _Verification, done: int) -> None:
    """Teacher-force the surviving rows from their cache through the rest of the suffix (only its tokens)."""
    ix = v.idx[v.rows]
    W = job.W
    feed = W[ix, :-1] if job.bos_id is None else np.concatenate([np.full((len(ix), 1), job.bos_id), W[ix, :-1]],
                                                                 axis=1)
    x = torch.as_tensor(feed[:, job.sbase + done:], device=next(job.model.parameters()).device)
    with torch.inference_mode():
        logits, v.cache = backend.forward(job.model, x, v.cache, last_only=False)
    v.argmax[v.rows, done:] = logits.argmax(-1).cpu().numpy()


def _greedy_records(job: _Job, pool: _Pool) -> list[dict]:
    indices, generated = _flush(job, pool)
    return job.records(indices, generated)


def _flush(job: _Job, pool: _Pool) -> tuple[list[int], np.ndarray]:
    """Decode every pooled row from its own divergence point; returns (indices, generated [n, S])."""
    W, P, S = job.W, job.P, job.S
    indices = [i for c in pool.chunks for i in c["indices"]]
    if all(c["kv"] is not None for c in pool.chunks):
        # each group joins the decoding batch at its own step, with its own cache: nothing is read twice
        outs = gen.greedy_join(job.model, [(c["d"], c["kv"], torch.as_tensor(c["tok"])) for c in pool.chunks], S)
        generated = np.concatenate([
            np.concatenate([W[c["indices"], P: P + c["d"]], o[:, c["d"]:].cpu().numpy()], axis=1)
            for c, o in zip(pool.chunks, outs)])
    else:  # no reusable cache: read the context up to the pool's first divergence point again
        d = torch.tensor(np.concatenate([np.full(len(c["indices"]), c["d"]) for c in pool.chunks]))
        argmax = torch.tensor(np.concatenate([c["argmax"] for c in pool.chunks]))
        d0 = int(d.min())
        ctx = _with_bos(W[indices, : P + d0], job.bos_id)
        tail = gen.greedy(job.model, ctx, S - d0, forced=argmax[:, d0:], n_forced=d - d0 + 1)
        generated = np.concatenate([W[indices, P: P + d0], tail.cpu().numpy()], axis=1)
    pool.chunks.clear()
    pool.size = 0
    return indices, generated


# --- sampling: (n, p)-discoverable extraction -------------------------------------------------------------------

def _sample_records(job: _Job, batch: ScoredBatch, kv) -> list[dict]:
    """n draws per sample from the pass's cache over the prefix (`kv`; None: read the prompt again); metrics on
    the first draw; (n, p) columns."""
    st, W, P, S, idx = job.st, job.W, job.P, job.S, batch.indices
    n = st.num_samples
    targets = torch.as_tensor(W[idx, P:], dtype=torch.long)
    if kv is not None:
        base = backend.crop_kv(kv, job.b + P - 1)
        feed = torch.as_tensor(W[idx, P - 1: P], dtype=torch.long)  # the last prefix token, read again for its logits
    else:
        base, feed = None, job.prompts(idx)
    past = backend.cache_from_kv(backend.repeat_kv(base, n)) if base is not None else None
    numbers = [job.windows.base + i for i in idx]  # the run's window numbers: chunking changes no draw
    draws = gen.sample(job.model, feed.repeat_interleave(n, 0), S, _uniforms(st.seed, numbers, n, S), past=past,
                       temperature=st.temperature, top_k=st.top_k, top_p=st.top_p).cpu().numpy().reshape(len(idx), n, S)
    exact_per_draw = (draws == targets.numpy()[:, None, :]).all(-1)
    extra = _np_columns(exact_per_draw, _log_p_seq(job, batch, base, feed, targets), n)
    return job.records(idx, draws[:, 0], extra=extra)


def _log_p_seq(job: _Job, batch: ScoredBatch, base, feed: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """ln of the sampler's probability of each whole target suffix given its prefix."""
    st = job.st
    if st.temperature == 1.0 and st.top_k == 0 and st.top_p == 1.0:
        # the untransformed sampler: the scoring pass already holds ln p of every target token
        sb = job.sbase
        return np.array([float(s.logprob[sb: sb + job.S].astype(np.float64).sum()) for s in batch.stats])
    past = backend.cache_from_kv(base) if base is not None else None
    return gen.sequence_logprob(job.model, feed, targets, past=past, temperature=st.temperature,
                                top_k=st.top_k, top_p=st.top_p).cpu().numpy()


def _np_columns(exact_per_draw: np.ndarray, log_p_seq: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Hayes et al. 2024, (n, p)-discoverable extraction, per sample:
    - p_seq: the exact probability that ONE draw of the sampler reproduces the target, the product over suffix
      positions of the sampler's (temperature / top-k / top-p processed) probability of the target token given
      the true context (one teacher-forced pass; no Monte-Carlo error);
    - p_extract: the probability that at least one of n independent draws reproduces it, 1 - (1 - p_seq)^n;
      the sample is (n, p)-discoverably extracted when p_extract >= p;
    - p_hat: the empirical fraction of the n actual draws that reproduced it (an unbiased estimate of p_seq,
      reported as a check), and any_exact: whether at least one of them did.
    """
    p_seq = np.exp(log_p_seq)
    p_extract = -np.expm1(n * np.log1p(-np.minimum(p_seq, 1.0 - 1e-16)))
    p_extract = np.where(p_seq >= 1.0 - 1e-16, 1.0, p_extract)
    return {"p_hat": exact_per_draw.mean(1), "any_exact": exact_per_draw.any(1), "p_seq": p_seq,
            "p_extract": p_extract}


def _uniforms(seed: int, indices: Sequence[int], n: int, S: int) -> torch.Tensor:
    """Each sample's own random numbers, from (seed, sample index): batching and resume cannot change them."""
    return torch.from_numpy(np.concatenate([np.random.default_rng([seed, int(i)]).random((n, S)) for i in indices]))


# --- documents: how much of each document came back verbatim ----------------------------------------------------

_DOC_COLUMNS = ["id", "n_tokens", "n_windows", "n_exact", "exact_fraction", "reproduced_tokens",
                "longest_reproduced_run", "mean_rouge_l"]


def document_table(windows: pd.DataFrame, ids: Sequence[str], n_tokens: Sequence[int], prefix: int,
                   suffix: int) -> pd.DataFrame:
    """One row per document (documents.parquet) from every window's `doc` (the document's position), `offset`,
    `exact` and `rouge_l`: n_windows, n_exact, exact_fraction (n_exact / n_windows; NaN without a window),
    reproduced_tokens (tokens inside at least one exactly reproduced suffix, i.e. [offset + prefix, offset +
    prefix + suffix) of an exact window), longest_reproduced_run (the longest stretch of such tokens with no gap)
    and mean_rouge_l. A document's first `prefix` tokens are only ever prompt, so they never count."""
    n_docs = len(ids)
    doc = windows["doc"].to_numpy(dtype=np.int64)
    exact = windows["exact"].to_numpy(dtype=bool)
    n_windows = np.bincount(doc, minlength=n_docs)
    n_exact = np.bincount(doc[exact], minlength=n_docs)
    rouge = np.bincount(doc, weights=windows["rouge_l"].to_numpy(dtype=float), minlength=n_docs)
    reproduced, longest = _coverage(doc[exact], windows["offset"].to_numpy(dtype=np.int64)[exact] + prefix, suffix,
                                    n_docs)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"id": list(ids), "n_tokens": np.asarray(n_tokens, dtype=np.int64),
                             "n_windows": n_windows, "n_exact": n_exact, "exact_fraction": n_exact / n_windows,
                             "reproduced_tokens": reproduced, "longest_reproduced_run": longest,
                             "mean_rouge_l": rouge / n_windows}, columns=_DOC_COLUMNS)


def _coverage(doc: np.ndarray, start: np.ndarray, length: int, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per document, the tokens in the union of the spans [start, start + length) and its longest gapless run.
    Sorted by start within a document, equal-length spans add min(length, start - previous start) new tokens
    each (the previous span ends furthest), and a run breaks where that gap exceeds `length`."""
    order = np.lexsort((start, doc))
    doc, start = doc[order], start[order]
    first = np.r_[True, doc[1:] != doc[:-1]] if len(doc) else np.zeros(0, dtype=bool)
    gap = np.diff(start, prepend=0)
    new = np.where(first, length, np.minimum(gap, length))
    run_starts = first | (gap > length)
    run_len = np.bincount(np.cumsum(run_starts) - 1, weights=new) if len(doc) else np.zeros(0)
    longest = np.zeros(n_docs, dtype=np.int64)
    np.maximum.at(longest, doc[run_starts], run_len.astype(np.int64))
    return np.bincount(doc, weights=new, minlength=n_docs).astype(np.int64), longest


def documents_summary(documents: pd.DataFrame) -> DocumentsSummary:
    """summary.json's `documents` block, from the documents table."""
    probed = documents["n_windows"] > 0
    tokens = int(documents["n_tokens"].sum())
    return {"n_documents": int(len(documents)), "documents_with_exact": int((documents["n_exact"] > 0).sum()),
            "mean_exact_fraction": float(documents.loc[probed, "exact_fraction"].mean()) if probed.any() else None,
            "reproduced_token_fraction": int(documents["reproduced_tokens"].sum()) / tokens if tokens else None}


def _sampling_keys(sampling: Sampling, n_repeats: int) -> dict[str, Any]:
    """summary.json's record of which windows were probed."""
    keys: dict[str, Any] = {"sampling": sampling.strategy}
    if sampling.stride is not None:
        keys["stride"] = sampling.stride
    if sampling.windows_per_doc is not None:
        keys["windows_per_doc"] = sampling.windows_per_doc
    return keys | {"n_repeats": n_repeats}


# --- the summary and the run directory --------------------------------------------------------------------------

def summarize(df: pd.DataFrame, st: DecodingSettings, use_bos: bool, *, prefix: int, suffix: int, n_skipped: int,
              n_duplicates: int) -> ExtractSummary:
    """summary.json's figures over the windows (ExtractSummary), from the result rows."""
    def mean(col: str) -> float | None:
        return float(df[col].mean()) if len(df) else None

    summary: ExtractSummary = {
        **summary_header("extract"),
        "n_samples": int(len(df)), "n_skipped": int(n_skipped),
        "n_duplicates": int(n_duplicates), "exact_rate": mean("exact"),
        "n_exact": int(df["exact"].sum()) if len(df) else 0,
        "mean_token_match": mean("token_match"), "mean_match_prefix": mean("match_prefix"),
        "mean_rouge_l": mean("rouge_l"), "mean_rouge_l_text": mean("rouge_l_text"),
        "prefix": prefix, "suffix": suffix, "decoding": st.decoding, "bos": use_bos,
        "n_out_of_vocab_tokens": int(df["out_of_vocab"].fillna(0).sum()) if "out_of_vocab" in df else 0}
    if st.decoding == "beam":
        summary["num_beams"] = st.num_beams
    if st.decoding == "sample":
        summary |= {"num_samples": st.num_samples, "temperature": st.temperature, "top_k": st.top_k,
                    "top_p": st.top_p, "mean_p_hat": mean("p_hat"), "mean_p_seq": mean("p_seq"),
                    "mean_p_extract": mean("p_extract"), "any_exact_rate": mean("any_exact"),
                    "np_threshold": st.np_threshold,
                    "np_discoverable_rate": float((df["p_extract"] >= st.np_threshold).mean()) if len(df) else None}
    return summary


def _write(run: RunDir | None, samples: pd.DataFrame, summary: ExtractSummary, *,
           documents: pd.DataFrame | None = None, windows: pd.DataFrame | None = None) -> ExtractResult:
    """samples.parquet, documents.parquet, summary.json and the figures (the memorization map when `windows`, every
    window's result, is given); the partial results go once they are written."""
    if run is not None:
        run.write_samples(samples)
        if documents is not None:
            run.write_samples(documents, "documents.parquet")
        run.write_summary(summary)
        _histograms(run, samples, summary["suffix"])
        if documents is not None and windows is not None:
            _memorization_map(run, documents, windows, summary["prefix"], summary["suffix"])
        run.finish()
    return ExtractResult(summary=summary, path=run.path if run is not None else None, samples=samples,
                         documents=documents)


MAP_DOCUMENTS = 100  # rows of the memorization map: the most reproduced documents
MAP_COLUMNS = 1500  # at most this many columns: longer documents are shown a few tokens per column


def _memorization_map(run: RunDir, documents: pd.DataFrame, windows: pd.DataFrame, prefix: int,
                      suffix: int) -> None:
    """One row per document (the most reproduced first), x = token position, colour = the token is inside an
    exactly reproduced suffix (a column's fraction of such tokens when a column holds several); white: past the
    document's end."""
    plt = pyplot()
    top = documents.assign(doc=np.arange(len(documents)))
    top = top[top["n_windows"] > 0].sort_values(["reproduced_tokens", "exact_fraction", "doc"],
                                                 ascending=[False, False, True], kind="stable").head(MAP_DOCUMENTS)
    width = int(top["n_tokens"].max())
    per_col = -(-width // MAP_COLUMNS)
    exact = windows[windows["exact"].to_numpy(dtype=bool)]
    starts = exact.groupby("doc")["offset"].apply(list).to_dict()
    image = np.full((len(top), -(-width // per_col) * per_col), np.nan)
    for r, (d, n) in enumerate(zip(top["doc"], top["n_tokens"])):
        image[r, :n] = 0.0
        for o in starts.get(d, ()):
            image[r, o + prefix: o + prefix + suffix] = 1.0
    if per_col > 1:  # each column: the fraction of its tokens reproduced (NaN where all lie past the end)
        cells = image.reshape(len(top), -1, per_col)
        counts = (~np.isnan(cells)).sum(2)
        image = np.where(counts > 0, np.nansum(cells, 2) / np.maximum(counts, 1), np.nan)
    cmap = plt.matplotlib.colors.LinearSegmentedColormap.from_list("reproduced", ["#e4e4e4", "#b2182b"])
    cmap = cmap.with_extremes(bad="white")  # past a document's end
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.12 * len(top)))
    im = ax.imshow(np.ma.masked_invalid(image), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0,
                   vmax=1.0, extent=(0, image.shape[1] * per_col, len(top), 0))
    ax.set_xlabel("token position in the document")
    ax.set_ylabel("document (most reproduced first)")
    if len(top) <= 30:
        ax.set_yticks(np.arange(len(top)) + 0.5, [str(i)[:24] for i in top["id"]], fontsize=7)
    ax.set_title(f"memorization map: tokens in an exactly reproduced suffix ({len(top)} of {len(documents)} "
                 f"documents" + (f", {per_col} tokens per column" if per_col > 1 else "") + ")", fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.03, label="reproduced" + (" (share of column)" if per_col > 1 else ""))
    if per_col == 1:
        bar.set_ticks([0, 1], labels=["no", "yes"])
    run.save_figure(fig, "memorization_map.png")


def _histograms(run: RunDir, df: pd.DataFrame, S: int) -> None:
    plt = pyplot()

    for col, bins, label in (("rouge_l", np.linspace(0, 1, 21), "ROUGE-L F on token ids (0 to 1)"),
                             ("match_prefix", np.arange(S + 2) - 0.5,
                              "continuation tokens right before the first divergence")):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(df[col].to_numpy(dtype=float), bins=bins, color="#4477aa")
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
        ax.set_title(f"{'ROUGE-L' if col == 'rouge_l' else 'Reach before the first divergence'}, {len(df):,} samples")
        run.save_figure(fig, f"{col}.png")
