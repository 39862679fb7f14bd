"""`torchrun --nproc-per-node 2 -m memaudit mia`: ranks score shards (gloo on CPU), rank 0 gathers and writes;
the result equals a single process's."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from memaudit import mia
from memaudit.distributed import shard_indices


def test_shards_partition_the_samples():
    parts = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(11))


def test_torchrun_two_processes_equal_one(memorized, tmp_path):
    args = ["--members", memorized.train_file, "--nonmembers", memorized.heldout_file, "--limit", "9",
            "--window", "24", "--attacks", "all", "--bootstrap", "50", "--recall-shots", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "memaudit", "mia", memorized.model_dir, *map(str, args), "--out", tmp_path / "dist"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dist = pd.read_parquet(tmp_path / "dist" / "samples.parquet")
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["world_size"] == 2
    single = mia(model_dir=memorized.model_dir, members=memorized.train_file, nonmembers=memorized.heldout_file,
                 limit=9, window=24, bootstrap=50, recall_shots=2, write=False)
    assert dist["id"].tolist() == single.samples["id"].tolist()
    cols = [c for c in single.samples.columns if c.startswith("score_")]
    assert cols == [c for c in dist.columns if c.startswith("score_")] and len(cols) == 12  # no reference
    for c in cols:
        np.testing.assert_allclose(dist[c], single.samples[c], rtol=1e-6, atol=1e-7, err_msg=c)
    for c in single.summary["columns"]:
        assert summary["attacks"][c]["auc"] == single.summary["attacks"][c]["auc"]
