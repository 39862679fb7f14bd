"""The `memaudit` command line: each command is a thin shell over the Python API.

Errors a user can cause raise MemauditError and end as one line on stderr with exit code 2. Each command imports
its module (and with it torch and transformers, seconds to load) only when it runs, so `--help` and usage errors
answer at once; tests/test_cli.py checks that importing this module loads neither.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import checks
from .errors import MemauditError
from .gate import FAIL_EXIT_CODE, GATEABLE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit and measure what language models memorize.")

# Shared option helps, so every command words them the same way.
H_BATCH = "Batch size: auto (largest that fits, backs off on out-of-memory) or a number."
H_DEVICE = "auto (CUDA if available, else CPU), cpu or cuda[:N]."
H_DTYPE = "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."
H_TEXT = "Field/column holding the document text (jsonl, parquet, csv)."
H_ID = "Field/column holding the document id (defaults to the row number)."
H_TOKEN_DTYPE = "Token width of a pre-tokenized .bin file: uint16 or uint32."
H_TOKEN_SEQ_LEN = "Tokens per row a pre-tokenized .bin file is cut into (needed for a .bin)."
H_PICKLE = "Allow pickled .bin weights (they can run code when loaded). Off: safetensors only."
H_REMOTE = "Allow the model directory's own Python code to run (trust_remote_code)."
H_OUT = "Run directory to write (default: runs/<command>-<time>)."
H_RESUME = "Continue an interrupted run in --out without redoing finished batches."
H_OVERWRITE = "Replace an existing run in --out."

# Options shared by the measuring commands: one definition each (help text here, default at the command).
BatchSize = Annotated[str, typer.Option(help=H_BATCH)]
Device = Annotated[str, typer.Option(help=H_DEVICE)]
Dtype = Annotated[str, typer.Option(help=H_DTYPE)]
OutDir = Annotated[Optional[Path], typer.Option(help=H_OUT)]
Resume = Annotated[bool, typer.Option(help=H_RESUME)]
Overwrite = Annotated[bool, typer.Option(help=H_OVERWRITE)]
AllowPickle = Annotated[bool, typer.Option(help=H_PICKLE)]
TrustRemoteCode = Annotated[bool, typer.Option(help=H_REMOTE)]
TextField = Annotated[str, typer.Option(help=H_TEXT)]
IdField = Annotated[str, typer.Option(help=H_ID)]
TokenDtype = Annotated[str, typer.Option(help=H_TOKEN_DTYPE)]
TokenSeqLen = Annotated[Optional[int], typer.Option("--seq-len", help=H_TOKEN_SEQ_LEN)]
# Models larger than one device (docs/architecture.md, "Large models"): accelerate places, bitsandbytes quantizes.
DeviceMap = Annotated[Optional[str], typer.Option(help="Place the model through accelerate: auto (every GPU, then CPU "
                                                       "memory, then disk), balanced (GPUs equally) or cpu-offload "
                                                       "(--device, what exceeds it in CPU memory, then disk). "
                                                       "Default: the whole model on --device.")]
MaxMemory = Annotated[Optional[str], typer.Option(help="With --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB, "
                                                       "or one size for each device the model runs on.")]
Quantize = Annotated[Optional[str], typer.Option(help="Load the weights in 8bit or 4bit through bitsandbytes (pip "
                                                      "install 'memaudit[quantize]'); other numbers than full "
                                                      "precision, and no gradnorm.")]


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=lambda v: _print_version(v),
                                        help="Print the version and exit.")):
    """Audit and measure what language models memorize."""


def _print_version(value: bool) -> None:
    if value:
        from .version import __version__

        typer.echo(f"memaudit {__version__}")
        raise typer.Exit()


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise MemauditError(f"--batch-size must be auto or a positive integer, not {value!r}") from None
    checks.batch_size(n)
    return n


@app.command()
def train(
    data: Path = typer.Option(..., help="Training documents (.jsonl, .txt, .parquet, .csv), or pre-tokenized ids "
                              "(.npy, .bin, an input_ids column in .jsonl/.parquet; they need --tokenizer or a "
                              "--config model directory)."),
    out: Path = typer.Option(..., help="Model directory to write."),
    objective: str = typer.Option("standard", help="Training objective: standard, goldfish or sinks."),
    config: str = typer.Option("tiny", help="tiny, small, LxW (layers x width), or a model directory to continue."),
    family: str = typer.Option("gpt2", help="Architecture for from-scratch configs: gpt2 or llama."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory for from-scratch configs "
                                                        "(default: train one on the training documents)."),
    epochs: int = typer.Option(10, help="Passes over the training documents."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (linear warmup, cosine decay to 10%)."),
    batch_size: int = typer.Option(16, help="Rows per optimizer step."),
    seq_len: int = typer.Option(128, help="Tokens per row, BOS included (a .bin is cut into rows of seq_len-1 "
                                          "stored tokens)."),
    rows: str = typer.Option("packed", help="packed: the documents joined with EOS and cut into --seq-len rows "
                                            "(every token trained on); first: one row per document, BOS + its "
                                            "first seq_len-1 tokens. A .bin, already a packed stream, is always "
                                            "one row per seq_len-1 stored tokens."),
    vocab_size: int = typer.Option(2048, help="Vocabulary of the tokenizer trained on the data (from scratch only)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of documents held out for validation loss."),
    seed: int = typer.Option(0, help="Random seed (split, init, order)."),
    device: Device = "auto",
    dtype: str = typer.Option("float32", help="Training precision: float32 or bfloat16 (autocast)."),
    text_field: TextField = "text",
    id_field: IdField = "id",
    limit: Optional[int] = typer.Option(None, help="Use only the first N documents."),
    token_dtype: TokenDtype = "uint16",
    allow_pickle: AllowPickle = False,
    val_data: Optional[Path] = typer.Option(None, help="Separate validation documents (then --data is all training)."),
    warmup_steps: int = typer.Option(20, help="Linear learning-rate warmup steps."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    grad_clip: float = typer.Option(1.0, help="Clip the gradient norm to this (0: off)."),
    goldfish_mode: str = typer.Option("hash", help="Goldfish mask: hash (preceding-h-token hash), static, random, "
                                                   "or hash-official (the goldfish repository's product hash)."),
    goldfish_k: int = typer.Option(4, help="Goldfish: drop 1 in k targets (k >= 2)."),
    goldfish_h: int = typer.Option(13, help="Goldfish: tokens of context hashed (h >= 1)."),
    sink_fraction: float = typer.Option(0.3, help="Sinks: fraction of MLP hidden neurons that are sinks, in (0, 1)."),
    sink_density: float = typer.Option(0.3, help="Sinks: fraction of sinks active per sequence id, in (0, 1)."),
    release: bool = typer.Option(True, help="Sinks: also write OUT/release, the model with the sinks removed."),
    canaries: int = typer.Option(0, help="Insert N random secrets ('my secret number is <9 digits>'); "
                                         "listed in OUT/canaries.jsonl."),
    canary_repeats: int = typer.Option(1, help="Times each canary is inserted (each as its own document)."),
    checkpoint_every: int = typer.Option(0, help="Save OUT/checkpoint every N steps (0: never)."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint (same settings and data)."),
    overwrite: bool = typer.Option(False, help="Replace a model directory that `memaudit train` wrote before "
                                               "(never one it did not write)."),
    stop_after: Optional[int] = typer.Option(None, help="Stop after N steps in total, leaving a checkpoint for "
                                                        "--resume."),
):
    """Train a causal LM on documents and save a model directory (with training_log.csv).

    Runs data-parallel under `torchrun --nproc-per-node N -m memaudit train ...` (--batch-size is global)."""
    from .distributed import env_rank
    from .training import TrainConfig, train as run_train

    settings = TrainConfig(data=data, out=out, objective=objective, config=config, family=family,
                           tokenizer=tokenizer, epochs=epochs, lr=lr, batch_size=batch_size, seq_len=seq_len,
                           rows=rows, vocab_size=vocab_size, seed=seed, val_fraction=val_fraction, val_data=val_data,
                           warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
                           device=device, dtype=dtype, text_field=text_field, id_field=id_field, limit=limit,
                           token_dtype=token_dtype, allow_pickle=allow_pickle, goldfish_mode=goldfish_mode,
                           goldfish_k=goldfish_k, goldfish_h=goldfish_h, sink_fraction=sink_fraction, sink_density=sink_density,
                           release=release, canaries=canaries, canary_repeats=canary_repeats,
                           checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite,
                           stop_after=stop_after)
    res = run_train(settings)
    if env_rank() != 0:  # under torchrun rank 0 reports
        return
    if not res.finished:
        typer.echo(f"stopped after {res.steps} steps; continue with --resume -> {res.out}/checkpoint")
        return
    if res.dropped_fraction is not None:
        typer.echo(f"goldfish dropped {res.dropped_fraction:.4f} of targets (1/k = {1 / goldfish_k:.4f})")
    val = f"{res.val_loss:.4f}" if res.val_loss is not None else "n/a"
    packed = f" ({res.n_rows} packed rows)" if rows == "packed" and data.suffix != ".bin" else ""
    typer.echo(f"trained {res.parameters:,} parameters for {res.steps} steps on {res.n_train} documents{packed}: "
               f"train loss {res.train_loss:.4f}, validation loss {val} -> {res.out}")


# --- commands added by later modules go below this line (one function each) ---


@app.command()
def extract(
    model_dir: Path = typer.Argument(..., help="Model directory (save_pretrained: config, safetensors, tokenizer)."),
    data: Path = typer.Option(..., help="Documents to probe (.jsonl, .txt, .parquet, .csv), or pre-tokenized ids "
                              "(.npy, .bin, an input_ids column in .jsonl/.parquet)."),
    prefix: int = typer.Option(32, help="Prompt length in tokens (Pythia: 32; Carlini 2023: 50)."),
    suffix: int = typer.Option(32, help="Target length in tokens, compared with the continuation."),
    offset: int = typer.Option(0, help="Token position in each document where the window starts (the first window, "
                                       "or --stride's first)."),
    stride: Optional[int] = typer.Option(None, help="Whole documents: every window of prefix + suffix tokens, one "
                                                    "starting each N tokens."),
    windows_per_doc: Optional[int] = typer.Option(None, help="Whole documents: N windows per document at random "
                                                             "starts (seeded by --seed; Carlini et al. 2023)."),
    tail: bool = typer.Option(False, "--tail", help="Whole documents: the last prefix + suffix tokens of each "
                                                    "document (the goldfish paper's evaluation)."),
    decoding: str = typer.Option("greedy", help="greedy (single-pass shortcut), sample, or beam."),
    num_beams: int = typer.Option(4, help="Beams for --decoding beam."),
    num_samples: int = typer.Option(10, help="Draws per sample (n) for --decoding sample."),
    temperature: float = typer.Option(1.0, help="Sampling temperature for --decoding sample."),
    top_k: int = typer.Option(0, help="Top-k for --decoding sample (0: off)."),
    top_p: float = typer.Option(1.0, help="Top-p (nucleus) for --decoding sample (1: off)."),
    np_threshold: float = typer.Option(0.5, help="p of the (n, p)-discoverable rate reported for sampling."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Prepend the tokenizer's BOS (else EOS) to each "
                                       "window, as the trainer starts rows (default: when the tokenizer has one)."),
    shortcut: bool = typer.Option(True, help="Greedy: decode only diverged samples, from the divergence point. "
                                             "--no-shortcut decodes every sample in full (for verification)."),
    batch_size: BatchSize = "auto",
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    quantize: Quantize = None,
    limit: Optional[int] = typer.Option(None, help="Use only the first N documents."),
    text_field: TextField = "text",
    id_field: IdField = "id",
    token_dtype: TokenDtype = "uint16",
    seq_len: TokenSeqLen = None,
    out: OutDir = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    seed: int = typer.Option(0, help="Seed for sampled decoding and --windows-per-doc starts."),
):
    """Extraction: prompt with each document's prefix and measure how much of the true suffix comes back."""
    from .extraction import ExtractSettings, extract as run_extract, format_summary  # lazy: fast CLI start-up

    res = run_extract(ExtractSettings(
        model_dir=model_dir, data=data, prefix=prefix, suffix=suffix, offset=offset, stride=stride,
        windows_per_doc=windows_per_doc, tail=tail, decoding=decoding,
        num_beams=num_beams, num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
        np_threshold=np_threshold, bos=bos, shortcut=shortcut, batch_size=_batch_size(batch_size), device=device,
        dtype=dtype, limit=limit, text_field=text_field, id_field=id_field, token_dtype=token_dtype,
        seq_len=seq_len, out=out, resume=resume, device_map=device_map, max_memory=max_memory, quantize=quantize,
        overwrite=overwrite, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, seed=seed))
    if res is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    typer.echo(format_summary(res.summary))
    typer.echo(f"-> {res.path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the corpus, the trained models, the runs and the report."),
    epochs: int = typer.Option(50, help="Training epochs per model (enough for the standard model to memorize)."),
    n_train: int = typer.Option(64, help="Docstrings trained on."),
    n_heldout: int = typer.Option(64, help="Docstrings held out (the non-members)."),
    objectives: str = typer.Option("standard,goldfish,sinks", help="Objectives to train and compare."),
    seed: int = typer.Option(0, help="Seed for the corpus split and training."),
    overwrite: bool = typer.Option(False, help="Retrain even if --out holds models trained with these settings."),
):
    """The showcase: standard, goldfish and sinks tiny models on stdlib docstrings, probed by extraction, membership
    inference and memorization, in one comparison report."""
    from .demo import SHOWCASE_OBJECTIVES, run_demo

    objs = tuple(o.strip() for o in objectives.split(",") if o.strip())
    bad = [o for o in objs if o not in SHOWCASE_OBJECTIVES]
    if bad or not objs:
        raise MemauditError(f"--objectives takes a comma list of {', '.join(SHOWCASE_OBJECTIVES)}")
    run_demo(out, epochs=epochs, n_train=n_train, n_heldout=n_heldout, objectives=objs, seed=seed,
                 overwrite=overwrite, echo=typer.echo)


@app.command()
def memorization(
    model_dir: Path = typer.Argument(..., help="Target model directory."),
    data: Path = typer.Option(..., help="Samples to measure (.jsonl, .txt, .parquet, .csv), or pre-tokenized ids "
                              "(.npy, .bin, an input_ids column in .jsonl/.parquet)."),
    reference: str = typer.Option(..., help="Reference: a model directory with the same tokenizer, or 'zstd'."),
    zstd_level: int = typer.Option(19, help="zstd compression level (1-22) for --reference zstd."),
    zstd_dict_from: Optional[Path] = typer.Option(None, help="Train a zstd dictionary on this text file first."),
    top_k: int = typer.Option(20, help="How many samples with the most mem_U to list in summary.json."),
    window: Optional[int] = typer.Option(None, help="Measure each document's first N tokens (shorter documents "
                                                    "skipped). Default: whole documents cut to the context."),
    stride: Optional[int] = typer.Option(None, help="With --window: measure every window starting each N tokens "
                                                    "(documents.parquet sums each document's windows)."),
    windows_per_doc: Optional[int] = typer.Option(None, help="With --window: N windows per document at random "
                                                             "starts (seeded by --seed); documents.parquet."),
    seed: int = typer.Option(0, help="Seed for --windows-per-doc starts."),
    out: OutDir = None,
    batch_size: BatchSize = "auto",
    device: Device = "auto",
    dtype: str = typer.Option("float32", help="Scoring precision: float32 (default, exact code lengths) or bfloat16."),
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    quantize: Quantize = None,
    text_field: TextField = "text",
    id_field: IdField = "id",
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples."),
    token_dtype: TokenDtype = "uint16",
    seq_len: TokenSeqLen = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    resume: Resume = False,
    overwrite: Overwrite = False,
):
    """Unintended memorization in bits per sample: max(0, bits under the reference - bits under the model)."""
    from .memorization import MemorizationSettings, memorization as run_memorization  # lazy: fast CLI start-up

    res = run_memorization(MemorizationSettings(
        model_dir=model_dir, data=data, reference=reference, zstd_level=zstd_level, zstd_dict_from=zstd_dict_from,
        top_k=top_k, window=window, stride=stride, windows_per_doc=windows_per_doc, seed=seed, out=out,
        batch_size=_batch_size(batch_size), device=device, dtype=dtype, text_field=text_field,
        device_map=device_map, max_memory=max_memory, quantize=quantize,
        id_field=id_field, limit=limit, token_dtype=token_dtype, seq_len=seq_len, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, resume=resume, overwrite=overwrite))
    if res is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    s = res.summary
    docs = s.get("documents")
    what = f"{s['n_samples']} windows of {docs['n_documents']} documents" if docs else f"{s['n_samples']} samples"
    typer.echo(f"{what}: {s['total_mem_u_bits']:.1f} bits of unintended memorization against "
               f"{s['reference']} ({s['fraction_samples_with_mem_u']:.1%} of samples > 0) -> {res.path}")


@app.command()
def capacity(
    layers: str = typer.Option("1", help="Comma-separated layer counts of the grid."),
    widths: str = typer.Option("8,16,24,32", help="Comma-separated model widths of the grid."),
    vocab: int = typer.Option(512, help="Vocabulary V of the uniform random tokens (paper: 2048)."),
    seq_len: int = typer.Option(32, help="Tokens per sequence S (paper: 64)."),
    sizes: str = typer.Option("0.5x,1.5x,3x", help="Dataset sizes: sequences, or multiples of 3.6 bits/param "
                              "of data (e.g. 0.5x,1.5x,3x)."),
    seeds: int = typer.Option(1, help="Models per (shape, dataset size), each with its own data and init."),
    max_steps: int = typer.Option(12000, help="Step budget per model; a model not converged by then is a lower bound."),
    batch_size: int = typer.Option(32, help="Sequences per model per step."),
    lr: float = typer.Option(1e-2, help="Adam learning rate after warmup (no weight decay)."),
    warmup_steps: int = typer.Option(100, help="Linear warmup steps."),
    eval_every: int = typer.Option(250, help="Measure every model's memorized bits every this many steps."),
    plateau_window: int = typer.Option(1000, help="Convergence: memorized bits grew < --plateau-tol over this many steps."),
    plateau_tol: float = typer.Option(0.005, help="Relative growth below which memorization has plateaued."),
    anneal_fraction: float = typer.Option(0.3, help="After the plateau, decay the LR to 0 over this fraction of the steps so far."),
    plateau_epochs: Optional[float] = typer.Option(None, help="Count the plateau window in epochs of each model's "
                                                   "own data instead of steps (overrides --plateau-window), so "
                                                   "larger datasets are judged after equal training per sequence."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (weights used in bf16; measured in bf16)."),
    paper_grid: bool = typer.Option(False, help="The paper's grid: V=2048, S=64, layers 1,2,4,8 x widths 32-256 (GPU)."),
    text: Optional[Path] = typer.Option(None, help="Real-text mode: fixed models on growing numbers of 64-token "
                                         "windows of this file (double descent and the MIA law)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    torch_compile: Optional[str] = typer.Option(
        None, "--compile", help="on or off: torch.compile the models' body (about 6 s per shape and ensemble size, "
        "then 4-16% faster steps on CPU). Default: on for --max-steps of 20,000 or more when a C++ compiler is found."),
    out: OutDir = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
):
    """Model capacity in bits per parameter on random tokens (Morris et al.); with --text, double descent and MIA.

    A grid checkpoints each shape at every evaluation: --resume continues an interrupted grid from there, \
ending exactly as an uninterrupted run would (same --threads).
    """
    from .capacity import CapacitySettings, capacity as run_capacity  # lazy: fast CLI start-up

    res = run_capacity(CapacitySettings(
        layers=checks.int_list("--layers", layers), widths=checks.int_list("--widths", widths), vocab=vocab,
        seq_len=seq_len, sizes=[v.strip() for v in sizes.split(",") if v.strip()], seeds=seeds, max_steps=max_steps,
        batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, eval_every=eval_every, plateau_window=plateau_window,
        plateau_tol=plateau_tol, anneal_fraction=anneal_fraction, plateau_epochs=plateau_epochs, dtype=dtype,
        paper_grid=paper_grid, text=text, threads=threads, torch_compile=torch_compile, out=out, resume=resume,
        overwrite=overwrite))
    if "message" in res.summary:  # torchrun ranks other than 0 have none
        typer.echo(res.summary["message"] + f" -> {res.path}")


@app.command()
def mia(
    model_dir: Path = typer.Argument(..., help="Target model directory."),
    members: Path = typer.Option(..., help="Documents the model was trained on (.jsonl, .txt, .parquet, .csv), or "
                                 "pre-tokenized ids (.npy, .bin, an input_ids column in .jsonl/.parquet)."),
    nonmembers: Path = typer.Option(..., help="Documents from the same source it never saw."),
    reference: Optional[Path] = typer.Option(None, help="Reference model directory (same tokenizer) for the "
                                                        "reference attack."),
    attacks: str = typer.Option("all", help="all, or a comma list of: loss, zlib, zstd, reference, min_k, "
                                            "min_k_pp, recall, dc_pdd, gradnorm. Cost, in units of the loss "
                                            "attack's one pass (124M-parameter GPT-2, CPU): loss, zlib, zstd, "
                                            "min_k, min_k_pp and dc_pdd all share that pass (1x together); "
                                            "reference adds the reference model's pass (about 1x at the same "
                                            "size); recall about 1.2x (each sample after the shots' cached "
                                            "prefix); gradnorm about 2x (a backward per batch from the target "
                                            "pass's forward; 3-7x on models that need one backward per sample)."),
    k: str = typer.Option("10,20,30", help="Percentages for min_k and min_k_pp (one score column per k)."),
    window: Optional[int] = typer.Option(None, help="Score each document's first N tokens (shorter documents "
                                                    "skipped). Default: whole documents truncated to the context."),
    stride: Optional[int] = typer.Option(None, help="With --window: score every window starting each N tokens "
                                                    "(windows.parquet); a document scores the mean of its windows."),
    windows_per_doc: Optional[int] = typer.Option(None, help="With --window: N windows per document at random "
                                                             "starts (seeded by --seed; Carlini et al. 2023), "
                                                             "scored as --stride's are."),
    collection: bool = typer.Option(False, help="Dataset inference: is the members file (the suspect set) trained "
                                                "on, against the non-members file (known unseen)? Adds a p-value."),
    bos: bool = typer.Option(True, help="Prepend the tokenizer's BOS (else EOS) so every token is scored (as "
                                        "the trainer starts rows). --no-bos: the first token is context only."),
    recall_shots: int = typer.Option(5, help="Non-member samples joined as recall's prefix (left out of recall's "
                                             "metrics)."),
    dcpdd_corpus: Optional[Path] = typer.Option(None, help="Reference corpus for dc_pdd's token frequencies "
                                                           "(default: the non-member file)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the confidence intervals (0: none)."),
    calibration_fraction: float = typer.Option(0.5, help="Fraction of each class used to calibrate thresholds; "
                                                         "calibrated figures are measured on the rest."),
    seed: int = typer.Option(0, help="Seed for the calibration split, bootstrap, recall shots and "
                                     "--windows-per-doc starts."),
    batch_size: BatchSize = "auto",
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    quantize: Quantize = None,
    text_field: TextField = "text",
    id_field: IdField = "id",
    limit: Optional[int] = typer.Option(None, help="Use only the first N documents of each file."),
    token_dtype: TokenDtype = "uint16",
    seq_len: TokenSeqLen = None,
    out: OutDir = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Membership inference: how well each attack tells members from non-members (AUC, TPR at low FPR)."""
    from .membership import MiaSettings, format_summary, mia as run_mia  # lazy: fast CLI start-up

    res = run_mia(MiaSettings(
        model_dir=model_dir, members=members, nonmembers=nonmembers, reference=reference, attacks=attacks, k=k,
        window=window, stride=stride, windows_per_doc=windows_per_doc, collection=collection, bos=bos,
        recall_shots=recall_shots, dcpdd_corpus=dcpdd_corpus, bootstrap=bootstrap,
        calibration_fraction=calibration_fraction, seed=seed, batch_size=_batch_size(batch_size), device=device,
        dtype=dtype, text_field=text_field, id_field=id_field, limit=limit, token_dtype=token_dtype,
        seq_len=seq_len, out=out, resume=resume, device_map=device_map, max_memory=max_memory, quantize=quantize,
        overwrite=overwrite, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    if res is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    typer.echo(format_summary(res.summary))
    typer.echo(f"-> {res.path}")


@app.command()
def exposure(
    model_dir: Path = typer.Argument(..., help="Model directory trained with canaries."),
    canaries: Optional[Path] = typer.Option(None, help="Canaries .jsonl (secret + template with {secret}); "
                                                       "default: MODEL_DIR/canaries.jsonl."),
    controls: int = typer.Option(5, help="Fresh random secrets in the same templates (never trained on) "
                                         "scored beside the canaries as a baseline."),
    exact_limit: int = typer.Option(100_000, help="Enumerate every candidate when 10^digits is at most this; "
                                                  "otherwise estimate from --sample-size candidates."),
    sample_size: int = typer.Option(5_000, help="Candidates sampled (without replacement) when estimating."),
    estimator: str = typer.Option("sampling", help="Headline estimate when sampling: sampling (rank from the "
                                                   "fraction of more likely samples) or skewnorm (Carlini 2019)."),
    seed: int = typer.Option(0, help="Seed for sampled candidates and control secrets."),
    batch_size: BatchSize = "auto",
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    quantize: Quantize = None,
    out: OutDir = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Canary exposure (Carlini et al. 2019): log2 |R| - log2 rank of each secret among all candidates."""
    from .exposure import ExposureSettings, exposure as run_exposure  # lazy: fast CLI start-up

    res = run_exposure(ExposureSettings(
        model_dir=model_dir, canaries=canaries, controls=controls, exact_limit=exact_limit, sample_size=sample_size,
        estimator=estimator, seed=seed, batch_size=_batch_size(batch_size), device=device, dtype=dtype, out=out,
        device_map=device_map, max_memory=max_memory, quantize=quantize,
        overwrite=overwrite, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    if res is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    s = res.summary
    ctrl = f"{s['mean_control_exposure_bits']:.2f}" if s["mean_control_exposure_bits"] is not None else "n/a"
    typer.echo(f"exposure of {s['n_canaries']} canaries: mean {s['mean_exposure_bits']:.2f} bits, max "
               f"{s['max_exposure_bits']:.2f} of {s['max_possible_exposure_bits']:.2f} possible; unseen controls "
               f"{ctrl} bits -> {res.path}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (extract, mia, memorization, capacity, "
                                                    "exposure, risk) and/or trained model directories."),
    out: Path = typer.Option(Path("reports/report"), help="Folder for report.md, report.html and figures/."),
    label: Optional[list[str]] = typer.Option(None, help="A label per run directory, in order (repeat the "
                                                          "option); default: the model's directory name."),
    title: str = typer.Option("memaudit report", help="Report title."),
    top: int = typer.Option(5, help="Most memorized samples listed per run."),
):
    """One Markdown + self-contained HTML report from any mix of run directories, runs of a kind side by side."""
    from .report import ReportSettings, report as write_report

    res = write_report(ReportSettings(run_dirs=run_dirs, out=out, labels=label, title=title, top=top))
    typer.echo(f"report of {len(res.runs)} runs with {res.figures} figures; Markdown: {res.markdown}")
    typer.echo(f"report -> {res.html}")


@app.command()
def risk(
    params: Optional[float] = typer.Option(None, help="Parameters of the model to be trained (pre-training mode)."),
    train_sequences: Optional[float] = typer.Option(None, help="Training sequences of --window tokens."),
    train_tokens: Optional[float] = typer.Option(None, help="Training tokens (cut into --window-token sequences)."),
    window: int = typer.Option(64, help="Tokens per sequence (the MIA law was fitted on 64)."),
    precision: str = typer.Option("published", help="Capacity in bits/parameter (Morris et al.): published (3.6), "
                                                    "float32 (3.83) or bfloat16 (3.51)."),
    bits_per_token: Optional[float] = typer.Option(None, help="Information per training token, for data bits. "
                                                              "Default 4.0 (English text, ~GPT-2-class code length)."),
    random_vocab: Optional[int] = typer.Option(None, help="The data is uniform random tokens over this vocabulary "
                                                          "(bits per token = log2 V, exact)."),
    model: Optional[Path] = typer.Option(None, help="Trained model directory (post-training mode)."),
    data: Optional[Path] = typer.Option(None, help="Its training documents (post-training mode)."),
    nonmembers: Optional[Path] = typer.Option(None, help="Documents it never saw, for membership inference."),
    canaries: Optional[Path] = typer.Option(None, help="Canaries .jsonl (default: MODEL/canaries.jsonl if there)."),
    fail_above: Optional[str] = typer.Option(None, help="Exit 3 when a figure exceeds its limit, e.g. "
                                                        "exact_rate=0.01,mia_auc=0.6 (names: " +
                                                        ", ".join(GATEABLE) + ")."),
    laws_dir: Optional[Path] = typer.Option(None, help="A folder searched for MIA laws fitted by `memaudit capacity` "
                                            "(e.g. reports/capacity), reported beside the published law."),
    prefix: int = typer.Option(32, help="Extraction prompt tokens."),
    suffix: int = typer.Option(32, help="Extraction target tokens."),
    batch_size: BatchSize = "auto",
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    quantize: Quantize = None,
    limit: Optional[int] = typer.Option(None, help="Use only the first N documents of each file."),
    text_field: TextField = "text",
    id_field: IdField = "id",
    out: OutDir = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Pre-release risk: predicted capacity, regime and MIA F1; after training, measured figures and a verdict."""
    from .risk import RiskSettings, risk as run_risk

    res = run_risk(RiskSettings(
        out=out, params=params, train_sequences=train_sequences, train_tokens=train_tokens, window=window,
        precision=precision, bits_per_token=bits_per_token, random_vocab=random_vocab, model=model, data=data,
        nonmembers=nonmembers, canaries=canaries, fail_above=fail_above, laws_dir=laws_dir, prefix=prefix,
        suffix=suffix, batch_size=_batch_size(batch_size), device=device, dtype=dtype, limit=limit,
        device_map=device_map, max_memory=max_memory, quantize=quantize,
        text_field=text_field, id_field=id_field, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        overwrite=overwrite), echo=typer.echo)
    if res is None:  # a non-zero rank under torchrun: rank 0 reports and exits with the verdict
        return
    typer.echo(f"-> {res.path}")
    if res.report is not None:  # the report's path comes last: the file a reviewer opens
        typer.echo(f"report -> {res.report}")
    if res.exit_code:
        raise typer.Exit(res.exit_code)


# The base of the usage errors typer raises (typer vendors click in newer releases, so it is found, not imported).
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Entry point: run the app; every mistake a user can make ends as one line on stderr and exit code 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        code = app(standalone_mode=False)  # usage errors come back to us instead of a multi-line box
    except _CLICK_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `memaudit` alone: the help text, not an error
            typer.echo(exc.format_message())
            sys.exit(0)
        command = f"memaudit {exc.ctx.info_name} --help" if getattr(exc, "ctx", None) and \
            exc.ctx.parent is not None else "memaudit --help"
        _fail(f"{exc.format_message()} (see '{command}')")
    except typer.Abort:
        _fail("aborted", code=130)
    except MemauditError as exc:
        _fail(str(exc))
    except OSError as exc:  # a file the system refused to read or write (permissions, full disk, ...)
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}")
    code = code if isinstance(code, int) else 0
    # On a finished run only (a risk verdict of FAIL included): after an error on one rank the others may never
    # reach the barrier.
    if code in (0, FAIL_EXIT_CODE) and "torch" in sys.modules:
        from .distributed import shutdown

        shutdown()
    sys.exit(code)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)  # one line, whatever the message held
    sys.exit(code)
