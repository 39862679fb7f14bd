"""Benchmark: every logit-based MIA attack at once through memaudit vs the per-sample way peers do it.

memaudit: `memaudit.mia` with loss, zlib, zstd, reference, min_k, min_k_pp (k = 10, 20, 30), recall and dc_pdd:
three batched scoring passes in all (target, reference model, shots-conditioned target), every score derived
from the kept per-token arrays.
Peer way (MIMIR-style): each attack is its own loop over the documents, one forward pass per document at batch
size 1 with the full [T, V] log-softmax kept; reference and recall need two passes per document.
Same models, data and machine, one run. The two ways' scores are compared as a check. Metrics are not timed
(--bootstrap 0). Usage: python bench/bench_mia.py [--docs 100] [--window 64] [--config tiny|small] [--repeats 2]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import zstandard

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = "loss,zlib,zstd,reference,min_k,min_k_pp,recall,dc_pdd"
KS = (10.0, 20.0, 30.0)


def build(tmp: Path, docs: int, config: str, window: int):
    from transformers import AutoModelForCausalLM

    from memaudit.corpus import demo_corpus
    from memaudit.data import train_tokenizer, write_documents
    from memaudit.models import build_config

    members, non = demo_corpus(n_train=docs, n_heldout=docs, seed=0)
    mem_f = write_documents(tmp / "members.jsonl", members, [f"m{i}" for i in range(docs)])
    non_f = write_documents(tmp / "non.jsonl", non, [f"n{i}" for i in range(docs)])
    tok = train_tokenizer(members + non, vocab_size=2048)
    dirs = []
    for name, seed in (("target", 0), ("reference", 1)):
        torch.manual_seed(seed)
        cfg = build_config(config, vocab_size=len(tok), max_length=2 * window, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        dirs.append(tmp / name)
    return dirs[0], dirs[1], mem_f, non_f


def peer(target_dir, ref_dir, mem_f, non_f, window: int, shot_ids: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Each attack its own per-document loop, batch size 1, full log-softmax kept."""
    from memaudit.data import read_documents, tokenize
    from memaudit.models import load_model

    tm = load_model(target_dir, device="cpu", dtype="float32")
    rm = load_model(ref_dir, device="cpu", dtype="float32").model
    tok = tm.tokenizer
    bos, eos, ctx = tok.bos_token_id, tok.eos_token_id, tm.max_length
    docs = [(i, t[:window]) for f in (mem_f, non_f) for i, t in
            zip(read_documents(f)["id"], tokenize(tok, read_documents(f)["text"])) if len(t) >= window]
    passes = 0

    def full_lp(model, ids):  # the peer's one forward pass: whole log-softmax over the vocabulary
        nonlocal passes
        passes += 1
        with torch.no_grad():
            lsm = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
        return lsm, lsm[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]

    cols: dict[str, list[float]] = {}
    for name in ("loss", "zlib", "zstd"):
        out = []
        for _, x in docs:
            _, lp = full_lp(tm.model, [bos] + x)
            ll = lp.mean().item()
            text = tok.decode(x).encode("utf-8")
            if name == "loss":
                out.append(ll)
            elif name == "zlib":
                out.append(ll / (8 * len(zlib.compress(text))))
            else:
                out.append(ll / (8 * len(zstandard.ZstdCompressor(level=3).compress(text))))
        cols[name] = out
    cols["reference"] = [full_lp(tm.model, [bos] + x)[1].mean().item() - full_lp(rm, [bos] + x)[1].mean().item()
                         for _, x in docs]
    cols.update({f"min_k_{k:g}": [] for k in KS} | {f"min_k_pp_{k:g}": [] for k in KS})
    for _, x in docs:
        _, lp = full_lp(tm.model, [bos] + x)
        for k in KS:
            cols[f"min_k_{k:g}"].append(torch.sort(lp).values[:max(1, int(len(lp) * k / 100))].mean().item())
    for _, x in docs:
        lsm, lp = full_lp(tm.model, [bos] + x)
        p = lsm.exp()
        mu = (p * lsm).sum(-1)
        sigma = ((p * lsm ** 2).sum(-1) - mu ** 2).clamp_min(1e-12).sqrt()
        z = torch.sort((lp - mu) / sigma).values
        for k in KS:
            cols[f"min_k_pp_{k:g}"].append(z[:max(1, int(len(z) * k / 100))].mean().item())
    id_tok = dict(docs)
    prefix = [t for s in shot_ids for t in id_tok[s] + [eos]][-(ctx - window):]
    rec = []
    for i, x in docs:
        if i in shot_ids:
            rec.append(float("nan"))
            continue
        ll = full_lp(tm.model, [bos] + x)[1].mean().item()
        rec.append(full_lp(tm.model, [bos] + prefix + x)[1][-len(x):].mean().item() / ll)
    cols["recall"] = rec
    corpus = [t for d in tokenize(tok, read_documents(non_f)["text"]) for t in d]
    counts = np.bincount(corpus, minlength=len(tok)).astype(float)
    logf = np.log((counts + 1) / (counts.sum() + len(tok)))
    dc = []
    for _, x in docs:
        _, lp = full_lp(tm.model, [bos] + x)
        seen, alphas = set(), []
        for t, l in zip(x, lp.tolist()):
            if t not in seen:
                seen.add(t)
                alphas.append(min(math.exp(l) * -logf[t], 0.01))
        dc.append(float(np.mean(alphas)))
    cols["dc_pdd"] = dc
    return {k: np.asarray(v) for k, v in cols.items()}, passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100, help="members and as many non-members")
    ap.add_argument("--repeats", type=int, default=2, help="time both ways this many times, interleaved; "
                                                          "report the fastest of each (the CPU may be shared)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--config", default="tiny", help="tiny, small or LxW")
    args = ap.parse_args()

    from memaudit import mia
    from memaudit.models import count_parameters, load_model

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        target, ref, mem_f, non_f = build(tmp, args.docs, args.config, args.window)
        params = count_parameters(load_model(target, device="cpu").model)
        t_mem = t_peer = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = mia(model_dir=target, members=mem_f, nonmembers=non_f, reference=ref, attacks=ATTACKS, k=KS,
                      window=args.window, bootstrap=0, device="cpu", dtype="float32", write=False)
            t_mem = min(t_mem, time.perf_counter() - t0)
            t0 = time.perf_counter()
            cols, passes = peer(target, ref, mem_f, non_f, args.window, res.summary["recall"]["shot_ids"])
            t_peer = min(t_peer, time.perf_counter() - t0)

    n = len(res.samples)
    diff = max(float(np.nanmax(np.abs(res.samples[f"score_{c}"].to_numpy() - v))) for c, v in cols.items())
    speedup = t_peer / t_mem
    print(f"model: GPT-2 {args.config}, {params:,} parameters, vocab 2048; {n} samples of {args.window} tokens "
          f"(+BOS); CPU, torch threads {torch.get_num_threads()}; fastest of {args.repeats} interleaved runs each")
    print(f"score columns: {', '.join(cols)} ({len(cols)})")
    print(f"{'way':<44}{'forward passes':>16}{'seconds':>10}{'samples/s':>11}")
    print(f"{'memaudit.mia (3 batched scoring passes)':<44}{'3 x batched':>16}{t_mem:>10.2f}{n / t_mem:>11.1f}")
    print(f"{'peer: per attack, per document, batch 1':<44}{passes:>16}{t_peer:>10.2f}{n / t_peer:>11.1f}")
    print(f"max |score difference| between the two ways: {diff:.2e}")
    print(f"speedup={speedup:.1f}")


if __name__ == "__main__":
    main()
