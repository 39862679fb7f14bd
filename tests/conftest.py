"""Shared fixtures: tiny models trained locally (nothing is downloaded)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("MEMAUDIT_NO_PROGRESS", "1")
torch.manual_seed(0)


@dataclass
class TrainedModel:
    model_dir: Path
    train_file: Path  # the documents it was trained on (members)
    heldout_file: Path  # documents from the same source it never saw


@pytest.fixture(scope="session")
def memorized(tmp_path_factory) -> TrainedModel:
    """A tiny GPT-2 trained until it reproduces its 60 training docstrings; 60 held-out ones beside them."""
    from memaudit.corpus import demo_corpus
    from memaudit.data import train_tokenizer, write_documents
    from memaudit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("memorized")
    members, heldout = demo_corpus(n_train=60, n_heldout=60, seed=1)
    train_file = write_documents(root / "train.jsonl", members, [f"m{i}" for i in range(len(members))])
    heldout_file = write_documents(root / "heldout.jsonl", heldout, [f"h{i}" for i in range(len(heldout))])
    # The tokenizer sees members and held-out alike (as a real tokenizer is trained on a broad corpus): one trained
    # on the members only would give them shorter token sequences, a membership signal no model weight carries.
    train_tokenizer(members + heldout).save_pretrained(root / "tokenizer")
    train(TrainConfig(data=str(train_file), out=str(root / "model"), epochs=80, lr=3e-3, batch_size=16,
                      seq_len=96, rows="first", val_fraction=0.0, seed=0, tokenizer=str(root / "tokenizer")))
    return TrainedModel(root / "model", train_file, heldout_file)


@pytest.fixture
def run_cli(capsys):
    """`memaudit ARGS...` in this process, through the real entry point (`cli.main`), without an interpreter's
    start-up: returns returncode, stdout and stderr as a subprocess run would."""
    from memaudit import cli

    def run(*args) -> SimpleNamespace:
        capsys.readouterr()
        old, sys.argv = sys.argv, ["memaudit", *map(str, args)]
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = old
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture(scope="session")
def canary_model(tmp_path_factory):
    """A tiny GPT-2 trained (by the trainer's --canaries) on 40 docstrings plus one 9-digit canary x 40."""
    from memaudit.corpus import demo_corpus
    from memaudit.data import write_documents
    from memaudit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("canary")
    docs, _ = demo_corpus(n_train=40, n_heldout=1, seed=3)
    data = write_documents(root / "train.jsonl", [d[:200] for d in docs])
    train(TrainConfig(data=str(data), out=str(root / "model"), config="2x64", epochs=25, lr=3e-3, batch_size=16,
                      seq_len=64, rows="first", val_fraction=0.0, seed=0, vocab_size=512, canaries=1,
                      canary_repeats=40))
    return root / "model"
