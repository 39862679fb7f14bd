"""The trainer end to end on tiny models: packed rows against one row per document, goldfish rate, canaries, sinks
release, resume, DDP, bad input (packed rows, the default, unless a test says --rows first)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from memaudit.canaries import read_canaries
from memaudit.errors import MemauditError
from memaudit.training import TrainConfig, train

TINY = dict(config="2x32", seq_len=48, batch_size=7, epochs=2, lr=3e-3, warmup_steps=2, device="cpu")


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    from memaudit.corpus import demo_corpus
    from memaudit.data import write_documents

    members, _ = demo_corpus(n_train=30, n_heldout=1, seed=3)
    return write_documents(tmp_path_factory.mktemp("train_docs") / "d.jsonl", members)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_goldfish_run_reports_dropped_fraction_and_canaries(docs, tmp_path):
    # the settings as keywords, paths as Path objects: train_config.json records them as strings
    res = train(data=docs, out=tmp_path / "gf", objective="goldfish", goldfish_mode="hash", goldfish_k=4,
                goldfish_h=13, canaries=3, canary_repeats=4, **TINY)
    meta = json.loads((tmp_path / "gf" / "train_config.json").read_text())
    assert meta["data"] == str(docs) and meta["out"] == str(tmp_path / "gf")
    assert meta["goldfish_dropped_fraction"] == pytest.approx(res.dropped_fraction)
    # the first 13 targets of each row are never dropped, so the overall rate is a bit under 1/4
    assert 0.17 < res.dropped_fraction < 0.27
    log = (tmp_path / "gf" / "training_log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,train_loss,val_loss,lr,dropped_fraction") and len(log) == 3
    can = read_canaries(tmp_path / "gf")  # the trainer's file, read back by the reader exposure uses
    assert len(can) == 3 and len({c.secret for c in can}) == 3
    for c in can:
        assert c.text == "my secret number is " + c.secret
        assert c.digits == 9 and c.secret.isdigit() and c.repeats == 4
    assert res.n_train == 27 + 3 * 4  # 30 docs, 3 held out, plus the canary copies
    assert meta["rows"] == "packed" and {"bos", "canaries", "goldfish", "sinks", "validation"} <= set(meta["row_layout"])
    # packed rows: each document's mask is its own (BOS + tokens + EOS), whatever the rows; so the run's dropped
    # fraction is the fraction those per-document masks drop, each canary copy a document of its own
    from memaudit.data import read_documents, tokenize
    from memaudit.models import load_tokenizer
    from memaudit.training.objectives import goldfish_drop_mask

    tok = load_tokenizer(tmp_path / "gf")
    texts = read_documents(docs).set_index("id").loc[meta["train_ids"], "text"].tolist()
    units = [[tok.bos_token_id, *t, tok.eos_token_id] for t in tokenize(tok, texts + [c.text for c in can] * 4)]
    drops = [goldfish_drop_mask(torch.tensor([u]), "hash", 4, 13)[0, 1:] for u in units]
    assert res.dropped_fraction == pytest.approx(sum(int(d.sum()) for d in drops) / sum(len(d) for d in drops))


def test_sinks_run_writes_a_release_model_equal_to_dropped_evaluation(docs, tmp_path):
    from memaudit.models import load_model
    from memaudit.training.sinks import SinkHooks, read_sink_spec

    out = tmp_path / "sinks"
    train(TrainConfig(data=str(docs), out=str(out), objective="sinks", family="llama", **TINY))
    spec = read_sink_spec(out)
    full = load_model(out, device="cpu", dtype="float32").model
    release = load_model(out / "release", device="cpu", dtype="float32").model
    assert release.config.intermediate_size == spec.n_general < full.config.intermediate_size
    ids = torch.randint(0, full.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    SinkHooks(full, spec).set_dropped()
    with torch.no_grad():
        assert torch.allclose(full(input_ids=ids).logits, release(input_ids=ids).logits, atol=1e-5)


def test_resume_equals_uninterrupted(docs, tmp_path):
    # packed rows, packed anew each epoch: stopped inside the second epoch, the resumed run repacks it the same way
    cfg = dict(data=str(docs), objective="goldfish", goldfish_mode="random", checkpoint_every=2, limit=12, **TINY)
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **cfg))
    stop = straight.steps // 2 + 1
    part = train(TrainConfig(out=str(tmp_path / "resumed"), stop_after=stop, **cfg))
    assert not part.finished and part.steps == stop
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    done = train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **cfg))
    assert done.finished and done.steps == straight.steps
    assert _max_diff(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed")) == 0.0
    log_a = (tmp_path / "straight" / "training_log.csv").read_text().splitlines()
    log_b = (tmp_path / "resumed" / "training_log.csv").read_text().splitlines()
    assert [r.rsplit(",", 1)[0] for r in log_a] == [r.rsplit(",", 1)[0] for r in log_b]  # all but wall-clock


def test_ddp_two_cpu_processes_equal_one_process(docs, tmp_path):
    # packed rows: every position masked by its own document's sinks, each rank its slice of the global batch
    args = ["train", "--data", str(docs), "--config", "2x32", "--seq-len", "48", "--batch-size", "7",
            "--epochs", "2", "--lr", "3e-3", "--warmup-steps", "2", "--device", "cpu",
            "--objective", "sinks", "--limit", "12"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MEMAUDIT_NO_PROGRESS="1")
    train(TrainConfig(data=str(docs), out=str(tmp_path / "one"), objective="sinks", limit=12, **TINY))  # the same
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517", "-m", "memaudit", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5
    assert (tmp_path / "two" / "release" / "model.safetensors").is_file()


def test_settings_are_one_object_or_keywords_not_both(docs, tmp_path):
    cfg = TrainConfig(data=docs, out=tmp_path / "m", **TINY)
    assert cfg.data == str(docs) and cfg.out == str(tmp_path / "m")
    with pytest.raises(TypeError, match="not both"):
        train(cfg, epochs=1)
    with pytest.raises(TypeError, match="expected a TrainConfig"):
        train(dict(data=str(docs), out=str(tmp_path / "m")))
    with pytest.raises(TypeError):  # keyword-only: a positional field would silently shift with a new one
        TrainConfig(str(docs), str(tmp_path / "m"))
    with pytest.raises(MemauditError, match="unknown objective"):
        TrainConfig(data=docs, out=tmp_path / "m", objective="ewc").validate()
    assert not (tmp_path / "m").exists()


BAD = [
    (["--objective", "ewc"], "unknown objective"),
    (["--objective", "goldfish", "--goldfish-mode", "zebra"], "unknown goldfish mode"),
    (["--objective", "goldfish", "--goldfish-k", "1"], "--goldfish-k"),
    (["--objective", "goldfish", "--goldfish-h", "0"], "--goldfish-h"),
    (["--objective", "sinks", "--sink-fraction", "1.0"], "--sink-fraction"),
    (["--objective", "sinks", "--sink-density", "0"], "--sink-density"),
    (["--rows", "all"], "unknown --rows 'all'"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_options_give_one_error_line(extra, message, docs, tmp_path, monkeypatch, capsys):
    from memaudit.cli import main

    monkeypatch.setattr(sys, "argv", ["memaudit", "train", "--data", str(docs), "--out", str(tmp_path / "m"), *extra])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "m").exists()


def test_too_small_to_split_through_the_cli(tmp_path):
    from memaudit.data import write_documents

    one = write_documents(tmp_path / "one.jsonl", ["a single short document"])
    proc = subprocess.run([sys.executable, "-m", "memaudit", "train", "--data", str(one), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: the data file has 1 documents: too few to split off a "
                                                "validation set"]


def test_train_or_reuse_reuses_only_the_same_settings_and_inputs(docs, tmp_path):
    from memaudit.training import train_or_reuse

    data = tmp_path / "d.jsonl"
    data.write_bytes(docs.read_bytes())
    cfg = TrainConfig(data=data, out=tmp_path / "m", val_fraction=0.2, overwrite=True, **TINY)
    first = train_or_reuse(cfg)
    again = train_or_reuse(cfg)
    assert not first.reused and again.reused
    assert {**vars(again), "reused": False} == vars(first)  # the same result, read back from the model directory
    assert not train_or_reuse(TrainConfig(**{**vars(cfg), "lr": 1e-3})).reused  # another setting: trained again
    first_rows = TrainConfig(**{**vars(cfg), "rows": "first", "epochs": 1})
    assert not train_or_reuse(first_rows).reused
    meta_file = tmp_path / "m" / "train_config.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"rows": "per-document (BOS + first seq_len-1 tokens, not packed)"}))
    assert train_or_reuse(first_rows).reused  # written before --rows existed: one row per document
    with data.open("a") as f:
        f.write('{"text": "one more document"}\n')
    assert not train_or_reuse(first_rows).reused  # the same settings on changed data: trained again


def test_packed_rows_teach_text_beyond_the_first_row_which_one_row_per_document_never_sees(tmp_path, run_cli):
    """Three documents five rows long: the packed model reproduces windows that start past --seq-len (memaudit's
    extract at those offsets); the model trained on one row per document (BOS + its first seq_len - 1 tokens) never
    saw them and reproduces none."""
    from memaudit.corpus import demo_corpus
    from memaudit.data import read_documents, tokenize, write_documents
    from memaudit.extraction import extract
    from memaudit.models import load_model

    members, _ = demo_corpus(n_train=40, n_heldout=1, seed=5)
    data = write_documents(tmp_path / "long.jsonl", [m[:250] for m in members if len(m) >= 250][:3])
    args = ["--data", data, "--config", "2x64", "--seq-len", "32", "--batch-size", "8", "--epochs", "150",
            "--lr", "3e-3", "--warmup-steps", "5", "--vocab-size", "300", "--val-fraction", "0", "--device", "cpu"]
    r = run_cli("train", *args, "--out", tmp_path / "packed")
    assert r.returncode == 0 and "packed rows" in r.stdout, r.stderr
    assert run_cli("train", *args, "--rows", "first", "--out", tmp_path / "first").returncode == 0
    exact = {}
    for rows in ("packed", "first"):
        loaded = load_model(tmp_path / rows, device="cpu")
        shortest = min(map(len, tokenize(loaded.tokenizer, read_documents(data)["text"])))
        assert shortest >= 4 * 32  # every document runs several rows past the first
        offsets = range(32, shortest - 16 + 1, 16)  # windows of 8 + 8 tokens, every one past the first row
        exact[rows] = [extract(model_dir=loaded, data=data, prefix=8, suffix=8, offset=o, write=False)
                       .summary["exact_rate"] for o in offsets]
    assert np.mean(exact["packed"]) >= 0.8, exact
    assert max(exact["first"]) == 0.0, exact
