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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import zstandard

from . import checks
from .data import file_hash, read_documents, tokenize
from .errors import MemauditError
from .models import load_model, tokenizers_match, weights_hash
from .progress import progress_bar
from .rundir import RunDir, check_output
from .samples import document_samples
from .scoring import score


@dataclass
class ModelCoder:
    """A loaded model as a coder of token sequences; `first_token` says how the first token is coded."""
    loaded: object  # memaudit.models.LoadedModel
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


def measure_memorization(model_dir: str | os.PathLike, data: str | os.PathLike, reference: str, *,
                         out: str | os.PathLike | None = None, zstd_level: int = 19,
                         zstd_dict_from: str | os.PathLike | None = None, batch_size: int | str = "auto",
                         device: str = "auto", dtype: str = "float32", text_field: str = "text",
                         id_field: str = "id", limit: int | None = None, top_k: int = 20,
                         allow_pickle: bool = False, trust_remote_code: bool = False,
                         resume: bool = False, overwrite: bool = False) -> dict:
    """Per-sample code lengths under the target and the reference, and mem_U; writes a run directory."""
    checks.integer("--zstd-level", zstd_level, low=1, high=22)
    checks.integer("--top-k", top_k, low=0)
    checks.limit(limit)
    checks.batch_size(batch_size)
    checks.choice("--dtype", dtype, ("float32", "fp32", "bfloat16", "bf16"))
    checks.readable_file(data)
    checks.model_dir(model_dir, allow_pickle=allow_pickle)
    if reference != "zstd":
        if not Path(reference).exists():
            raise MemauditError(f"--reference must be a model directory or 'zstd': {reference} does not exist")
        checks.model_dir(reference, allow_pickle=allow_pickle, what="--reference model directory")
    if zstd_dict_from is not None:
        if reference != "zstd":
            raise MemauditError("--zstd-dict-from only applies with --reference zstd")
        checks.readable_file(zstd_dict_from, "--zstd-dict-from file")
    out = out or RunDir.default_out("memorization")
    check_output(out, "memorization", inputs=[p for p in (model_dir, data, None if reference == "zstd" else reference,
                                                          zstd_dict_from) if p is not None],
                 resume=resume, overwrite=overwrite)
    target = ModelCoder(load_model(model_dir, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code), batch_size)
    docs = read_documents(data, text_field=text_field, id_field=id_field, limit=limit)
    ref_model = None
    if reference != "zstd":
        ref_model = ModelCoder(load_model(reference, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                          trust_remote_code=trust_remote_code), batch_size)
        if not tokenizers_match(target.loaded.tokenizer, ref_model.loaded.tokenizer):
            raise MemauditError(f"the reference model {reference} uses another tokenizer than {model_dir}: code "
                                "lengths of different tokenizations do not compare token by token (use a reference "
                                "with the same tokenizer, or --reference zstd)")

    settings = {"reference": "zstd" if reference == "zstd" else str(reference), "zstd_level": zstd_level,
                "zstd_dict_from": str(zstd_dict_from) if zstd_dict_from else None, "dtype": dtype,
                "text_field": text_field, "id_field": id_field, "limit": limit, "top_k": top_k,
                "first_token": target.first_token}
    inputs = {"model_dir": str(model_dir), "model_weights_sha256": weights_hash(model_dir),
              "data": str(data), "data_sha256": file_hash(data)}
    if ref_model is not None:
        inputs["reference_weights_sha256"] = weights_hash(reference)
    if zstd_dict_from:
        inputs["zstd_dict_sha256"] = file_hash(zstd_dict_from)
    run = RunDir(out, "memorization", settings, inputs=inputs,
                 resume=resume, overwrite=overwrite)

    # Tokenize; a sample longer than the context is cut to what fits, and the cut is counted.
    tok = target.loaded.tokenizer
    room = target.loaded.max_length if target.start_id is not None else target.loaded.max_length + 1
    token_lists = tokenize(tok, docs["text"].tolist())
    cut = document_samples(token_lists, max_tokens=room, min_tokens=1 if target.start_id is not None else 2)
    keep, seqs, n_skipped, n_truncated = cut.doc_ids, cut.tokens, cut.n_skipped, cut.n_truncated
    if not keep:
        raise MemauditError(f"{data}: no sample has enough tokens to score")
    texts = [docs["text"].iloc[i] if len(token_lists[i]) <= room else tok.decode(seqs[k], clean_up_tokenization_spaces=False)
             for k, i in enumerate(keep)]

    with progress_bar(len(seqs), "code lengths (target)") as advance:
        bits_model = target.bits(seqs, on_progress=advance)
    if ref_model is not None:
        with progress_bar(len(seqs), "code lengths (reference)") as advance:
            bits_ref = ref_model.bits(seqs, on_progress=advance)
        ref_name = f"model {reference}"
    else:
        dict_texts = read_documents(zstd_dict_from, text_field=text_field)["text"].tolist() if zstd_dict_from else None
        coder = ZstdCoder(zstd_level, dict_texts)
        bits_ref = coder.bits(texts)
        ref_name = coder.describe()
    mem = unintended_memorization(bits_model, bits_ref)
    df = pd.DataFrame({"id": docs["id"].iloc[keep].tolist(), "bits_model": bits_model, "bits_reference": bits_ref,
                       "mem_u_bits": mem, "n_tokens": [len(s) for s in seqs],
                       "n_bytes": [len(t.encode("utf-8")) for t in texts]})
    run.write_samples(df)

    order = np.argsort(-mem, kind="stable")[:top_k]
    top = [{"id": df["id"].iloc[i], "mem_u_bits": float(mem[i]), "bits_model": float(bits_model[i]),
            "bits_reference": float(bits_ref[i]), "n_tokens": int(df["n_tokens"].iloc[i]),
            "text": escape_text(texts[i])} for i in order]
    summary = {
        "method": "Morris et al. (arXiv 2505.24832): mem_U = max(0, bits(x|reference) - bits(x|target))",
        "reference": ref_name, "first_token": target.first_token,
        "n_samples": len(df), "n_skipped_too_short": n_skipped, "n_truncated_to_context": int(n_truncated),
        "total_bits_model": float(bits_model.sum()), "total_bits_reference": float(bits_ref.sum()),
        "total_mem_u_bits": float(mem.sum()),
        "mem_u_bits_per_token": float(mem.sum() / max(1, df["n_tokens"].sum())),
        "fraction_samples_with_mem_u": float((mem > 0).mean()),
        "bits_model_per_byte": float(bits_model.sum() / max(1, df["n_bytes"].sum())),
        "bits_reference_per_byte": float(bits_ref.sum() / max(1, df["n_bytes"].sum())),
        "mem_u_bits": _distribution(mem), "bits_model": _distribution(bits_model),
        "bits_reference": _distribution(bits_ref), "top_samples": top,
    }
    run.write_summary(summary)
    run.save_figure(_histogram(mem, ref_name), "mem_u_hist.png")
    run.finish()
    summary["out"] = str(run.path)
    return summary


def _histogram(mem: np.ndarray, ref_name: str):
    import matplotlib  # lazy: slow to import, and the backend must be set before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(mem, bins=min(50, max(5, len(mem) // 4)), color="#3b6ea8")
    ax.set_xlabel("unintended memorization per sample (bits)")
    ax.set_ylabel("samples")
    ax.set_title(f"mem_U against {ref_name}"[:90], fontsize=9)
    return fig
