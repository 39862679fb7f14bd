"""The `memaudit` command line: each command is a thin shell over the Python API.

Errors a user can cause raise MemauditError and end as one line on stderr with exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import MemauditError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit and measure what language models memorize.")

# Shared option helps, so every command words them the same way.
H_BATCH = "Batch size: auto (largest that fits, backs off on out-of-memory) or a number."
H_DEVICE = "auto (CUDA if available, else CPU), cpu or cuda[:N]."
H_DTYPE = "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."
H_TEXT = "Field/column holding the document text (jsonl, parquet, csv)."
H_ID = "Field/column holding the document id (defaults to the row number)."
H_PICKLE = "Allow pickled .bin weights (they can run code when loaded). Off: safetensors only."
H_REMOTE = "Allow the model directory's own Python code to run (trust_remote_code)."
H_OUT = "Run directory to write (default: runs/<command>-<time>)."
H_RESUME = "Continue an interrupted run in --out without redoing finished batches."
H_OVERWRITE = "Replace an existing run in --out."


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=lambda v: _print_version(v),
                                        help="Print the version and exit.")):
    """Audit and measure what language models memorize."""


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"memaudit {__version__}")
        raise typer.Exit()


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise MemauditError(f"--batch-size must be auto or a positive integer, not {value!r}") from None
    if n < 1:
        raise MemauditError("--batch-size must be >= 1")
    return n


@app.command()
def train(
    data: Path = typer.Option(..., help="Training documents (.jsonl, .txt, .parquet, .csv)."),
    out: Path = typer.Option(..., help="Model directory to write."),
    objective: str = typer.Option("standard", help="Training objective: standard."),
    config: str = typer.Option("tiny", help="tiny, small, LxW (layers x width), or a model directory to continue."),
    family: str = typer.Option("gpt2", help="Architecture for from-scratch configs: gpt2 or llama."),
    epochs: int = typer.Option(10, help="Passes over the training documents."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (linear warmup, cosine decay to 10%)."),
    batch_size: int = typer.Option(16, help="Documents per optimizer step."),
    seq_len: int = typer.Option(128, help="Tokens per row (BOS + the document's first seq_len-1 tokens)."),
    vocab_size: int = typer.Option(2048, help="Vocabulary of the tokenizer trained on the data (from scratch only)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of documents held out for validation loss."),
    seed: int = typer.Option(0, help="Random seed (split, init, order)."),
    device: str = typer.Option("auto", help=H_DEVICE),
    dtype: str = typer.Option("float32", help="Training precision: float32 or bfloat16 (autocast)."),
    text_field: str = typer.Option("text", help=H_TEXT),
    id_field: str = typer.Option("id", help=H_ID),
    limit: Optional[int] = typer.Option(None, help="Use only the first N documents."),
    allow_pickle: bool = typer.Option(False, help=H_PICKLE),
):
    """Train a causal LM on documents and save a model directory (with training_log.csv)."""
    from .training import TrainConfig, train as run_train

    res = run_train(TrainConfig(data=str(data), out=str(out), objective=objective, config=config, family=family,
                                epochs=epochs, lr=lr, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
                                val_fraction=val_fraction, seed=seed, device=device, dtype=dtype,
                                text_field=text_field, id_field=id_field, limit=limit, allow_pickle=allow_pickle))
    val = f"{res.val_loss:.4f}" if res.val_loss is not None else "n/a"
    typer.echo(f"trained {res.parameters:,} parameters for {res.steps} steps on {res.n_train} documents: "
               f"train loss {res.train_loss:.4f}, validation loss {val} -> {res.out}")


# --- commands added by later modules go below this line (one function each) ---


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()  # standalone: click reports usage errors itself
    except MemauditError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
