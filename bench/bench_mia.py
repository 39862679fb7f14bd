"""Benchmark: `memaudit mia` with every default attack against MIMIR's loop, on a 124M-parameter GPT-2 shape.

memaudit: `memaudit.mia` with `--attacks all` and a reference model (loss, zlib, zstd, reference, min_k, min_k_pp
at k = 10, 20, 30, recall, dc_pdd, gradnorm): batched target and reference passes, ReCaLL scored after the shots'
KV cache (read once), per-sample gradient norms a batch at once.
MIMIR's loop, as its run.py (`get_mia_scores`, github.com/iamgroot42/mimir) does it, batch size 1: per document one
target pass shared by every logit attack (MIMIR's `get_probabilities`: the full log-softmax kept for Min-K%++,
each token's log-probability read one by one), then a reference-model pass, a ReCaLL pass of shots + document
(`model(ids, labels=...)`, the prefix masked) and a gradnorm forward and backward (`loss.backward()`). Two
kindnesses to MIMIR: dc_pdd reuses the shared target pass (MIMIR's runs one more, EOS-first), and documents used as
ReCaLL shots are not scored by it (memaudit leaves them out too). gradnorm is reduced as memaudit does (the L2 norm
over all parameters; MIMIR's default, the mean of per-parameter inf-norms, costs the same) so the scores compare.
Same models, data, process and machine. Rows:
  1. memaudit vs MIMIR's loop, every default attack (documents/s; the ratio is `speedup`, the last line);
  2. the old per-attack comparison: the logit attacks through memaudit vs each attack its own per-document loop;
  3. the ReCaLL pass: after the cached shots vs the shots re-read before every sample (the way before);
  4. the target and gradnorm passes as `mia` runs them: now one forward per batch gives the target pass's stats and
     the per-sample gradient norms; before, the target pass and then one forward and backward per sample; and
     gradnorm's share of that: the same minus the target pass's own time (which both ways need);
  5. the gradnorm pass alone: a batch at once (with its method's check) vs one backward per sample.
Every row checks its two ways' scores: 1e-5, gradnorm and min_k_pp 1e-4 relative (see RTOL). Metrics are not timed
(--bootstrap 0). The shots' prefix is read once per pass, so ReCaLL's ratio grows with the number of samples.
Rows 2-5 shrink with the samples' length (`--window 0`: whole documents, 93-732 tokens here): batch 1 wastes
less on a CPU, caching a prefix saves (prefix + x) / x of a pass at most, and past a layer's width (~400-600 tokens
at this shape) a sample's exact gradient norm costs its weight gradient, as a backward of its own does. Row 1 does
not: MIMIR reads each token's log-probability one at a time under autograd, and the backward of every such index
fills a [T, vocabulary] gradient, so its gradnorm grows with the square of the length.
Usage: python bench/bench_mia.py [--docs 16] [--window 64] [--config gpt2|tiny|small|LxW] [--repeats 1]
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import zstandard

LOGIT_ATTACKS = "loss,zlib,zstd,reference,min_k,min_k_pp,recall,dc_pdd"
KS = (10.0, 20.0, 30.0)
ATOL = 1e-5  # every score column, absolute, but for those in RTOL
# Relative: gradnorm (float32 gradients summed in another order), and min_k_pp, whose sigma^2 = E[(ln p)^2] -
# E[ln p]^2 loses about 1e-4 of itself to float32 cancellation on a random model's near-uniform prediction, in
# MIMIR's formula as in memaudit's.
RTOL = {"gradnorm": 1e-4, "min_k_pp": 1e-4}
GPT2_VOCAB = 50257


def build(tmp: Path, docs: int, config: str):
    """Members, non-members, a tokenizer trained on both, a target and a reference model (random init)."""
    from transformers import AutoModelForCausalLM, GPT2Config

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
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        # gpt2: GPT-2's own 50,257-token output layer (124M parameters); the local tokenizer's ids are its first 2,048
        cfg = GPT2Config(vocab_size=GPT2_VOCAB, **ids) if config == "gpt2" else \
            build_config(config, vocab_size=len(tok), max_length=1024, **ids)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        dirs.append(tmp / name)
    return dirs[0], dirs[1], mem_f, non_f


def documents(tok, mem_f, non_f, window: int, ctx: int = 1024) -> list[tuple[str, list[int]]]:
    """(id, first `window` tokens) of every document long enough, members first: memaudit's samples; with window 0
    whole documents, truncated to the context (`ctx` tokens fit after BOS)."""
    from memaudit.data import read_documents, tokenize

    out = []
    for f in (mem_f, non_f):
        df = read_documents(f)
        out += [(i, t[:window or ctx]) for i, t in zip(df["id"], tokenize(tok, df["text"])) if len(t) >= window]
    return out


def log_frequencies(tok, non_f) -> np.ndarray:
    from memaudit.data import read_documents, tokenize

    corpus = [t for d in tokenize(tok, read_documents(non_f)["text"]) for t in d]
    counts = np.bincount(corpus, minlength=len(tok)).astype(float)
    return np.log((counts + 1) / (counts.sum() + len(tok)))


def recall_prefix(docs, shot_ids: list[str], eos: int, bos: int, ctx: int) -> list[int]:
    """memaudit's ReCaLL prefix: BOS, then the shots joined by EOS, cut from the left to the room before the
    longest sample."""
    by_id = dict(docs)
    room = ctx - max(len(x) for _, x in docs)
    return [bos] + [t for s in shot_ids for t in by_id[s] + [eos]][-room:]


def logit_scores(lp: torch.Tensor, lsm: torch.Tensor, x: list[int], text: bytes, logf: np.ndarray) -> dict:
    """Every logit attack from one pass's token log-probabilities `lp` [T] and log-softmax `lsm` [T, V]."""
    ll = lp.mean().item()
    out = {"loss": ll, "zlib": ll / (8 * len(zlib.compress(text))),
           "zstd": ll / (8 * len(zstandard.ZstdCompressor(level=3).compress(text)))}
    lp_sorted = torch.sort(lp).values
    p = lsm.exp()  # Min-K%++'s mu and sigma in float32, as MIMIR computes them
    mu = (p * lsm).sum(-1)
    sigma = ((p * lsm ** 2).sum(-1) - mu ** 2).clamp_min(1e-12).sqrt()
    z = torch.sort((lp - mu) / sigma).values
    for k in KS:
        n = max(1, int(len(lp) * k / 100 + 1e-9))
        out[f"min_k_{k:g}"] = lp_sorted[:n].mean().item()
        out[f"min_k_pp_{k:g}"] = z[:n].mean().item()
    seen, alphas = set(), []
    for t, lv in zip(x, lp.tolist()):
        if t not in seen:
            seen.add(t)
            alphas.append(min(math.exp(lv) * -logf[t], 0.01))
    out["dc_pdd"] = float(np.mean(alphas))
    return out


def mimir_probabilities(model, ids: list[int], grads: bool = False):
    """MIMIR's Model.get_probabilities on a document within the context: one forward (labels passed, as MIMIR does),
    the full log-softmax kept, each token's log-probability read one at a time."""
    with torch.set_grad_enabled(grads):
        t = torch.tensor([ids])
        logits = model(t, labels=t).logits
        lsm = torch.log_softmax(logits[0, :-1].float(), -1)
        lps = [lsm[i, tok] if grads else lsm[i, tok].item() for i, tok in enumerate(ids[1:])]
    return (torch.stack(lps) if grads else torch.tensor(lps)), lsm


def mimir_loop(target_dir, ref_dir, mem_f, non_f, window: int, shot_ids: list[str]):
    """MIMIR's run.py loop over the documents; returns the score columns and seconds per part."""
    from memaudit.models import load_model

    secs: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    tm = load_model(target_dir, device="cpu", dtype="float32")
    rm = load_model(ref_dir, device="cpu", dtype="float32").model
    tok, model = tm.tokenizer, tm.model
    bos, eos = tok.bos_token_id, tok.eos_token_id
    docs = documents(tok, mem_f, non_f, window)
    logf = log_frequencies(tok, non_f)
    prefix = recall_prefix(docs, shot_ids, eos, bos, tm.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    secs["load"] = time.perf_counter() - t0
    cols: dict[str, list[float]] = defaultdict(list)
    for doc_id, x in docs:
        t = time.perf_counter()
        lp, lsm = mimir_probabilities(model, [bos] + x)  # the one target pass every logit attack shares
        for c, v in logit_scores(lp, lsm, x, tok.decode(x).encode("utf-8"), logf).items():
            cols[c].append(v)
        secs["target pass + logit attacks"] += time.perf_counter() - t
        t = time.perf_counter()
        cols["reference"].append(cols["loss"][-1] - mimir_probabilities(rm, [bos] + x)[0].mean().item())
        secs["reference pass"] += time.perf_counter() - t
        t = time.perf_counter()
        if doc_id in shot_ids:
            cols["recall"].append(float("nan"))
        else:  # MIMIR's get_conditional_ll: the model's loss on prefix + document, the prefix masked (its last
            # token is not read: with a context-filling prefix it would be one position past the context)
            ids = torch.tensor([prefix + x])
            with torch.no_grad():
                logits = model(ids[:, :-1]).logits[0, len(prefix) - 1:]
                cond = -torch.nn.functional.cross_entropy(logits, ids[0, len(prefix):]).item()
            cols["recall"].append(cond / min(cols["loss"][-1], -1e-12))
        secs["recall pass"] += time.perf_counter() - t
        t = time.perf_counter()
        model.zero_grad()
        lp_g, _ = mimir_probabilities(model, [bos] + x, grads=True)
        (-lp_g.mean()).backward()
        cols["gradnorm"].append(-math.sqrt(sum(float(p.grad.double().square().sum()) for p in params
                                               if p.grad is not None)))
        model.zero_grad()
        secs["gradnorm backward"] += time.perf_counter() - t
    return {c: np.asarray(v) for c, v in cols.items()}, dict(secs)


def per_attack_peer(target_dir, ref_dir, mem_f, non_f, window: int, shot_ids: list[str]):
    """The old comparison: each logit attack its own per-document loop, batch size 1, full log-softmax kept."""
    from memaudit.models import load_model

    tm = load_model(target_dir, device="cpu", dtype="float32")
    rm = load_model(ref_dir, device="cpu", dtype="float32").model
    tok = tm.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    docs = documents(tok, mem_f, non_f, window)
    logf = log_frequencies(tok, non_f)
    prefix = recall_prefix(docs, shot_ids, eos, bos, tm.max_length)

    def lp_of(model, ids):
        with torch.no_grad():
            lsm = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
        return lsm[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], lsm

    cols: dict[str, list[float]] = defaultdict(list)
    for name in ("loss", "zlib", "zstd", "min_k", "min_k_pp", "dc_pdd"):
        for _, x in docs:  # each attack runs its own pass over every document
            lp, lsm = lp_of(tm.model, [bos] + x)
            for c, v in logit_scores(lp, lsm, x, tok.decode(x).encode("utf-8"), logf).items():
                if name in (c, c.rsplit("_", 1)[0]):  # min_k_10 belongs to min_k, min_k_pp_10 to min_k_pp
                    cols[c].append(v)
    for _, x in docs:
        cols["reference"].append(lp_of(tm.model, [bos] + x)[0].mean().item() - lp_of(rm, [bos] + x)[0].mean().item())
    for i, x in docs:
        cols["recall"].append(float("nan") if i in shot_ids else
                              lp_of(tm.model, prefix + x)[0][-len(x):].mean().item()
                              / lp_of(tm.model, [bos] + x)[0].mean().item())
    return {c: np.asarray(v) for c, v in cols.items()}


def compare(res_samples, cols: dict) -> tuple[str, bool]:
    """Each column of `cols` against memaudit's (NaNs must match): the worst absolute difference and the worst
    relative one (columns in RTOL), and whether every column is within its tolerance."""
    worst = {"abs": (0.0, ""), "rel": (0.0, "")}
    ok = True
    for c, v in cols.items():
        mine = res_samples[f"score_{c}"].to_numpy()
        assert np.array_equal(np.isnan(mine), np.isnan(v)), c
        keep = ~np.isnan(v)
        tol = RTOL.get(c, RTOL.get(c.rsplit("_", 1)[0]))
        kind = "abs" if tol is None else "rel"
        d = float(np.max(np.abs(mine[keep] - v[keep]) if tol is None else np.abs(mine[keep] / v[keep] - 1)))
        ok = ok and d <= (ATOL if tol is None else tol)
        worst[kind] = max(worst[kind], (d, c))
    text = "; ".join(f"{k} {d:.1e} ({c})" for k, (d, c) in worst.items() if c)
    return text, ok


def warm_up(target_dir) -> None:
    """One short forward and backward, untimed, so neither way pays the process's first-call costs."""
    from memaudit.models import load_model

    model = load_model(target_dir, device="cpu", dtype="float32").model
    ids = torch.zeros((2, 16), dtype=torch.long)
    model(input_ids=ids).logits.float().mean().backward()


def timed(fn, repeats: int):
    """(result of the last call, median seconds)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def passes_today(target_dir, mem_f, non_f, window: int, shot_ids: list[str], repeats: int) -> list[tuple]:
    """Rows 3 to 5, each pass the new way and the way before on the same samples: ReCaLL's pass; the target and
    gradnorm passes as mia runs them (now one forward gives both); gradnorm's pass alone."""
    from memaudit.attacks import choose_gradient_method, gradient_norms, score_and_gradient_norms
    from memaudit.models import load_model
    from memaudit.scoring import score

    tm = load_model(target_dir, device="cpu", dtype="float32")
    tok, model = tm.tokenizer, tm.model
    bos, eos = tok.bos_token_id, tok.eos_token_id
    docs = documents(tok, mem_f, non_f, window)
    prefix = recall_prefix(docs, shot_ids, eos, bos, tm.max_length)
    xs = [x for i, x in docs if i not in shot_ids]
    new, t_new = timed(lambda: score(model, xs, prefix=prefix, max_length=tm.max_length), repeats)
    old, t_old = timed(lambda: score(model, [prefix + x for x in xs], max_length=tm.max_length), repeats)
    d_recall = max(abs(float(a.logprob.mean()) - float(b.logprob[-len(x):].mean())) for a, b, x in zip(new, old, xs))
    all_x = [x for _, x in docs]

    def joint():  # as mia runs them now: the method chosen, then one forward per batch for stats and norms
        assert choose_gradient_method(model, all_x, bos_id=bos)[0] == "batched"
        return score_and_gradient_norms(model, all_x, bos_id=bos)

    (j_stats, j_norms), t_joint = timed(joint, repeats)
    stats, t_score = timed(lambda: score(model, all_x, bos_id=bos), repeats)
    g_new, tg_new = timed(lambda: gradient_norms(model, all_x, bos_id=bos, method="auto"), repeats)
    g_old, tg_old = timed(lambda: gradient_norms(model, all_x, bos_id=bos, method="loop"), repeats)
    d_stats = max(float(np.max(np.abs(a.logprob - b.logprob))) for a, b in zip(j_stats, stats))
    d_joint, d_grad = (float(np.max(np.abs(g / g_old - 1))) for g in (j_norms, g_new))
    return [("ReCaLL pass: cached shots vs shots re-read", len(xs), t_new, t_old, f"abs {d_recall:.1e} (LL(x | shots))",
             d_recall <= ATOL),
            ("target + gradnorm passes, as mia runs them", len(all_x), t_joint, t_score + tg_old,
             f"abs {d_stats:.1e} (logprob); rel {d_joint:.1e} (gradnorm)",
             d_stats <= ATOL and d_joint <= RTOL["gradnorm"]),
            ("  gradnorm's share of them (minus target pass)", len(all_x), max(t_joint - t_score, 1e-9), tg_old,
             "as above", d_stats <= ATOL and d_joint <= RTOL["gradnorm"]),
            ("gradnorm pass alone: batched vs backward each", len(all_x), tg_new, tg_old,
             f"rel {d_grad:.1e} (gradnorm)", d_grad <= RTOL["gradnorm"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=16, help="members and as many non-members")
    ap.add_argument("--repeats", type=int, default=1, help="time each way this many times, interleaved; report the "
                                                          "median of each")
    ap.add_argument("--window", type=int, default=64, help="tokens per sample (each document's first); 0: whole "
                                                           "documents, as mia's default")
    ap.add_argument("--config", default="gpt2", help="gpt2: GPT2Config() defaults, GPT-2 124M (12 layers, width "
                                                     "768, context 1024, 50,257 output tokens; the local tokenizer "
                                                     "uses the first 2,048); or tiny, small, LxW")
    args = ap.parse_args()

    from memaudit import mia
    from memaudit.models import count_parameters, load_model

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        target, ref, mem_f, non_f = build(tmp, args.docs, args.config)
        params = count_parameters(load_model(target, device="cpu").model)
        warm_up(target)
        kw = dict(model_dir=target, members=mem_f, nonmembers=non_f, reference=ref, k=KS, window=args.window or None,
                  bootstrap=0, device="cpu", dtype="float32", write=False)
        times = defaultdict(list)  # way -> seconds of each repeat (interleaved, so drifts in load hit both ways)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = mia(**kw, attacks="all")
            times["mem"].append(time.perf_counter() - t0)
            shots = res.summary["recall"]["shot_ids"]
            t0 = time.perf_counter()
            cols, secs = mimir_loop(target, ref, mem_f, non_f, args.window, shots)
            times["mimir"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res_logit = mia(**kw, attacks=LOGIT_ATTACKS)
            times["logit"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            peer_cols = per_attack_peer(target, ref, mem_f, non_f, args.window, shots)
            times["peer"].append(time.perf_counter() - t0)
        t_mem, t_mimir, t_logit, t_peer = (statistics.median(times[w]) for w in ("mem", "mimir", "logit", "peer"))
        n = len(res.samples)
        rows.append(("memaudit mia vs MIMIR's loop, all attacks", n, t_mem, t_mimir, *compare(res.samples, cols)))
        rows.append(("old: logit attacks vs a loop per attack", n, t_logit, t_peer,
                     *compare(res_logit.samples, peer_cols)))
        rows += passes_today(target, mem_f, non_f, args.window, shots, args.repeats)

    size = f"{args.window} tokens" if args.window else "whole documents"
    print(f"model: GPT-2 --config {args.config}, {params:,} parameters, tokenizer vocab 2048, context 1024; {n} samples of "
          f"{size} (+BOS), {args.docs} members and {args.docs} non-members, 5 ReCaLL shots; CPU, "
          f"torch threads {torch.get_num_threads()}; median of {args.repeats} interleaved run(s) each")
    print("MIMIR's loop, seconds by part: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    print(f"{'row':<48}{'samples':>8}{'new s':>9}{'old s':>9}{'new/s':>8}{'old/s':>8}{'ratio':>7}  max score diff")
    for name, m, t_new, t_old, diff, _ in rows:
        print(f"{name:<48}{m:>8}{t_new:>9.1f}{t_old:>9.1f}{m / t_new:>8.2f}{m / t_old:>8.2f}{t_old / t_new:>7.2f}  "
              f"{diff}")
    ok = all(r[-1] for r in rows)
    print(f"scores equal in every row (absolute {ATOL:g}; relative " + ", ".join(f"{c} {t:g}" for c, t in RTOL.items())
          + f"): {'yes' if ok else 'NO'}")
    print(f"speedup={t_mimir / t_mem:.2f}")


if __name__ == "__main__":
    main()
