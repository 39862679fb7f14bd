"""A small, readable trainer for causal LMs: from a tiny config (with a locally trained tokenizer) or a model dir.

Rows are per document (not packed): each document is one row, BOS + its first `seq_len - 1` tokens,
right-padded, so a document always starts at position 0 after BOS, as the extraction probe prompts it.
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import read_documents, tokenize, train_tokenizer
from ..errors import MemauditError
from ..models import build_config, count_parameters, load_model, resolve_device, resolve_dtype
from ..progress import progress_bar
from .objectives import IGNORE, OBJECTIVES


@dataclass
class TrainConfig:
    data: str
    out: str
    objective: str = "standard"
    config: str = "tiny"  # tiny | small | LxW | a model directory to continue
    family: str = "gpt2"  # gpt2 | llama (for from-scratch configs)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 2048  # for a locally trained tokenizer
    seed: int = 0
    val_fraction: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    device: str = "auto"
    dtype: str = "float32"
    text_field: str = "text"
    id_field: str = "id"
    limit: int | None = None
    allow_pickle: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float
    val_loss: float | None
    n_train: int
    n_val: int
    parameters: int


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


def _rows(token_lists, bos: int, seq_len: int) -> list[list[int]]:
    return [[bos] + t[: seq_len - 1] for t in token_lists if t]


def _collate(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over kept targets (labels shifted inside)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model, rows: list[list[int]], pad: int, batch_size: int, device) -> float:
    """Token-weighted mean validation loss (nats), with no mask: every real token counts."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        ids, mask = _collate(rows[s:s + batch_size], pad)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        labels = ids.masked_fill(mask == 0, IGNORE)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        count += int((labels[:, 1:] != IGNORE).sum())
    model.train()
    return total / max(1, count)


def _init_model(cfg: TrainConfig, texts: list[str], device, dtype):
    from transformers import AutoModelForCausalLM

    if Path(cfg.config).is_dir():
        loaded = load_model(cfg.config, device=str(device), dtype="float32", allow_pickle=cfg.allow_pickle)
        return loaded.model, loaded.tokenizer
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    mcfg = build_config(cfg.config, vocab_size=len(tok), max_length=cfg.seq_len, family=cfg.family,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(mcfg)
    return model.to(device), tok


def train(cfg: TrainConfig) -> TrainResult:
    """Train and save a model directory (weights, tokenizer, training_log.csv, train_config.json)."""
    if cfg.objective not in OBJECTIVES:
        raise MemauditError(f"unknown objective {cfg.objective!r}: use {', '.join(OBJECTIVES)}")
    if cfg.epochs < 1 or cfg.lr <= 0 or cfg.batch_size < 1 or cfg.seq_len < 2:
        raise MemauditError("--epochs, --batch-size must be >= 1, --lr > 0 and --seq-len >= 2")
    _seed_all(cfg.seed)
    docs = read_documents(cfg.data, text_field=cfg.text_field, id_field=cfg.id_field, limit=cfg.limit)
    train_idx, val_idx = _split(len(docs), cfg.val_fraction, cfg.seed)
    texts = docs["text"].tolist()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok = _init_model(cfg, [texts[i] for i in train_idx], device, dtype)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    toks = tokenize(tok, texts)
    train_rows = _rows([toks[i] for i in train_idx], bos, cfg.seq_len)
    val_rows = _rows([toks[i] for i in val_idx], bos, cfg.seq_len)
    label_fn = OBJECTIVES[cfg.objective]

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else _nullcontext()
    out = Path(cfg.out)
    log_rows = []
    rng = np.random.default_rng(cfg.seed)
    model.train()
    step, loss_val, t0 = 0, float("nan"), time.time()
    with progress_bar(total_steps, f"train {cfg.objective}") as advance:
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(train_rows))
            for s in range(0, len(order), cfg.batch_size):
                ids, mask = _collate([train_rows[i] for i in order[s:s + cfg.batch_size]], pad)
                ids, mask = ids.to(device), mask.to(device)
                labels = label_fn(ids, mask, step)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                with autocast:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                loss = lm_loss(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                loss_val = loss.item()
                step += 1
                advance(1)
            val_loss = evaluate(model, val_rows, pad, cfg.batch_size, device) if val_rows else None
            log_rows.append({"epoch": epoch + 1, "step": step, "train_loss": loss_val, "val_loss": val_loss,
                             "lr": lr_at(step - 1), "seconds": round(time.time() - t0, 2)})

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    with open(out / "training_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(log_rows[0]))
        w.writeheader()
        w.writerows(log_rows)
    meta = asdict(cfg) | {"rows": "per-document (BOS + first seq_len-1 tokens, not packed)",
                          "train_ids": docs["id"].iloc[train_idx].tolist(),
                          "val_ids": docs["id"].iloc[val_idx].tolist(), "steps": step}
    (out / "train_config.json").write_text(json.dumps(meta, indent=2))
    return TrainResult(out=out, steps=step, train_loss=loss_val, val_loss=log_rows[-1]["val_loss"],
                       n_train=len(train_rows), n_val=len(val_rows), parameters=count_parameters(model))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
