"""Output folders memaudit owns: what --overwrite may replace, the marker that lists every file written, file modes
under the umask, and kill -9 followed by --resume ending exactly as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from memaudit.errors import MemauditError
from memaudit.rundir import MARKER, Owned, RunDir, check_output


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_removes_only_what_the_command_wrote(tmp_path):
    run = RunDir(tmp_path / "r", "extract", {"a": 1})
    run.write_summary({"x": 1})
    run.save_partial("000001", pd.DataFrame({"i": [1]}))
    marker = json.loads((tmp_path / "r" / MARKER).read_text())
    assert marker["command"] == "extract" and {"config.json", "summary.json"} <= set(marker["files"])
    assert marker["dirs"] == ["partial"]
    RunDir(tmp_path / "r", "extract", {"a": 2}, overwrite=True)
    assert not (tmp_path / "r" / "summary.json").exists() and not (tmp_path / "r" / "partial").exists()
    # a file the user put there is never deleted: the whole overwrite is refused before anything is removed
    (tmp_path / "r" / "notes.txt").write_text("mine")
    before = _tree(tmp_path / "r")
    with pytest.raises(MemauditError, match="did not write \\(notes.txt\\)"):
        RunDir(tmp_path / "r", "extract", {"a": 3}, overwrite=True)
    assert _tree(tmp_path / "r") == before


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'), "not written by memaudit"),
    (lambda d: RunDir(d, "mia", {}), "holds a mia run, not a extract run"),
    (lambda d: (d / "data.txt").write_text("x"), "not written by memaudit"),
])
def test_overwrite_refuses_folders_it_does_not_own(tmp_path, setup, message):
    d = tmp_path / "out"
    d.mkdir()
    setup(d)
    before = _tree(d)
    with pytest.raises(MemauditError, match=message):
        check_output(d, "extract", overwrite=True)
    assert _tree(d) == before


def test_output_never_is_or_holds_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "runs" / "docs.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    for out, word in ((model, "is an input"), (model / "audit", "lies inside"), (tmp_path / "runs", "holds")):
        with pytest.raises(MemauditError, match=word):
            check_output(out, "extract", inputs=[model, data], overwrite=True)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = RunDir(tmp_path / "r", "extract", {})
        run.write_summary({})
    finally:
        os.umask(old)
    for name in ("config.json", "summary.json", MARKER):  # mkstemp alone would leave 0600
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o644


def test_report_replaces_only_its_own_files(memorized, tmp_path):
    from memaudit.extraction import extract
    from memaudit.report import report

    extract(model_dir=memorized.model_dir, data=memorized.train_file, prefix=8, suffix=8, limit=4, out=tmp_path / "run")
    rep = tmp_path / "rep"
    report(run_dirs=[tmp_path / "run"], out=rep)
    owned = json.loads((rep / MARKER).read_text())
    assert owned["command"] == "report" and {"report.md", "report.html"} <= set(owned["files"])
    (rep / "my-notes.md").write_text("kept")
    report(run_dirs=[tmp_path / "run"], out=rep)  # a rebuild replaces the report and keeps the user's file
    assert (rep / "my-notes.md").read_text() == "kept"
    user = tmp_path / "user"
    user.mkdir()
    (user / "report.md").write_text("mine")
    with pytest.raises(MemauditError, match="not written by memaudit"):
        report(run_dirs=[tmp_path / "run"], out=user)
    assert (user / "report.md").read_text() == "mine"


def test_train_refuses_a_model_it_did_not_write_and_replaces_its_own(memorized, tmp_path):
    from memaudit.training import TrainConfig, train

    hub_model = tmp_path / "hub-model"  # a model directory as save_pretrained writes it: no memaudit marker
    shutil.copytree(memorized.model_dir, hub_model)
    (hub_model / MARKER).unlink()
    before = _tree(hub_model)
    kw = dict(data=str(memorized.train_file), epochs=1, batch_size=8, seq_len=32, val_fraction=0.0, config="1x32",
              vocab_size=300)
    with pytest.raises(MemauditError, match="not written by memaudit"):
        train(TrainConfig(out=str(hub_model), overwrite=True, **kw))
    with pytest.raises(MemauditError, match="is an input"):  # continuing a model into its own folder
        train(TrainConfig(out=str(hub_model), **kw | {"config": str(hub_model)}))
    assert _tree(hub_model) == before
    train(TrainConfig(out=str(tmp_path / "m"), **kw))
    with pytest.raises(MemauditError, match="--overwrite"):
        train(TrainConfig(out=str(tmp_path / "m"), **kw))
    train(TrainConfig(out=str(tmp_path / "m"), overwrite=True, **kw))
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m" / ".staging").exists()


def test_owned_adopts_files_written_by_other_libraries(tmp_path):
    owned = Owned(tmp_path / "o", "train")
    stage = tmp_path / "o" / ".staging"
    (stage / "sub").mkdir(parents=True)
    (stage / "weights.bin").write_bytes(b"1")
    (stage / "sub" / "x").write_bytes(b"2")
    owned.record(dirs=[".staging"])
    owned.adopt(stage)
    marker = json.loads((tmp_path / "o" / MARKER).read_text())
    assert "weights.bin" in marker["files"] and "sub" in marker["dirs"] and not stage.exists()


# --- kill -9, then --resume ----------------------------------------------------------------------------------------

def _memaudit(*args: str) -> list[str]:
    return [sys.executable, "-m", "memaudit", *args]


def _kill_when(cmd: list[str], ready, timeout: float = 120) -> bool:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; True when it was killed while still working."""
    env = dict(os.environ, MEMAUDIT_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, MEMAUDIT_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def _run_here(args: list[str], monkeypatch) -> None:
    """The uninterrupted reference run, in this process (saves an interpreter start)."""
    import torch

    from memaudit import cli

    monkeypatch.setattr(sys, "argv", ["memaudit", *args])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1): float sums in the same order
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        torch.set_num_threads(threads)
    assert exc.value.code == 0


def _parts(out: Path, pattern: str, n: int = 1):
    return lambda: len(list(out.glob(pattern))) >= n


@pytest.mark.parametrize("command", ["extract", "mia", "memorization", "train", "capacity"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(command, memorized, tmp_path, monkeypatch):
    m, members, heldout = str(memorized.model_dir), str(memorized.train_file), str(memorized.heldout_file)
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    args = {
        "extract": (["extract", m, "--data", members, "--prefix", "16", "--suffix", "16", "--batch-size", "2",
                     "--limit", "30", "--device", "cpu"], "partial/*.parquet", "samples.parquet"),
        "mia": (["mia", m, "--members", members, "--nonmembers", heldout, "--attacks", "loss,zlib,min_k",
                 "--bootstrap", "20", "--batch-size", "2", "--limit", "20", "--device", "cpu"], MARKER,
                "samples.parquet"),
        "memorization": (["memorization", m, "--data", members, "--reference", "zstd", "--batch-size", "2",
                          "--limit", "20", "--device", "cpu"], MARKER, "samples.parquet"),
        "train": (["train", "--data", members, "--config", "1x32", "--vocab-size", "300", "--epochs", "3",
                   "--batch-size", "4", "--seq-len", "32", "--val-fraction", "0", "--device", "cpu",
                   "--checkpoint-every", "5"], "checkpoint/state.pt", "model.safetensors"),
        "capacity": (["capacity", "--widths", "8", "--sizes", "64", "--max-steps", "400", "--eval-every", "25",
                      "--plateau-window", "50", "--seq-len", "8", "--vocab", "16", "--threads", "1"],
                     "partial/*.ckpt", "results.csv"),
    }
    cmd, ready, result = args[command]
    _run_here([*cmd, "--out", str(whole)], monkeypatch)
    killed = _kill_when(_memaudit(*cmd, "--out", str(cut)), _parts(cut, ready))
    assert killed or command in ("mia", "memorization"), "the run finished before it could be killed"
    _run(_memaudit(*cmd, "--out", str(cut), "--resume"))
    if result.endswith(".parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(cut / result), pd.read_parquet(whole / result))
    elif result.endswith(".csv"):
        a, b = pd.read_csv(cut / result), pd.read_csv(whole / result)
        drop = [c for c in a.columns if "second" in c]  # wall-clock columns
        pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop))
    else:
        assert (cut / result).read_bytes() == (whole / result).read_bytes()


def test_a_failed_run_does_not_block_the_corrected_rerun(memorized, tmp_path):
    from memaudit.training import TrainConfig, train

    kw = dict(data=str(memorized.train_file), out=str(tmp_path / "m"), epochs=1, batch_size=8, val_fraction=0.0,
              config="1x32", vocab_size=300, canaries=1)
    with pytest.raises(MemauditError, match="canary is .* longer than a row"):
        train(TrainConfig(seq_len=4, **kw))  # fails after claiming the folder, before writing anything
    assert train(TrainConfig(seq_len=32, **kw)).finished  # no --overwrite needed


def test_a_forged_marker_is_not_trusted(tmp_path):
    """A marker listing paths outside its folder makes the folder foreign: --overwrite deletes nothing."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = RunDir(tmp_path / "r", "extract", {})
    marker = json.loads((run.path / MARKER).read_text())
    marker["files"].append("../victim.txt")
    (run.path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(MemauditError, match="is damaged"):
        RunDir(tmp_path / "r", "extract", {}, overwrite=True)
    assert victim.read_text() == "keep me" and (run.path / "config.json").exists()
