"""Bad-input matrix: every command x classes of user mistakes, run in-process through `memaudit.cli.main()`.

Each bad case must: exit non-zero, print no traceback, print at most two non-empty stderr lines (Python warnings
count as the lines they would print), and leave the sentinels byte-identical: a tiny model directory (also the
input of most cases), a finished `extract` run directory, an unrelated folder of user files and the data files.
Good-input controls must exit 0, so the harness is shown to tell success from failure.

Cases that would start work before failing under a lax check are capped with tiny sizes (one epoch, four
documents, a few steps), so even then they end in seconds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

# --------------------------------------------------------------------------------------------- session fixtures

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud forest winter "
         "summer garden window engine paper signal vector matrix kernel buffer socket thread parser token model "
         "secret number memory audit canary value table column record index format string bytes").split()


def _texts(n: int, words: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run_main(argv: list[str]) -> int:
    from memaudit import cli

    old = sys.argv
    sys.argv = ["memaudit", *argv]
    try:
        cli.main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> SimpleNamespace:
    """Everything the cases point at: the sentinels, valid inputs, and a collection of broken ones."""
    import numpy as np
    import pandas as pd
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from memaudit.data import train_tokenizer

    root = tmp_path_factory.mktemp("badinputs")
    torch.manual_seed(0)

    # --- the tiny model (sentinel and input) -------------------------------------------------------------------
    tok = train_tokenizer(_texts(300, 12, seed=0), vocab_size=400)
    tok_dir = root / "tokenizer"
    tok.save_pretrained(tok_dir)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    model_dir = root / "sentinels" / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    data = root / "sentinels" / "data"
    data.mkdir(parents=True)
    members = _write_jsonl(data / "members.jsonl",
                           [{"id": f"m{i}", "text": t} for i, t in enumerate(_texts(30, 24, seed=1))])
    nonmembers = _write_jsonl(data / "nonmembers.jsonl",
                              [{"id": f"n{i}", "text": t} for i, t in enumerate(_texts(30, 24, seed=2))])
    canaries = _write_jsonl(data / "canaries.jsonl",
                            [{"id": "c0", "template": "my secret number is {secret}", "secret": "123", "repeats": 1}])

    # --- the unrelated user folder (sentinel) ------------------------------------------------------------------
    user = root / "sentinels" / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes, not memaudit's\n")
    (user / "table.csv").write_text("a,b\n1,2\n")
    (user / "sub" / "blob.bin").write_bytes(bytes(range(256)))

    # --- another command's finished run (sentinel) -------------------------------------------------------------
    run = root / "sentinels" / "run-extract"
    code = _run_main(["extract", str(model_dir), "--data", str(members), "--prefix", "8", "--suffix", "8",
                      "--limit", "4", "--device", "cpu", "--batch-size", "4", "--out", str(run)])
    if code != 0 or not (run / "config.json").is_file():  # fall back to a hand-made run directory
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"command": "extract", "settings": {"prefix": 8},
                                                     "inputs": {"model": str(model_dir)},
                                                     "versions": {"memaudit": "0"}}))
        (run / "summary.json").write_text(json.dumps({"n_samples": 4, "exact_rate": 0.0}))

    sentinels = {"model": model_dir, "run": run, "user": user, "data": data}
    pristine = root / "pristine"
    for name, path in sentinels.items():
        shutil.copytree(path, pristine / name)

    # --- broken data files -------------------------------------------------------------------------------------
    bad = root / "bad"
    bad.mkdir()
    adir = bad / "adir"
    adir.mkdir()
    (adir / "inside.jsonl").write_text('{"text": "x"}\n')
    (bad / "empty.jsonl").write_bytes(b"")
    (bad / "blank.jsonl").write_text("\n   \n\n")
    (bad / "docs.xml").write_text(members.read_text())
    (bad / "badjson.jsonl").write_text('{"text": "fine"}\n{not json at all\n')
    _write_jsonl(bad / "numtext.jsonl", [{"text": 5}, {"text": 6}])
    _write_jsonl(bad / "nofield.jsonl", [{"body": "hello"}, {"body": "world"}])
    _write_jsonl(bad / "notobject.jsonl", [[1, 2], [3]])
    pd.DataFrame({"text": pd.Series([None, None], dtype=object)}).to_parquet(bad / "nulltext.parquet")
    pd.DataFrame({"text": [1, 2, 3]}).to_parquet(bad / "inttext.parquet")
    (bad / "notext.csv").write_text("body,id\nhello,1\nworld,2\n")
    (bad / "corrupt.parquet").write_bytes(b"this is not a parquet file")
    (bad / "badutf8.txt").write_bytes(b"ok line\n\xff\xfe\xfa broken\n")
    _write_jsonl(bad / "long.jsonl", [{"text": t} for t in _texts(4, 300, seed=3)])  # longer than 128 positions
    # pre-tokenized corpora: a good .bin, and each way one goes wrong
    (np.arange(64) % len(tok)).astype(np.uint16).tofile(bad / "tokens.bin")
    (bad / "odd.bin").write_bytes(b"\x01\x00\x02")  # 3 bytes: not a whole number of uint16 tokens
    np.array([1, 2, 3, 4, 5, 60000, 6, 7], dtype=np.uint16).tofile(bad / "beyond.bin")  # row 1 of 4-token rows
    np.save(bad / "beyond.npy", np.array([[1, 2, 3], [4, len(tok) + 5, 6]]))
    _write_jsonl(bad / "idsbeyond.jsonl", [{"input_ids": [1, 2]}, {"input_ids": [len(tok)]}])
    _write_jsonl(bad / "idsnotlist.jsonl", [{"input_ids": [1, 2]}, {"input_ids": "3 4"}])
    pd.DataFrame({"input_ids": ["1 2", "3"]}).to_parquet(bad / "idsnotlist.parquet")

    # --- broken model directories ------------------------------------------------------------------------------
    def model_variant(name: str, *, config=True, weights=True, tokenizer=True) -> Path:
        d = bad / name
        d.mkdir()
        for f in model_dir.iterdir():
            is_cfg = f.name == "config.json"
            is_w = f.suffix == ".safetensors"
            is_tok = not (is_cfg or is_w) and f.name != "generation_config.json"
            if (is_cfg and config) or (is_w and weights) or (is_tok and tokenizer):
                shutil.copy2(f, d / f.name)
        return d

    m_cfg_list = model_variant("m_cfg_list")
    (m_cfg_list / "config.json").write_text("[1, 2]")
    m_cfg_notjson = model_variant("m_cfg_notjson")
    (m_cfg_notjson / "config.json").write_text("{ this is not json")
    m_no_config = model_variant("m_no_config", config=False)
    m_no_weights = model_variant("m_no_weights", weights=False)
    m_pickle = model_variant("m_pickle", weights=False)
    (m_pickle / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    m_no_tok = model_variant("m_no_tok", tokenizer=False)
    m_not_causal = model_variant("m_not_causal")
    c = json.loads((m_not_causal / "config.json").read_text())
    c["architectures"] = ["BertModel"]
    (m_not_causal / "config.json").write_text(json.dumps(c))
    m_corrupt = model_variant("m_corrupt")
    (m_corrupt / "model.safetensors").write_bytes(b"\x00\x01garbage, not safetensors")
    m_empty = bad / "m_empty"
    m_empty.mkdir()
    a_file = bad / "a_file.txt"
    a_file.write_text("just a file\n")
    tok_empty = bad / "tok_empty"
    tok_empty.mkdir()
    (tok_empty / "readme.txt").write_text("no tokenizer here\n")

    # --- broken canary files -----------------------------------------------------------------------------------
    tpl = "my secret number is {secret}"
    _write_jsonl(bad / "can_nofields.jsonl", [{"id": "x"}])
    _write_jsonl(bad / "can_letters.jsonl", [{"secret": "12a", "template": tpl, "repeats": 1}])
    _write_jsonl(bad / "can_noplace.jsonl", [{"secret": "123", "template": "no placeholder here", "repeats": 1}])
    _write_jsonl(bad / "can_notobject.jsonl", [["123", tpl]])
    _write_jsonl(bad / "can_ndigits.jsonl", [{"secret": "123", "n_digits": 5, "template": tpl, "repeats": 1}])
    _write_jsonl(bad / "can_repeats_neg.jsonl", [{"secret": "123", "template": tpl, "repeats": -2}])
    _write_jsonl(bad / "can_repeats0.jsonl", [{"secret": "123", "template": tpl, "repeats": 0}])
    _write_jsonl(bad / "can_empty_secret.jsonl", [{"secret": "", "template": tpl, "repeats": 1}])
    (bad / "can_badjson.jsonl").write_text('{"secret": "123", "template": "x {secret}"\n')

    # --- classes an adversarial probe found beyond the first matrix ------------------------------------------------
    m_no_layers = model_variant("m_no_layers")
    c = json.loads((m_no_layers / "config.json").read_text())
    (m_no_layers / "config.json").write_text(json.dumps(c | {"n_layer": 0}))
    m_nan_eps = model_variant("m_nan_eps")
    (m_nan_eps / "config.json").write_text(json.dumps(c | {"layer_norm_epsilon": float("nan")}))
    m_vocab_mismatch = model_variant("m_vocab_mismatch")  # config says more rows than the weights hold
    (m_vocab_mismatch / "config.json").write_text(json.dumps(c | {"vocab_size": c["vocab_size"] + 100}))
    m_tok_bigger = model_variant("m_tok_bigger", tokenizer=False)  # a tokenizer with ids beyond the embedding
    train_tokenizer(_texts(300, 12, seed=5) + _texts(300, 12, seed=6), vocab_size=1000).save_pretrained(m_tok_bigger)
    (bad / "deep.jsonl").write_text("[" * 100_000 + "\n")
    _write_jsonl(bad / "nullid.jsonl", [{"id": None, "text": "a b c d"}, {"id": "x", "text": "e f g h"}])
    _write_jsonl(bad / "can_20digits.jsonl", [{"secret": "1" * 20, "template": tpl, "repeats": 1}])
    dangling = bad / "dangling"
    dangling.symlink_to(bad / "nowhere")

    ns = SimpleNamespace(root=root, sentinels=sentinels, pristine=pristine, model=model_dir, run=run, user=user,
                         data=data, members=members, nonmembers=nonmembers, canaries=canaries, tok=tok_dir,
                         missing=root / "does-not-exist", missing_jsonl=root / "does-not-exist.jsonl",
                         adir=adir, a_file=a_file, tok_empty=tok_empty,
                         m_cfg_list=m_cfg_list, m_cfg_notjson=m_cfg_notjson, m_no_config=m_no_config,
                         m_no_weights=m_no_weights, m_pickle=m_pickle, m_no_tok=m_no_tok,
                         m_not_causal=m_not_causal, m_corrupt=m_corrupt, m_empty=m_empty,
                         m_no_layers=m_no_layers, m_nan_eps=m_nan_eps, m_vocab_mismatch=m_vocab_mismatch,
                         m_tok_bigger=m_tok_bigger, dangling=dangling)
    for f in bad.iterdir():
        if f.is_file():
            setattr(ns, f.name.replace(".", "_"), f)  # e.g. ns.empty_jsonl, ns.can_letters_jsonl
    return ns


# --------------------------------------------------------------------------------------------- sentinels

def _tree_hashes(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() or f.is_symlink():
            rel = str(f.relative_to(path))
            h = hashlib.sha256(rel.encode())
            try:
                h.update(f.read_bytes())
            except OSError as exc:
                h.update(f"<unreadable: {exc}>".encode())
            out[rel] = h.hexdigest()
        elif f.is_dir():
            out[str(f.relative_to(path)) + "/"] = "dir"
    return out


def _all_hashes(w) -> dict[str, dict[str, str]]:
    return {name: (_tree_hashes(p) if p.is_dir() else {"<missing or not a dir>": str(p.exists())})
            for name, p in w.sentinels.items()}


def _damage(before: dict, after: dict) -> list[str]:
    out = []
    for name in before:
        b, a = before[name], after[name]
        if b == a:
            continue
        added = sorted(set(a) - set(b))
        removed = sorted(set(b) - set(a))
        changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        out.append(f"{name}: added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}")
    return out


def _restore(w, names) -> None:
    for name in names:
        p = w.sentinels[name]
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            for sub in p.rglob("*"):
                try:
                    sub.chmod(0o755 if sub.is_dir() else 0o644)
                except OSError:
                    pass
            shutil.rmtree(p)
        shutil.copytree(w.pristine / name, p)


# --------------------------------------------------------------------------------------------- case builder

# Every command's base arguments: valid and small (capped), so a case changes one thing.
BASE = {
    "extract": ("extract", ["{model}"], {"--data": "{members}", "--prefix": "8", "--suffix": "8", "--limit": "4",
                                         "--device": "cpu", "--batch-size": "4", "--out": "{tmp}/out"}),
    "mia": ("mia", ["{model}"], {"--members": "{members}", "--nonmembers": "{nonmembers}", "--attacks": "loss",
                                 "--bootstrap": "0", "--limit": "6", "--device": "cpu", "--batch-size": "4",
                                 "--out": "{tmp}/out"}),
    "memorization": ("memorization", ["{model}"], {"--data": "{members}", "--reference": "zstd", "--limit": "4",
                                                   "--device": "cpu", "--batch-size": "4", "--out": "{tmp}/out"}),
    "capacity": ("capacity", [], {"--layers": "1", "--widths": "8", "--vocab": "16", "--seq-len": "8",
                                  "--sizes": "4", "--seeds": "1", "--max-steps": "4", "--batch-size": "2",
                                  "--warmup-steps": "1", "--eval-every": "2", "--plateau-window": "2",
                                  "--compile": "off", "--out": "{tmp}/out"}),
    "train": ("train", [], {"--data": "{members}", "--out": "{tmp}/out", "--epochs": "1", "--config": "1x32",
                            "--seq-len": "32", "--tokenizer": "{tok}", "--val-fraction": "0", "--device": "cpu",
                            "--batch-size": "8", "--warmup-steps": "1"}),
    "exposure": ("exposure", ["{model}"], {"--canaries": "{canaries}", "--controls": "0", "--exact-limit": "1000",
                                           "--sample-size": "10", "--device": "cpu", "--batch-size": "64",
                                           "--out": "{tmp}/out"}),
    "report": ("report", ["{run}"], {"--out": "{tmp}/out"}),
    "risk": ("risk", [], {"--params": "1e6", "--train-sequences": "1000", "--out": "{tmp}/out"}),
    "riskpost": ("risk", [], {"--model": "{model}", "--data": "{members}", "--prefix": "8", "--suffix": "8",
                              "--limit": "4", "--device": "cpu", "--batch-size": "4", "--out": "{tmp}/out"}),
    "demo": ("demo", [], {"--out": "{tmp}/out", "--epochs": "1", "--n-train": "4", "--n-heldout": "4",
                          "--objectives": "standard"}),
}


def P(case_id: str, base: str, *, pos=None, extra=(), expect=None, setup=None, ok=False, opts=None, **kw):
    """One case: `base`'s arguments with options changed (`name=value`; None drops one, True is a flag)."""
    over = dict(opts or {})
    for k, v in kw.items():
        over["--" + k.rstrip("_").replace("_", "-")] = v
    return pytest.param(dict(base=base, pos=pos, over=over, extra=list(extra), expect=expect, setup=setup, ok=ok),
                        id=case_id)


def _argv(spec: dict, ns: SimpleNamespace) -> list[str]:
    command, pos, opts = BASE[spec["base"]]
    merged = dict(opts)
    merged.update(spec["over"])
    args = [command] + list(spec["pos"] if spec["pos"] is not None else pos)
    for k, v in merged.items():
        if v is None:
            continue
        args += [k] if v is True else [k, str(v)]
    args += spec["extra"]
    fields = {k: str(v) for k, v in vars(ns).items()}
    return [a.format_map(fields) for a in args]


# Per-case set-ups (they receive the case namespace; `ns.tmp` is the case's own folder).

def _unreadable(ns):
    """A copy of the members file nobody may read (skipped where chmod 000 does not stop reads, e.g. root)."""
    p = ns.tmp / "unreadable.jsonl"
    shutil.copy2(ns.members, p)
    p.chmod(0)
    try:
        with open(p, "rb"):
            pass
    except PermissionError:
        ns.unreadable = p
        return
    pytest.skip("chmod 000 does not stop reads here (running as root)")


def _unreadable_model(ns):
    """A copy of the model whose config.json cannot be read (skipped as root)."""
    d = ns.tmp / "model-copy"
    shutil.copytree(ns.model, d)
    (d / "config.json").chmod(0)
    try:
        with open(d / "config.json", "rb"):
            pass
    except PermissionError:
        ns.unreadable_model = d
        return
    pytest.skip("chmod 000 does not stop reads here (running as root)")


def _broken_run(kind: str):
    def setup(ns):
        d = ns.tmp / "broken-run"
        shutil.copytree(ns.run, d)
        if kind == "config":
            (d / "config.json").write_text("{ not json")
        elif kind == "samples":
            (d / "samples.parquet").write_bytes(b"not a parquet file")
        elif kind == "summary":
            (d / "summary.json").write_text("{ not json")
        ns.broken_run = d
    return setup


NONFINITE = ("nan", "inf", "-inf")


def _cases() -> list:
    C = []
    add = C.append

    # ---- good-input controls: must exit 0 ---------------------------------------------------------------------
    add(P("ok-extract", "extract", ok=True))
    add(P("ok-extract-stride", "extract", stride="8", ok=True))
    add(P("ok-risk-pretraining", "risk", ok=True))
    add(P("ok-mia-loss", "mia", ok=True))
    add(P("ok-memorization-zstd", "memorization", ok=True))
    add(P("ok-report-run", "report", ok=True))
    add(P("ok-exposure-exact", "exposure", ok=True))
    add(P("ok-risk-posttraining", "riskpost", ok=True))
    add(P("ok-train-1-epoch", "train", ok=True))
    add(P("ok-capacity-4-steps", "capacity", ok=True))
    add(P("ok-demo-1-epoch", "demo", ok=True))

    # ---- non-finite numbers, for every float option -----------------------------------------------------------
    for v in NONFINITE:
        tag = v.replace("-", "neg")
        add(P(f"extract-temperature-{tag}", "extract", decoding="sample", num_samples="2", temperature=v))
        add(P(f"extract-top-p-{tag}", "extract", decoding="sample", num_samples="2", top_p=v))
        add(P(f"extract-np-threshold-{tag}", "extract", decoding="sample", num_samples="2", np_threshold=v))
        add(P(f"mia-calibration-fraction-{tag}", "mia", calibration_fraction=v))
        add(P(f"capacity-lr-{tag}", "capacity", lr=v))
        add(P(f"capacity-plateau-tol-{tag}", "capacity", plateau_tol=v))
        add(P(f"capacity-anneal-fraction-{tag}", "capacity", anneal_fraction=v))
        add(P(f"capacity-plateau-epochs-{tag}", "capacity", plateau_epochs=v))
        add(P(f"train-lr-{tag}", "train", lr=v))
        add(P(f"train-val-fraction-{tag}", "train", val_fraction=v))
        add(P(f"train-weight-decay-{tag}", "train", weight_decay=v))
        add(P(f"train-grad-clip-{tag}", "train", grad_clip=v))
        add(P(f"train-sink-fraction-{tag}", "train", objective="sinks", sink_fraction=v))
        add(P(f"train-sink-density-{tag}", "train", objective="sinks", sink_density=v))
        add(P(f"risk-params-{tag}", "risk", params=v))
        add(P(f"risk-train-sequences-{tag}", "risk", train_sequences=v))
        add(P(f"risk-train-tokens-{tag}", "risk", train_sequences=None, train_tokens=v))
        add(P(f"risk-bits-per-token-{tag}", "risk", bits_per_token=v))
        add(P(f"risk-fail-above-exact-rate-{tag}", "risk", fail_above=f"exact_rate={v}"))
        add(P(f"riskpost-params-{tag}", "riskpost", params=v))

    # ---- zero / negative counts, sizes, steps, limits, seeds --------------------------------------------------
    for cmd, opt, values in [
        ("extract", "prefix", ("0", "-1")), ("extract", "suffix", ("0", "-1")), ("extract", "offset", ("-1",)),
        ("extract", "num_samples", ("0",)), ("extract", "top_k", ("-1",)), ("extract", "limit", ("0", "-1")),
        ("extract", "seed", ("-1", "4294967296")), ("extract", "batch_size", ("0", "-1", "x", "1.5")),
        ("extract", "stride", ("0", "-1", "x")), ("extract", "windows_per_doc", ("0", "-1")),
        ("mia", "window", ("0", "1", "-1")), ("mia", "recall_shots", ("-1",)), ("mia", "bootstrap", ("-1",)),
        ("mia", "seed", ("-1",)), ("mia", "limit", ("0", "-1")), ("mia", "batch_size", ("0", "x")),
        ("memorization", "zstd_level", ("0", "23", "-1")), ("memorization", "top_k", ("-1",)),
        ("memorization", "limit", ("0", "-1")), ("memorization", "batch_size", ("0", "x")),
        ("capacity", "layers", ("0", "-1", "x")), ("capacity", "widths", ("0", "-8", "8,,x", "")),
        ("capacity", "vocab", ("1", "0", "-1")), ("capacity", "seq_len", ("1", "0")),
        ("capacity", "seeds", ("0", "-1")), ("capacity", "max_steps", ("0", "-1")),
        ("capacity", "batch_size", ("0", "-1")), ("capacity", "warmup_steps", ("-1",)),
        ("capacity", "eval_every", ("0", "-1")), ("capacity", "plateau_window", ("0", "-1")),
        ("capacity", "threads", ("0", "-1")),
        ("capacity", "sizes", ("infx", "nanx", "-1x", "abc", "", "0", "0.00001x")),
        ("train", "epochs", ("0", "-1")), ("train", "batch_size", ("0", "-1")),
        ("train", "seq_len", ("1", "0", "-1")), ("train", "seed", ("-1",)), ("train", "limit", ("0", "-1")),
        ("train", "warmup_steps", ("-1",)), ("train", "canaries", ("-1",)), ("train", "checkpoint_every", ("-1",)),
        ("train", "stop_after", ("0", "-1")),
        ("exposure", "controls", ("-1",)), ("exposure", "exact_limit", ("0", "-1")),
        ("exposure", "sample_size", ("0", "-1")), ("exposure", "seed", ("-1",)), ("exposure", "batch_size", ("0", "x")),
        ("demo", "epochs", ("0", "-1")), ("demo", "n_train", ("0", "1", "-1")), ("demo", "n_heldout", ("-1", "0", "1")),
        ("demo", "seed", ("-1",)),
        ("risk", "window", ("0", "-1")), ("risk", "random_vocab", ("1", "0")), ("risk", "params", ("0", "-5")),
        ("risk", "train_sequences", ("0", "-1")),
        ("riskpost", "prefix", ("0",)), ("riskpost", "suffix", ("-1",)), ("riskpost", "limit", ("0",)),
        ("riskpost", "batch_size", ("0", "x")), ("riskpost", "window", ("0",)),
        ("report", "top", ("-1",)),
    ]:
        for v in values:
            tag = {"": "empty"}.get(v, v.replace("-", "neg").replace(",", "_"))
            add(P(f"{cmd}-{opt.replace('_', '-')}-{tag}", cmd, **{opt: v}))
    add(P("extract-num-beams-0", "extract", decoding="beam", num_beams="0"))
    add(P("mia-window-longer-than-context", "mia", window="100000"))
    add(P("train-vocab-size-neg1", "train", tokenizer=None, vocab_size="-1"))
    add(P("train-vocab-size-0", "train", tokenizer=None, vocab_size="0"))
    add(P("train-vocab-size-100", "train", tokenizer=None, vocab_size="100"))
    add(P("train-goldfish-k-1", "train", objective="goldfish", goldfish_k="1"))
    add(P("train-goldfish-k-0", "train", objective="goldfish", goldfish_k="0"))
    add(P("train-goldfish-h-0", "train", objective="goldfish", goldfish_h="0"))
    add(P("train-canary-repeats-0", "train", canaries="1", canary_repeats="0"))
    add(P("train-limit-1-val-split", "train", limit="1", val_fraction="0.5"))
    add(P("train-seq-len-exceeds-config-context", "train", config="{model}", tokenizer=None, seq_len="512",
          data="{long_jsonl}"))
    add(P("extract-window-exceeds-context", "extract", prefix="100", suffix="100"))
    add(P("extract-offset-past-every-document", "extract", offset="1000"))
    add(P("extract-stride-with-tail", "extract", stride="4", tail=True, expect="--stride and --tail exclude"))
    add(P("extract-stride-with-windows-per-doc", "extract", stride="4", windows_per_doc="2"))
    add(P("extract-windows-per-doc-with-tail", "extract", windows_per_doc="2", tail=True))
    add(P("extract-offset-with-tail", "extract", offset="2", tail=True))
    add(P("extract-stride-past-every-document", "extract", stride="4", prefix="100", suffix="20"))
    add(P("mia-limit-1", "mia", limit="1"))
    add(P("mia-recall-shots-too-many", "mia", attacks="loss,recall", recall_shots="100"))
    for v in ("0", "-1", "x"):
        add(P(f"mia-stride-{v.replace('-', 'neg')}", "mia", window="8", stride=v))
    add(P("mia-stride-without-window", "mia", stride="4", expect="--stride needs --window"))
    add(P("mia-collection-fewer-than-ten-documents", "mia", collection=True, expect="--collection needs at least 10"))
    add(P("mia-collection-dc-pdd-alone", "mia", collection=True, attacks="dc_pdd", expect="add --dcpdd-corpus"))
    add(P("mia-collection-recall-shots-not-counted", "mia", collection=True, limit="12", attacks="loss,recall",
          expect="validation: 7 once recall's 5 shot documents are left out"))
    add(P("memorization-zstd-dict-from-with-model-reference", "memorization", reference="{model}",
          zstd_dict_from="{members}"))
    add(P("memorization-stride-without-window", "memorization", stride="4", expect="--stride needs --window"))
    add(P("memorization-windows-per-doc-without-window", "memorization", windows_per_doc="2",
          expect="--windows-per-doc needs --window"))
    for v in ("0", "1", "-1", "x"):
        add(P(f"memorization-window-{v.replace('-', 'neg')}", "memorization", window=v))
    for v in ("0", "-1"):
        add(P(f"memorization-stride-{v.replace('-', 'neg')}", "memorization", window="8", stride=v,
              expect="--stride must be >= 1"))
        add(P(f"memorization-windows-per-doc-{v.replace('-', 'neg')}", "memorization", window="8",
              windows_per_doc=v, expect="--windows-per-doc must be >= 1"))
    add(P("memorization-windows-per-doc-with-stride", "memorization", window="8", stride="4", windows_per_doc="2",
          expect="--stride and --windows-per-doc exclude each other"))
    add(P("memorization-windows-per-doc-seed-neg1", "memorization", window="8", windows_per_doc="2", seed="-1"))
    add(P("memorization-window-longer-than-context", "memorization", window="100000",
          expect="longer than the model's context"))
    add(P("memorization-window-longer-than-every-document", "memorization", window="120",
          expect="shorter than --window 120"))
    add(P("ok-memorization-stride", "memorization", ok=True, window="8", stride="4"))
    add(P("capacity-widths-8__16", "capacity", widths="8,,16"))
    add(P("capacity-layers-1__2", "capacity", layers="1,,2"))
    add(P("capacity-text-too-short", "capacity", text="{members}"))
    add(P("demo-objectives-standard-nope", "demo", objectives="standard,nope"))
    for v in ("0x32", "1x0", "1xabc", "-1x32"):
        add(P(f"train-config-{v.replace('-', 'neg')}", "train", config=v))
    add(P("train-canaries-too-many", "train", canaries="1000000000"))
    add(P("extract-prefix-huge", "extract", prefix="99999999999999999999"))
    add(P("risk-params-1e400", "risk", params="1e400"))
    add(P("risk-params-1e-300", "risk", params="1e-300"))
    add(P("risk-train-sequences-1e308", "risk", train_sequences="1e308"))
    add(P("extract-device-cuda99", "extract", device="cuda:99"))
    add(P("mia-device-cuda99", "mia", device="cuda:99"))

    # ---- out-of-range fractions, probabilities, rates ---------------------------------------------------------
    for v in ("0", "-1"):
        add(P(f"extract-temperature-{v.replace('-', 'neg')}", "extract", decoding="sample", num_samples="2",
              temperature=v))
    for v in ("0", "1.5", "-0.1"):
        add(P(f"extract-top-p-{v.replace('-', 'neg')}", "extract", decoding="sample", num_samples="2", top_p=v))
    for v in ("-0.1", "1.5"):
        add(P(f"extract-np-threshold-{v.replace('-', 'neg')}", "extract", decoding="sample", num_samples="2",
              np_threshold=v))
    for v in ("0", "1", "1.5", "-0.5"):
        add(P(f"mia-calibration-fraction-{v.replace('-', 'neg')}", "mia", calibration_fraction=v))
    for v in ("1", "1.5", "-0.1"):
        add(P(f"train-val-fraction-{v.replace('-', 'neg')}", "train", val_fraction=v))
    for v in ("1.5", "0", "1"):
        add(P(f"train-sink-fraction-{v}", "train", objective="sinks", sink_fraction=v))
    for v in ("0", "1", "2"):
        add(P(f"train-sink-density-{v}", "train", objective="sinks", sink_density=v))
    for v in ("0", "-1"):
        add(P(f"train-lr-{v.replace('-', 'neg')}", "train", lr=v))
        add(P(f"capacity-lr-{v.replace('-', 'neg')}", "capacity", lr=v))
        add(P(f"capacity-plateau-epochs-{v.replace('-', 'neg')}", "capacity", plateau_epochs=v))
    add(P("train-weight-decay-neg1", "train", weight_decay="-1"))
    add(P("train-grad-clip-neg1", "train", grad_clip="-1"))
    add(P("capacity-plateau-tol-neg1", "capacity", plateau_tol="-1"))
    add(P("capacity-anneal-fraction-neg0.5", "capacity", anneal_fraction="-0.5"))
    add(P("risk-bits-per-token-0", "risk", bits_per_token="0"))
    add(P("risk-train-tokens-0", "risk", train_sequences=None, train_tokens="0"))

    # ---- malformed lists and unknown choices ------------------------------------------------------------------
    for v, tag in (("0", "0"), ("150", "150"), ("x", "x"), ("10,,20", "10__20"), ("nan", "nan"), ("-5", "neg5"),
                   ("", "empty")):
        add(P(f"mia-k-{tag}", "mia", attacks="loss,min_k", k=v))
    add(P("mia-attacks-nope", "mia", attacks="nope"))
    add(P("mia-attacks-empty", "mia", attacks=""))
    add(P("mia-attacks-loss-nope", "mia", attacks="loss,,nope"))
    add(P("mia-attacks-reference-without-reference", "mia", attacks="reference"))
    add(P("extract-decoding-nope", "extract", decoding="nope"))
    add(P("exposure-estimator-nope", "exposure", estimator="nope"))
    add(P("train-objective-nope", "train", objective="nope"))
    add(P("train-family-nope", "train", family="nope"))
    add(P("train-config-nope", "train", config="nope"))
    add(P("train-goldfish-mode-nope", "train", objective="goldfish", goldfish_mode="nope"))
    add(P("train-rows-nope", "train", rows="nope"))
    add(P("capacity-compile-maybe", "capacity", compile_="maybe"))
    add(P("capacity-dtype-nonsense", "capacity", dtype="nonsense"))
    add(P("risk-precision-nope", "risk", precision="nope"))
    add(P("demo-objectives-nope", "demo", objectives="nope"))
    add(P("demo-objectives-empty", "demo", objectives=","))
    add(P("memorization-dtype-float16", "memorization", dtype="float16"))
    for cmd in ("extract", "mia", "memorization", "exposure", "riskpost", "train"):
        add(P(f"{cmd}-device-nonsense", cmd, device="nonsense"))
        add(P(f"{cmd}-dtype-nonsense", cmd, dtype="nonsense"))

    # ---- risk: spec mistakes ----------------------------------------------------------------------------------
    add(P("risk-fail-above-x-nan", "risk", fail_above="x=nan"))
    add(P("risk-fail-above-unknown-name", "risk", fail_above="unknown_name=1"))
    add(P("risk-fail-above-no-value", "risk", fail_above="exact_rate"))
    add(P("risk-fail-above-not-a-number", "risk", fail_above="exact_rate=abc"))
    add(P("risk-fail-above-empty-value", "risk", fail_above="exact_rate="))
    add(P("risk-sequences-and-tokens", "risk", train_tokens="64000"))
    add(P("risk-params-only", "risk", train_sequences=None))
    add(P("risk-nothing", "risk", params=None, train_sequences=None))
    add(P("risk-random-vocab-and-bits", "risk", random_vocab="512", bits_per_token="4"))
    add(P("risk-nonmembers-without-model", "risk", nonmembers="{nonmembers}"))
    add(P("risk-model-without-data", "riskpost", data=None))
    add(P("risk-data-without-model", "riskpost", model=None))
    add(P("riskpost-fail-above-unknown", "riskpost", fail_above="bogus=1"))

    # ---- data files: missing, directory, unreadable, empty, wrong formats --------------------------------------
    data_bad = [("missing", "{missing_jsonl}"), ("dir", "{adir}"), ("empty", "{empty_jsonl}"),
                ("blank", "{blank_jsonl}"), ("unknown-ext", "{docs_xml}"), ("invalid-json", "{badjson_jsonl}"),
                ("text-is-number", "{numtext_jsonl}"), ("no-text-field", "{nofield_jsonl}"),
                ("line-not-object", "{notobject_jsonl}"), ("parquet-text-null", "{nulltext_parquet}"),
                ("parquet-text-int", "{inttext_parquet}"), ("csv-no-text-column", "{notext_csv}"),
                ("corrupt-parquet", "{corrupt_parquet}"), ("txt-bad-utf8", "{badutf8_txt}")]
    for tag, path in data_bad:
        add(P(f"extract-data-{tag}", "extract", data=path))
    add(P("extract-data-unreadable", "extract", data="{unreadable}", setup=_unreadable))
    add(P("extract-text-field-absent", "extract", text_field="nope"))
    for tag, path in data_bad[:4] + [data_bad[5], data_bad[10]]:
        add(P(f"mia-members-{tag}", "mia", members=path))
    for tag, path in (data_bad[0], data_bad[6], data_bad[11]):
        add(P(f"mia-nonmembers-{tag}", "mia", nonmembers=path))
    add(P("mia-members-unreadable", "mia", members="{unreadable}", setup=_unreadable))
    add(P("mia-dcpdd-corpus-missing", "mia", attacks="loss,dc_pdd", dcpdd_corpus="{missing_jsonl}"))
    add(P("mia-dcpdd-corpus-dir", "mia", attacks="loss,dc_pdd", dcpdd_corpus="{adir}"))
    for tag, path in (data_bad[0], data_bad[1], data_bad[9], data_bad[11], data_bad[2]):
        add(P(f"memorization-data-{tag}", "memorization", data=path))
    add(P("ok-memorization-bin", "memorization", ok=True, data="{tokens_bin}", seq_len="8"))
    add(P("memorization-bin-size-not-token-multiple", "memorization", data="{odd_bin}", seq_len="8",
          expect="3 bytes is not a whole number of 2-byte uint16 tokens"))
    add(P("memorization-bin-without-seq-len", "memorization", data="{tokens_bin}", expect="needs --seq-len"))
    add(P("memorization-bin-seq-len-0", "memorization", data="{tokens_bin}", seq_len="0"))
    add(P("memorization-bin-token-dtype-int8", "memorization", data="{tokens_bin}", seq_len="8", token_dtype="int8"))
    add(P("memorization-seq-len-without-bin", "memorization", seq_len="8", expect="--seq-len cuts a .bin"))
    add(P("memorization-input-ids-not-list-jsonl", "memorization", data="{idsnotlist_jsonl}",
          expect="line 2: 'input_ids' is not a list of integers"))
    add(P("memorization-input-ids-not-list-parquet", "memorization", data="{idsnotlist_parquet}",
          expect="row 0: column 'input_ids' is not a list of integers"))
    for tag, path, where, extra in (("npy", "{beyond_npy}", "row 1", {}), ("jsonl", "{idsbeyond_jsonl}", "line 2", {}),
                                    ("bin", "{beyond_bin}", "row 1", {"seq_len": "4"})):
        add(P(f"memorization-ids-beyond-vocab-{tag}", "memorization", data=path, expect=f"{where}: token id", **extra))
    # extract reads the same pre-tokenized corpora with the same options (rows of 32 hold a 8 + 8 window)
    add(P("ok-extract-bin", "extract", ok=True, data="{tokens_bin}", seq_len="32"))
    add(P("extract-bin-size-not-token-multiple", "extract", data="{odd_bin}", seq_len="8",
          expect="3 bytes is not a whole number of 2-byte uint16 tokens"))
    add(P("extract-bin-without-seq-len", "extract", data="{tokens_bin}", expect="needs --seq-len"))
    add(P("extract-bin-seq-len-0", "extract", data="{tokens_bin}", seq_len="0"))
    add(P("extract-bin-token-dtype-int8", "extract", data="{tokens_bin}", seq_len="32", token_dtype="int8"))
    add(P("extract-seq-len-without-bin", "extract", seq_len="8", expect="--seq-len cuts a .bin"))
    add(P("extract-input-ids-not-list-jsonl", "extract", data="{idsnotlist_jsonl}",
          expect="line 2: 'input_ids' is not a list of integers"))
    add(P("extract-input-ids-not-list-parquet", "extract", data="{idsnotlist_parquet}",
          expect="row 0: column 'input_ids' is not a list of integers"))
    for tag, path, where, extra in (("npy", "{beyond_npy}", "row 1", {}), ("jsonl", "{idsbeyond_jsonl}", "line 2", {}),
                                    ("bin", "{beyond_bin}", "row 1", {"seq_len": "4"})):
        add(P(f"extract-ids-beyond-vocab-{tag}", "extract", data=path, expect=f"{where}: token id", **extra))
    # mia and train read them too (train cuts a .bin into rows of --seq-len - 1 stored tokens, BOS making seq_len)
    add(P("ok-mia-bin-members", "mia", ok=True, members="{tokens_bin}", seq_len="8"))
    add(P("mia-members-bin-size-not-token-multiple", "mia", members="{odd_bin}", seq_len="8",
          expect="3 bytes is not a whole number of 2-byte uint16 tokens"))
    add(P("mia-members-bin-without-seq-len", "mia", members="{tokens_bin}", expect="needs --seq-len"))
    add(P("mia-dcpdd-corpus-bin-without-seq-len", "mia", attacks="loss,dc_pdd", dcpdd_corpus="{tokens_bin}",
          expect="needs --seq-len"))
    add(P("mia-seq-len-without-bin", "mia", seq_len="8", expect="--seq-len cuts a .bin"))
    add(P("mia-bin-token-dtype-int8", "mia", members="{tokens_bin}", seq_len="8", token_dtype="int8"))
    add(P("mia-members-input-ids-not-list-jsonl", "mia", members="{idsnotlist_jsonl}",
          expect="line 2: 'input_ids' is not a list of integers"))
    add(P("mia-nonmembers-input-ids-not-list-parquet", "mia", nonmembers="{idsnotlist_parquet}",
          expect="row 0: column 'input_ids' is not a list of integers"))
    for tag, path, where, extra in (("npy", "{beyond_npy}", "row 1", {}), ("jsonl", "{idsbeyond_jsonl}", "line 2", {}),
                                    ("bin", "{beyond_bin}", "row 1", {"seq_len": "4"})):
        add(P(f"mia-members-ids-beyond-vocab-{tag}", "mia", members=path, expect=f"{where}: token id", **extra))
        add(P(f"train-ids-beyond-vocab-{tag}", "train", data=path, expect=f"{where}: token id",
              **({"seq_len": "5"} if extra else {})))
    add(P("ok-train-bin", "train", ok=True, data="{tokens_bin}", seq_len="9"))
    add(P("train-bin-without-tokenizer", "train", data="{tokens_bin}", tokenizer=None,
          expect="needs the tokenizer that made them"))
    add(P("train-input-ids-without-tokenizer", "train", data="{idsbeyond_jsonl}", tokenizer=None,
          expect="needs the tokenizer that made them"))
    add(P("train-bin-size-not-token-multiple", "train", data="{odd_bin}",
          expect="3 bytes is not a whole number of 2-byte uint16 tokens"))
    add(P("train-bin-token-dtype-int8", "train", data="{tokens_bin}", token_dtype="int8"))
    add(P("train-input-ids-not-list-jsonl", "train", data="{idsnotlist_jsonl}",
          expect="line 2: 'input_ids' is not a list of integers"))
    add(P("train-input-ids-not-list-parquet", "train", data="{idsnotlist_parquet}",
          expect="row 0: column 'input_ids' is not a list of integers"))
    # mia --windows-per-doc: the same option, and checks, as extract's
    for v in ("0", "-1", "x"):
        add(P(f"mia-windows-per-doc-{v.replace('-', 'neg')}", "mia", window="8", windows_per_doc=v))
    add(P("mia-windows-per-doc-without-window", "mia", windows_per_doc="2", expect="--windows-per-doc needs --window"))
    add(P("mia-windows-per-doc-with-stride", "mia", window="8", stride="4", windows_per_doc="2",
          expect="--stride and --windows-per-doc exclude each other"))
    add(P("memorization-zstd-dict-from-missing", "memorization", zstd_dict_from="{missing}"))
    add(P("memorization-zstd-dict-from-dir", "memorization", zstd_dict_from="{adir}"))
    for tag, path in (data_bad[0], data_bad[1], data_bad[2], data_bad[5], data_bad[4], data_bad[10]):
        add(P(f"train-data-{tag}", "train", data=path))
    add(P("train-data-unreadable", "train", data="{unreadable}", setup=_unreadable))
    add(P("train-val-data-missing", "train", val_data="{missing_jsonl}"))
    add(P("train-val-data-dir", "train", val_data="{adir}"))
    for tag, path in (data_bad[0], data_bad[2]):
        add(P(f"riskpost-data-{tag}", "riskpost", data=path))
    add(P("riskpost-nonmembers-missing", "riskpost", nonmembers="{missing_jsonl}"))
    add(P("riskpost-nonmembers-invalid-json", "riskpost", nonmembers="{badjson_jsonl}"))
    for tag, path in (data_bad[0], data_bad[1], data_bad[2], data_bad[5]):
        add(P(f"capacity-text-{tag}", "capacity", text=path))

    # ---- model directories: missing, a file, broken ------------------------------------------------------------
    model_bad = [("missing", "{missing}"), ("a-file", "{a_file}"), ("empty-dir", "{m_empty}"),
                 ("no-config", "{m_no_config}"), ("config-list", "{m_cfg_list}"), ("config-not-json", "{m_cfg_notjson}"),
                 ("no-weights", "{m_no_weights}"), ("pickle-only", "{m_pickle}"), ("no-tokenizer", "{m_no_tok}"),
                 ("not-causal", "{m_not_causal}"), ("corrupt-weights", "{m_corrupt}"), ("run-dir", "{run}"),
                 ("user-folder", "{user}")]
    tok_msg = "has no tokenizer files"
    for tag, path in model_bad:
        add(P(f"extract-model-{tag}", "extract", pos=[path], expect=tok_msg if tag == "no-tokenizer" else None))
    add(P("extract-model-config-unreadable", "extract", pos=["{unreadable_model}"], setup=_unreadable_model))
    for tag, path in (model_bad[0], model_bad[4], model_bad[7], model_bad[8], model_bad[10], model_bad[11]):
        add(P(f"mia-model-{tag}", "mia", pos=[path], expect=tok_msg if tag == "no-tokenizer" else None))
    for tag, path in (model_bad[0], model_bad[1], model_bad[5], model_bad[8]):
        add(P(f"mia-reference-{tag}", "mia", attacks="loss,reference", reference=path,
              expect=tok_msg if tag == "no-tokenizer" else None))
    for tag, path in (model_bad[0], model_bad[6], model_bad[8]):
        add(P(f"memorization-model-{tag}", "memorization", pos=[path], expect=tok_msg if tag == "no-tokenizer" else None))
    for tag, path in (model_bad[0], model_bad[11], model_bad[12], model_bad[4]):
        add(P(f"memorization-reference-{tag}", "memorization", reference=path))
    for tag, path in (model_bad[0], model_bad[4], model_bad[7], model_bad[8]):
        add(P(f"exposure-model-{tag}", "exposure", pos=[path], expect=tok_msg if tag == "no-tokenizer" else None))
    add(P("exposure-model-without-canaries-file", "exposure", canaries=None))
    for tag, path in (model_bad[0], model_bad[5], model_bad[8]):
        add(P(f"riskpost-model-{tag}", "riskpost", model=path, expect=tok_msg if tag == "no-tokenizer" else None))
    add(P("train-config-model-config-list", "train", config="{m_cfg_list}"))
    add(P("train-config-missing-dir", "train", config="{missing}/"))
    add(P("train-config-model-pickle-only", "train", config="{m_pickle}"))
    add(P("train-tokenizer-missing", "train", tokenizer="{missing}"))
    add(P("train-tokenizer-a-file", "train", tokenizer="{a_file}"))
    add(P("train-tokenizer-no-files", "train", tokenizer="{tok_empty}"))
    add(P("train-resume-without-checkpoint", "train", resume=True))
    add(P("train-resume-and-overwrite", "train", resume=True, overwrite=True))

    # ---- canary files -----------------------------------------------------------------------------------------
    canary_bad = [("missing", "{missing_jsonl}"), ("dir", "{adir}"), ("empty", "{empty_jsonl}"),
                  ("invalid-json", "{can_badjson_jsonl}"), ("not-object", "{can_notobject_jsonl}"),
                  ("missing-fields", "{can_nofields_jsonl}"), ("secret-not-digits", "{can_letters_jsonl}"),
                  ("template-without-placeholder", "{can_noplace_jsonl}"), ("n-digits-mismatch", "{can_ndigits_jsonl}"),
                  ("repeats-negative", "{can_repeats_neg_jsonl}"), ("all-repeats-0", "{can_repeats0_jsonl}"),
                  ("secret-empty", "{can_empty_secret_jsonl}")]
    for tag, path in canary_bad:
        add(P(f"exposure-canaries-{tag}", "exposure", canaries=path))
    add(P("exposure-canaries-unreadable", "exposure", canaries="{unreadable}", setup=_unreadable))
    for tag, path in (canary_bad[0], canary_bad[5], canary_bad[6], canary_bad[7]):
        add(P(f"riskpost-canaries-{tag}", "riskpost", canaries=path))

    # ---- report -----------------------------------------------------------------------------------------------
    add(P("report-not-a-run-dir", "report", pos=["{user}"]))
    add(P("report-missing", "report", pos=["{missing}"]))
    add(P("report-a-file", "report", pos=["{members}"]))
    add(P("report-empty-dir", "report", pos=["{m_empty}"]))
    add(P("report-model-without-training-log", "report", pos=["{model}"]))
    add(P("report-label-count-2-for-1", "report", extra=["--label", "a", "--label", "b"]))
    add(P("report-label-count-1-for-2", "report", pos=["{run}", "{run}"], extra=["--label", "a"]))
    add(P("report-run-config-not-json", "report", pos=["{broken_run}"], setup=_broken_run("config")))
    add(P("report-run-samples-corrupt", "report", pos=["{broken_run}"], setup=_broken_run("samples")))
    add(P("report-run-summary-not-json", "report", pos=["{broken_run}"], setup=_broken_run("summary")))

    # ---- --out: an existing file, and data-loss targets (the sentinels themselves) ------------------------------
    for cmd in ("extract", "mia", "memorization", "exposure", "capacity", "train", "report", "risk", "demo"):
        add(P(f"{cmd}-out-existing-file", cmd, out="{tmp}/existing.txt"))
    for cmd in ("extract", "mia", "memorization", "exposure", "riskpost"):
        add(P(f"{cmd}-out-model-overwrite", cmd, out="{model}", overwrite=True))
    add(P("extract-out-inside-model", "extract", out="{model}/audit"))
    add(P("extract-out-data-file", "extract", out="{members}", overwrite=True))
    add(P("extract-out-user-folder", "extract", out="{user}"))
    add(P("extract-out-existing-run-no-flag", "extract", out="{run}"))
    add(P("extract-resume-other-settings", "extract", out="{run}", resume=True, prefix="9"))
    add(P("extract-out-empty-string-is-cwd", "extract", out=""))
    add(P("extract-out-user-folder-overwrite", "extract", out="{user}", overwrite=True))
    add(P("mia-out-other-run-overwrite", "mia", out="{run}", overwrite=True))
    add(P("memorization-out-other-run-overwrite", "memorization", out="{run}", overwrite=True))
    add(P("exposure-out-other-run-overwrite", "exposure", out="{run}", overwrite=True))
    add(P("risk-out-other-run-overwrite", "risk", out="{run}", overwrite=True))
    add(P("risk-out-user-folder-overwrite", "risk", out="{user}", overwrite=True))
    add(P("capacity-out-other-run-overwrite", "capacity", out="{run}", overwrite=True))
    add(P("capacity-out-user-folder-overwrite", "capacity", out="{user}", overwrite=True))
    add(P("train-out-existing-model", "train", out="{model}"))
    add(P("train-out-existing-model-overwrite", "train", out="{model}", overwrite=True))
    add(P("train-out-existing-model-resume", "train", out="{model}", resume=True))
    add(P("train-out-other-run-overwrite", "train", out="{run}", overwrite=True))
    add(P("train-out-user-folder", "train", out="{user}"))
    add(P("report-out-user-folder", "report", out="{user}"))
    add(P("report-out-other-run", "report", out="{run}"))
    add(P("report-out-model", "report", out="{model}"))
    add(P("demo-out-user-folder", "demo", out="{user}"))
    add(P("demo-out-other-run", "demo", out="{run}"))
    add(P("demo-out-model", "demo", out="{model}"))

    # ---- typer/click usage errors -----------------------------------------------------------------------------
    add(P("extract-prefix-abc", "extract", prefix="abc"))
    add(P("extract-limit-1.5", "extract", limit="1.5"))
    add(P("extract-unknown-option", "extract", extra=["--nope", "1"]))
    add(P("extract-missing-model-arg", "extract", pos=[]))
    add(P("extract-missing-data", "extract", data=None))
    add(P("mia-window-abc", "mia", window="abc"))
    add(P("mia-missing-members", "mia", members=None))
    add(P("memorization-zstd-level-x", "memorization", zstd_level="x"))
    add(P("memorization-missing-reference", "memorization", reference=None))
    add(P("capacity-vocab-x", "capacity", vocab="x"))
    add(P("capacity-lr-abc", "capacity", lr="abc"))
    add(P("train-epochs-1.5", "train", epochs="1.5"))
    add(P("train-missing-out", "train", out=None))
    add(P("exposure-controls-x", "exposure", controls="x"))
    add(P("report-top-x", "report", top="x"))
    add(P("report-no-run-dirs", "report", pos=[]))
    add(P("risk-params-abc", "risk", params="abc"))
    add(P("demo-epochs-x", "demo", epochs="x"))
    add(P("demo-n-train-x", "demo", n_train="x"))
    add(pytest.param(dict(raw=["nonsense-command"], ok=False, expect=None, setup=None), id="unknown-command"))

    # ---- outputs nested in what another command or a model owns; symlinks -----------------------------------------
    for cmd in ("extract", "mia", "memorization", "train", "report", "capacity"):
        add(P(f"{cmd}-out-inside-other-run", cmd, out="{run}/sub"))
    add(P("train-out-inside-model", "train", out="{model}/sub"))
    add(P("report-out-inside-model", "report", out="{model}/report"))
    add(P("extract-out-dangling-symlink", "extract", out="{dangling}"))
    add(P("demo-out-dangling-symlink", "demo", out="{dangling}"))
    add(P("risk-out-empty-string", "risk", out=""))
    # ---- model directories that load but would give wrong numbers ---------------------------------------------------
    for name in ("m_no_layers", "m_nan_eps", "m_vocab_mismatch", "m_tok_bigger"):
        for cmd in ("extract", "memorization"):
            add(P(f"{cmd}-{name}", cmd, pos=["{%s}" % name]))
        add(P(f"train-config-{name}", "train", config="{%s}" % name, tokenizer=None))
    add(P("mia-m_tok_bigger", "mia", pos=["{m_tok_bigger}"]))
    add(P("exposure-m_tok_bigger", "exposure", pos=["{m_tok_bigger}"]))
    # ---- data and specs ---------------------------------------------------------------------------------------------
    add(P("extract-data-deeply-nested-json", "extract", data="{deep_jsonl}"))
    add(P("extract-data-null-id", "extract", data="{nullid_jsonl}"))
    add(P("extract-id-field-missing", "extract", id_field="nope"))
    add(P("mia-members-equal-nonmembers", "mia", nonmembers="{members}"))
    add(P("exposure-canary-20-digits", "exposure", canaries="{can_20digits_jsonl}"))
    add(P("exposure-sample-size-huge", "exposure", sample_size="99999999999"))
    add(P("exposure-controls-huge", "exposure", controls="99999999999"))
    add(P("extract-num-beams-huge", "extract", decoding="beam", num_beams="100000"))
    add(P("capacity-widths-duplicate", "capacity", widths="8,8"))
    add(P("capacity-widths-huge", "capacity", widths="99999999"))
    add(P("capacity-threads-huge", "capacity", threads="100000"))
    add(P("risk-fail-above-twice", "risk", fail_above="predicted_mia_f1=0.1,predicted_mia_f1=2"))
    add(P("risk-fail-above-measured-before-training", "risk", fail_above="exact_rate=0.01"))
    add(P("riskpost-fail-above-mia-without-nonmembers", "riskpost", nonmembers=None, fail_above="mia_auc=0.6"))
    add(P("train-config-dir-with-family", "train", config="{model}", tokenizer=None, family="llama"))
    add(P("train-canary-longer-than-rows", "train", canaries="1", seq_len="4"))
    # ---- a second probe's classes: contradictions, hand-set torchrun variables, duplicate labels -------------------
    for cmd in ("extract", "mia", "memorization", "capacity", "train"):
        add(P(f"{cmd}-resume-and-overwrite", cmd, resume=True, overwrite=True))
    add(P("train-val-data-is-data", "train", val_data="{members}"))
    add(P("report-same-label-two-runs", "report", pos=["{run}", "{run}"], extra=["--label", "a", "--label", "a"]))
    # ---- placing large models (--device-map, --max-memory, --quantize): refused before the model loads ----------
    add(P("extract-device-map-unknown", "extract", device_map="sideways"))
    add(P("mia-max-memory-not-a-size", "mia", device_map="cpu-offload", max_memory="lots"))
    add(P("memorization-max-memory-without-device-map", "memorization", max_memory="1GiB"))
    add(P("exposure-quantize-unknown", "exposure", quantize="3bit"))
    add(P("riskpost-device-map-auto-with-device-cpu", "riskpost", device_map="auto"))
    return C


CASES = _cases()


# --------------------------------------------------------------------------------------------- the test

def _redirect_log_handlers() -> list:
    """Point stream handlers of loaded loggers at the current (captured) stderr, as a fresh process would."""
    swapped = []
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) is not sys.stdout:
                swapped.append((h, h.setStream(sys.stderr)))
    return swapped


@pytest.mark.parametrize("spec", CASES)
def test_bad_input(spec, world, tmp_path, monkeypatch, capsys):
    import torch

    from memaudit import cli

    ns = SimpleNamespace(**vars(world))
    ns.tmp = tmp_path
    existing = tmp_path / "existing.txt"
    existing.write_text("a user's file that must survive\n")
    monkeypatch.chdir(tmp_path)  # default output folders (runs/..., reports/...) land in the case's folder
    if spec.get("setup"):
        spec["setup"](ns)
    argv = spec["raw"] if "raw" in spec else _argv(spec, ns)

    before = _all_hashes(world)
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["memaudit", *argv])
    capsys.readouterr()
    escaped = None
    swapped = _redirect_log_handlers()
    with warnings.catch_warnings(record=True) as caught:
        # Python's own default filters, as the installed command runs with
        warnings.simplefilter("default")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=cat)
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # anything but SystemExit escaping main() is a traceback for the user
            code, escaped = None, exc
        finally:
            for h, old in swapped:
                if old is not None:
                    h.setStream(old)
            torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    warn_lines = [ln for w in caught for ln in warnings.formatwarning(w.message, w.category, w.filename,
                                                                      w.lineno, w.line).splitlines() if ln.strip()]
    after = _all_hashes(world)
    damage = _damage(before, after)
    if damage:
        _restore(world, [d.split(":")[0] for d in damage])

    problems = []
    if escaped is not None:
        problems.append(f"exception escaped main(): {escaped!r}")
    if "Traceback" in out or "Traceback" in err:
        last = [ln for ln in (err + out).splitlines() if ln.strip()][-1:]
        problems.append(f"traceback printed (last line: {last[0] if last else ''!r})")
    err_lines = [ln for ln in err.splitlines() if ln.strip()] + warn_lines
    if spec["ok"]:
        if code != 0:
            problems.append(f"good input exited {code}")
    else:
        if code == 0:
            problems.append("exit code 0 for bad input")
    if len(err_lines) > 2:
        problems.append(f"{len(err_lines)} stderr lines: {err_lines[:6]!r}")
    if damage:
        problems.append("sentinel damaged: " + "; ".join(damage))
    if existing.read_text() != "a user's file that must survive\n":
        problems.append("the case's existing file was changed")
    if spec.get("expect") and spec["expect"] not in err:
        problems.append(f"stderr lacks {spec['expect']!r}: {err.strip()[:200]!r}")
    if spec.get("expect") == "has no tokenizer files" and "not a causal" in err:
        problems.append("a model without tokenizer files is called 'not a causal language model'")
    assert not problems, (f"memaudit {' '.join(argv)}\n  exit {code}\n  " + "\n  ".join(problems)
                          + f"\n  stderr: {err.strip()[:600]!r}")


def test_matrix_size():
    """The matrix covers every command with at least 130 cases."""
    assert len(CASES) >= 130
    commands = {BASE[c.values[0]["base"]][0] for c in CASES if "base" in c.values[0]}
    assert commands >= {"extract", "mia", "memorization", "capacity", "train", "exposure", "report", "risk", "demo"}


def test_harness_sees_damage(world):
    """The sentinel check itself: an added, a changed and a removed file are all reported, and restored."""
    before = _all_hashes(world)
    (world.user / "added.txt").write_text("new")
    (world.user / "notes.txt").write_text("changed")
    (world.run / "summary.json").unlink()
    damage = _damage(before, _all_hashes(world))
    assert [d.split(":")[0] for d in damage] == ["run", "user"]
    assert "added.txt" in damage[1] and "notes.txt" in damage[1] and "summary.json" in damage[0]
    _restore(world, ["run", "user"])
    assert _all_hashes(world) == before


def test_world_size_set_by_hand_is_one_line(world, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE without torchrun's other variables: one line naming torchrun, not a traceback from gloo."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    code = _run_main(["train", "--data", str(world.members), "--out", str(tmp_path / "out"), "--epochs", "1",
                      "--config", "1x32", "--seq-len", "32", "--tokenizer", str(world.tok), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "torchrun" in err[0]
