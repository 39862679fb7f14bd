"""One readable trainer for causal LMs: standard, goldfish and sinks objectives; canaries; resume; DDP.

Rows (`--rows`): `packed` (the default) joins the documents, each followed by EOS, into one stream cut into rows of
BOS + the next `seq_len - 1` tokens, so every token of every document is trained on (packing.py says how canaries,
goldfish masks and sink ids follow documents across rows); `first` is one row per document, BOS + its first
`seq_len - 1` tokens, right-padded. Either way a row starts with BOS, as every probe sample does.

Pre-tokenized data (data.load_documents: .npy rows, input_ids in .jsonl/.parquet, a .bin stream) is trained on as
stored, with the tokenizer that made it (--tokenizer, or the --config model's; a tokenizer trained here would give
the ids other meanings). A .bin is already a packed token stream: it is cut into rows of BOS + the next
`seq_len - 1` stored tokens, one row each ("first" semantics, whatever --rows says; `row_cut`).

Everything that decides a step is a pure function of (seed, step): the epoch's row order is drawn by
`default_rng([seed, epoch])`, the random goldfish mask by a generator seeded with (seed, step). So a resumed run
replays the uninterrupted one, and under torchrun every rank builds the same global batch and takes its slice:
the loss of each rank is its share of the GLOBAL mean over kept targets, so DDP's gradient average equals the
single-process gradient up to float summation order.

A run reads top to bottom as a recipe does: `_setup` (claim the folder, read the data, build the tokenizer, model,
rows and optimizer, restore a checkpoint), `_loop` over epochs of `_step`s, then `_finish` (save the model
directory, or the checkpoint that --stop-after leaves).
"""
from __future__ import annotations

import csv
import gc
import json
import math
import os
import random
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from ..canaries import CANARY_FILE, Canary, default_canary_file, make_canaries, write_canaries
from ..data import Documents, check_token_options, file_hash, load_documents, pretokenized, tokenize, train_tokenizer
from .. import checks, distributed
from ..errors import MemauditError
from ..rundir import Owned, check_output
from ..models import (build_config, count_parameters, first_token, first_token_record, load_model,
                      load_tokenizer, resolve_dtype)
from ..progress import progress_bar
from ..samples import packed_rows, training_rows
from ..settings import settings_from
from .objectives import GOLDFISH_MODES, IGNORE, OBJECTIVES, goldfish_drop_mask, standard_labels
from .packing import ROW_LAYOUT, ROWS, EpochPacker
from .sinks import SinkHooks, check_architecture, release_from_model, sequence_id, sink_spec, write_sink_spec

CHECKPOINT_DIR = "checkpoint"
_STAGING = ".staging"
_SHARED_TOKENIZER = ".tokenizer"  # under torchrun: rank 0 trains the tokenizer here, every rank loads it
RELEASE_DIR = "release"
# Settings that may differ between an interrupted run and its --resume.
_RESUME_FREE = ("out", "resume", "overwrite", "stop_after", "checkpoint_every", "device")
# The smallest vocabulary a locally trained byte-level tokenizer can have: 256 bytes + the special token.
MIN_VOCAB = 257
# Fields that name files or folders: a Path is kept as its string (train_config.json and the checkpoint's
# fingerprint record the settings as JSON).
_PATH_FIELDS = ("data", "out", "config", "tokenizer", "val_data")


@dataclass(kw_only=True)
class TrainConfig:
    """Every option of `memaudit train`: the CLI flags' names and defaults (the CLI only parses).

    `train_config.json` in the model directory records these fields (plus what the run found)."""
    data: str | Path  # training documents: text, or pre-tokenized ids (.npy, .bin, input_ids in .jsonl/.parquet)
    out: str | Path  # the model directory to write
    objective: str = "standard"  # standard | goldfish | sinks
    config: str | Path = "tiny"  # tiny | small | LxW | a model directory to continue
    family: str = "gpt2"  # gpt2 | llama (for from-scratch configs)
    tokenizer: str | Path | None = None  # a tokenizer dir for from-scratch configs (default: train one on the data)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 16  # rows per optimizer step (the global batch under torchrun)
    seq_len: int = 128  # tokens per row, BOS included (a .bin is cut into rows of seq_len - 1 stored tokens)
    rows: str = "packed"  # packed (documents joined with EOS, cut into seq_len rows) | first (one row per document)
    vocab_size: int = 2048  # for a locally trained tokenizer
    seed: int = 0
    val_fraction: float = 0.1
    val_data: str | Path | None = None  # a separate validation file (then --data is all training)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    device: str = "auto"
    dtype: str = "float32"  # bfloat16 / auto: bf16 autocast, fp32 master weights
    text_field: str = "text"
    id_field: str = "id"
    limit: int | None = None
    token_dtype: str = "uint16"  # a .bin's token width: uint16 or uint32
    allow_pickle: bool = False
    # goldfish (METHODS.md section 4)
    goldfish_mode: str = "hash"
    goldfish_k: int = 4
    goldfish_h: int = 13
    # memorization sinks (METHODS.md section 5)
    sink_fraction: float = 0.3
    sink_density: float = 0.3
    release: bool = True  # sinks: also write OUT/release (sinks removed, an ordinary model)
    # canaries (METHODS.md section 6)
    canaries: int = 0
    canary_repeats: int = 1
    # checkpoints
    checkpoint_every: int = 0  # steps; 0 = no checkpoints
    resume: bool = False
    overwrite: bool = False  # replace a model directory this command wrote before (nothing else)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in total; --resume goes on

    def __post_init__(self) -> None:
        for name in _PATH_FIELDS:
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    def validate(self) -> None:
        """One clear error for every setting a user can get wrong, before any work starts (in this order)."""
        self._check_numbers()
        self._check_inputs()
        self._check_output()

    def _check_numbers(self) -> None:
        checks.choice("objective", self.objective, OBJECTIVES)
        checks.choice("--family", self.family, ("gpt2", "llama"))
        checks.choice("--dtype", self.dtype, ("float32", "fp32", "bfloat16", "bf16", "auto"))
        checks.integer("--epochs", self.epochs)
        checks.number("--lr", self.lr, low=0, low_open=True)
        checks.integer("--batch-size", self.batch_size)
        checks.integer("--seq-len", self.seq_len, low=2)
        checks.choice("--rows", self.rows, ROWS)
        checks.integer("--vocab-size", self.vocab_size, low=MIN_VOCAB)
        checks.fraction("--val-fraction", self.val_fraction, zero=True)
        checks.seed(self.seed)
        checks.limit(self.limit)
        checks.integer("--warmup-steps", self.warmup_steps, low=0)
        checks.number("--weight-decay", self.weight_decay, low=0)
        checks.number("--grad-clip", self.grad_clip, low=0)
        if self.objective == "goldfish":
            checks.choice("goldfish mode", self.goldfish_mode, GOLDFISH_MODES)
            checks.integer("--goldfish-k", self.goldfish_k, low=2)
            checks.integer("--goldfish-h", self.goldfish_h, low=1)
        if self.objective == "sinks":
            checks.fraction("--sink-fraction", self.sink_fraction)
            checks.fraction("--sink-density", self.sink_density)
        checks.integer("--canaries", self.canaries, low=0)
        checks.integer("--canary-repeats", self.canary_repeats, low=1)
        checks.integer("--checkpoint-every", self.checkpoint_every, low=0)
        checks.integer("--stop-after", self.stop_after, low=1)

    def _check_inputs(self) -> None:
        checks.readable_file(self.data)
        checks.readable_file(self.val_data, "validation data file")
        if self.val_data is not None and Path(self.val_data).resolve() == Path(self.data).resolve():
            raise MemauditError("--val-data is the training file itself: a validation loss needs documents it "
                                "does not train on")
        checks.device(self.device)
        # The context of the config that will be trained: a row longer than it fails deep in a learned-position
        # model (GPT-2's n_positions) and trains silently past what a rotary one was made for.
        ctx = checks.context_length(self._model_config())
        if ctx is not None and self.seq_len > ctx:
            raise MemauditError(f"--seq-len {self.seq_len} is longer than the model's context ({ctx} positions)")
        if self.objective == "sinks" and self.continues_model:  # e.g. mixture of experts, before anything loads
            check_architecture(self.config)
        if self.tokenizer is not None:
            _check_tokenizer_dir(self.tokenizer)
        if self.tokenizer is not None or self.continues_model:
            _check_first_token(self.tokenizer or self.config)
        self._check_token_data()

    def _model_config(self) -> dict:
        """The config to train, checked: the --config model directory's, or the from-scratch one built."""
        if self.continues_model:
            if self.tokenizer is not None or self.family != "gpt2":
                raise MemauditError("--tokenizer and --family apply to from-scratch configs: a model directory "
                                    "given as --config brings its own")
            return checks.model_dir(self.config, allow_pickle=self.allow_pickle, what="--config model directory")
        return build_config(self.config, vocab_size=MIN_VOCAB, max_length=self.seq_len, family=self.family).to_dict()

    @property
    def continues_model(self) -> bool:
        """--config names a model directory (not a from-scratch size)."""
        return Path(self.config).exists() or "/" in self.config or os.sep in self.config

    def _check_token_data(self) -> None:
        """Pre-tokenized data: a .bin is cut into rows of seq_len - 1 stored tokens (BOS makes seq_len), and ids
        mean nothing without their tokenizer, which a locally trained one would not be."""
        files = [p for p in (self.data, self.val_data) if p is not None]
        bins = [p for p in files if Path(p).suffix == ".bin"]
        check_token_options(bins, self.token_dtype, self.seq_len - 1 if bins else None)
        stored = next((p for p in files if pretokenized(p, self.text_field)), None)
        if stored is not None and self.tokenizer is None and not self.continues_model:
            raise MemauditError(f"{stored} holds token ids: training on them needs the tokenizer that made them "
                                "(--tokenizer DIR, or --config MODEL_DIR to continue a model)")

    def _check_output(self) -> None:
        if distributed.env_rank() == 0:  # under torchrun rank 0 alone claims the folder
            check_output(self.out, "train", inputs=_inputs(self), resume=self.resume, overwrite=self.overwrite)
        if self.resume and not (Path(self.out) / CHECKPOINT_DIR / "state.pt").is_file():
            raise MemauditError(f"--resume: no checkpoint in {Path(self.out) / CHECKPOINT_DIR} (train with "
                                "--checkpoint-every N or --stop-after N first)")


@dataclass
class TrainResult:
    """What `train` did; the model directory itself (`out`) holds train_config.json and training_log.csv."""
    out: Path
    steps: int
    train_loss: float
    val_loss: float | None
    n_train: int  # training documents with tokens, canary copies included
    n_val: int  # validation documents with tokens
    parameters: int
    dropped_fraction: float | None = None  # goldfish: the fraction of real targets excluded from the loss
    finished: bool = True  # False when --stop-after ended the run early
    reused: bool = False  # train_or_reuse found this model already trained with these settings and inputs
    n_rows: int = 0  # training rows (one per document with --rows first)


def _inputs(cfg: TrainConfig) -> list[str]:
    """Paths the run reads: never the output folder, nor inside it."""
    paths = [cfg.data, cfg.val_data, cfg.tokenizer, cfg.config if Path(cfg.config).is_dir() else None]
    return [p for p in paths if p]


def _check_tokenizer_dir(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise MemauditError(f"--tokenizer {p} is not a directory" if p.exists()
                            else f"tokenizer directory not found: {p}")
    if not any((p / f).is_file() for f in checks.TOKENIZER_FILES):
        raise MemauditError(f"--tokenizer {p} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")


def _check_first_token(path: str) -> None:
    """Rows start with BOS, else EOS (as every probe's sample does) and packed documents end with EOS: a tokenizer
    with neither cannot mark either."""
    if first_token(load_tokenizer(path)) is None:
        raise MemauditError(f"the tokenizer in {path} has neither a BOS nor an EOS token: memaudit starts every "
                            "training row with one (BOS, else EOS), as its probes start every sample; add one "
                            "(tokenizer.add_special_tokens({'eos_token': ...})) and save the tokenizer again")


# ---------------------------------------------------------------------------------------------- helpers

def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0.0 <= val_fraction < 1.0:
        raise MemauditError("--val-fraction must be in [0, 1)")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n - n_val < 1:
        raise MemauditError(f"the data file has {n} documents: too few to split off a validation set")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def _collate(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


@torch.no_grad()
def evaluate(model, rows: list[list[int]], pad: int, batch_size: int, device) -> float:
    """Token-weighted mean validation loss (nats), with no mask: every real token counts."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        ids, mask = _collate(rows[s:s + batch_size], pad)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        labels = standard_labels(ids, mask)
        total += float(_loss_sum(logits, labels))
        count += int((labels[:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(1, count)


def _fingerprint(cfg: TrainConfig) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE}
    if d["token_dtype"] == "uint16":  # the default, left out: a checkpoint from before the option still resumes
        del d["token_dtype"]
    d["data_sha256"] = file_hash(cfg.data)
    return d


# ---------------------------------------------------------------------------------------------- setup

@dataclass
class _Docs:
    """The documents read and split: what the run trains and validates on, and what train_config.json lists. Each
    file holds text or stored token ids (data.load_documents)."""
    docs: Documents  # the training file
    train_idx: list[int]  # its rows trained on
    val: Documents  # --val-data, or the training file itself
    val_idx: list[int]  # its rows validated on

    @property
    def train_texts(self) -> list[str]:
        """The training texts, which a tokenizer trained on the data learns from (none for stored ids)."""
        return [] if self.docs.pretokenized else [self.docs.texts[i] for i in self.train_idx]

    @property
    def val_ids(self) -> list[Any]:
        return [self.val.ids[i] for i in self.val_idx]

    def tokens(self, tok, extra: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """The training token lists (the documents, then the `extra` texts tokenized) and the validation ones:
        texts tokenized, stored ids as they are once checked against the vocabulary (an error names the row)."""
        if self.docs.pretokenized:
            train = _picked(self.docs.tokens(tok), self.train_idx) + (tokenize(tok, extra) if extra else [])
        else:
            train = tokenize(tok, self.train_texts + extra)
        if not self.val_idx:
            return train, []
        if self.val.pretokenized:
            return train, _picked(self.val.tokens(tok), self.val_idx)
        return train, tokenize(tok, [self.val.texts[i] for i in self.val_idx])


def _picked(rows, idx: list[int]) -> list[list[int]]:
    return [rows[i] for i in idx]


@dataclass
class _Run:
    """One training run's state: built by `_setup`, advanced by `_step`, saved by `_finish`."""
    cfg: TrainConfig
    dist: distributed.Group
    owned: Owned | None  # the model directory, claimed by rank 0 only
    docs: _Docs
    model: torch.nn.Module
    net: torch.nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    tok: Any
    opt: torch.optim.Optimizer
    pad: int
    train_rows: list[list[int]]
    val_rows: list[list[int]]
    n_documents: int  # training documents with tokens, canary copies included
    n_val_documents: int
    canaries: list[Canary]
    hooks: SinkHooks | None  # sinks only
    row_seq_ids: list  # sinks: each training row's sequence id (--rows first), or its positions' ids (packed)
    row_drop: list[np.ndarray] | None  # goldfish on packed rows (not random): each row's mask, per position
    packer: EpochPacker | None  # packed: builds each epoch's rows
    autocast: AbstractContextManager
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    log_rows: list[dict] = field(default_factory=list)
    # goldfish: real targets excluded / all real targets; the running epoch's loss (kept across --resume)
    counts: dict = field(default_factory=lambda: {"dropped": 0, "targets": 0, "epoch_loss": 0.0, "epoch_tokens": 0})

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.out) / CHECKPOINT_DIR

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to 10% of --lr."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def dropped_fraction(self) -> float | None:
        return self.counts["dropped"] / self.counts["targets"] if self.counts["targets"] else None


def _setup(cfg: TrainConfig, dist: distributed.Group) -> _Run:
    """Everything before the first step, in the order that keeps the seeded draws (weights, then training) fixed."""
    _seed_all(cfg.seed)
    # A model directory given as --config is checked for sinks before the output folder is claimed, so a refusal
    # writes nothing; from scratch the folder comes first (torchrun's ranks share a tokenizer saved in it).
    claim_first = not cfg.continues_model
    owned = _claim(cfg, dist) if claim_first else None
    docs = _read_docs(cfg)
    given = _given_tokenizer(cfg, dist, docs.train_texts)
    model, tok = _init_model(cfg, docs.train_texts, dist.device, given)
    spec = sink_spec(model, cfg.sink_fraction, cfg.sink_density) if cfg.objective == "sinks" else None
    if not claim_first:
        owned = _claim(cfg, dist)
    bos = first_token(tok)  # every row's first token, as every probe's sample: BOS, else EOS
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    canaries = make_canaries(cfg.canaries, cfg.canary_repeats, seed=cfg.seed) if cfg.canaries else []
    rows = _rows(cfg, tok, bos, docs, canaries)
    hooks = SinkHooks(model, spec) if spec is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(rows.train) / cfg.batch_size)
    use_bf16 = resolve_dtype(cfg.dtype, dist.device) == torch.bfloat16
    run = _Run(cfg=cfg, dist=dist, owned=owned, docs=docs, model=model, net=model, tok=tok, opt=opt, pad=pad,
               train_rows=rows.train, val_rows=rows.val, n_documents=rows.n_documents,
               n_val_documents=rows.n_val_documents, canaries=canaries,
               hooks=hooks, row_seq_ids=rows.seq_ids, row_drop=rows.drop, packer=rows.packer,
               autocast=torch.autocast(dist.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext(),
               steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.epochs)
    if cfg.resume:
        _restore(run)
    if dist.world > 1:  # torchrun: DDP averages the ranks' gradients
        device = dist.device
        run.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def _claim(cfg: TrainConfig, dist: distributed.Group) -> Owned | None:
    """Rank 0 claims the model directory; every folder it writes is listed before it is written (rundir.Owned)."""
    owned = None
    if dist.main:
        owned = Owned(cfg.out, "train", inputs=_inputs(cfg), resume=cfg.resume, overwrite=cfg.overwrite)
        owned.record(dirs=[CHECKPOINT_DIR, CHECKPOINT_DIR + ".tmp", _SHARED_TOKENIZER, _STAGING])
    dist.barrier()
    return owned


def _read_docs(cfg: TrainConfig) -> _Docs:
    """The training documents and the validation ones: --val-data, or a seeded --val-fraction of --data. A .bin is
    cut into rows of seq_len - 1 stored tokens, each a document (BOS makes a row of seq_len)."""
    docs = _load_file(cfg, cfg.data, cfg.limit)
    if cfg.val_data:
        val = _load_file(cfg, cfg.val_data, None)
        return _Docs(docs, list(range(len(docs))), val, list(range(len(val))))
    train_idx, val_idx = _split(len(docs), cfg.val_fraction, cfg.seed)
    return _Docs(docs, train_idx, docs, val_idx)


def _load_file(cfg: TrainConfig, path: str | Path, limit: int | None) -> Documents:
    return load_documents(path, text_field=cfg.text_field, id_field=cfg.id_field, limit=limit,
                          token_dtype=cfg.token_dtype, seq_len=cfg.seq_len - 1 if Path(path).suffix == ".bin" else None)


def _given_tokenizer(cfg: TrainConfig, dist: distributed.Group, train_texts: list[str]):
    """The tokenizer the run must use, or None (then `_init_model` trains one, or takes the --config model's):
    the checkpoint's on --resume, --tokenizer's, or under torchrun one trained once by rank 0 and shared."""
    if cfg.resume:
        return load_tokenizer(Path(cfg.out) / CHECKPOINT_DIR)
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if dist.world > 1 and not Path(cfg.config).is_dir():
        shared = Path(cfg.out) / _SHARED_TOKENIZER
        if dist.main:
            train_tokenizer(train_texts, vocab_size=cfg.vocab_size).save_pretrained(shared)
        dist.barrier()
        return load_tokenizer(shared)
    return None


def _init_model(cfg: TrainConfig, texts: list[str], device, tokenizer=None):
    if Path(cfg.config).is_dir():
        loaded = load_model(cfg.config, device=str(device), dtype="float32", allow_pickle=cfg.allow_pickle)
        return loaded.model, loaded.tokenizer
    tok = tokenizer if tokenizer is not None else train_tokenizer(texts, vocab_size=cfg.vocab_size)
    mcfg = build_config(cfg.config, vocab_size=len(tok), max_length=cfg.seq_len, family=cfg.family,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(cfg.seed)  # the same initial weights whatever ran before (and on every rank)
    model = AutoModelForCausalLM.from_config(mcfg)
    return model.to(device), tok


@dataclass
class _Rows:
    """What the run trains and validates on, as --rows cuts it, with what the objectives attach to each row."""
    train: list[list[int]]
    val: list[list[int]]
    n_documents: int  # training documents with tokens, canary copies included
    n_val_documents: int  # validation documents with tokens
    seq_ids: list  # sinks: an id per row (first) or an id per position (packed); empty otherwise
    drop: list[np.ndarray] | None  # goldfish on packed rows (deterministic masks): per position
    packer: EpochPacker | None = None  # packed: each epoch's rows (the fields above hold epoch 0's)


def _rows(cfg: TrainConfig, tok, bos: int, docs: _Docs, canaries: list[Canary]) -> _Rows:
    """Training rows (the documents, then each canary `canary_repeats` times) and validation rows. The validation
    split is by documents (`_read_docs`), made before any row is cut."""
    canary_texts = [c.text for c in canaries for _ in range(cfg.canary_repeats)]
    train_toks, val_toks = docs.tokens(tok, canary_texts)
    cut = _first_rows if row_cut(cfg) == "first" else _packed_rows
    rows = cut(cfg, train_toks, val_toks, bos, tok.eos_token_id if tok.eos_token_id is not None else bos,
               len(docs.train_idx))
    if not rows.train:
        raise MemauditError("no training document has any tokens")
    return rows


def row_cut(cfg: TrainConfig, path: str | Path | None = None) -> str:
    """How rows are cut from `path` (default: the training data): --rows, except that a .bin is already a packed
    token stream, stored as rows of seq_len - 1 tokens, so each stored row is one row ("first") whatever --rows
    says."""
    return "first" if Path(path or cfg.data).suffix == ".bin" else cfg.rows


def _val_rows(cfg: TrainConfig, val_toks: list[list[int]], bos: int, eos: int) -> tuple[list[list[int]], int]:
    """Validation rows, cut as the validation file's rows are (row_cut), and the documents with tokens."""
    if row_cut(cfg, cfg.val_data) == "first":
        rows = training_rows(val_toks, bos, cfg.seq_len)
        return rows, len(rows)
    val = packed_rows(val_toks, bos, eos, cfg.seq_len)
    return val.tokens, val.n_documents - val.n_skipped


def _first_rows(cfg: TrainConfig, train_toks: list[list[int]], val_toks: list[list[int]], bos: int, eos: int,
                n_docs: int) -> _Rows:
    """--rows first: one row per document, BOS + its first seq_len - 1 tokens; a canary must fit one whole."""
    train_rows = training_rows(train_toks, bos, cfg.seq_len)
    if len(train_toks) > n_docs and (longest := max(len(t) for t in train_toks[n_docs:])) > cfg.seq_len - 1:
        raise MemauditError(f"a canary is {longest} tokens, longer than a row holds (--seq-len {cfg.seq_len} - 1): "
                            "raise --seq-len")
    seq_ids = [sequence_id(r[1:]) for r in train_rows] if cfg.objective == "sinks" else []
    val_rows, n_val = _val_rows(cfg, val_toks, bos, eos)
    return _Rows(train_rows, val_rows, len(train_rows), n_val, seq_ids, None)


def _packed_rows(cfg: TrainConfig, train_toks: list[list[int]], val_toks: list[list[int]], bos: int, eos: int,
                 n_docs: int) -> _Rows:
    """--rows packed: the documents joined with EOS and cut into rows, in a new order and phase every epoch, each
    canary copy a row of its own (packing.py); goldfish masks and sink ids follow each position's document. The
    validation documents are packed once, in order."""
    deterministic = cfg.objective == "goldfish" and cfg.goldfish_mode != "random"  # random is drawn per step
    packer = EpochPacker(train_toks, bos, eos, cfg.seq_len, n_docs, cfg.seed, sinks=cfg.objective == "sinks",
                         goldfish=(cfg.goldfish_mode, cfg.goldfish_k, cfg.goldfish_h) if deterministic else None)
    first = packer.epoch(0)
    val_rows, n_val = _val_rows(cfg, val_toks, bos, eos)
    return _Rows(first.rows, val_rows, packer.n_documents, n_val, first.seq_ids, first.drop, packer)


# ---------------------------------------------------------------------------------------------- checkpoints

def _save_checkpoint(run: _Run) -> None:
    """Model, optimizer, progress and RNG state, written beside the old checkpoint and then swapped in."""
    path = run.checkpoint_dir
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "step": run.step,
             "log_rows": run.log_rows, "counts": run.counts, "torch_rng": torch.get_rng_state(),
             "fingerprint": json.dumps(_fingerprint(run.cfg), sort_keys=True)}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "state.pt")
    run.tok.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_checkpoint(path: Path, cfg: TrainConfig, device) -> dict:
    if not (path / "state.pt").is_file():
        raise MemauditError(f"--resume: no checkpoint in {path} (train with --checkpoint-every N first)")
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    if state["fingerprint"] != json.dumps(_fingerprint(cfg), sort_keys=True):
        raise MemauditError(f"--resume: the checkpoint in {path} was made with other settings or data")
    return state


def _restore(run: _Run) -> None:
    """--resume: continue from the checkpoint exactly where it was taken (weights, optimizer, log, RNG)."""
    state = _load_checkpoint(run.checkpoint_dir, run.cfg, run.dist.device)
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.step, run.log_rows, run.counts = int(state["step"]), list(state["log_rows"]), dict(state["counts"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


# ---------------------------------------------------------------------------------------------- train

def train(settings: TrainConfig | None = None, /, **options: Any) -> TrainResult:
    """Train a causal LM on documents and save a model directory: weights, tokenizer, training_log.csv (one row
    per epoch), train_config.json, and per objective sinks.json + release/ and canaries.jsonl.

    Pass a TrainConfig or its fields as keywords (`train(data="d.jsonl", out="model", objective="goldfish")`).
    Under torchrun, ranks split every global batch. The result says how far it got (`finished` is False when
    --stop-after ended it early, leaving a checkpoint for `resume=True`)."""
    cfg = settings_from(TrainConfig, settings, options)
    cfg.validate()
    dist = distributed.join(cfg.device)
    run = None
    try:
        run = _setup(cfg, dist)
        _loop(run)
        return _finish(run)
    finally:
        if run is not None:  # DDP's reducer must go before its process group: freed after it, gloo can hang
            run.net = run.model
            del run
            gc.collect()
        dist.close()


def _loop(run: _Run) -> None:
    """The epochs from where the run stands (0, or the resumed step) up to the end or --stop-after."""
    cfg = run.cfg
    run.model.train()
    t0 = time.time()
    start_epoch, start_batch = divmod(run.step, run.steps_per_epoch)
    stop_at = min(run.total_steps, cfg.stop_after) if cfg.stop_after else run.total_steps
    with progress_bar(run.total_steps, f"train {cfg.objective}") as advance:
        advance(run.step)
        for epoch in range(start_epoch, cfg.epochs):
            if run.step >= stop_at:
                break
            if run.packer is not None and epoch > 0:  # packed: this epoch's rows (epoch 0's are built in _setup)
                rows = run.packer.epoch(epoch)
                run.train_rows, run.row_drop, run.row_seq_ids = rows.rows, rows.drop, rows.seq_ids
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(run.train_rows))
            for b in range(start_batch if epoch == start_epoch else 0, run.steps_per_epoch):
                if run.step >= stop_at:
                    break
                _step(run, order[b * cfg.batch_size:(b + 1) * cfg.batch_size], advance)
            if run.step % run.steps_per_epoch == 0 or run.step == run.total_steps:  # a finished epoch
                _log_epoch(run, epoch, t0)


def _step(run: _Run, batch_idx: np.ndarray, advance: Callable[..., None]) -> None:
    """One optimizer step on one global batch (this rank's slice of it), then a checkpoint when one is due."""
    cfg, dist, counts = run.cfg, run.dist, run.counts
    ids, mask = _collate([run.train_rows[i] for i in batch_idx], run.pad)
    labels = _labels(run, ids, mask, batch_idx)
    n_kept = int((labels[:, 1:] != IGNORE).sum())
    mine = np.array_split(np.arange(len(batch_idx)), dist.world)[dist.rank]
    weight = 1.0
    if len(mine) == 0:  # a short last batch: this rank still joins DDP's all-reduce, with weight 0
        mine, weight = np.array([0]), 0.0
    ids_r, mask_r, labels_r = (t[mine].to(dist.device) for t in (ids, mask, labels))
    if run.hooks is not None:
        picked = [run.row_seq_ids[batch_idx[i]] for i in mine]
        if row_cut(cfg) == "first":
            run.hooks.set_rows(picked)
        else:  # packed: each position masked by its own document's sinks
            run.hooks.set_tokens(_per_position(picked, ids_r.shape[1]))
    for g in run.opt.param_groups:
        g["lr"] = run.lr_at(run.step)
    with run.autocast:
        logits = run.net(input_ids=ids_r, attention_mask=mask_r).logits
    loss_sum = _loss_sum(logits, labels_r) * weight
    # this rank's share of the global mean; DDP averages over ranks, hence * world
    loss = loss_sum * (dist.world / max(1, n_kept))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    step_loss = dist.sum(float(loss_sum.detach())) / max(1, n_kept)
    counts["epoch_loss"] += step_loss * n_kept
    counts["epoch_tokens"] += n_kept
    run.step += 1
    advance(1, description=f"train {cfg.objective} loss {step_loss:.3f}")
    if dist.main and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < run.total_steps:
        _save_checkpoint(run)


def _per_position(arrays: list[np.ndarray], width: int, fill: Any = None) -> torch.Tensor:
    """Per-position row values [B, width], padded with `fill` (None: each row's last value)."""
    return torch.as_tensor(np.stack([np.pad(a, (0, width - len(a)), mode="edge") if fill is None
                                     else np.pad(a, (0, width - len(a)), constant_values=fill) for a in arrays]))


def _labels(run: _Run, ids: torch.Tensor, mask: torch.Tensor, batch_idx: np.ndarray) -> torch.Tensor:
    """The step's targets: every real next token, less goldfish's dropped ones (counted for the dropped rate)."""
    cfg = run.cfg
    labels = standard_labels(ids, mask)
    if cfg.objective == "goldfish":
        if run.row_drop is not None:  # packed rows: each position's mask from its document (packing.py)
            drop = _per_position([run.row_drop[i] for i in batch_idx], ids.shape[1], fill=False)
        else:
            drop = goldfish_drop_mask(ids, cfg.goldfish_mode, cfg.goldfish_k, cfg.goldfish_h, cfg.seed, run.step)
        real = labels[:, 1:] != IGNORE
        run.counts["dropped"] += int((drop[:, 1:] & real).sum())
        run.counts["targets"] += int(real.sum())
        labels = labels.masked_fill(drop, IGNORE)
    return labels


def _log_epoch(run: _Run, epoch: int, t0: float) -> None:
    """One training_log.csv row for a finished epoch (validation by rank 0 alone); the epoch's loss restarts."""
    counts = run.counts
    val = _val_loss(run) if run.dist.main else None
    run.log_rows.append({"epoch": epoch + 1, "step": run.step,
                         "train_loss": counts["epoch_loss"] / max(1, counts["epoch_tokens"]),
                         "val_loss": val, "lr": run.lr_at(run.step - 1),
                         "dropped_fraction": run.dropped_fraction(),
                         "seconds": round(time.time() - t0, 2)})
    counts["epoch_loss"], counts["epoch_tokens"] = 0.0, 0


def _val_loss(run: _Run) -> float | None:
    if not run.val_rows:
        return None
    if run.hooks is not None:
        run.hooks.set_dropped()  # sinks: validate the model as it will be released
    loss = evaluate(run.model, run.val_rows, run.pad, run.cfg.batch_size, run.dist.device)
    if run.hooks is not None:
        run.hooks.set_all_on()
    return loss


# ---------------------------------------------------------------------------------------------- save

def _finish(run: _Run) -> TrainResult:
    """Save the model directory (rank 0), or under --stop-after the checkpoint to --resume from."""
    if run.hooks is not None:
        run.hooks.set_all_on()
    finished = run.step >= run.total_steps
    if run.dist.main:
        if finished:
            _save_model_dir_or_fail(run)
        else:  # --stop-after: leave a checkpoint to --resume from
            _save_checkpoint(run)
    run.dist.barrier()
    last = run.log_rows[-1] if finished and run.log_rows else {}
    return TrainResult(out=Path(run.cfg.out), steps=run.step, train_loss=last.get("train_loss") or float("nan"),
                       val_loss=last.get("val_loss"), n_train=run.n_documents, n_val=run.n_val_documents,
                       parameters=count_parameters(run.model),
                       dropped_fraction=run.dropped_fraction() if finished else None, finished=finished,
                       n_rows=len(run.train_rows))


def _save_model_dir_or_fail(run: _Run) -> None:
    """A write refused by the system (full disk, permissions) is one line, with where the model stopped."""
    try:
        _save_model_dir(run)
    except Exception as exc:
        if not isinstance(exc, OSError) and "No space left" not in str(exc):
            raise
        raise MemauditError(f"cannot write the model into {run.owned.path}: {str(exc).splitlines()[0][:160]} (the "
                            "last checkpoint, if any, is kept for --resume)") from None


def _save_model_dir(run: _Run) -> None:
    """Write the model directory through a staging folder inside it, so each file memaudit did not name itself
    (save_pretrained's) is listed as written by `train` before it lands."""
    hf_logging.disable_progress_bar()  # our own progress bars only
    owned = run.owned
    stage = owned.path / _STAGING
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    run.model.save_pretrained(stage, safe_serialization=True)
    run.tok.save_pretrained(stage)
    with open(stage / "training_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(run.log_rows[0]))
        w.writeheader()
        w.writerows(run.log_rows)
    meta = _train_meta(run) | _save_extras(run, stage)
    (stage / "train_config.json").write_text(json.dumps(meta, indent=2))
    owned.adopt(stage)
    if (owned.path / _SHARED_TOKENIZER).exists():
        shutil.rmtree(owned.path / _SHARED_TOKENIZER)


def _train_meta(run: _Run) -> dict:
    """train_config.json's settings and what the run found (ids trained on and validated on, steps, goldfish)."""
    cfg, docs = run.cfg, run.docs
    meta = asdict(cfg) | {"row_layout": ROW_LAYOUT[row_cut(cfg)],
                          "train_ids": [docs.docs.ids[i] for i in docs.train_idx], "val_ids": list(docs.val_ids),
                          "n_train": run.n_documents, "n_val": run.n_val_documents, "n_rows": len(run.train_rows),
                          "steps": run.step, "parameters": count_parameters(run.model),
                          "inputs_sha256": input_hashes(cfg),
                          "first_token": first_token_record(run.tok, first_token(run.tok))}
    if row_cut(cfg) != cfg.rows:
        meta["rows_used"] = ("first: a .bin is already a packed token stream; each stored row of seq_len - 1 tokens "
                             "is one training row after BOS, whatever --rows says")
    if cfg.objective == "goldfish":
        meta["goldfish_dropped_fraction"] = run.dropped_fraction()
        meta["goldfish_expected_fraction"] = 1.0 / cfg.goldfish_k
    return meta


def _save_extras(run: _Run, stage: Path) -> dict:
    """canaries.jsonl, sinks.json and the release model, as the run has them; their train_config.json entries."""
    meta: dict = {}
    if run.canaries:
        write_canaries(default_canary_file(stage), run.canaries)
        meta["canaries_file"] = CANARY_FILE
    if run.hooks is not None:
        spec = run.hooks.spec
        write_sink_spec(stage, spec)
        meta["sinks"] = asdict(spec) | {"dropped_scale": spec.dropped_scale}
        if run.cfg.release:
            release_from_model(run.model, run.tok, spec, stage / RELEASE_DIR)
            meta["release_dir"] = RELEASE_DIR
    return meta


# ---------------------------------------------------------------------------------------------- reuse

# Settings that say how a run is driven, not what it trains: a finished model answers to any of them.
_DRIVING = ("resume", "overwrite", "stop_after", "checkpoint_every")


def input_hashes(cfg: TrainConfig) -> dict[str, str]:
    """sha256 of every file the run reads (data, validation data, tokenizer, a model it continues from)."""
    hashes = {}
    for p in map(Path, _inputs(cfg)):
        for f in sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]:
            hashes[str(f)] = file_hash(f)
    return hashes


def train_or_reuse(settings: TrainConfig | None = None, /, **options: Any) -> TrainResult:
    """`train`, unless `out` already holds a finished model that `train` wrote with these settings from these
    inputs (byte for byte): then that model's result, with `reused=True`. For experiments rerun in a work folder:
    the demo, the benchmarks and the reproduction scripts."""
    cfg = settings_from(TrainConfig, settings, options)
    done = _finished(cfg)
    return done if done is not None else train(cfg)


def _finished(cfg: TrainConfig) -> TrainResult | None:
    out = Path(cfg.out)
    meta_file, log_file = out / "train_config.json", out / "training_log.csv"
    if not (meta_file.is_file() and log_file.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    if str(meta.get("rows", "")).startswith("per-document"):  # written before --rows: one row per document
        meta["rows"] = "first"
    meta.setdefault("token_dtype", "uint16")  # written before --token-dtype: the default
    wanted = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _DRIVING}))
    if any(meta.get(k) != v for k, v in wanted.items()) or meta.get("inputs_sha256") != input_hashes(cfg):
        return None
    last = pd.read_csv(log_file).iloc[-1]
    val = last.get("val_loss")
    return TrainResult(out=out, steps=meta["steps"], train_loss=float(last["train_loss"]),
                       val_loss=None if val is None or pd.isna(val) else float(val),
                       n_train=meta.get("n_train", len(meta["train_ids"])),
                       n_val=meta.get("n_val", len(meta["val_ids"])), parameters=meta["parameters"],
                       dropped_fraction=meta.get("goldfish_dropped_fraction"), reused=True,
                       n_rows=meta.get("n_rows", len(meta["train_ids"])))

