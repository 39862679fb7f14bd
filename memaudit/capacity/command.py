"""`memaudit capacity`: its settings, its summaries and its Python entry, `capacity`.

One `CapacitySettings` holds every option and its check. The two experiments take their own config derived from
it (`RandomGridConfig`, `TextCapacityConfig`): each is the dict config.json records as the run's settings, which
--resume compares, so those dicts stay exactly as older runs recorded them; the random grid's also holds the
values --paper-grid puts in place of the options.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .. import checks
from ..errors import MemauditError
from ..settings import settings_from
from .ensemble_train import check_compile_setting
from .random_data import PAPER_GRID, RandomCapacitySummary, RandomGridConfig, parse_size, run_grid
from .text import TextCapacityConfig, TextCapacitySummary, run_text

MAX_THREADS = 1024  # OpenMP fails (or crashes) allocating far more threads than any machine has

CapacitySummary = RandomCapacitySummary | TextCapacitySummary  # summary.json of the grid, or of --text


@dataclass(kw_only=True)
class CapacitySettings:
    """Every option of `memaudit capacity`: the CLI flags' names and defaults (the CLI only parses).

    Without `text`, the random-token grid; with it, the text experiment, which takes `widths`, the first of
    `layers`, `threads`, `torch_compile` and the `text_*` fields below, and leaves the grid's options unused.
    """
    layers: list[int] = field(default_factory=lambda: [1])
    widths: list[int] = field(default_factory=lambda: [8, 16, 24, 32])  # with text too, as the CLI always had
    vocab: int = 512  # V of the uniform random tokens (paper: 2048)
    seq_len: int = 32  # S, tokens per sequence (paper: 64)
    sizes: list[str] = field(default_factory=lambda: ["0.5x", "1.5x", "3x"])  # sequences, or multiples like 1.5x
    seeds: int = 1  # models per (shape, dataset size)
    max_steps: int = 12000
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 100
    eval_every: int = 250
    plateau_window: int = 1000
    plateau_tol: float = 0.005
    anneal_fraction: float = 0.3
    plateau_epochs: float | None = None  # the plateau window in epochs of each model's data (overrides the steps)
    dtype: str = "float32"  # or bfloat16
    paper_grid: bool = False  # PAPER_GRID's values in place of the grid options it names
    text: str | Path | None = None  # real-text mode: the documents file
    threads: int | None = None
    torch_compile: str | None = None  # --compile: on, off, or None (auto)
    out: str | Path | None = None  # None: runs/capacity-<time> (runs/capacity-text-<time> with text)
    resume: bool = False
    overwrite: bool = False
    # Python API only; the CLI runs with these values.
    head_dim: int = 16  # a grid shape's heads: width // head_dim
    data_seed: int = 0  # the grid's random data
    text_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512, 1024])  # windows
    text_test_windows: int = 256  # held out (at most a quarter of all windows)
    text_steps: int = 2000  # each text model's step budget
    text_batch_size: int = 32
    text_lr: float = 5e-3
    text_warmup_steps: int = 100
    text_seed: int = 0  # shuffles the windows; seeds the models
    text_vocab_size: int = 512  # of the tokenizer trained on the text
    text_field: str = "text"

    def validate(self) -> None:
        """Cheap checks before anything is read or trained: one MemauditError line each."""
        check_compile_setting(self.torch_compile)
        if self.text is not None:
            self._validate_text()
        else:
            _validate_grid(self.grid())

    def _validate_text(self) -> None:
        if not self.widths:
            raise MemauditError("--widths needs positive integers")
        for w in self.widths:
            checks.integer("--widths", w, high=16_384)
        if not self.layers:
            raise MemauditError("--layers needs a positive integer")
        checks.integer("--layers", self.layers[0], high=256)  # the text models have the first of --layers
        checks.integer("--threads", self.threads, high=MAX_THREADS)
        checks.readable_file(self.text, "--text file")
        for n in self.text_sizes:
            checks.integer("text_sizes", n)
        for name in ("text_test_windows", "text_steps", "text_batch_size", "text_vocab_size"):
            checks.integer(name, getattr(self, name))
        checks.integer("text_warmup_steps", self.text_warmup_steps, low=0)
        checks.number("text_lr", self.text_lr, low=0, low_open=True)
        checks.seed(self.text_seed, "text_seed")

    def grid(self) -> RandomGridConfig:
        """The random-data grid these settings run: the options of the same names, then --paper-grid's values."""
        cfg = RandomGridConfig(**{f.name: getattr(self, f.name) for f in fields(RandomGridConfig)})
        cfg.sizes = [str(s) for s in cfg.sizes]  # the CLI's strings; a number of sequences may come as an int
        return replace(cfg, **PAPER_GRID) if self.paper_grid else cfg

    def text_config(self) -> TextCapacityConfig:
        """The text experiment these settings run (its recorded names: the `text_` fields without the prefix)."""
        return TextCapacityConfig(text=str(self.text), widths=self.widths, layers=self.layers[0],
                                  vocab_size=self.text_vocab_size, sizes=self.text_sizes, n_test=self.text_test_windows,
                                  steps=self.text_steps, batch_size=self.text_batch_size, lr=self.text_lr,
                                  warmup_steps=self.text_warmup_steps, seed=self.text_seed, threads=self.threads,
                                  text_field=self.text_field, torch_compile=self.torch_compile)


def _validate_grid(cfg: RandomGridConfig) -> None:
    """The grid's checks, on its values after --paper-grid (compiling is checked before)."""
    if not cfg.layers or not cfg.widths:
        raise MemauditError("--layers and --widths need positive integers")
    for v in cfg.layers:
        checks.integer("--layers", v, high=256)
    for v in cfg.widths:
        checks.integer("--widths", v, high=16_384)
    checks.integer("--vocab", cfg.vocab, low=2, high=1 << 20)
    checks.integer("--seq-len", cfg.seq_len, low=2, high=1 << 16)
    checks.integer("--seeds", cfg.seeds)
    checks.integer("--max-steps", cfg.max_steps)
    checks.integer("--batch-size", cfg.batch_size)
    checks.number("--lr", cfg.lr, low=0, low_open=True)
    checks.integer("--warmup-steps", cfg.warmup_steps, low=0)
    checks.integer("--eval-every", cfg.eval_every)
    checks.integer("--plateau-window", cfg.plateau_window)
    checks.number("--plateau-tol", cfg.plateau_tol, low=0)
    checks.number("--anneal-fraction", cfg.anneal_fraction, low=0)
    checks.number("--plateau-epochs", cfg.plateau_epochs, low=0, low_open=True)
    checks.integer("--threads", cfg.threads, high=MAX_THREADS)
    checks.choice("--dtype", cfg.dtype, ("float32", "bfloat16"))
    checks.integer("head_dim", cfg.head_dim)
    checks.integer("data_seed", cfg.data_seed, low=None)
    if not cfg.sizes:
        raise MemauditError("--sizes needs at least one dataset size")
    for s in cfg.sizes:
        parse_size(s, 1000, cfg.seq_len, cfg.vocab)


@dataclass
class CapacityResult:
    summary: CapacitySummary  # exactly what summary.json holds ({} on torchrun ranks other than 0)
    path: Path  # the run directory
    results: pd.DataFrame  # results.csv (the grid: one row per model) or text_results.csv (per width and size)


def capacity(settings: CapacitySettings | None = None, /, **options: Any) -> CapacityResult:
    """Model capacity in bits per parameter on uniform random tokens (Morris et al., arXiv 2505.24832); with
    `text`, double descent and the MIA scaling law on real text.

    The grid trains every shape (`layers` x `widths`) on every dataset size (`sizes`) x `seeds`, measures each
    model's memorized bits, takes each shape's plateau as its capacity (a lower bound when a model did not
    converge within `max_steps` or the largest dataset was still memorized) and fits bits per parameter. Pass a
    `CapacitySettings` or its fields as keywords. Returns the summary, the run directory and the results table.
    """
    s = settings_from(CapacitySettings, settings, options)
    s.validate()
    if s.text is not None:
        summary, path, results = run_text(s.text_config(), s.out, resume=s.resume, overwrite=s.overwrite)
    else:
        summary, path, results = run_grid(s.grid(), s.out, resume=s.resume, overwrite=s.overwrite)
    return CapacityResult(summary=summary, path=path, results=results)
