"""`torchrun --nproc-per-node 2 -m memaudit extract`: each rank probes its share of every chunk of windows (gloo on
CPU) with the usual fast paths, rank 0 gathers, saves and writes; the results equal one process's, and --resume
under torchrun finishes a run whose partial results are on disk with the same results, probing only the rest.
The ranks run a small script (the API, or the command line's entry point `cli.main`, as `-m memaudit` does) that
counts what each rank's scoring passes read."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from memaudit import extract, load_model, read_documents, tokenize, write_documents
from memaudit.data import decode
from memaudit.distributed import shard_todo

KW = dict(prefix=16, suffix=16, stride=16, batch_size=8, device="cpu")

# Under torchrun, each rank counting the windows its scoring passes read (into scored-<run>-<rank>.json):
# `runs`: a greedy run and a sampling run in chunks of 30 windows (several gathers), then a greedy run interrupted on
# rank 0 after its second saved chunk; `cli ARGS`: `memaudit ARGS` through the command line's entry point.
_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import memaudit.extraction as ex
    from memaudit import cli, extract

    out, mode = sys.argv[1:3]
    scored = []
    real = ex.iter_scored_batches

    def counting(*a, **k):
        for b in real(*a, **k):
            scored.extend(b.indices)
            yield b

    def save_count(name):
        with open(f"{out}/scored-{name}-{os.environ['RANK']}.json", "w") as fh:
            json.dump(len(scored), fh)
        scored.clear()

    ex.iter_scored_batches = counting
    if mode == "cli":
        sys.argv = ["memaudit", *sys.argv[3:]]
        try:
            cli.main()
        finally:
            save_count("cli")
    model, data, kw = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    ex.CHUNK_WINDOWS = 30
    extract(model_dir=model, data=data, out=f"{out}/greedy", **kw)
    save_count("greedy")
    extract(model_dir=model, data=data, out=f"{out}/sample", decoding="sample", num_samples=3, **kw)

    def stop(k):
        if k == 2:
            raise RuntimeError("interrupted on purpose")

    extract(model_dir=model, data=data, out=f"{out}/cut", on_batch=stop, **kw)
""")


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def _files(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return (pd.read_parquet(out / "samples.parquet"), pd.read_parquet(out / "documents.parquet"),
            json.loads((out / "summary.json").read_text()))


def _scored(folder: Path, name: str) -> list[int]:
    """How many windows each rank's scoring passes read in the script's run `name`."""
    return [json.loads((folder / f"scored-{name}-{k}.json").read_text()) for k in (0, 1)]


def _assert_equal_runs(dist: Path, single: Path) -> None:
    """samples.parquet, documents.parquet and the summary (but world_size) of two run directories agree."""
    got, want = _files(dist), _files(single)
    pd.testing.assert_frame_equal(got[0], want[0], check_exact=True)
    pd.testing.assert_frame_equal(got[1], want[1], check_exact=True)
    assert got[2].pop("world_size") == 2 and want[2].pop("world_size") == 1
    assert got[2] == want[2]


def test_shares_of_what_is_left_partition_it():
    todo = [0, 2, 3, 7, 8, 9, 12]
    parts = [shard_todo(todo, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == todo and [len(p) for p in parts] == [3, 2, 2]


@pytest.fixture(scope="module")
def docs(memorized, tmp_path_factory):
    """30 trained and 10 held-out documents, each cut to its first 64 tokens: 120 windows, of which the trained
    documents' first ones are memorized (the model trained on each document's first row only)."""
    tok = load_model(memorized.model_dir).tokenizer
    d = pd.concat([read_documents(memorized.train_file, limit=30), read_documents(memorized.heldout_file, limit=10)])
    texts = [decode(tok, t[:64]) for t in tokenize(tok, d.text)]
    return write_documents(tmp_path_factory.mktemp("dist") / "docs.jsonl", texts, d.id.tolist())


def test_torchrun_two_processes_equal_one_and_resume(memorized, docs, tmp_path):
    model = memorized.model_dir
    script = tmp_path / "ranks.py"
    script.write_text(_SCRIPT)
    r = _torchrun(script, tmp_path, "runs", model, docs, json.dumps(KW))
    assert r.returncode != 0 and "interrupted on purpose" in r.stderr, r.stderr[-3000:]  # the third run: interrupted
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, so the same floats
    try:
        extract(model_dir=model, data=docs, out=tmp_path / "single", **KW)
        extract(model_dir=model, data=docs, out=tmp_path / "single-sample", decoding="sample", num_samples=3, **KW)
    finally:
        torch.set_num_threads(threads)
    single = pd.read_parquet(tmp_path / "single" / "samples.parquet")
    assert 0.15 < single.exact.mean() < 0.9 and len(single) == 120
    _assert_equal_runs(tmp_path / "greedy", tmp_path / "single")
    _assert_equal_runs(tmp_path / "sample", tmp_path / "single-sample")
    # both ranks probed: their shares of the windows, together every distinct window once
    n_distinct = len(single) - json.loads((tmp_path / "single" / "summary.json").read_text())["n_repeats"]
    scored = _scored(tmp_path, "greedy")
    assert sum(scored) == n_distinct and min(scored) >= 0.4 * n_distinct, scored
    # the interrupted run saved two gathered chunks of 30 windows; torchrun --resume finishes it
    cut = tmp_path / "cut"
    assert not (cut / "samples.parquet").exists()
    assert sum(len(pd.read_parquet(f)) for f in (cut / "partial").glob("*.parquet")) == 60
    args = [a for k, v in KW.items() for a in (f"--{k.replace('_', '-')}", v)]
    r = _torchrun(script, tmp_path, "cli", "extract", model, "--data", docs, *args, "--out", cut, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    scored = _scored(tmp_path, "cli")  # only the windows not saved before, shared evenly
    assert sum(scored) == n_distinct - 60 and min(scored) >= 0.4 * (n_distinct - 60), scored
    assert r.stdout.count("exact (verbatim suffix):") == 1 and str(cut) in r.stdout  # rank 0 reports, alone
    assert not (cut / "partial").exists()
    _assert_equal_runs(cut, tmp_path / "single")
