"""`torchrun --nproc-per-node 2 -m memaudit memorization`: ranks measure shards of each chunk (gloo on CPU), rank 0
gathers and writes; the result equals a single process's, against zstd and against a reference model, and an
interrupted torchrun run resumed under torchrun measures only what it had not saved."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from memaudit.memorization import memorization

# Runs memaudit's command line with a small chunk size, counting the chunks this rank measures (written to
# $COUNT_FILE by rank 0) and, with $CRASH_AT, stopping every rank when it reaches that chunk.
SCRIPT = """
import os, sys
import memaudit.memorization as m
from memaudit.errors import MemauditError
m.CHUNK = int(os.environ["CHUNK"])
calls, inner = [], m._measure_chunk
def counted(loaded, chunk):
    calls.append(len(chunk))
    if len(calls) == int(os.environ.get("CRASH_AT", "0")):
        raise MemauditError("interrupted for the test")
    return inner(loaded, chunk)
m._measure_chunk = counted
from memaudit import cli
sys.argv = ["memaudit", *sys.argv[1:]]
try:
    cli.main()
finally:
    if os.environ.get("RANK") == "0":
        open(os.environ["COUNT_FILE"], "w").write(str(len(calls)))
"""


def _torchrun(*args, script=None, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_NO_PROGRESS": "1", **(env or {})}
    what = [str(script)] if script else ["-m", "memaudit"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *what, "memorization", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def _same_run(dist_dir, single, rtol):
    """The torchrun run directory against a single process's result."""
    dist = pd.read_parquet(dist_dir / "samples.parquet")
    summary = json.loads((dist_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and single.summary["world_size"] == 1
    for c in single.samples.columns:
        if c in ("bits_model", "bits_reference", "mem_u_bits"):
            np.testing.assert_allclose(dist[c], single.samples[c], rtol=rtol, atol=1e-6, err_msg=c)
        else:
            assert dist[c].tolist() == single.samples[c].tolist(), c
    assert [t["id"] for t in summary["top_samples"]] == [t["id"] for t in single.summary["top_samples"]]
    for k in ("n_samples", "n_skipped_too_short", "n_truncated_to_context", "n_documents", "windows", "reference"):
        assert summary[k] == single.summary[k], k
    assert summary["total_mem_u_bits"] == pytest.approx(single.summary["total_mem_u_bits"], rel=rtol, abs=1e-6)
    return dist, summary


def test_zstd_windows_two_processes_equal_one(memorized, tmp_path):
    args = ["--data", memorized.train_file, "--reference", "zstd", "--zstd-dict-from", memorized.heldout_file,
            "--limit", "10", "--window", "16", "--stride", "12", "--device", "cpu"]
    r = _torchrun(memorized.model_dir, *args, "--out", tmp_path / "dist")
    assert r.returncode == 0, r.stderr[-2000:]
    single = memorization(model_dir=memorized.model_dir, data=memorized.train_file, reference="zstd",
                          zstd_dict_from=memorized.heldout_file, limit=10, window=16, stride=12, device="cpu",
                          out=tmp_path / "single")
    dist, summary = _same_run(tmp_path / "dist", single, rtol=1e-5)
    assert (dist["bits_reference"] == single.samples["bits_reference"]).all()  # same dictionary on every rank
    docs = pd.read_parquet(tmp_path / "dist" / "documents.parquet")
    assert docs["id"].tolist() == single.documents["id"].tolist()
    np.testing.assert_allclose(docs["mem_u_bits"], single.documents["mem_u_bits"], rtol=1e-5, atol=1e-6)
    assert summary["documents"]["n_documents"] == 10 and len(dist) > 10


def test_reference_model_interrupted_and_resumed_under_torchrun(memorized, tmp_path):
    from transformers import AutoModelForCausalLM

    from memaudit.models import load_model

    # a reference model: the same tokenizer, fresh weights
    loaded = load_model(memorized.model_dir, device="cpu", dtype="float32")
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(loaded.model.config).save_pretrained(tmp_path / "ref")
    loaded.tokenizer.save_pretrained(tmp_path / "ref")
    script = tmp_path / "run_memaudit.py"
    script.write_text(SCRIPT)
    args = [memorized.model_dir, "--data", memorized.train_file, "--reference", tmp_path / "ref", "--limit", "20",
            "--device", "cpu", "--out", tmp_path / "dist"]
    env = {"CHUNK": "6", "COUNT_FILE": str(tmp_path / "count")}
    r = _torchrun(*args, script=script, env={**env, "CRASH_AT": "3"})
    assert r.returncode != 0 and "interrupted for the test" in r.stderr
    assert len(list((tmp_path / "dist" / "partial").glob("*.parquet"))) == 2
    r = _torchrun(*args, "--resume", script=script, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "count").read_text() == "2"  # 4 chunks of 6 of 20 documents: the 2 not saved
    single = memorization(model_dir=memorized.model_dir, data=memorized.train_file, reference=str(tmp_path / "ref"),
                          limit=20, device="cpu", out=tmp_path / "single")
    _same_run(tmp_path / "dist", single, rtol=1e-5)
    assert not (tmp_path / "dist" / "partial").exists()
