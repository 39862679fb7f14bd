"""A default run prints no warnings: `extract`, `mia` and `train` as a user runs them, on a tiny local model.

Each command runs in its own `python -m memaudit` process (warnings are printed once per process, so an
in-process test would miss any that an earlier test already triggered), and its stderr must hold no line
mentioning a warning or a deprecation: Python warnings (FutureWarning, DeprecationWarning shown by libraries,
UserWarning) and transformers' logger warnings alike.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

_WARNING_LINE = re.compile(r"warning|deprecated", re.IGNORECASE)
_WORDS = ("the model reads every token of a document and the cache keeps its keys and values so the next step "
          "only reads one new token while the loss of each member stays low").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 1-layer, 32-wide GPT-2 with a 300-token BPE tokenizer; 20 members and 20 non-members of 24 words."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from memaudit.data import train_tokenizer, write_documents

    root = tmp_path_factory.mktemp("warnings")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(_WORDS) for _ in range(24)) for _ in range(40)]
    write_documents(root / "members.jsonl", docs[:20])
    write_documents(root / "nonmembers.jsonl", docs[20:])
    tok = train_tokenizer(docs, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


_COMMANDS = {
    "extract": ["extract", "model", "--data", "members.jsonl", "--prefix", "8", "--suffix", "8",
                "--out", "run-extract"],
    "mia": ["mia", "model", "--members", "members.jsonl", "--nonmembers", "nonmembers.jsonl", "--out", "run-mia"],
    "train": ["train", "--data", "members.jsonl", "--out", "run-train", "--epochs", "1"],
}


@pytest.mark.parametrize("command", list(_COMMANDS))
def test_default_run_prints_no_warning(tiny: Path, command: str):
    env = dict(os.environ, MEMAUDIT_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "memaudit", *_COMMANDS[command]], cwd=tiny, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"memaudit {command} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    noisy = [line for line in proc.stderr.splitlines() if _WARNING_LINE.search(line)]
    assert not noisy, f"memaudit {command} printed warnings:\n" + "\n".join(noisy)
