"""Code lengths under a model or zstd, and unintended memorization (Morris et al., arXiv 2505.24832).

bits(x | model) = -sum_t log2 p(x_t | x_<t) over every token of x, the first conditioned on the tokenizer's BOS
(EOS when it has no BOS; with neither, the first token is charged log2 V bits, a uniform code). Computed by the
one scoring engine (`memaudit.scoring.score`).
bits(x | zstd) = 8 * len(zstd(utf8(x))) at a fixed level, optionally with a dictionary trained on reference text;
frames carry no checksum, content size or dictionary id, so only the payload is charged.
mem_U(x) = max(0, bits(x | reference) - bits(x | target)).

The samples x are each document whole, cut to the model's context (the default), or windows of `window` tokens
(`samples.Sampling`): each document's first, every window starting each `stride` tokens, or `windows_per_doc` at
seeded random starts. Windows are produced lazily and measured in chunks of CHUNK samples: under torchrun each rank
measures its shard of a chunk and rank 0 gathers it, saves it under partial/ (so --resume skips it) and writes the
run directory. With `stride` or `windows_per_doc`, documents.parquet sums each document's windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence, TypedDict

import numpy as np
import pandas as pd
import zstandard

from . import checks, distributed
from .data import Documents, TokenRows, check_token_options, decode, file_hash, load_documents, read_documents, \
    tokenize
from .devices import check_placement, placement
from .errors import MemauditError
from .figures import pyplot
from .models import LoadedModel, first_token, load_model, tokenizers_match, weights_hash
from .progress import progress_bar
from .rundir import RunDir, check_output, summary_header
from .samples import Samples, Sampling, WindowStream, document_samples
from .scoring import score
from .settings import settings_from

# Samples per measured and saved unit: an interrupted run redoes at most this many, and only this many samples'
# tokens and texts are held at a time. Each unit is one scoring call, so it holds many of the largest batches.
CHUNK = 4096


@dataclass
class ModelCoder:
    """A loaded model as a coder of token sequences; `first_token` says how the first token is coded."""
    loaded: LoadedModel
    batch_size: int | str = "auto"

    @property
    def start_id(self) -> int | None:
        tok = self.loaded.tokenizer
        return first_token(tok)

    @property
    def first_token(self) -> str:
        tok = self.loaded.tokenizer
        if tok.bos_token_id is not None:
            return "conditioned on BOS"
        if tok.eos_token_id is not None:
            return "conditioned on EOS (the tokenizer has no BOS)"
        return "uniform code, log2(V) bits (the tokenizer has neither BOS nor EOS)"

    def bits(self, token_lists: Sequence[Sequence[int]], on_progress=None) -> np.ndarray:
        start = self.start_id
        stats = score(self.loaded.model, token_lists, batch_size=self.batch_size, bos_id=start,
                      pad_id=self.loaded.tokenizer.pad_token_id or 0, on_progress=on_progress,
                      max_length=self.loaded.max_length)
        bits = np.array([s.bits for s in stats], dtype=np.float64)
        if start is None:  # the engine scored tokens 2..n; the first gets a uniform code
            bits += math.log2(len(self.loaded.tokenizer))
        return bits


class ZstdCoder:
    """zstd at a fixed level, optionally with a dictionary trained on reference text."""

    def __init__(self, level: int = 19, dict_texts: Sequence[str] | None = None, dict_size: int = 16384):
        if not 1 <= level <= 22:
            raise MemauditError(f"--zstd-level must be between 1 and 22, not {level}")
        self.level = level
        self.dictionary = None
        if dict_texts is not None:
            samples = [t.encode("utf-8") for t in dict_texts if t]
            try:
                self.dictionary = zstandard.train_dictionary(dict_size, samples, level=level)
            except zstandard.ZstdError as exc:
                raise MemauditError(f"cannot train a zstd dictionary from the --zstd-dict-from text ({exc}); "
                                    "give more or longer documents") from None
        params = dict(level=level, write_checksum=False, write_content_size=False, write_dict_id=False)
        self._compressor = zstandard.ZstdCompressor(dict_data=self.dictionary, **params)

    def bits(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([8.0 * len(self._compressor.compress(t.encode("utf-8"))) for t in texts])

    def describe(self) -> str:
        d = f", dictionary of {len(self.dictionary.as_bytes())} bytes" if self.dictionary is not None else ""
        return f"zstd level {self.level}{d}"


def escape_text(text: str, limit: int = 600) -> str:
    """Control characters as \\xNN, so a reviewer reads the sample safely; long texts cut with a marker."""
    out = "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[:limit] + f"... [{len(out) - limit} more characters]"


def unintended_memorization(bits_target: np.ndarray, bits_reference: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, np.asarray(bits_reference, dtype=np.float64) - np.asarray(bits_target, dtype=np.float64))


def _distribution(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    q = np.quantile(x, [0.1, 0.5, 0.9, 0.99])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "p10": float(q[0]),
            "median": float(q[1]), "p90": float(q[2]), "p99": float(q[3]), "max": float(x.max())}


@dataclass(kw_only=True)
class MemorizationSettings:
    """Every option of `memaudit memorization`: the CLI flags' names and defaults (the CLI only parses)."""
    model_dir: str | Path  # the target model
    data: str | Path  # the samples to measure (.jsonl, .txt, .parquet, .csv; pre-tokenized .npy, .bin, input_ids)
    reference: str | Path  # a model directory with the target's tokenizer, or "zstd"
    zstd_level: int = 19
    zstd_dict_from: str | Path | None = None  # train a zstd dictionary on this text file first (zstd only)
    top_k: int = 20  # samples with the most mem_U listed in summary.json
    window: int | None = None  # each document's first N tokens; None: whole documents cut to the context
    stride: int | None = None  # with window: every window starting each N tokens (documents.parquet)
    windows_per_doc: int | None = None  # with window: N windows per document at seeded random starts
    seed: int = 0  # windows_per_doc's starts
    out: str | Path | None = None  # None: RunDir.default_out("memorization")
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "float32"  # exact code lengths by default (not the other commands' "auto")
    device_map: str | None = None  # auto, balanced, cpu-offload: accelerate places the model (None: all on device)
    max_memory: str | None = None  # device_map's limit per device: "0=20GiB,cpu=60GiB", or one size for each
    quantize: str | None = None  # 8bit or 4bit through bitsandbytes (None: full precision)
    text_field: str = "text"
    id_field: str = "id"
    limit: int | None = None
    token_dtype: str = "uint16"  # a .bin's token width: uint16 or uint32
    seq_len: int | None = None  # tokens per row a .bin is cut into (needed for a .bin, refused otherwise)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    resume: bool = False
    overwrite: bool = False

    @property
    def zstd(self) -> bool:
        return self.reference == "zstd"

    def sampling(self) -> Sampling | None:
        """Which windows of each document are measured (samples.Sampling); None: each document whole."""
        if self.window is None:
            return None
        return Sampling(stride=self.stride, windows_per_doc=self.windows_per_doc, seed=self.seed)

    @property
    def whole_document(self) -> bool:
        """Several windows per document (--stride or --windows-per-doc): rows are windows, and documents.parquet."""
        return self.stride is not None or self.windows_per_doc is not None

    def validate(self) -> None:
        """Cheap checks before anything is loaded: one MemauditError line each."""
        checks.integer("--zstd-level", self.zstd_level, low=1, high=22)
        checks.integer("--top-k", self.top_k, low=0)
        self._check_windows()
        checks.limit(self.limit)
        checks.batch_size(self.batch_size)
        checks.device(self.device)
        checks.choice("--dtype", self.dtype, ("float32", "fp32", "bfloat16", "bf16"))
        check_placement(self.device_map, self.max_memory, self.quantize, self.device)
        checks.readable_file(self.data)
        check_token_options(self.data, self.token_dtype, self.seq_len)
        checks.model_dir(self.model_dir, allow_pickle=self.allow_pickle)
        if not self.zstd:
            if not Path(self.reference).exists():
                raise MemauditError(f"--reference must be a model directory or 'zstd': {self.reference} does not "
                                    "exist")
            checks.model_dir(self.reference, allow_pickle=self.allow_pickle, what="--reference model directory")
        self._check_window_fits()
        if self.zstd_dict_from is not None:
            if not self.zstd:
                raise MemauditError("--zstd-dict-from only applies with --reference zstd")
            checks.readable_file(self.zstd_dict_from, "--zstd-dict-from file")

    def _check_windows(self) -> None:
        checks.integer("--window", self.window, low=2)
        Sampling(stride=self.stride, windows_per_doc=self.windows_per_doc, seed=self.seed).validate()
        for flag, value in (("--stride", self.stride), ("--windows-per-doc", self.windows_per_doc)):
            if value is not None and self.window is None:
                raise MemauditError(f"{flag} needs --window N: the length of the windows it takes")

    def _check_window_fits(self) -> None:
        """--window against the context the model's (and a reference model's) config states."""
        if self.window is None:
            return
        dirs = [self.model_dir] + ([] if self.zstd else [self.reference])
        contexts = [c for d in dirs if (c := checks.context_length(checks.model_dir(
            d, allow_pickle=self.allow_pickle, tokenizer=False))) is not None]
        if contexts and self.window > min(contexts):
            raise MemauditError(f"--window {self.window} is longer than the model's context ({min(contexts)} "
                                "positions)")

    def input_paths(self) -> list[str | Path]:
        """The files and folders the run reads (an output folder may not be or hold one)."""
        reference = None if self.zstd else self.reference
        return [p for p in (self.model_dir, self.data, reference, self.zstd_dict_from) if p is not None]


class TopSample(TypedDict):
    """One of summary.json's `top_samples`: a sample with the most unintended memorization."""
    id: Any
    mem_u_bits: float
    bits_model: float
    bits_reference: float
    n_tokens: int
    text: str  # escaped for a reviewer (escape_text), cut at 600 characters
    doc_id: Any  # the sample's document
    offset: int  # the token of its document where the sample starts


class MemorizationDocumentsSummary(TypedDict):
    """summary.json's `documents` block (--stride or --windows-per-doc): documents.parquet in a few figures."""
    n_documents: int  # documents read (those too short for any window included)
    documents_with_windows: int
    documents_with_mem_u: int  # documents with mem_U > 0 in at least one window
    mean_mem_u_bits: float | None  # mean over documents with a window of their windows' summed mem_U
    mean_mem_u_bits_per_token: float | None  # mean over those documents of summed mem_U / scored tokens
    covered_token_fraction: float | None  # tokens inside at least one window / all tokens of all documents


class MemorizationSummary(TypedDict, total=False):
    """summary.json of `memaudit memorization` (schema rundir.SUMMARY_SCHEMA_VERSION)."""
    schema_version: int
    command: str  # "memorization"
    method: str  # the definition of mem_U, with its source
    reference: str  # "model DIR", or "zstd level L[, dictionary of N bytes]"
    first_token: str  # how the first token is coded (ModelCoder.first_token)
    n_samples: int  # samples scored (one per document; with --stride or --windows-per-doc, windows)
    n_skipped_too_short: int  # documents with too few tokens to score (shorter than --window)
    n_truncated_to_context: int  # documents cut to the model's context (their samples are the scored part)
    total_bits_model: float  # sum of bits(x | target)
    total_bits_reference: float  # sum of bits(x | reference)
    total_mem_u_bits: float  # sum of mem_U
    mem_u_bits_per_token: float  # total mem_U / scored tokens
    fraction_samples_with_mem_u: float  # fraction of samples with mem_U > 0
    bits_model_per_byte: float  # total bits under the target / UTF-8 bytes of the scored texts
    bits_reference_per_byte: float  # the same under the reference
    mem_u_bits: dict[str, float]  # distribution over samples: mean, std, min, p10, median, p90, p99, max
    bits_model: dict[str, float]  # the same for bits(x | target)
    bits_reference: dict[str, float]  # the same for bits(x | reference)
    top_samples: list[TopSample]  # the top_k samples by mem_U, most first
    n_documents: int  # documents read
    windows: dict[str, Any]  # how documents became samples: {"mode": "document" | "window" | "stride" | "random", ...}
    world_size: int  # torchrun processes
    documents: MemorizationDocumentsSummary  # --stride or --windows-per-doc only


@dataclass
class MemorizationResult:
    summary: MemorizationSummary  # exactly what summary.json holds
    path: Path | None  # the run directory
    # samples.parquet: id, bits_model, bits_reference, mem_u_bits, n_tokens, n_bytes, doc_id, offset (with --stride
    # or --windows-per-doc a row is a window, its id "<document id>@<offset>")
    samples: pd.DataFrame
    documents: pd.DataFrame | None = None  # documents.parquet (--stride or --windows-per-doc): see document_table


@dataclass
class _Plan:
    """The samples to measure: each document whole, cut to the context (`cut`), or a strategy's windows (`stream`,
    produced lazily). Iterating yields (document position, offset, tokens)."""
    n_samples: int
    n_skipped: int
    n_truncated: int
    cut: Samples | None = None
    stream: WindowStream | None = None

    def __iter__(self) -> Iterator[tuple[int, int, Sequence[int]]]:
        if self.stream is not None:
            return ((w.doc, w.offset, w.tokens) for w in self.stream)
        return zip(self.cut.doc_ids, self.cut.offsets, self.cut.tokens)


@dataclass
class _Loaded:
    """The coders and the documents whose samples they code."""
    target: ModelCoder
    reference: ModelCoder | ZstdCoder
    reference_name: str  # as summary.json names it
    docs: Documents
    tokens: Sequence[Sequence[int]]  # each document's tokens
    lengths: np.ndarray  # each document's length in tokens
    plan: _Plan

    def text(self, doc: int, offset: int, tokens: Sequence[int]) -> str:
        """A sample's text: its document's as read when it is the whole document, else its tokens decoded."""
        tok = self.target.loaded.tokenizer
        return self.docs.text(doc, tok) if offset == 0 and len(tokens) == self.lengths[doc] else decode(tok, tokens)


def memorization(settings: MemorizationSettings | None = None, /, **options: Any) -> MemorizationResult | None:
    """Unintended memorization (Morris et al.): each sample's code length in bits under the target model and under
    a reference (a model with the same tokenizer, or zstd), and mem_U = max(0, reference - target). Takes a
    MemorizationSettings or its fields as keywords; writes a run directory (samples.parquet, summary.json,
    mem_u_hist.png; documents.parquet with --stride or --windows-per-doc) and returns its summary, path and tables.
    Under torchrun every rank measures a shard of each chunk and rank 0 writes; the other ranks return None."""
    s = settings_from(MemorizationSettings, settings, options)
    s.validate()
    out = _start(s)
    loaded = _load(s)
    run = _open_run(s, out, loaded) if distributed.is_main() else None
    rows = _measure(loaded, run)
    if not distributed.is_main():
        return None
    return _write(run, loaded, rows, s)


def _start(s: MemorizationSettings) -> Path:
    """Join torchrun's processes (if any); the output folder, refused now (by rank 0) if it may not be written."""
    distributed.start(s.device)
    out = Path(s.out) if s.out is not None else distributed.broadcast_object(RunDir.default_out("memorization"))
    if distributed.is_main():
        check_output(out, "memorization", inputs=s.input_paths(), resume=s.resume, overwrite=s.overwrite)
    return out


def _load(s: MemorizationSettings) -> _Loaded:
    """The target (and a reference model, with the same tokenizer, or zstd), the documents and their samples."""
    docs = load_documents(s.data, text_field=s.text_field, id_field=s.id_field, limit=s.limit,
                          token_dtype=s.token_dtype, seq_len=s.seq_len)  # a damaged file fails before the model loads
    target = ModelCoder(_load_model(s, s.model_dir), s.batch_size)
    if s.zstd:
        reference = None
    else:
        reference = ModelCoder(_load_model(s, s.reference), s.batch_size)
        if not tokenizers_match(target.loaded.tokenizer, reference.loaded.tokenizer):
            raise MemauditError(f"the reference model {s.reference} uses another tokenizer than {s.model_dir}: code "
                                "lengths of different tokenizations do not compare token by token (use a reference "
                                "with the same tokenizer, or --reference zstd)")
    tok = target.loaded.tokenizer
    tokens = docs.tokens(tok) if s.window is None else _compact_tokens(docs, tok)
    lengths = _lengths(tokens)
    plan = _plan(s, target, tokens, lengths)
    if reference is None:  # every rank trains the same dictionary (zstd's training is deterministic)
        dict_texts = (read_documents(s.zstd_dict_from, text_field=s.text_field)["text"].tolist()
                      if s.zstd_dict_from else None)
        reference = ZstdCoder(s.zstd_level, dict_texts)
    name = f"model {s.reference}" if isinstance(reference, ModelCoder) else reference.describe()
    return _Loaded(target, reference, name, docs, tokens, lengths, plan)


def _compact_tokens(docs: Documents, tok, chunk: int = 1024) -> Sequence[Sequence[int]]:
    """Windows read documents in slices: stored ids as they are (memory-mapped), texts tokenized `chunk` at a time
    into one int32 array each (a tenth of a list of ints)."""
    if docs.pretokenized:
        return docs.tokens(tok)
    out: list[np.ndarray] = []
    for a in range(0, len(docs), chunk):
        out.extend(np.asarray(t, dtype=np.int32) for t in tokenize(tok, docs.texts[a:a + chunk]))
    return out


def _lengths(tokens: Sequence[Sequence[int]]) -> np.ndarray:
    if isinstance(tokens, TokenRows):  # from the row bounds: no row is read
        return np.array([b - a for a, b in map(tokens.span, range(len(tokens)))], dtype=np.int64)
    return np.array([len(t) for t in tokens], dtype=np.int64)


def _plan(s: MemorizationSettings, target: ModelCoder, tokens: Sequence[Sequence[int]],
          lengths: np.ndarray) -> _Plan:
    """One sample per document, cut to what fits the context (the cut counted), or the windows of --window."""
    room = target.loaded.max_length if target.start_id is not None else target.loaded.max_length + 1
    sampling = s.sampling()
    if sampling is None:
        cut = document_samples(tokens, max_tokens=room, min_tokens=1 if target.start_id is not None else 2)
        if not cut.doc_ids:
            raise MemauditError(f"{s.data}: no sample has enough tokens to score")
        return _Plan(len(cut), cut.n_skipped, cut.n_truncated, cut=cut)
    if s.window > room:
        raise MemauditError(f"--window {s.window} is longer than the model's context ({target.loaded.max_length} "
                            "positions)")
    per_doc = np.array([len(sampling.starts(int(n), s.window, d)) for d, n in enumerate(lengths)], dtype=np.int64)
    if not per_doc.sum():
        raise MemauditError(f"{s.data}: all {len(lengths)} documents are shorter than --window {s.window} tokens")
    return _Plan(int(per_doc.sum()), int((per_doc == 0).sum()), 0, stream=sampling.windows(tokens, None, s.window))


def _load_model(s: MemorizationSettings, model_dir: str | Path) -> LoadedModel:
    return load_model(model_dir, device=distributed.rank_device(s.device), dtype=s.dtype,
                      allow_pickle=s.allow_pickle, trust_remote_code=s.trust_remote_code, **placement(s))


def _open_run(s: MemorizationSettings, out: str | Path, loaded: _Loaded) -> RunDir:
    """The run directory and its config.json (these settings are what --resume compares: keep them as they are)."""
    settings = {"reference": "zstd" if s.zstd else str(s.reference), "zstd_level": s.zstd_level,
                "zstd_dict_from": str(s.zstd_dict_from) if s.zstd_dict_from else None, "dtype": s.dtype,
                "text_field": s.text_field, "id_field": s.id_field, "limit": s.limit, "top_k": s.top_k,
                "first_token": loaded.target.first_token, "seq_len": s.seq_len,
                "token_dtype": s.token_dtype if s.seq_len is not None else None,  # recorded for a .bin only
                "quantize": s.quantize}  # other numbers than full precision (None matches runs from before it)
    # Recorded only when set, so a run without them records (and resumes) exactly as before they existed.
    settings |= {k: v for k, v in (("window", s.window), ("stride", s.stride), ("windows_per_doc", s.windows_per_doc),
                                   ("seed", s.seed if s.windows_per_doc is not None else None)) if v is not None}
    inputs = {"model_dir": str(s.model_dir), "model_weights_sha256": weights_hash(s.model_dir),
              "data": str(s.data), "data_sha256": file_hash(s.data)}
    if not s.zstd:
        inputs["reference_weights_sha256"] = weights_hash(s.reference)
    if s.zstd_dict_from:
        inputs["zstd_dict_sha256"] = file_hash(s.zstd_dict_from)
    return RunDir(out, "memorization", settings, inputs=inputs, resume=s.resume, overwrite=s.overwrite)


# --- compute: code lengths, chunk by chunk, sharded across ranks -------------------------------------------------

ROW_COLUMNS = ("doc", "offset", "n_tokens", "n_bytes", "bits_model", "bits_reference")


def _measure(loaded: _Loaded, run: RunDir | None) -> pd.DataFrame | None:
    """Every sample's code lengths, CHUNK samples at a time, as rows (ROW_COLUMNS) on rank 0 (None elsewhere).
    Each chunk is measured by `_measure_chunk` and saved under partial/; a resumed run loads the chunks it has."""
    n = loaded.plan.n_samples
    starts = range(0, n, CHUNK)
    saved = {a: run.load_partial(f"rows-{a:09d}") for a in starts} if run is not None else {}
    done = set(distributed.broadcast_object(sorted(a for a, df in saved.items() if df is not None)))
    parts: list[pd.DataFrame] = []
    samples = iter(loaded.plan)
    with progress_bar(n, "code lengths") as advance:
        for a in starts:
            chunk = list(islice(samples, CHUNK))
            if a in done:
                parts += [saved[a]] if run is not None else []
                advance(len(chunk))
                continue
            got = _measure_chunk(loaded, chunk)
            advance(len(chunk))
            if got is not None:
                frame = pd.DataFrame({"doc": [c[0] for c in chunk], "offset": [c[1] for c in chunk],
                                      "n_tokens": [len(c[2]) for c in chunk]} | dict(zip(ROW_COLUMNS[3:], zip(*got))))
                frame = frame.astype({"doc": np.int64, "offset": np.int64, "n_tokens": np.int64, "n_bytes": np.int64,
                                      "bits_model": np.float64, "bits_reference": np.float64})
                if run is not None:
                    run.save_partial(f"rows-{a:09d}", frame)
                parts.append(frame)
    return pd.concat(parts, ignore_index=True) if distributed.is_main() else None


def _measure_chunk(loaded: _Loaded, chunk: list[tuple[int, int, Sequence[int]]]) -> list[tuple] | None:
    """(n_bytes, bits_model, bits_reference) of each sample of the chunk, in order, on rank 0 (None elsewhere):
    each rank codes every world-th sample."""
    mine = distributed.shard_indices(len(chunk))
    tokens = [np.asarray(chunk[i][2]).tolist() for i in mine]
    texts = [loaded.text(chunk[i][0], chunk[i][1], t) for i, t in zip(mine, tokens)]
    bits_model = loaded.target.bits(tokens) if tokens else np.zeros(0)
    if isinstance(loaded.reference, ModelCoder):
        bits_ref = loaded.reference.bits(tokens) if tokens else np.zeros(0)
    else:
        bits_ref = loaded.reference.bits(texts)
    local = [(len(t.encode("utf-8")), float(m), float(r)) for t, m, r in zip(texts, bits_model, bits_ref)]
    return distributed.gather_sharded(local, mine, len(chunk))


# --- write (rank 0): samples, documents, summary, figure ---------------------------------------------------------

def _write(run: RunDir, loaded: _Loaded, rows: pd.DataFrame, s: MemorizationSettings) -> MemorizationResult:
    df = _samples_table(loaded, rows, s.whole_document)
    documents = None
    if s.whole_document:
        documents = document_table(rows["doc"].to_numpy(), rows["offset"].to_numpy(), rows["n_tokens"].to_numpy(),
                                   df["bits_model"].to_numpy(), df["bits_reference"].to_numpy(),
                                   df["mem_u_bits"].to_numpy(), list(loaded.docs.ids), loaded.lengths)
        run.write_samples(documents, "documents.parquet")
    run.write_samples(df)
    summary = _summary(loaded, df, rows["doc"].to_numpy(), s)
    if documents is not None:
        summary["documents"] = documents_summary(documents)
    run.write_summary(summary)
    run.save_figure(_histogram(df["mem_u_bits"].to_numpy(), loaded.reference_name), "mem_u_hist.png")
    run.finish()
    return MemorizationResult(summary=summary, path=run.path, samples=df, documents=documents)


def _samples_table(loaded: _Loaded, rows: pd.DataFrame, whole: bool) -> pd.DataFrame:
    """samples.parquet: a row per sample; with several windows per document its id is "<document id>@<offset>"."""
    doc_ids = [loaded.docs.ids[d] for d in rows["doc"]]
    offsets = rows["offset"].to_numpy()
    ids = [f"{i}@{o}" for i, o in zip(doc_ids, offsets)] if whole else doc_ids
    bits_model, bits_ref = rows["bits_model"].to_numpy(), rows["bits_reference"].to_numpy()
    return pd.DataFrame({"id": ids, "bits_model": bits_model, "bits_reference": bits_ref,
                         "mem_u_bits": unintended_memorization(bits_model, bits_ref),
                         "n_tokens": rows["n_tokens"].to_numpy(), "n_bytes": rows["n_bytes"].to_numpy(),
                         "doc_id": doc_ids, "offset": offsets})


def document_table(doc: np.ndarray, offset: np.ndarray, n_tokens: np.ndarray, bits_model: np.ndarray,
                   bits_reference: np.ndarray, mem_u: np.ndarray, ids: Sequence[Any],
                   lengths: np.ndarray) -> pd.DataFrame:
    """documents.parquet: per document read (in input order, those without a window included) its id, length
    `n_tokens`, `n_windows`, `scored_tokens` (summed over its windows: overlapping windows count a token once each),
    `covered_tokens` (tokens inside at least one window), the windows' summed `bits_model`, `bits_reference` and
    `mem_u_bits`, `mem_u_bits_per_token` (summed mem_U / scored tokens), `max_window_mem_u_bits` and
    `windows_with_mem_u`. Each document's windows (rows) come in order of offset."""
    n = len(ids)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(doc, weights=np.asarray(values, dtype=np.float64), minlength=n)

    n_windows = np.bincount(doc, minlength=n)
    scored = np.bincount(doc, weights=n_tokens, minlength=n).astype(np.int64)
    end = pd.Series(np.asarray(offset) + np.asarray(n_tokens))
    reached = end.groupby(doc).cummax().groupby(doc).shift(fill_value=0).to_numpy()  # earlier windows' furthest end
    new = np.clip(end.to_numpy() - np.maximum(offset, reached), 0, None)  # tokens no earlier window covered
    peak = np.full(n, np.nan)
    np.fmax.at(peak, doc, mem_u)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_token = total(mem_u) / scored
    return pd.DataFrame({"id": list(ids), "n_tokens": np.asarray(lengths, dtype=np.int64), "n_windows": n_windows,
                         "scored_tokens": scored, "covered_tokens": total(new).astype(np.int64),
                         "bits_model": total(bits_model), "bits_reference": total(bits_reference),
                         "mem_u_bits": total(mem_u), "mem_u_bits_per_token": np.where(n_windows > 0, per_token, np.nan),
                         "max_window_mem_u_bits": peak,
                         "windows_with_mem_u": np.bincount(doc, weights=mem_u > 0, minlength=n).astype(np.int64)})


def documents_summary(documents: pd.DataFrame) -> MemorizationDocumentsSummary:
    """summary.json's `documents` block from documents.parquet."""
    read = documents["n_windows"].to_numpy() > 0
    with_windows = documents[read]

    def mean(col: str) -> float | None:
        return float(with_windows[col].mean()) if read.any() else None

    total_tokens = int(documents["n_tokens"].sum())
    return MemorizationDocumentsSummary(
        n_documents=len(documents), documents_with_windows=int(read.sum()),
        documents_with_mem_u=int((documents["windows_with_mem_u"] > 0).sum()),
        mean_mem_u_bits=mean("mem_u_bits"), mean_mem_u_bits_per_token=mean("mem_u_bits_per_token"),
        covered_token_fraction=float(documents["covered_tokens"].sum() / total_tokens) if total_tokens else None)


def _summary(loaded: _Loaded, df: pd.DataFrame, doc: np.ndarray, s: MemorizationSettings) -> MemorizationSummary:
    mem, bits_model, bits_ref = (df[c].to_numpy() for c in ("mem_u_bits", "bits_model", "bits_reference"))
    order = np.argsort(-mem, kind="stable")[:s.top_k]
    top = [TopSample(id=df["id"].iloc[i], mem_u_bits=float(mem[i]), bits_model=float(bits_model[i]),
                     bits_reference=float(bits_ref[i]), n_tokens=int(df["n_tokens"].iloc[i]),
                     text=escape_text(_sample_text(loaded, int(doc[i]), int(df["offset"].iloc[i]),
                                                   int(df["n_tokens"].iloc[i]))),
                     doc_id=df["doc_id"].iloc[i], offset=int(df["offset"].iloc[i])) for i in order]
    n_tokens, n_bytes = max(1, df["n_tokens"].sum()), max(1, df["n_bytes"].sum())
    return MemorizationSummary(
        **summary_header("memorization"),
        method="Morris et al. (arXiv 2505.24832): mem_U = max(0, bits(x|reference) - bits(x|target))",
        reference=loaded.reference_name, first_token=loaded.target.first_token,
        n_samples=len(df), n_skipped_too_short=loaded.plan.n_skipped,
        n_truncated_to_context=int(loaded.plan.n_truncated),
        total_bits_model=float(bits_model.sum()), total_bits_reference=float(bits_ref.sum()),
        total_mem_u_bits=float(mem.sum()), mem_u_bits_per_token=float(mem.sum() / n_tokens),
        fraction_samples_with_mem_u=float((mem > 0).mean()),
        bits_model_per_byte=float(bits_model.sum() / n_bytes),
        bits_reference_per_byte=float(bits_ref.sum() / n_bytes),
        mem_u_bits=_distribution(mem), bits_model=_distribution(bits_model),
        bits_reference=_distribution(bits_ref), top_samples=top,
        n_documents=len(loaded.docs), windows=_windows_block(s, loaded), world_size=distributed.world_size())


def _sample_text(loaded: _Loaded, doc: int, offset: int, n_tokens: int) -> str:
    """A measured sample's text again, from its document's tokens (texts are not kept while measuring)."""
    tokens = loaded.tokens[doc]
    return loaded.text(doc, offset, np.asarray(tokens[offset:offset + n_tokens]).tolist())


def _windows_block(s: MemorizationSettings, loaded: _Loaded) -> dict[str, Any]:
    """summary["windows"]: how documents became samples."""
    if s.window is None:
        target = loaded.target
        room = target.loaded.max_length + (0 if target.start_id is not None else 1)
        return {"mode": "document", "max_tokens": room, "how": "whole documents, cut to the model's context"}
    if s.stride is not None:
        return {"mode": "stride", "tokens": s.window, "stride": s.stride,
                "how": f"every {s.window}-token window starting each {s.stride} tokens (documents shorter than a "
                       "window skipped); documents.parquet sums each document's windows"}
    if s.windows_per_doc is not None:
        return {"mode": "random", "tokens": s.window, "windows_per_doc": s.windows_per_doc, "seed": s.seed,
                "how": f"{s.windows_per_doc} windows of {s.window} tokens per document at random starts seeded by "
                       "(seed, document position), all of them when fewer fit; documents.parquet sums them"}
    return {"mode": "window", "tokens": s.window,
            "how": "one window per document: its first N tokens; shorter documents skipped"}


def _histogram(mem: np.ndarray, ref_name: str):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(mem, bins=min(50, max(5, len(mem) // 4)), color="#3b6ea8")
    ax.set_xlabel("unintended memorization per sample (bits)")
    ax.set_ylabel("samples")
    ax.set_title(f"Unintended memorization against {ref_name}"[:90], fontsize=9)
    return fig
