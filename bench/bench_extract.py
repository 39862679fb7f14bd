"""Benchmark: `memaudit.extract` (greedy shortcut) vs batched Hugging Face `generate`.

Same model, same windows, same batch size, same machine, one run. The peer way is what extraction scripts do:
greedy `generate` of the suffix for every prompt, then the same metrics (exact, token_match, match_prefix,
ROUGE-L on ids and on text). Two scenarios: documents the model was trained on (mostly memorized: the
shortcut skips their decoding) and held-out documents (none memorized: everything is decoded).
Each timing is the best of --repeats runs, the two sides alternating run by run so that a change in the machine's
load hits both (the machine is shared). Results go to bench/results/bench_extract.txt; the last line is
`speedup=<x>`, the memorized-case ratio.

    python bench/bench_extract.py [--batch-sizes 4,16,64] [--repeats 3] [--cache DIR]

The headline (`speedup=`) is the memorized case at the first batch size listed.

What to expect: memaudit verifies greedy continuations with teacher-forced passes (staged: a first pass that
stops a few suffix tokens in, a continuation from its KV cache only for rows still matching; a full pass per batch
when nearly all rows match) and decodes only diverged rows, each from its own divergence point and cache, pooled
across batches. A teacher-forced pass costs the same FLOPs as generating the same tokens, so on a compute-bound CPU
the memorized case gains what sequential decoding wastes: per-step latency (large at small batches) and the lower
efficiency of one-token steps (~2x per token here, a bound of ~1.6x at large batches). When nothing is memorized
both sides do the same decoding work; memaudit saves the per-step overhead of `generate` and larger decoding groups.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from memaudit import extract, load_model, make_windows, read_documents, tokenize, write_documents
from memaudit.corpus import demo_corpus
from memaudit.extraction import sample_metrics
from memaudit.metrics import rouge_l_text
from memaudit.training import train_or_reuse

PREFIX, SUFFIX = 32, 32
# generate's eos_token_id: [] never stops early. None falls back to the model's generation_config (its EOS, which a
# model trained on EOS-joined packed rows emits), and min_new_tokens = max_new_tokens would forbid EOS instead,
# changing the tokens: either breaks the exact comparison (checked with transformers 5.24).
NEVER_STOP: list[int] = []


def trained_model(cache: Path) -> tuple[Path, Path, Path]:
    """A tiny GPT-2 trained until it memorized 100 stdlib docstrings (cached), and 100 held-out ones."""
    members, heldout = demo_corpus(n_train=100, n_heldout=100, seed=0)
    train_file = write_documents(cache / "train.jsonl", members)
    heldout_file = write_documents(cache / "heldout.jsonl", heldout)
    model_dir = cache / "model"
    train_or_reuse(data=train_file, out=model_dir, epochs=60, lr=3e-3, batch_size=16, seq_len=72, rows="first",
                   val_fraction=0.0, seed=0, device="cpu", overwrite=True)
    return model_dir, train_file, heldout_file


def hf_generate_extract(m, data: Path, batch_size: int) -> list[dict]:
    """The peer way: tokenize (the tokenizer's standard call), cut the same windows, batched greedy generate, then
    the same metrics."""
    from transformers import GenerationConfig

    docs = read_documents(data)
    token_lists = m.tokenizer(docs["text"].tolist(), add_special_tokens=False)["input_ids"]  # the standard call
    w = make_windows(token_lists, docs["id"].tolist(), PREFIX, SUFFIX)
    cfg = GenerationConfig(max_new_tokens=SUFFIX, do_sample=False, eos_token_id=NEVER_STOP, bos_token_id=None,
                           pad_token_id=m.tokenizer.pad_token_id)
    rows = []
    for s in range(0, len(w.ids), batch_size):
        prompts = torch.as_tensor(w.tokens[s:s + batch_size, :PREFIX])
        prompts = torch.cat([torch.full((len(prompts), 1), m.tokenizer.bos_token_id), prompts], dim=1)
        with torch.no_grad():
            out = m.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
        generated = out[:, prompts.shape[1]:].numpy()
        targets = w.tokens[s:s + batch_size, PREFIX:]
        gen_text = m.tokenizer.batch_decode(generated.tolist())
        tgt_text = m.tokenizer.batch_decode(targets.tolist())
        for k in range(len(generated)):
            rows.append({"id": w.ids[s + k], **sample_metrics(generated[k], targets[k]),
                         "rouge_l_text": rouge_l_text(tgt_text[k], gen_text[k]),
                         "generated_ids": generated[k].tolist()})
    return rows


def bare_times(m, data: Path, batch_size: int, repeats: int) -> tuple[float, float]:
    """The model work of the memorized case: one bare teacher-forced pass over every window (logits for the suffix
    only, argmax) against bare `generate`, same batch size, no tokenizing and no metrics on either side. A method
    that verifies every window with a teacher-forced pass cannot do the model work faster than the first; on a
    compute-bound CPU at large batches the two are close, whatever the method."""
    from transformers import GenerationConfig

    docs = read_documents(data)
    w = make_windows(tokenize(m.tokenizer, docs["text"].tolist()), docs["id"].tolist(), PREFIX, SUFFIX)
    x = torch.cat([torch.full((len(w.ids), 1), m.tokenizer.bos_token_id), torch.as_tensor(w.tokens)], dim=1)
    cfg = GenerationConfig(max_new_tokens=SUFFIX, do_sample=False, eos_token_id=NEVER_STOP, bos_token_id=None,
                           pad_token_id=m.tokenizer.pad_token_id)

    def teacher_forced():
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                m.model(input_ids=x[s:s + batch_size, :-1], logits_to_keep=SUFFIX).logits.argmax(-1)

    def generate():
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                p = x[s:s + batch_size, :PREFIX + 1]
                m.model.generate(input_ids=p, attention_mask=torch.ones_like(p), generation_config=cfg)

    t_tf = t_gen = float("inf")
    for _ in range(repeats):
        t_tf = min(t_tf, best_time(teacher_forced, 1)[0])
        t_gen = min(t_gen, best_time(generate, 1)[0])
    return t_tf, t_gen


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="16,4,64", help="comma list; the first one gives the headline")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "memaudit-bench-extract")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_extract.txt")
    args = ap.parse_args()

    model_dir, train_file, heldout_file = trained_model(args.cache)
    m = load_model(model_dir, device="cpu")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    # warm-up (first calls allocate); write=False: results only, as the generate side
    extract(model_dir=m, data=heldout_file, batch_size=sizes[0], limit=sizes[0], write=False)
    hf_generate_extract(m, heldout_file, sizes[0])

    lines = [f"memaudit extract vs HF generate (greedy), prefix {PREFIX} + suffix {SUFFIX}, "
             f"device cpu ({torch.get_num_threads()} threads), best of {args.repeats}",
             f"{'scenario':<22}{'batch':>6}{'samples':>8}{'exact':>7}{'memaudit s':>12}{'HF gen s':>10}"
             f"{'memaudit tok/s':>16}{'HF gen tok/s':>14}{'speedup':>9}{'identical':>11}"]
    ratios = {}
    for bs in sizes:
        for name, f in (("memorized (trained)", train_file), ("none (held out)", heldout_file)):
            t_ma = t_hf = float("inf")
            for _ in range(args.repeats):  # alternate, so both sides see the same machine
                t, df = best_time(lambda: extract(model_dir=m, data=f, prefix=PREFIX, suffix=SUFFIX, batch_size=bs,
                                                  write=False).samples, 1)
                t_ma = min(t_ma, t)
                t, rows = best_time(lambda: hf_generate_extract(m, f, bs), 1)
                t_hf = min(t_hf, t)
            same = [tuple(r["generated_ids"]) for r in rows] == [tuple(g) for g in df.generated_ids] and all(
                r["exact"] == e and r["token_match"] == t and abs(r["rouge_l_text"] - rt) < 1e-12
                for r, e, t, rt in zip(rows, df.exact, df.token_match, df.rouge_l_text))
            n = len(df)
            ratios[(name, bs)] = t_hf / t_ma
            lines.append(f"{name:<22}{bs:>6}{n:>8}{df.exact.mean():>7.2f}{t_ma:>12.3f}{t_hf:>10.3f}"
                         f"{n * SUFFIX / t_ma:>16.0f}{n * SUFFIX / t_hf:>14.0f}{t_hf / t_ma:>8.2f}x{str(same):>11}")
    lines.append("tok/s: suffix tokens produced and scored per second (samples x suffix / wall time); both sides "
                 "include tokenizing, windowing and the metrics.")
    for bs in sizes:  # cheap, so twice the repeats
        t_tf, t_gen = bare_times(m, train_file, bs, 2 * args.repeats)
        lines.append(f"model work alone, memorized case, batch {bs}: one bare teacher-forced pass over every window "
                     f"{t_tf:.3f} s, bare HF generate {t_gen:.3f} s, ratio {t_gen / t_tf:.2f}x (no tokenizing, no "
                     f"metrics)")
    lines.append(f"speedup when none are memorized (batch {sizes[0]}): {ratios[('none (held out)', sizes[0])]:.2f}x")
    lines.append(f"speedup={ratios[('memorized (trained)', sizes[0])]:.2f}")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
