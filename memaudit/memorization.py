"""Code lengths under a model or zstd, and unintended memorization (Morris et al., arXiv 2505.24832).

bits(x | model) = -sum_t log2 p(x_t | x_<t) over every token of x, the first conditioned on the tokenizer's BOS
(EOS when it has no BOS; with neither, the first token is charged log2 V bits, a uniform code). Computed by the
one scoring engine (`memaudit.scoring.score`).
bits(x | zstd) = 8 * len(zstd(utf8(x))) at a fixed level, optionally with a dictionary trained on reference text;
frames carry no checksum, content size or dictionary id, so only the payload is charged.
mem_U(x) = max(0, bits(x | reference) - bits(x | target)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypedDict

import numpy as np
import pandas as pd
import zstandard

from . import checks
from .data import check_token_options, decode, file_hash, load_documents, read_documents
from .errors import MemauditError
from .figures import pyplot
from .models import LoadedModel, load_model, tokenizers_match, weights_hash
from .progress import progress_bar
from .rundir import RunDir, check_output, summary_header
from .samples import document_samples
from .scoring import score
from .settings import settings_from


@dataclass
class ModelCoder:
    """A loaded model as a coder of token sequences; `first_token` says how the first token is coded."""
    loaded: LoadedModel
    batch_size: int | str = "auto"

    @property
    def start_id(self) -> int | None:
        tok = self.loaded.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

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
    out: str | Path | None = None  # None: RunDir.default_out("memorization")
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "float32"  # exact code lengths by default (not the other commands' "auto")
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

    def validate(self) -> None:
        """Cheap checks before anything is loaded: one MemauditError line each."""
        checks.integer("--zstd-level", self.zstd_level, low=1, high=22)
        checks.integer("--top-k", self.top_k, low=0)
        checks.limit(self.limit)
        checks.batch_size(self.batch_size)
        checks.choice("--dtype", self.dtype, ("float32", "fp32", "bfloat16", "bf16"))
        checks.readable_file(self.data)
        check_token_options(self.data, self.token_dtype, self.seq_len)
        checks.model_dir(self.model_dir, allow_pickle=self.allow_pickle)
        if not self.zstd:
            if not Path(self.reference).exists():
                raise MemauditError(f"--reference must be a model directory or 'zstd': {self.reference} does not "
                                    "exist")
            checks.model_dir(self.reference, allow_pickle=self.allow_pickle, what="--reference model directory")
        if self.zstd_dict_from is not None:
            if not self.zstd:
                raise MemauditError("--zstd-dict-from only applies with --reference zstd")
            checks.readable_file(self.zstd_dict_from, "--zstd-dict-from file")

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


class MemorizationSummary(TypedDict, total=False):
    """summary.json of `memaudit memorization` (schema rundir.SUMMARY_SCHEMA_VERSION)."""
    schema_version: int
    command: str  # "memorization"
    method: str  # the definition of mem_U, with its source
    reference: str  # "model DIR", or "zstd level L[, dictionary of N bytes]"
    first_token: str  # how the first token is coded (ModelCoder.first_token)
    n_samples: int  # samples scored (one per document)
    n_skipped_too_short: int  # documents with too few tokens to score
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


@dataclass
class MemorizationResult:
    summary: MemorizationSummary  # exactly what summary.json holds
    path: Path | None  # the run directory
    samples: pd.DataFrame  # samples.parquet: id, bits_model, bits_reference, mem_u_bits, n_tokens, n_bytes


@dataclass
class _Loaded:
    """The coders and the samples they code: `tokens[i]` and `texts[i]` are one sample of document `ids[i]`."""
    target: ModelCoder
    reference: ModelCoder | ZstdCoder
    reference_name: str  # as summary.json names it
    ids: list[Any]
    tokens: list[list[int]]  # cut to the target's context
    texts: list[str]  # the text of exactly those tokens
    n_skipped: int
    n_truncated: int


def memorization(settings: MemorizationSettings | None = None, /, **options: Any) -> MemorizationResult:
    """Unintended memorization (Morris et al.): each sample's code length in bits under the target model and under
    a reference (a model with the same tokenizer, or zstd), and mem_U = max(0, reference - target). Takes a
    MemorizationSettings or its fields as keywords; writes a run directory (samples.parquet, summary.json,
    mem_u_hist.png) and returns its summary, path and per-sample table."""
    s = settings_from(MemorizationSettings, settings, options)
    s.validate()
    out = s.out or RunDir.default_out("memorization")
    check_output(out, "memorization", inputs=s.input_paths(), resume=s.resume, overwrite=s.overwrite)
    loaded = _load(s)
    run = _open_run(s, out, loaded)
    bits_model, bits_ref = _compute(loaded)
    return _write(run, loaded, bits_model, bits_ref, s.top_k)


def _load(s: MemorizationSettings) -> _Loaded:
    """The target (and a reference model, with the same tokenizer), the samples cut to the context, or zstd."""
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
    # One sample per document; a document longer than the context is cut to what fits, and the cut is counted.
    tok = target.loaded.tokenizer
    room = target.loaded.max_length if target.start_id is not None else target.loaded.max_length + 1
    token_lists = docs.tokens(tok)  # texts tokenized, or stored ids checked against the vocabulary
    cut = document_samples(token_lists, max_tokens=room, min_tokens=1 if target.start_id is not None else 2)
    if not cut.doc_ids:
        raise MemauditError(f"{s.data}: no sample has enough tokens to score")
    texts = [docs.text(i, tok) if len(seq) == len(token_lists[i]) else decode(tok, seq)
             for i, seq in zip(cut.doc_ids, cut.tokens)]
    if reference is None:
        dict_texts = (read_documents(s.zstd_dict_from, text_field=s.text_field)["text"].tolist()
                      if s.zstd_dict_from else None)
        reference = ZstdCoder(s.zstd_level, dict_texts)
    name = f"model {s.reference}" if isinstance(reference, ModelCoder) else reference.describe()
    return _Loaded(target, reference, name, [docs.ids[i] for i in cut.doc_ids], cut.tokens, texts,
                   cut.n_skipped, cut.n_truncated)


def _load_model(s: MemorizationSettings, model_dir: str | Path) -> LoadedModel:
    return load_model(model_dir, device=s.device, dtype=s.dtype, allow_pickle=s.allow_pickle,
                      trust_remote_code=s.trust_remote_code)


def _open_run(s: MemorizationSettings, out: str | Path, loaded: _Loaded) -> RunDir:
    """The run directory and its config.json (these settings are what --resume compares: keep them as they are)."""
    settings = {"reference": "zstd" if s.zstd else str(s.reference), "zstd_level": s.zstd_level,
                "zstd_dict_from": str(s.zstd_dict_from) if s.zstd_dict_from else None, "dtype": s.dtype,
                "text_field": s.text_field, "id_field": s.id_field, "limit": s.limit, "top_k": s.top_k,
                "first_token": loaded.target.first_token, "seq_len": s.seq_len,
                "token_dtype": s.token_dtype if s.seq_len is not None else None}  # recorded for a .bin only
    inputs = {"model_dir": str(s.model_dir), "model_weights_sha256": weights_hash(s.model_dir),
              "data": str(s.data), "data_sha256": file_hash(s.data)}
    if not s.zstd:
        inputs["reference_weights_sha256"] = weights_hash(s.reference)
    if s.zstd_dict_from:
        inputs["zstd_dict_sha256"] = file_hash(s.zstd_dict_from)
    return RunDir(out, "memorization", settings, inputs=inputs, resume=s.resume, overwrite=s.overwrite)


def _compute(loaded: _Loaded) -> tuple[np.ndarray, np.ndarray]:
    """Code lengths in bits of every sample under the target and the reference."""
    with progress_bar(len(loaded.tokens), "code lengths (target)") as advance:
        bits_model = loaded.target.bits(loaded.tokens, on_progress=advance)
    if isinstance(loaded.reference, ModelCoder):
        with progress_bar(len(loaded.tokens), "code lengths (reference)") as advance:
            bits_ref = loaded.reference.bits(loaded.tokens, on_progress=advance)
    else:
        bits_ref = loaded.reference.bits(loaded.texts)
    return bits_model, bits_ref


def _write(run: RunDir, loaded: _Loaded, bits_model: np.ndarray, bits_ref: np.ndarray,
           top_k: int) -> MemorizationResult:
    mem = unintended_memorization(bits_model, bits_ref)
    df = pd.DataFrame({"id": loaded.ids, "bits_model": bits_model, "bits_reference": bits_ref,
                       "mem_u_bits": mem, "n_tokens": [len(s) for s in loaded.tokens],
                       "n_bytes": [len(t.encode("utf-8")) for t in loaded.texts]})
    run.write_samples(df)
    summary = _summary(loaded, df, top_k)
    run.write_summary(summary)
    run.save_figure(_histogram(mem, loaded.reference_name), "mem_u_hist.png")
    run.finish()
    return MemorizationResult(summary=summary, path=run.path, samples=df)


def _summary(loaded: _Loaded, df: pd.DataFrame, top_k: int) -> MemorizationSummary:
    mem, bits_model, bits_ref = (df[c].to_numpy() for c in ("mem_u_bits", "bits_model", "bits_reference"))
    order = np.argsort(-mem, kind="stable")[:top_k]
    top = [TopSample(id=df["id"].iloc[i], mem_u_bits=float(mem[i]), bits_model=float(bits_model[i]),
                     bits_reference=float(bits_ref[i]), n_tokens=int(df["n_tokens"].iloc[i]),
                     text=escape_text(loaded.texts[i])) for i in order]
    n_tokens, n_bytes = max(1, df["n_tokens"].sum()), max(1, df["n_bytes"].sum())
    return MemorizationSummary(
        **summary_header("memorization"),
        method="Morris et al. (arXiv 2505.24832): mem_U = max(0, bits(x|reference) - bits(x|target))",
        reference=loaded.reference_name, first_token=loaded.target.first_token,
        n_samples=len(df), n_skipped_too_short=loaded.n_skipped, n_truncated_to_context=int(loaded.n_truncated),
        total_bits_model=float(bits_model.sum()), total_bits_reference=float(bits_ref.sum()),
        total_mem_u_bits=float(mem.sum()), mem_u_bits_per_token=float(mem.sum() / n_tokens),
        fraction_samples_with_mem_u=float((mem > 0).mean()),
        bits_model_per_byte=float(bits_model.sum() / n_bytes),
        bits_reference_per_byte=float(bits_ref.sum() / n_bytes),
        mem_u_bits=_distribution(mem), bits_model=_distribution(bits_model),
        bits_reference=_distribution(bits_ref), top_samples=top)


def _histogram(mem: np.ndarray, ref_name: str):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(mem, bins=min(50, max(5, len(mem) // 4)), color="#3b6ea8")
    ax.set_xlabel("unintended memorization per sample (bits)")
    ax.set_ylabel("samples")
    ax.set_title(f"Unintended memorization against {ref_name}"[:90], fontsize=9)
    return fig
