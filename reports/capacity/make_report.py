"""Build reports/capacity/: run (or, with finished run directories present, reuse) the capacity experiments and
write report.md, capacity.json (key `bits_per_param`), CSVs and figures.

    python reports/capacity/make_report.py    # 2 CPU cores: under a minute with the committed runs present;
                                              # about 10 hours from scratch: the headline grid 3.7 h (its
                                              # widths 32-44 train 79, 93, 113 and 141 min, two at a time), the
                                              # four earlier paper-regime grids 126, 87, 82 and 56 min, the
                                              # small grids ~30 min

Each experiment is one `memaudit capacity` command (printed below and in report.md); a finished run directory
is reused through --resume (refit and redraw only).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from memaudit.capacity.laws import (PUBLISHED_ALPHA, PUBLISHED_ALPHA_BF16, PUBLISHED_ALPHA_FP32,
                                    PUBLISHED_ALPHA_PER_MODEL_RANGE, PUBLISHED_CHECKS, predict_mia_f1)
from memaudit.corpus import stdlib_docstrings
from memaudit.data import write_documents
from memaudit.report import markdown_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_NO_PROGRESS": "1"}
PER_MODEL_RANGE = "-".join(map(str, PUBLISHED_ALPHA_PER_MODEL_RANGE))  # as the report writes it: 2.9-4.2

# optimizer settings from a pilot on the width-16 shape (see report.md, "Optimizer pilot"): a high constant LR
# reaches its noise floor fast and the per-model anneal after the plateau recovers the rest
COMMON = ["--layers", "1", "--vocab", "512", "--seq-len", "32", "--batch-size", "32", "--lr", "5e-2",
          "--warmup-steps", "100", "--plateau-tol", "0.005", "--threads", "1"]
PAPER_REGIME = ["--layers", "1", "--widths", "44,40,32,36", "--vocab", "2048", "--seq-len", "64", "--sizes",
                "0.5x,1.5x", "--batch-size", "32", "--lr", "1e-2", "--warmup-steps", "100", "--eval-every", "500",
                "--plateau-window", "4000", "--plateau-tol", "0.005", "--anneal-fraction", "0.5", "--max-steps", "48000",
                "--threads", "1"]
# the same grid with the anneal as long as the training before the plateau (the small grid's rule): the paper-regime
# run above gained ~12% in its 50% anneal, still rising when the LR reached 0
PAPER_REGIME_LONG = list(PAPER_REGIME)
PAPER_REGIME_LONG[PAPER_REGIME_LONG.index("--anneal-fraction") + 1] = "1.0"
PAPER_REGIME_LONG[PAPER_REGIME_LONG.index("--max-steps") + 1] = "72000"
# batch 64 at lr 2e-2 (pilot G: at equal epochs ahead of batch 32 by ~0.08 bits/param all through the constant-LR
# phase; batch 16 trailed, pilot F) and the plateau window in steps, so twice as many epochs; only the size above
# capacity (the 0.5x datasets are memorized >= 98% in the two runs below, which stay as the below-capacity check)
PAPER_REGIME_B64 = ["--layers", "1", "--widths", "44,40,32,36", "--vocab", "2048", "--seq-len", "64", "--sizes", "1.5x",
                    "--batch-size", "64", "--lr", "2e-2", "--warmup-steps", "100", "--eval-every", "500",
                    "--plateau-window", "4000", "--plateau-tol", "0.005", "--anneal-fraction", "1.0",
                    "--max-steps", "50000", "--threads", "1"]
# the same grid with the plateau window counted in epochs of each model's own data: 415 epochs is the 4,000 steps
# the 80K shape had above, so the wider shapes (more sequences) are judged after the same training per sequence
PAPER_REGIME_B64_EPOCHS = list(PAPER_REGIME_B64)
_w = PAPER_REGIME_B64_EPOCHS.index("--plateau-window")
PAPER_REGIME_B64_EPOCHS[_w:_w + 2] = ["--plateau-epochs", "415"]
PAPER_REGIME_B64_EPOCHS[PAPER_REGIME_B64_EPOCHS.index("--max-steps") + 1] = "120000"
# twice the training of every model: the same plateau rule (so the same curves up to each plateau), then an anneal
# three times as long as the training before it instead of once; the anneal is where most memorization is gained
# (about +12% there against +0.5% per plateau window at constant LR)
PAPER_REGIME_B64_ANNEAL3X = list(PAPER_REGIME_B64_EPOCHS)
PAPER_REGIME_B64_ANNEAL3X[PAPER_REGIME_B64_ANNEAL3X.index("--anneal-fraction") + 1] = "3.0"
PAPER_REGIME_B64_ANNEAL3X[PAPER_REGIME_B64_ANNEAL3X.index("--max-steps") + 1] = "160000"
RUNS = {
    # the headline: the paper's own V and S and its smallest shapes (1 layer, widths 32-44: 80K-116K parameters),
    # batch 64 from pilot G, plateau window in epochs, anneal over 300%. Widths are listed so that torchrun's
    # round-robin gives each rank about the same work (44+32 and 40+36). Chosen as the headline before its results
    # existed (commit 854a718, re-registered with the 1.5x size only in f46c501).
    "paper_regime_fp32_b64_anneal3x": PAPER_REGIME_B64_ANNEAL3X,
    # the previous headline: the same with the anneal over 100%, so half the training
    "paper_regime_fp32_b64_epochs": PAPER_REGIME_B64_EPOCHS,
    # an earlier headline: the same with the window in steps (4,000), so larger datasets got fewer epochs
    "paper_regime_fp32_b64": PAPER_REGIME_B64,
    # an earlier headline: batch 32, lr 1e-2 (pilot C), anneal over 100%; also the below-capacity check
    "paper_regime_fp32_long": PAPER_REGIME_LONG,
    # the paper-regime budget check: the batch-32 grid with the anneal over 50% (an earlier headline, 3.10)
    "paper_regime_fp32": PAPER_REGIME,
    # the small-shape grid (V=512, S=32, widths 8-32: 5K-30K parameters), cheap on a CPU: 4 model sizes; plateau over 2,000 steps, then an anneal as long as the training before it
    "random_fp32": COMMON + ["--widths", "32,24,8,16", "--sizes", "0.5x,1.25x,2x", "--max-steps", "24000",
                             "--plateau-window", "2000", "--anneal-fraction", "1.0"],
    # the budget check: the same grid under a rule about half as long (plateau over 1,000 steps, anneal over 50%);
    # if the main run's capacities are not clearly above these, more training would not raise them much either
    "random_fp32_short": COMMON + ["--widths", "32,24,8,16", "--sizes", "0.5x,1.25x,2x", "--max-steps", "16000",
                                   "--plateau-window", "1000", "--anneal-fraction", "0.5"],
    # fp32 vs bf16: the two smallest shapes of the main grid, trained and measured in bf16
    "random_bf16": COMMON + ["--widths", "16,8", "--sizes", "0.5x,1.25x,2x", "--max-steps", "24000",
                             "--plateau-window", "2000", "--anneal-fraction", "1.0", "--dtype", "bfloat16"],
}
TEXT = ["--text", "reports/capacity/text_corpus.jsonl", "--widths", "16", "--layers", "1", "--threads", "1"]


def fit_params(summary: dict) -> str:
    p = [c["params"] for c in summary["capacities"]]
    return f"{min(p) / 1e3:.1f}K-{max(p) / 1e3:.1f}K"


def sh(args: list[str], torchrun: bool = False) -> None:
    cmd = (["torchrun", "--nproc-per-node", "2", "--master-port", "29531", "-m", "memaudit"] if torchrun
           else [sys.executable, "-m", "memaudit"]) + args
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=ENV)


def embedding_shares(run: dict) -> list[float]:
    """Per shape of a run: the share of its parameters in the token embedding (V+1 rows, BOS included)."""
    return [(run["grid"]["vocab"] + 1) * c["width"] / c["params"] for c in run["capacities"]]


def pilot_lines(log: Path) -> list[str]:
    """Per section of a pilot log (sections start with '#'): its header and FINAL lines, or its last progress line
    if it was stopped early."""
    out = []
    for section in ("\n" + log.read_text()).split("\n#")[1:]:
        body = [ln for ln in section.splitlines()[1:] if ln.strip()]
        finals = [ln for ln in body if ln.startswith("FINAL")]
        out += ["#" + section.splitlines()[0]] + (finals or [f"last progress line (step, bits/param per lr, "
                                                             f"seconds): {body[-1]}"] if body else [])
    return out


def identical_curves(a: str, b: str, until_plateau: bool = False) -> list[int]:
    """Widths whose memorization curves in runs a and b are identical (up to a's plateau, if asked)."""
    res = [pd.read_csv(HERE / n / "results.csv").set_index("width") for n in (a, b)]

    def curve(r: pd.DataFrame, w: int, last: float) -> list[str]:
        return [p for p in r.loc[w, "history"].split(";") if int(p.split(":")[0]) <= last]

    def same(w: int) -> bool:
        last = res[0].loc[w, "anneal_start"] if until_plateau else float("inf")
        return curve(res[0], w, last) == curve(res[1], w, last)

    return [w for w in res[0].index if w in res[1].index and same(w)]


def text_fit_note(res: pd.DataFrame) -> str:
    """Where the text models stop fitting their data, beside the test-loss peak (one width)."""
    res = res.sort_values("n_sequences")
    i = int(res["test_loss_nats"].to_numpy().argmax())
    peak = res.iloc[i]
    after = res.iloc[i + 1] if i + 1 < len(res) else None
    return (f"the test loss rises while the model still fits its data (train loss {res['train_loss_nats'].iloc[0]:.2f}"
            f"-{peak['train_loss_nats']:.2f} nats/token up to the peak at {int(peak['n_sequences'])} windows)"
            + (f" and falls once the data outgrows what it stores (train loss {after['train_loss_nats']:.2f} at "
               f"{int(after['n_sequences'])} windows, {after['data_over_measured_capacity']:.2f} x the capacity "
               "reached). The peak is the last dataset size below the capacity the training reached, in line with "
               f"the paper's 'near 1'; the {PUBLISHED_ALPHA} bits/parameter axis puts it lower only because this "
               "budget stops "
               "short of saturation." if after is not None else "."))


def command_line(name: str, args: list[str], torchrun: bool) -> str:
    pre = "torchrun --nproc-per-node 2 -m memaudit" if torchrun else "python -m memaudit"
    return f"OMP_NUM_THREADS=1 {pre} capacity {' '.join(args)} --out reports/capacity/{name}"


def main() -> None:
    corpus = HERE / "text_corpus.jsonl"
    if not corpus.exists():
        write_documents(corpus, stdlib_docstrings(min_chars=200, max_chars=20000))
    for name, args in RUNS.items():
        sh(["capacity", *args, "--out", f"reports/capacity/{name}", "--resume"], torchrun=True)
    sh(["capacity", *TEXT, "--out", "reports/capacity/text", "--resume"])

    runs = {n: json.loads((HERE / n / "summary.json").read_text()) for n in RUNS}
    text = json.loads((HERE / "text" / "summary.json").read_text())
    # The headline is the paper-regime run (decided before its results existed): its V, S and model sizes are the
    # ones the published 3.6 bits/parameter refers to. The small-shape grid is reported beside it.
    # The below-capacity check comes from the batch-32 run of the same shapes (the headline trains only the size above).
    main_run, epochs_run = "paper_regime_fp32_b64_anneal3x", "paper_regime_fp32_b64_epochs"
    steps_run, below_run, small = "paper_regime_fp32_b64", "paper_regime_fp32_long", "random_fp32"
    fit = runs[main_run]["bits_per_param"]
    for n in RUNS:
        shutil.copy(HERE / n / "results.csv", HERE / f"{n}_results.csv")
        shutil.copy(HERE / n / "capacities.csv", HERE / f"{n}_capacities.csv")
    shutil.copy(HERE / "text" / "text_results.csv", HERE / "text_results.csv")

    law_checks = [{"params": p, "sequences": n, "published_f1": f, "law_f1": predict_mia_f1(p, n)}
                  for p, n, f in PUBLISHED_CHECKS]
    out = {"bits_per_param": fit, "runs": {n: runs[n]["bits_per_param"] for n in RUNS},
           "per_model": {n: runs[n]["capacities"] for n in RUNS},
           "below_capacity_min_memorized_fraction": runs[below_run]["below_capacity_min_memorized_fraction"],
           "below_measured_capacity_min_memorized_fraction":
               runs[below_run].get("below_measured_capacity_min_memorized_fraction"),
           "below_capacity_run": below_run,
           "grid": runs[main_run]["grid"],
           "mia_law_fit": text["mia_law_fit"], "mia_law_published": text["mia_law_published"],
           "mia_law_published_checks": law_checks,
           "test_loss_peak_at_data_over_capacity": text["test_loss_peak_at_data_over_capacity"],
           "text_measured_capacity": text["measured_capacity"],
           "published": {"bits_per_param_fp32": PUBLISHED_ALPHA_FP32, "bits_per_param_bf16": PUBLISHED_ALPHA_BF16,
                         "alpha": PUBLISHED_ALPHA, "per_model_range": list(PUBLISHED_ALPHA_PER_MODEL_RANGE)}}
    (HERE / "capacity.json").write_text(json.dumps(out, indent=2) + "\n")

    def table(df: pd.DataFrame) -> str:
        return markdown_table(df.columns, df.itertuples(index=False),
                              cell=lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["# Capacity in bits per parameter, double descent and the MIA law (Morris et al., arXiv 2505.24832)", "",
             "Produced by `python reports/capacity/make_report.py` on this machine (2 shared CPU cores, no GPU).", ""]
    status = "a LOWER BOUND" if fit["is_lower_bound"] else "a capacity (all plateaus reached under the rule)"
    mr = runs[below_run]
    own = mr.get("below_measured_capacity_min_memorized_fraction")

    def per_shape(new: str, old: str) -> str:
        return ", ".join(f"width {c['width']} {h['bits_per_param']:.2f} -> {c['bits_per_param']:.2f}"
                         for c in runs[new]["capacities"] for h in runs[old]["capacities"] if h["width"] == c["width"])

    def gain(new: str, old: str) -> float:
        return runs[new]["bits_per_param"]["estimate"] / runs[old]["bits_per_param"]["estimate"] - 1

    anneal_gain, batch_gain, epochs_gain, long_gain = (gain(below_run, "paper_regime_fp32"), gain(steps_run, below_run),
                                                       gain(epochs_run, steps_run), gain(main_run, epochs_run))

    def epochs_trained(name: str) -> tuple[str, bool]:
        """Per model of a run, widest first: epochs trained (steps x batch / sequences) and bits/param; and
        whether bits/param falls with fewer epochs."""
        res = pd.read_csv(HERE / name / "results.csv").sort_values("width", ascending=False)
        res["epochs"] = res["steps"] * runs[name]["grid"]["batch_size"] / res["n_sequences"]
        text = "; ".join(f"width {r.width}: {r.epochs:,.0f} epochs, {r.bits_per_param:.2f}" for r in res.itertuples())
        by_epochs = res.sort_values("epochs")["bits_per_param"]
        return text, bool(by_epochs.is_monotonic_increasing)

    main_steps = pd.read_csv(HERE / main_run / "results.csv")["steps"]
    steps_span = f"{main_steps.min():,}-{main_steps.max():,}"
    lines += ["## Headline", "",
              f"- Fitted bits/parameter (fp32, {fit['n_models']} model sizes, run `{main_run}`): "
              f"**{fit['estimate']:.2f}** (95% bootstrap CI {fit['ci95'][0]:.2f}-{fit['ci95'][1]:.2f}); "
              f"per model {fit['per_model_min']:.2f}-{fit['per_model_max']:.2f}. This is {status}."
              + (f" It reaches the target range 3.2-4.4 only at its edge ({fit['estimate']:.4f}); the 95% CI reaches "
                 "below it." if fit["ci95"][0] < 3.2 <= fit["estimate"] else ""),
              f"- How firm (paper regime): the same grid with the anneal over "
              f"{runs[epochs_run]['grid']['anneal_fraction']:.0%} of the steps before the plateau instead of "
              f"{runs[main_run]['grid']['anneal_fraction']:.0%}, so half the training (run `{epochs_run}`, the previous "
              "headline), gave "
              f"{runs[epochs_run]['bits_per_param']['estimate']:.2f}; doubling the training changed the fit by "
              f"{long_gain:+.1%} (per shape: {per_shape(main_run, epochs_run)}). "
              f"With the plateau window counted in steps (4,000 for every shape; run `{steps_run}`) that grid gave "
              f"{runs[steps_run]['bits_per_param']['estimate']:.2f}; counting it in epochs changed the fit by "
              f"{epochs_gain:+.1%} (per shape: {per_shape(epochs_run, steps_run)}). "
              f"At batch 32 and lr 1e-2 (run `{below_run}`) the window-in-steps grid gave "
              f"{runs[below_run]['bits_per_param']['estimate']:.2f}; batch 64 changed it by "
              f"{batch_gain:+.1%} (per shape: {per_shape(steps_run, below_run)}). At batch 32 an anneal over 50% instead "
              f"of 100% of the steps before the plateau (run `paper_regime_fp32`) gave "
              f"{runs['paper_regime_fp32']['bits_per_param']['estimate']:.2f}, {anneal_gain:.1%} less (per shape: "
              f"{per_shape(below_run, 'paper_regime_fp32')}). Plateaus under a finite rule remain a lower estimate of "
              "what far longer training would store: the paper's models trained about 1M steps at a very large batch "
              f"(see 'Choices that differ from the paper'), the headline's {steps_span} steps at batch "
              f"{runs[main_run]['grid']['batch_size']}.",
              f"- The small-shape grid (run `{small}`: V=512, S=32, widths 8-32, {fit_params(runs[small])} params): "
              f"**{runs[small]['bits_per_param']['estimate']:.2f}** (95% CI {runs[small]['bits_per_param']['ci95'][0]:.2f}-"
              f"{runs[small]['bits_per_param']['ci95'][1]:.2f}). Models 3-15x smaller than the paper's smallest, "
              "embedding-dominated, with shorter rows, store less per parameter (see 'Pilots beyond the grid').",
              f"- How firm (small grid): the same grid under a rule about half as long gave "
              f"{runs['random_fp32_short']['bits_per_param']['estimate']:.2f}, so doubling the training added "
              f"{runs[small]['bits_per_param']['estimate'] / runs['random_fp32_short']['bits_per_param']['estimate'] - 1:+.1%}; "
              "a 40K-step warmup-stable-decay pilot stored 2.90 bits/parameter at width 16 where the grid's rule stopped "
              "at 2.79 (see 'Budget check' and the pilots). Plateaus under a finite rule are a few percent below what "
              "far longer training would store.",
              f"- Published (paper): {PUBLISHED_ALPHA} bits/parameter ({PUBLISHED_ALPHA_FP32} fp32, "
              f"{PUBLISHED_ALPHA_BF16} bf16), per model ~{PER_MODEL_RANGE}.",
              "- fp32 vs bf16 (run `random_bf16`, same rule, widths 8 and 16): "
              + ", ".join(f"width {c['width']}: {c['bits_per_param']:.2f} bf16 vs {f32['bits_per_param']:.2f} fp32"
                          for c in runs["random_bf16"]["capacities"]
                          for f32 in runs[small]["capacities"] if f32["width"] == c["width"])
              + f": the two agree within about 1.5%, so the paper's bf16 drop ({PUBLISHED_ALPHA_FP32} -> "
              f"{PUBLISHED_ALPHA_BF16}) does not show at these "
              "sizes (bf16 here: training computes in bf16 from fp32 master weights; the model is measured with its "
              "weights cast to bf16).",
              f"- Below capacity the least-memorized model kept {mr['below_capacity_min_memorized_fraction']:.1%} of "
              f"the data's bits (datasets <= 0.9 x {PUBLISHED_ALPHA} x params)"
              + (f"; {own:.1%} over the {mr['below_measured_capacity_n_models']} datasets <= 0.9 x the shape's own "
                 "measured capacity" if own is not None else "")
              + f" (run `{below_run}`, the same shapes at batch 32; "
              f"{runs[small]['below_capacity_min_memorized_fraction']:.1%} in the small grid). "
              "The first token of each row is coded from BOS alone, which caps this at about (S-1)/S (98.4% at S=64, "
              "97% at S=32) plus what the model learns of the first tokens' empirical distribution.",
              "- Previous version of this report (commit ab08473: lr 1e-2, anneal over 25% of the steps, at most "
              "12,000 steps, sizes 0.5x/1.25x/2.5x): 2.77 bits/parameter, a lower bound (2 of 4 shapes not converged).",
              ""]
    steps_epochs, steps_ordered = epochs_trained(steps_run)
    epochs_epochs, _ = epochs_trained(epochs_run)
    main_epochs, _ = epochs_trained(main_run)
    same = identical_curves(epochs_run, steps_run)
    same_to_plateau = identical_curves(main_run, epochs_run, until_plateau=True)
    lines += [f"**Training per model.** With the plateau window in steps (run `{steps_run}`) the per-model values "
              f"{'fall in the order of' if steps_ordered else 'follow, though not strictly,'} the epochs each model "
              f"trained before its rule stopped it ({steps_epochs}): a window in steps judges a larger dataset after "
              "fewer epochs. Pilot H separated budget from shape: the 80K shape trained at batch 64 for the epochs the "
              "wider shapes got there stores 3.21 (2,700 epochs) and 3.24 (3,440; width 36 in the grid: 3.23), so at "
              f"equal epochs the wider shapes still stored 2-3% less. With the window in epochs (run `{epochs_run}`) "
              f"every model is judged after the same training per sequence ({epochs_epochs}); the headline shares "
              f"that rule up to the plateau, then anneals over three times the steps before it ({main_epochs})."
              + (f" Where the two rules give the same window (width {', '.join(map(str, same))}), runs `{steps_run}` "
                 f"and `{epochs_run}` have identical training curves: the trainer is deterministic at a fixed thread "
                 "count." if same else "")
              + (f" The headline's curves are identical to run `{epochs_run}`'s up to each plateau for width "
                 f"{', '.join(map(str, same_to_plateau))}." if same_to_plateau else ""),
              ""]
    if fit["estimate"] < 3.2:
        emb_p = embedding_shares(runs[main_run])
        lines += [f"**The target range 3.2-4.4 was not reached on this machine** ({fit['estimate']:.2f}). The plateaus "
                  f"are reported as measured. Per model ({fit['per_model_min']:.2f}-{fit['per_model_max']:.2f}) they lie "
                  f"inside the published per-model range (~{PER_MODEL_RANGE}), in its lower half. What holds the fit "
                  "down, as far "
                  "as the runs show, is training per model (above; batch 64, which lowers the noise floor per epoch, "
                  f"raised the fit by {batch_gain:.1%}): the fitted slope is a lower estimate of what these shapes store "
                  "at far longer training (pilot E's higher LR reached the same value sooner, not a higher one). Also: "
                  "one dataset size above capacity per shape, and the paper's four smallest shapes only, where the token "
                  f"embedding holds {min(emb_p):.0%}-{max(emb_p):.0%} of the parameters (our width-8 pilot at V=2048 "
                  "shows embedding-heavy models storing less per parameter). See also 'Why the small grid is below the "
                  "paper'.", ""]
    for n in RUNS:
        r = runs[n]
        lines += [f"## Random tokens: run `{n}`", "", "```", command_line(n, RUNS[n], True), "```", "",
                  f"{r['message']}.", "", "Per-model capacity (max over dataset sizes):", "",
                  table(pd.read_csv(HERE / n / "capacities.csv")), "", "All models:", "",
                  table(pd.read_csv(HERE / n / "results.csv")[
                      ["width", "params", "size", "n_sequences", "data_bits", "memorized_bits", "memorized_fraction",
                       "bits_per_param", "final_loss_nats", "steps", "anneal_start", "converged"]]), "",
                  f"![memorization vs data]({n}/memorization_vs_data.png) ![capacity vs params]({n}/capacity_vs_params.png)",
                  "", f"Training curves (memorized bits/parameter vs step, measured on each model's whole dataset every "
                  f"{r['grid']['eval_every']} steps; dotted: plateau detected and LR annealed from there; dashed: not "
                  f"converged within --max-steps):", "", f"![training curves]({n}/training_curves.png)", ""]
    fitm, pub = text["mia_law_fit"], text["mia_law_published"]
    tres = pd.read_csv(HERE / "text" / "text_results.csv")
    lines += ["## Real text: double descent and membership inference", "", "```",
              f"OMP_NUM_THREADS=1 python -m memaudit capacity {' '.join(TEXT)} --out reports/capacity/text", "```", "",
              "Corpus: docstrings of the Python standard library (memaudit.corpus.stdlib_docstrings, min_chars=200), "
              "a byte-level BPE of 512 tokens trained on it, non-overlapping deduplicated 64-token windows; one model "
              "shape (1 layer, width 16) trained on the first N windows for N = 8 ... 1024, and a reference of the same "
              "shape trained on the whole pool; fixed 2000 steps, batch 32, lr 5e-3.", "",
              table(pd.read_csv(HERE / "text" / "text_results.csv")), "",
              "![double descent](text/double_descent.png) ![MIA law](text/mia_law.png)", "",
              "Test loss peaks at dataset bits / capacity = "
              + ", ".join(f"{p['data_over_capacity']:.2f} (width {p['width']}, {p['n_sequences']} windows)"
                          for p in text["test_loss_peak_at_data_over_capacity"])
              + f" against the {PUBLISHED_ALPHA} bits/parameter capacity (published: near 1). But under the fixed step "
              f"budget the model stores far less than {PUBLISHED_ALPHA} bits/parameter: at most "
              + ", ".join(f"{c['bits']:,.0f} bits of unintended memorization ({c['bits_per_param']:.2f} bits/parameter, "
                          f"width {c['width']}, at {c['at_n_sequences']} windows)" for c in text["measured_capacity"])
              + ". Against the capacity it reached (right panel), the peak sits at "
              + ", ".join(f"{p['data_over_measured_capacity']:.2f}" for p in text["test_loss_peak_at_data_over_capacity"])
              + f": {text_fit_note(tres)} Per-sample unintended memorization falls as the data grows past "
              "capacity, as published.", "",
              f"MIA law F1 = 0.5 (1 + c1 sigmoid(-c2 (N/P - c3))): fitted c1={fitm.get('c1', float('nan')):.3g}, "
              f"c2={fitm.get('c2', float('nan')):.3g}, c3={fitm.get('c3', float('nan')):.3g} (published law "
              f"`{pub.get('name', '')}`: {pub['c1']:.3g}, {pub['c2']:.3g}, {pub['c3']:.3g}); RMSE of the published law "
              f"on our points: {text['mia_f1_rmse_vs_published_law']:.3f}.", "",
              "Published checks of the law (`memaudit.capacity.laws.predict_mia_f1`, default constants):", "",
              table(pd.DataFrame(law_checks)), "",
              f"Largest difference from the published table: {max(abs(c['law_f1'] - c['published_f1']) for c in law_checks):.3f} "
              "(a consistency check, not an independent validation: the default slope and midpoint are solved from "
              "these two rows, because METHODS.md's transcribed constants 33.14 / 0.034 give 0.951 / 0.550).",
              ""]
    g, gp = runs[small]["grid"], runs[main_run]["grid"]

    if gp.get("plateau_epochs") is None:
        headline_window = f"{gp['plateau_window']:,} steps"
    else:  # the window each model had, in steps
        n_seq = pd.read_csv(HERE / main_run / "results.csv")["n_sequences"]
        headline_window = (f"{gp['plateau_epochs']:g} epochs of each model's data: "
                           f"{int(gp['plateau_epochs'] * n_seq.min() / gp['batch_size']):,}-"
                           f"{int(gp['plateau_epochs'] * n_seq.max() / gp['batch_size']):,} steps")
    short = {(c["layers"], c["width"]): c for c in runs["random_fp32_short"]["capacities"]}
    # the previous report's grid (commit ab08473: lr 1e-2, plateau over 1,000 steps, anneal over 25%, <= 12,000 steps)
    old = pd.read_csv(HERE / "previous_lr1e-2_capacities.csv")
    prev = {(int(r.layers), int(r.width)): (float(r.bits_per_param), str(bool(r.lower_bound))) for r in old.itertuples()}
    budget = pd.DataFrame([{"layers": c["layers"], "width": c["width"], "params": c["params"],
                            "bits_per_param (short rule)": short[(c["layers"], c["width"])]["bits_per_param"],
                            "bits_per_param (main rule)": c["bits_per_param"],
                            "gain": f'{c["bits_per_param"] / short[(c["layers"], c["width"])]["bits_per_param"] - 1:+.1%}',
                            "converged (main)": c["converged"],
                            "previous lr 1e-2 run": prev.get((c["layers"], c["width"]), (float("nan"), ""))[0],
                            "previous: lower bound?": prev.get((c["layers"], c["width"]), (0, ""))[1]}
                           for c in runs[small]["capacities"] if (c["layers"], c["width"]) in short])
    sfit = runs[small]["bits_per_param"]
    gain = sfit["estimate"] / runs["random_fp32_short"]["bits_per_param"]["estimate"] - 1
    rel_prev = budget["previous lr 1e-2 run"] / budget["bits_per_param (main rule)"] - 1
    n_prev_higher, max_prev_gain = int((rel_prev > 0).sum()), float(rel_prev.max())
    P = [c["params"] for c in runs[small]["capacities"]]
    emb = embedding_shares(runs[small])
    pilot = pilot_lines(HERE / "pilot_optimizer.log")
    lines += ["## Optimizer pilot", "",
              "Before the grid, one shape (1 layer, width 16, 12,032 parameters, 2x data) was trained with several "
              "learning rates and batch sizes under the same convergence rule (`reports/capacity/pilot_optimizer.py`, "
              "log in `pilot_optimizer.log`). Final memorized bits/parameter:", "", "```", *pilot, "```", "",
              "At a constant LR memorization creeps up slowly and a higher LR sits on a lower noise floor, but the "
              "per-model anneal after the plateau recovers more than the floor costs: lr 7e-2 reached 2.60 in 5,000 "
              "steps where lr 1e-2 had 2.34 after 6,000 steps, still at constant LR; 1.5e-1 was too high. Batch 128 "
              "did better per step but not per sequence processed. The grid uses lr 5e-2 and batch 32; the first grid "
              "under a short rule (anneal over 50% of the steps taken) showed that the anneal is where most of the "
              "memorization is gained, so the main run anneals over as many steps as it trained before its plateau.", ""]
    lines += ["## Choices that differ from the paper", "",
              f"| | paper | headline run `{main_run}` | small grid `{small}` |", "|---|---|---|---|",
              f"| vocabulary V | 2048 | {gp['vocab']} | {g['vocab']} (CPU: the logits dominate the cost) |",
              f"| sequence length S | 64 | {gp['seq_len']} | {g['seq_len']} (random data); 64 (text) |",
              f"| models | 1-8 layers, width 32-256 (80K-6.9M params) | {','.join(map(str, gp['layers']))} layer, widths "
              f"{','.join(map(str, sorted(gp['widths'])))} ({fit_params(runs[main_run])} params) | "
              f"{','.join(map(str, g['layers']))} layer, widths {','.join(map(str, sorted(g['widths'])))} "
              f"({fit_params(runs[small])} params) |",
              f"| optimizer | Adam (GPU, large batches; see the paper) | Adam, betas 0.9/0.98, eps 1e-8, no weight decay, "
              f"batch {gp['batch_size']} sequences (epochs of fresh permutations), per-model gradient clip 1.0 | the same, "
              f"batch {g['batch_size']} |",
              f"| learning rate | the paper's schedule | {gp['lr']:g} after {gp['warmup_steps']} linear warmup steps, "
              f"constant until the model's plateau, then linear decay to 0 over {gp['anneal_fraction']:.0%} of the steps "
              f"taken (per model) | {g['lr']:g}, the same schedule, decay over {g['anneal_fraction']:.0%} "
              f"({runs['random_fp32_short']['grid']['anneal_fraction']:.0%} in the budget-check run) |",
              f"| steps | to saturation, \"usually around 1M steps using a very large batch size\" (the first author's summary "
              f"thread, threadreaderapp.com/thread/1929903028372459909) | until the convergence rule (plateau window {headline_window}), at most "
              f"{gp['max_steps']:,} | window {g['plateau_window']:,}, at most {g['max_steps']:,} "
              f"({runs['random_fp32_short']['grid']['max_steps']:,} in the budget-check run) |",
              f"| dataset sizes | 0.25x-4x style sweep | {', '.join(gp['sizes'])} of {PUBLISHED_ALPHA} bits/param, 1 seed each "
              f"({', '.join(runs[below_run]['grid']['sizes'])} in run `{below_run}`) | "
              f"{', '.join(g['sizes'])} |",
              "| first token | - | conditioned on BOS (id V, one extra embedding row, counted in the parameters) | "
              "the same |",
              "| precision | fp32 and bf16 | fp32 | fp32; bf16 for widths 8 and 16 (run `random_bf16`) |", "",
              f"Convergence rule: a model's memorized bits (measured on its whole dataset every {gp['eval_every']} steps "
              f"in the headline run, every {g['eval_every']} in the small grid) "
              f"grew by less than {g['plateau_tol']:.1%} over the last `--plateau-window` steps (or `--plateau-epochs` "
              "epochs of its own data, as in the headline run) at constant LR; then its LR "
              "decays to 0 and it stops. A model that memorizes >= 99.5% stops at once. A shape's capacity is the "
              "maximum over dataset sizes; it is marked a lower bound when any of its runs did not converge within "
              "--max-steps or its largest dataset was still memorized >= 90%.", "",
              "Budget check (small grid): the rule above can fire on the noise floor of a high constant LR, so the same grid was "
              "also run under a rule about half as long (run `random_fp32_short`: plateau window "
              f"{runs['random_fp32_short']['grid']['plateau_window']:,} steps, anneal over "
              f"{runs['random_fp32_short']['grid']['anneal_fraction']:.0%}). Per shape:", "",
              table(budget), "",
              f"Roughly doubling the training raised the fitted value from {runs['random_fp32_short']['bits_per_param']['estimate']:.2f} "
              f"to {sfit['estimate']:.2f} bits/parameter ({gain:+.1%}). "
              + ("Capacities still grow with the budget, so the fit is best read as a lower bound of what these shapes "
                 "can store; the curves above show where each model stopped." if gain > 0.03 else
                 f"More training would likely add a few percent more, not the {3.2 / sfit['estimate'] - 1:.0%} needed "
                 "to reach 3.2 bits/parameter."), "",
              (f"The previous report's lower-LR run (lr 1e-2, commit ab08473) stored more than this run in {n_prev_higher} "
               f"of {len(budget)} shapes (up to {max_prev_gain:+.1%}): a lower LR converges more slowly but, for some "
               "shapes, higher, so these plateaus depend on the optimizer at the few-percent level as well as on the "
               "budget." if n_prev_higher else
               "The previous report's lower-LR run (lr 1e-2, commit ab08473) stored less than this run in every shape."),
              "",
              "## Pilots beyond the grid", "",
              "One shape at a time, models differing only in learning rate (`reports/capacity/pilot_shapes.py`, log "
              "in `pilot_shapes.log`; figures there are the trainer's own fp32 code lengths, which the grid re-measures "
              "with the scoring engine). Final memorized bits/parameter:", "", "```",
              *pilot_lines(HERE / "pilot_shapes.log"), "```", "",
              "What they show: (A) at a constant LR memorization still creeps up after 30,000 steps (width 16, lr 2e-2: "
              "2.39 at 8K steps, 2.58 at 32K); (B) a 40,000-step warmup-stable-decay schedule stores 2.90 at width 16, "
              "4% above the grid's 2.79, so the small grid's plateaus are a few percent low, not 20%; (D) under the "
              "grid's own rule, V=2048 at width 8 (embedding 94% of the parameters) stores only 2.18 while S=64 at "
              "V=512 stores 2.79 vs 2.65 at S=32; (C) the paper's smallest shape (1 layer, width 32, V=2048, S=64, "
              "80K parameters) stores 3.13. Hence the headline run: the paper's V, S and smallest shapes, with C's "
              "settings. (E), run afterwards on the same shape and rule: lr 2e-2 stores 3.15 in 31,500 steps, lr 5e-3 "
              "only 2.95 after 40,000 (still annealing), so lr 1e-2 is not what holds the 80K shape near 3.1: a "
              "higher LR gets there sooner, not higher. (F, G) batch size at equal epochs (sequences seen): batch 16 "
              "trails batch 32 by about 0.1 bits/parameter all through the constant-LR phase and batch 64 at lr 2e-2 "
              "leads it by about 0.08 (the gradient noise sets the floor a constant LR sits on), at no more cost per "
              "sequence on this CPU (the logs' seconds column). Hence batch 64 (run `paper_regime_fp32_b64`, whose 4,000-step "
              "window covers twice the epochs it did at batch 32). (H) the 80K shape at batch 64 for the epochs the "
              "wider shapes got in that run: see 'Training per model'; hence the window in epochs. (I) batch 128 at equal epochs "
              "stores what batch 64 does (2.81 and 2.80 at lr 2e-2 and 3e-2 after 1,141 epochs, against 2.82), at twice "
              "the time per step, so the gain from batch size has run out at 64; what is left is training longer, "
              "hence the headline's anneal over 300%.", "",
              "## Why the small grid is below the paper", "",
              f"The models there are {80e3 / max(P):.1f}-{80e3 / min(P):.0f}x smaller than the paper's smallest (80K) and "
              f"the token embedding holds {min(emb):.0%}-{max(emb):.0%} of their parameters, with V={g['vocab']} "
              f"instead of 2048 and S={g['seq_len']} instead of 64. Per model we measure "
              f"{sfit['per_model_min']:.2f}-{sfit['per_model_max']:.2f} bits/parameter with no clear trend over this "
              "narrow range of widths, at or just below the bottom of the published per-model range "
              f"(~{PER_MODEL_RANGE}). "
              "Memorization at a constant LR keeps "
              "creeping up slowly, so a plateau found by a finite rule is an underestimate (see the budget check). "
              "The full paper grid (V=2048, S=64, 1-8 layers, widths 32-256) is one flag away on a GPU (`--paper-grid`). Paper figures are not reproduced as "
              "images (nothing is downloaded); the published values are drawn as reference lines "
              f"({PUBLISHED_ALPHA} bits/param; the "
              "published MIA law).", ""]
    (HERE / "report.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'report.md'} and capacity.json: bits_per_param {fit['estimate']:.2f}")


if __name__ == "__main__":
    main()
