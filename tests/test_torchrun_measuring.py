"""`torchrun --nproc-per-node 2 -m memaudit exposure|risk` (gloo on CPU): each rank scores a share of the work, rank
0 writes, and the results equal a single process's. (extract, mia and memorization have their own files.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from memaudit.corpus import demo_corpus
from memaudit.data import write_documents


def _torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "memaudit", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_exposure_two_processes_equal_one(canary_model, tmp_path, run_cli):
    args = ["--controls", "2", "--exact-limit", "1000", "--sample-size", "300", "--batch-size", "64",
            "--device", "cpu"]
    r = _torchrun("exposure", canary_model, *args, "--out", tmp_path / "dist")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("exposure of 1 canaries") == 1  # rank 0 alone reports
    assert run_cli("exposure", canary_model, *args, "--out", tmp_path / "one").returncode == 0
    dist, one = (pd.read_parquet(tmp_path / d / "samples.parquet") for d in ("dist", "one"))
    assert dist["candidates_scored"].tolist() == one["candidates_scored"].tolist() == [301, 301, 301]
    np.testing.assert_allclose(dist["log_likelihood_nats"], one["log_likelihood_nats"], rtol=1e-5)
    np.testing.assert_allclose(dist["exposure"], one["exposure"], atol=1e-9)  # the same candidates rank the same
    assert json.loads((tmp_path / "dist" / "summary.json").read_text())["max_exposure_bits"] > 5


def test_risk_two_processes_equal_one_and_keep_the_verdict(canary_model, tmp_path, run_cli):
    _, unseen = demo_corpus(n_train=1, n_heldout=12, seed=4)
    nonmembers = write_documents(tmp_path / "unseen.jsonl", unseen)
    args = ["--model", canary_model, "--data", canary_model.parent / "train.jsonl", "--nonmembers", nonmembers,
            "--limit", "12", "--prefix", "8", "--suffix", "8", "--fail-above", "mia_auc=0.6", "--device", "cpu",
            "--laws-dir", tmp_path / "none"]
    r = _torchrun("risk", *args, "--out", tmp_path / "dist")
    one = run_cli("risk", *args, "--out", tmp_path / "one")
    assert one.returncode == 3, one.stderr  # its training data is told from unseen text: FAIL
    assert r.returncode != 0 and r.stdout.count("VERDICT: FAIL") == 1, r.stderr[-2000:]  # rank 0's exit 3
    dist, single = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("dist", "one"))
    assert [os.path.basename(p) for p in dist["runs"]] == ["extract", "mia", "memorization", "exposure"]
    assert dist["measured"].keys() == single["measured"].keys()
    for k, v in single["measured"].items():
        assert dist["measured"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for run in ("extract", "mia", "memorization"):
        assert json.loads((tmp_path / "dist" / run / "summary.json").read_text())["world_size"] == 2, run
