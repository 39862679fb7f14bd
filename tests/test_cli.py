"""The command line as a user meets it: the real entry point in a subprocess, and options that match the API."""
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from memaudit.cli import app


def test_train_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "memaudit", "train", "--data", str(tmp_path / "none.jsonl"),
                        "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data file not found: {tmp_path / 'none.jsonl'}"


# Each command's settings dataclass against its typer options: same names, same defaults, same required inputs.
# (cli name -> field name where they differ; fields the command line does not offer)
COMMANDS = {
    "extract": ("memaudit.extraction", "ExtractSettings", {}, {"write"}),
    "mia": ("memaudit.membership", "MiaSettings", {}, {"write"}),
    "memorization": ("memaudit.memorization", "MemorizationSettings", {}, set()),
    "exposure": ("memaudit.exposure", "ExposureSettings", {}, set()),
    "capacity": ("memaudit.capacity", "CapacitySettings", {},
                 {"head_dim", "data_seed", "text_sizes", "text_test_windows", "text_steps", "text_batch_size",
                  "text_lr", "text_warmup_steps", "text_seed", "text_vocab_size", "text_field"}),
    "train": ("memaudit.training", "TrainConfig", {}, set()),
    "risk": ("memaudit.risk", "RiskSettings", {}, {"report"}),
    "report": ("memaudit.report", "ReportSettings", {"label": "labels"}, set()),
}


def _plain(value):
    """Paths as text, and lists as the comma list the command line parses them from."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value) if isinstance(value, Path) else value


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_settings_mirror_the_cli_options(command):
    module, cls_name, renamed, api_only = COMMANDS[command]
    cls = getattr(importlib.import_module(module), cls_name)
    cli = {renamed.get(p.name, p.name): p for p in typer.main.get_command(app).commands[command].params}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(cli) == set(fields) - api_only, command
    for name, p in cli.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert (default is dataclasses.MISSING) == p.required, name
        if not p.required:
            assert _plain(default) == _plain(p.default), (name, default, p.default)


def test_help_does_not_load_the_engine():
    """`memaudit --help` and usage errors answer at once: torch and transformers load only when a command runs."""
    code = "import sys, memaudit.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
