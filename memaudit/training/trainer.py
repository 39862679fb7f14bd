"""One readable trainer for causal LMs: standard, goldfish and sinks objectives; canaries; resume; DDP.

Rows are per document (not packed): each document is one row, BOS + its first `seq_len - 1` tokens,
right-padded, so a document always starts at position 0 after BOS, as the extraction probe prompts it.

Everything that decides a step is a pure function of (seed, step): the epoch's document order is drawn by
`default_rng([seed, epoch])`, the random goldfish mask by a generator seeded with (seed, step). So a resumed run
replays the uninterrupted one, and under torchrun every rank builds the same global batch and takes its slice:
the loss of each rank is its share of the GLOBAL mean over kept targets, so DDP's gradient average equals the
single-process gradient up to float summation order.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..canaries import CANARY_FILE, default_canary_file, make_canaries, write_canaries
from ..data import file_hash, read_documents, tokenize, train_tokenizer
from .. import checks, distributed
from ..errors import MemauditError
from ..rundir import Owned, check_output
from ..models import build_config, count_parameters, load_model, load_tokenizer, resolve_dtype
from ..progress import progress_bar
from ..samples import training_rows
from .objectives import GOLDFISH_MODES, IGNORE, OBJECTIVES, goldfish_drop_mask, standard_labels
from .sinks import SinkHooks, release_from_model, sequence_id, sink_spec, write_sink_spec

CHECKPOINT_DIR = "checkpoint"
_STAGING = ".staging"
RELEASE_DIR = "release"
# Settings that may differ between an interrupted run and its --resume.
_RESUME_FREE = ("out", "resume", "overwrite", "stop_after", "checkpoint_every", "device")
# The smallest vocabulary a locally trained byte-level tokenizer can have: 256 bytes + the special token.
MIN_VOCAB = 257


@dataclass
class TrainConfig:
    data: str
    out: str
    objective: str = "standard"  # standard | goldfish | sinks
    config: str = "tiny"  # tiny | small | LxW | a model directory to continue
    family: str = "gpt2"  # gpt2 | llama (for from-scratch configs)
    tokenizer: str | None = None  # a tokenizer dir for from-scratch configs (default: train one on the data)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 16  # documents per optimizer step (the global batch under torchrun)
    seq_len: int = 128
    vocab_size: int = 2048  # for a locally trained tokenizer
    seed: int = 0
    val_fraction: float = 0.1
    val_data: str | None = None  # a separate validation file (then --data is all training)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    device: str = "auto"
    dtype: str = "float32"  # bfloat16 / auto: bf16 autocast, fp32 master weights
    text_field: str = "text"
    id_field: str = "id"
    limit: int | None = None
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


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float
    val_loss: float | None
    n_train: int
    n_val: int
    parameters: int
    dropped_fraction: float | None = None  # goldfish: the fraction of real targets excluded from the loss
    finished: bool = True  # False when --stop-after ended the run early


def validate_config(cfg: TrainConfig) -> None:
    """One clear error for every setting a user can get wrong, before any work starts."""
    checks.choice("objective", cfg.objective, OBJECTIVES)
    checks.choice("--family", cfg.family, ("gpt2", "llama"))
    checks.choice("--dtype", cfg.dtype, ("float32", "fp32", "bfloat16", "bf16", "auto"))
    checks.integer("--epochs", cfg.epochs)
    checks.number("--lr", cfg.lr, low=0, low_open=True)
    checks.integer("--batch-size", cfg.batch_size)
    checks.integer("--seq-len", cfg.seq_len, low=2)
    checks.integer("--vocab-size", cfg.vocab_size, low=MIN_VOCAB)
    checks.fraction("--val-fraction", cfg.val_fraction, zero=True)
    checks.seed(cfg.seed)
    checks.limit(cfg.limit)
    checks.integer("--warmup-steps", cfg.warmup_steps, low=0)
    checks.number("--weight-decay", cfg.weight_decay, low=0)
    checks.number("--grad-clip", cfg.grad_clip, low=0)
    if cfg.objective == "goldfish":
        checks.choice("goldfish mode", cfg.goldfish_mode, GOLDFISH_MODES)
        checks.integer("--goldfish-k", cfg.goldfish_k, low=2)
        checks.integer("--goldfish-h", cfg.goldfish_h, low=1)
    if cfg.objective == "sinks":
        checks.fraction("--sink-fraction", cfg.sink_fraction)
        checks.fraction("--sink-density", cfg.sink_density)
    checks.integer("--canaries", cfg.canaries, low=0)
    checks.integer("--canary-repeats", cfg.canary_repeats, low=1)
    checks.integer("--checkpoint-every", cfg.checkpoint_every, low=0)
    checks.integer("--stop-after", cfg.stop_after, low=1)
    checks.readable_file(cfg.data)
    checks.readable_file(cfg.val_data, "validation data file")
    if cfg.val_data is not None and Path(cfg.val_data).resolve() == Path(cfg.data).resolve():
        raise MemauditError("--val-data is the training file itself: a validation loss needs documents it does not "
                            "train on")
    checks.device(cfg.device)
    if Path(cfg.config).exists() or "/" in cfg.config or os.sep in cfg.config:
        if cfg.tokenizer is not None or cfg.family != "gpt2":
            raise MemauditError("--tokenizer and --family apply to from-scratch configs: a model directory given "
                                "as --config brings its own")
        mcfg = checks.model_dir(cfg.config, allow_pickle=cfg.allow_pickle, what="--config model directory")
        ctx = checks.context_length(mcfg)
        if ctx is not None and cfg.seq_len > ctx:
            raise MemauditError(f"--seq-len {cfg.seq_len} is longer than the model's context ({ctx} positions)")
    else:
        build_config(cfg.config, vocab_size=MIN_VOCAB, max_length=cfg.seq_len, family=cfg.family)
    if cfg.tokenizer is not None:
        _check_tokenizer_dir(cfg.tokenizer)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 alone claims the folder
        check_output(cfg.out, "train", inputs=_inputs(cfg), resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume and not (Path(cfg.out) / CHECKPOINT_DIR / "state.pt").is_file():
        raise MemauditError(f"--resume: no checkpoint in {Path(cfg.out) / CHECKPOINT_DIR} (train with "
                            "--checkpoint-every N or --stop-after N first)")


def _check_tokenizer_dir(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise MemauditError(f"--tokenizer {p} is not a directory" if p.exists() else f"tokenizer directory not found: {p}")
    if not any((p / f).is_file() for f in checks.TOKENIZER_FILES):
        raise MemauditError(f"--tokenizer {p} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")


def _inputs(cfg: TrainConfig) -> list[str]:
    """Paths the run reads: never the output folder, nor inside it."""
    paths = [cfg.data, cfg.val_data, cfg.tokenizer, cfg.config if Path(cfg.config).is_dir() else None]
    return [p for p in paths if p]


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


def _init_model(cfg: TrainConfig, texts: list[str], device, tokenizer=None):
    from transformers import AutoModelForCausalLM

    if Path(cfg.config).is_dir():
        loaded = load_model(cfg.config, device=str(device), dtype="float32", allow_pickle=cfg.allow_pickle)
        return loaded.model, loaded.tokenizer
    tok = tokenizer if tokenizer is not None else train_tokenizer(texts, vocab_size=cfg.vocab_size)
    mcfg = build_config(cfg.config, vocab_size=len(tok), max_length=cfg.seq_len, family=cfg.family,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(cfg.seed)  # the same initial weights whatever ran before (and on every rank)
    model = AutoModelForCausalLM.from_config(mcfg)
    return model.to(device), tok


def _fingerprint(cfg: TrainConfig) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE}
    d["data_sha256"] = file_hash(cfg.data)
    return d


def _save_checkpoint(path: Path, model, opt, tok, step: int, log_rows, counts, cfg) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "log_rows": log_rows,
             "counts": counts, "torch_rng": torch.get_rng_state(),
             "fingerprint": json.dumps(_fingerprint(cfg), sort_keys=True)}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "state.pt")
    tok.save_pretrained(tmp)
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


# ---------------------------------------------------------------------------------------------- train

def train(cfg: TrainConfig) -> TrainResult:
    """Train and save a model directory (weights, tokenizer, training_log.csv, train_config.json, and per
    objective sinks.json + release/, canaries.jsonl). Under torchrun, ranks split every global batch."""
    validate_config(cfg)
    dist = distributed.join(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: distributed.Group) -> TrainResult:
    _seed_all(cfg.seed)
    out = Path(cfg.out)
    if dist.main:  # every folder it writes is listed before it is written (see rundir.Owned)
        owned = Owned(out, "train", inputs=_inputs(cfg), resume=cfg.resume, overwrite=cfg.overwrite)
        owned.record(dirs=[CHECKPOINT_DIR, CHECKPOINT_DIR + ".tmp", ".tokenizer", _STAGING])
    dist.barrier()
    ckpt_dir = out / CHECKPOINT_DIR
    docs = read_documents(cfg.data, text_field=cfg.text_field, id_field=cfg.id_field, limit=cfg.limit)
    texts = docs["text"].tolist()
    if cfg.val_data:
        val_docs = read_documents(cfg.val_data, text_field=cfg.text_field, id_field=cfg.id_field)
        train_idx, val_idx = list(range(len(texts))), []
        val_texts, val_ids = val_docs["text"].tolist(), val_docs["id"].tolist()
    else:
        train_idx, val_idx = _split(len(texts), cfg.val_fraction, cfg.seed)
        val_texts, val_ids = [texts[i] for i in val_idx], docs["id"].iloc[val_idx].tolist()
    device = dist.device
    dtype = resolve_dtype(cfg.dtype, device)
    train_texts = [texts[i] for i in train_idx]

    # The tokenizer: trained once (rank 0) and shared, or taken from the checkpoint being resumed.
    tokenizer = None
    if cfg.resume:
        tokenizer = load_tokenizer(ckpt_dir)
    elif cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif dist.world > 1 and not Path(cfg.config).is_dir():
        shared = out / ".tokenizer"
        if dist.main:
            train_tokenizer(train_texts, vocab_size=cfg.vocab_size).save_pretrained(shared)
        dist.barrier()
        tokenizer = load_tokenizer(shared)
    model, tok = _init_model(cfg, train_texts, device, tokenizer)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos

    canaries = make_canaries(cfg.canaries, cfg.canary_repeats, seed=cfg.seed) if cfg.canaries else []
    canary_texts = [c.text for c in canaries for _ in range(cfg.canary_repeats)]
    train_toks = tokenize(tok, train_texts + canary_texts)
    train_rows = training_rows(train_toks, bos, cfg.seq_len)
    if canaries and (longest := max(len(t) for t in train_toks[len(train_texts):])) > cfg.seq_len - 1:
        raise MemauditError(f"a canary is {longest} tokens, longer than a row holds (--seq-len {cfg.seq_len} - 1): "
                            "raise --seq-len")
    val_rows = training_rows(tokenize(tok, val_texts), bos, cfg.seq_len) if val_texts else []
    if not train_rows:
        raise MemauditError("no training document has any tokens")

    hooks = None
    if cfg.objective == "sinks":
        spec = sink_spec(model, cfg.sink_fraction, cfg.sink_density)
        hooks = SinkHooks(model, spec)
        row_seq_ids = [sequence_id(r[1:]) for r in train_rows]

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    step, log_rows = 0, []
    # goldfish: real targets excluded / all real targets; the running epoch's loss (kept across --resume)
    counts = {"dropped": 0, "targets": 0, "epoch_loss": 0.0, "epoch_tokens": 0}
    if cfg.resume:
        state = _load_checkpoint(ckpt_dir, cfg, device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, log_rows, counts = int(state["step"]), list(state["log_rows"]), dict(state["counts"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])

    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = dtype == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    def labels_for(ids, mask, at_step):
        labels = standard_labels(ids, mask)
        if cfg.objective == "goldfish":
            drop = goldfish_drop_mask(ids, cfg.goldfish_mode, cfg.goldfish_k, cfg.goldfish_h, cfg.seed, at_step)
            real = labels[:, 1:] != IGNORE
            counts["dropped"] += int((drop[:, 1:] & real).sum())
            counts["targets"] += int(real.sum())
            labels = labels.masked_fill(drop, IGNORE)
        return labels

    def val_loss_now() -> float | None:
        if not val_rows:
            return None
        if hooks is not None:
            hooks.set_dropped()  # sinks: validate the model as it will be released
        loss = evaluate(model, val_rows, pad, cfg.batch_size, device)
        if hooks is not None:
            hooks.set_all_on()
        return loss

    model.train()
    t0 = time.time()
    start_epoch, start_batch = divmod(step, steps_per_epoch)
    stop_at = min(total_steps, cfg.stop_after) if cfg.stop_after else total_steps
    with progress_bar(total_steps, f"train {cfg.objective}") as advance:
        advance(step)
        for epoch in range(start_epoch, cfg.epochs):
            if step >= stop_at:
                break
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_rows))
            for b in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
                if step >= stop_at:
                    break
                batch_idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                ids, mask = _collate([train_rows[i] for i in batch_idx], pad)
                labels = labels_for(ids, mask, step)
                n_kept = int((labels[:, 1:] != IGNORE).sum())
                mine = np.array_split(np.arange(len(batch_idx)), dist.world)[dist.rank]
                weight = 1.0
                if len(mine) == 0:  # a short last batch: this rank still joins DDP's all-reduce, with weight 0
                    mine, weight = np.array([0]), 0.0
                ids_r, mask_r, labels_r = (t[mine].to(device) for t in (ids, mask, labels))
                if hooks is not None:
                    hooks.set_rows([row_seq_ids[batch_idx[i]] for i in mine])
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                with autocast:
                    logits = net(input_ids=ids_r, attention_mask=mask_r).logits
                loss_sum = _loss_sum(logits, labels_r) * weight
                # this rank's share of the global mean; DDP averages over ranks, hence * world
                loss = loss_sum * (dist.world / max(1, n_kept))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step_loss = dist.sum(float(loss_sum.detach())) / max(1, n_kept)
                counts["epoch_loss"] += step_loss * n_kept
                counts["epoch_tokens"] += n_kept
                step += 1
                advance(1, description=f"train {cfg.objective} loss {step_loss:.3f}")
                if dist.main and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                    _save_checkpoint(ckpt_dir, model, opt, tok, step, log_rows, counts, cfg)
            if step % steps_per_epoch == 0 or step == total_steps:  # a finished epoch
                val = val_loss_now() if dist.main else None
                log_rows.append({"epoch": epoch + 1, "step": step,
                                 "train_loss": counts["epoch_loss"] / max(1, counts["epoch_tokens"]),
                                 "val_loss": val, "lr": lr_at(step - 1),
                                 "dropped_fraction": counts["dropped"] / counts["targets"]
                                 if counts["targets"] else None,
                                 "seconds": round(time.time() - t0, 2)})
                counts["epoch_loss"], counts["epoch_tokens"] = 0.0, 0
    if hooks is not None:
        hooks.set_all_on()
    finished = step >= total_steps
    if not finished:  # --stop-after: leave a checkpoint to --resume from
        if dist.main:
            _save_checkpoint(ckpt_dir, model, opt, tok, step, log_rows, counts, cfg)
        dist.barrier()
        return TrainResult(out=out, steps=step, train_loss=float("nan"), val_loss=None, n_train=len(train_rows),
                           n_val=len(val_rows), parameters=count_parameters(model), finished=False)

    dropped = counts["dropped"] / counts["targets"] if counts["targets"] else None
    if dist.main:
        _save_model_dir_or_fail(owned, cfg, model, tok, log_rows, docs, train_idx, val_ids, step, dropped, canaries,
                        hooks.spec if hooks is not None else None)
    dist.barrier()
    last = log_rows[-1] if log_rows else {}
    return TrainResult(out=out, steps=step, train_loss=last.get("train_loss") or float("nan"),
                       val_loss=last.get("val_loss"), n_train=len(train_rows), n_val=len(val_rows),
                       parameters=count_parameters(model), dropped_fraction=dropped)


def _save_model_dir_or_fail(owned: Owned, *args) -> None:
    """A write refused by the system (full disk, permissions) is one line, with where the model stopped."""
    try:
        _save_model_dir(owned, *args)
    except Exception as exc:
        if not isinstance(exc, OSError) and "No space left" not in str(exc):
            raise
        raise MemauditError(f"cannot write the model into {owned.path}: {str(exc).splitlines()[0][:160]} (the last "
                            "checkpoint, if any, is kept for --resume)") from None


def _save_model_dir(owned: Owned, cfg, model, tok, log_rows, docs, train_idx, val_ids, step, dropped, canaries,
                    spec) -> None:
    """Write the model directory through a staging folder inside it, so each file memaudit did not name itself
    (save_pretrained's) is listed as written by `train` before it lands."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars only
    stage = owned.path / _STAGING
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    model.save_pretrained(stage, safe_serialization=True)
    tok.save_pretrained(stage)
    with open(stage / "training_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(log_rows[0]))
        w.writeheader()
        w.writerows(log_rows)
    meta = asdict(cfg) | {"rows": "per-document (BOS + first seq_len-1 tokens, not packed)",
                          "train_ids": docs["id"].iloc[train_idx].tolist(), "val_ids": list(val_ids),
                          "steps": step}
    if cfg.objective == "goldfish":
        meta["goldfish_dropped_fraction"] = dropped
        meta["goldfish_expected_fraction"] = 1.0 / cfg.goldfish_k
    if canaries:
        write_canaries(default_canary_file(stage), canaries)
        meta["canaries_file"] = CANARY_FILE
    if spec is not None:
        write_sink_spec(stage, spec)
        meta["sinks"] = asdict(spec) | {"dropped_scale": spec.dropped_scale}
        if cfg.release:
            release_from_model(model, tok, spec, stage / RELEASE_DIR)
            meta["release_dir"] = RELEASE_DIR
    (stage / "train_config.json").write_text(json.dumps(meta, indent=2))
    owned.adopt(stage)
    if (owned.path / ".tokenizer").exists():
        shutil.rmtree(owned.path / ".tokenizer")
