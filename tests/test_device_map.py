"""Models larger than one device: --device-map through accelerate (weights offloaded to CPU memory and disk within
--max-memory) gives the numbers of the whole model on one device; --quantize through bitsandbytes; bad placement
options end as one line before any model loads."""
from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from memaudit import devices
from memaudit.data import train_tokenizer
from memaudit.errors import MemauditError
from memaudit.membership import mia
from memaudit.models import load_model

PREFIX, SUFFIX = 8, 16
# Every attack but gradnorm (offloaded weights get no gradient: refused, see below) and reference (no second model).
ATTACKS = "loss,zlib,zstd,min_k,min_k_pp,recall,dc_pdd"


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 4-layer GPT-2 (weights large enough that its greedy output varies) and pre-tokenized documents:
    its own greedy continuations (extracted whole), the same with one suffix token changed (a divergence mid-suffix,
    decoded from a cropped cache) and random tokens; `limit`: room for the embeddings and about one block, so the
    other blocks go to disk."""
    root = tmp_path_factory.mktemp("device_map")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud forest".split()
    tok = train_tokenizer([" ".join(rng.choice(words, 30)) for _ in range(40)], vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=4, n_head=2,
                                       initializer_range=0.2, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    docs = []
    for i in range(18):
        ids = rng.integers(3, len(tok), PREFIX + SUFFIX).tolist()
        if i % 3 < 2:
            prompt = torch.tensor([[tok.bos_token_id] + ids[:PREFIX]])
            ids = model.generate(prompt, max_new_tokens=SUFFIX, do_sample=False, pad_token_id=0)[0, 1:].tolist()
            if i % 3 == 1:
                ids[PREFIX + 6] = (ids[PREFIX + 6] + 1) % len(tok)
        docs.append({"id": f"d{i}", "input_ids": ids})
    for name, rows in (("members", docs[:9]), ("nonmembers", docs[9:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = model.transformer
    limit = _bytes(t.wte) + _bytes(t.wpe) + 2 * _bytes(t.h[0])  # accelerate keeps room for one block beside
    return root, model, limit


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("pickled", [False, True])
def test_offloaded_model_computes_what_transformers_does(tiny, tmp_path, monkeypatch, pickled):
    """cpu-offload within --max-memory: some blocks in CPU memory, the rest on disk (meta parameters swapped in by
    accelerate's hooks); logits equal the plain model's. Disk offload reads a safetensors checkpoint in place and
    writes a pickled one's offloaded weights to memaudit's own temporary folder, gone with the model; the model
    directory is never written."""
    root, plain, limit = tiny
    model_dir = root / "model"
    if pickled:
        model_dir = tmp_path / "pickled"
        model_dir.mkdir()
        for f in (root / "model").iterdir():
            if f.suffix != ".safetensors":
                (model_dir / f.name).write_bytes(f.read_bytes())
        torch.save(plain.state_dict(), model_dir / "pytorch_model.bin")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = _snapshot(model_dir)
    lm = load_model(model_dir, device="cpu", device_map="cpu-offload", max_memory=str(limit), allow_pickle=pickled)
    where = set(lm.placement.values())
    assert where == {"cpu", "disk"}, lm.placement
    assert lm.model.hf_device_map["transformer.wte"] == "cpu"
    assert any(p.device.type == "meta" for p in lm.model.parameters())
    [folder] = (tmp_path / "tmp").iterdir()
    assert any(folder.iterdir()) == pickled  # safetensors: read from the checkpoint itself
    ids = torch.randint(3, 200, (3, 20))
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, plain(ids).logits)
    assert _snapshot(model_dir) == before
    del lm
    gc.collect()
    assert not folder.exists()


def _run_files(path: Path) -> tuple[pd.DataFrame, dict]:
    summary = json.loads((path / "summary.json").read_text())
    return pd.read_parquet(path / "samples.parquet"), summary


def test_extract_offloaded_equals_whole_model(tiny, tmp_path, run_cli):
    """The command line's extract with its weights beyond --max-memory: the same table and summary as the whole
    model (greedy with the shortcut: full matches, mid-suffix divergences decoded from cropped caches)."""
    root, _, limit = tiny
    args = ["extract", root / "model", "--data", root / "members.jsonl", "--prefix", PREFIX, "--suffix", SUFFIX,
            "--device", "cpu", "--batch-size", "4"]
    whole = run_cli(*args, "--out", tmp_path / "whole")
    offloaded = run_cli(*args, "--out", tmp_path / "offloaded", "--device-map", "cpu-offload", "--max-memory",
                        f"cpu={limit / 1000:.1f}KB")
    assert whole.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    assert offloaded.stderr == whole.stderr
    a, sa = _run_files(tmp_path / "whole")
    b, sb = _run_files(tmp_path / "offloaded")
    pd.testing.assert_frame_equal(a, b)
    assert sa == sb
    assert 0 < sa["exact_rate"] < 1 and 0 < sa["mean_match_prefix"] < SUFFIX  # all three kinds of windows


def test_mia_offloaded_equals_whole_model(tiny):
    """mia with the weights beyond --max-memory: the same scores and metrics as the whole model (the Python API's
    results-only path: its summary is summary.json's, without the figures)."""
    root, _, limit = tiny
    common = dict(model_dir=root / "model", members=root / "members.jsonl", nonmembers=root / "nonmembers.jsonl",
                  attacks=ATTACKS, recall_shots=2, bootstrap=20, device="cpu", batch_size=4, write=False)
    whole = mia(**common)
    offloaded = mia(**common, device_map="cpu-offload", max_memory=str(limit))
    pd.testing.assert_frame_equal(whole.samples, offloaded.samples)
    assert ({k: v for k, v in whole.summary.items() if k != "seconds"}
            == {k: v for k, v in offloaded.summary.items() if k != "seconds"})
    assert {"score_loss", "score_recall", "score_dc_pdd"} <= set(whole.samples.columns)


def test_gradnorm_with_offloaded_weights(tiny):
    """Offloaded weights get no gradient (accelerate swaps copies in for each forward), so a gradient norm would
    miss them: `all` skips gradnorm, saying why; named, it is refused."""
    root, _, limit = tiny
    common = dict(model_dir=root / "model", members=root / "members.jsonl", nonmembers=root / "nonmembers.jsonl",
                  device="cpu", device_map="cpu-offload", max_memory=str(limit), bootstrap=0, write=False)
    res = mia(**common, attacks="all", recall_shots=2)
    assert "offloaded" in res.summary["skipped_attacks"]["gradnorm"]
    assert not any(c.startswith("score_gradnorm") for c in res.samples.columns)
    with pytest.raises(MemauditError, match="gradnorm needs the gradient of every weight"):
        mia(**common, attacks="loss,gradnorm")


def test_whole_model_when_it_fits(tiny):
    """A limit the model fits: no offloading; the default (no --device-map) is the whole model on --device."""
    root, _, _ = tiny
    assert load_model(root / "model", device="cpu").placement is None
    fits = load_model(root / "model", device="cpu", device_map="cpu-offload", max_memory="1GiB")
    assert set(fits.placement.values()) <= {"cpu"}
    assert all(p.device.type == "cpu" for p in fits.model.parameters())


def test_limit_without_room_for_the_input_layer(tiny):
    """A limit too small for the input embedding and one block: accelerate would put all on disk (meta), where
    the engine cannot put its inputs: refused with the size it needs."""
    root, _, limit = tiny
    with pytest.raises(MemauditError, match=r"no room for the model's input embedding and one layer.*MiB"):
        load_model(root / "model", device="cpu", device_map="cpu-offload", max_memory=str(limit // 4))


def test_parse_max_memory_agrees_with_accelerate():
    from accelerate.utils import convert_file_size_to_int

    text = "0=20GiB,cuda:1=1.5GB,cpu=300KB"
    assert devices.parse_max_memory(text) == {0: convert_file_size_to_int("20GiB"),
                                             1: convert_file_size_to_int("1.5GB"),
                                             "cpu": convert_file_size_to_int("300KB")}
    assert devices.parse_max_memory("512MiB") == {devices.EACH: 512 * 2**20}
    assert devices.parse_max_memory("12345") == {devices.EACH: 12345}
    assert devices.accelerate_limits("cpu-offload", {devices.EACH: 1000}, torch.device("cpu")) == {"cpu": 1000}
    assert devices.accelerate_limits("auto", None, torch.device("cpu")) is None


# --- bad input: one line, exit 2, before any model loads -----------------------------------------------------------

BAD = [
    (["--device-map", "sideways"], "unknown --device-map 'sideways'"),
    (["--device-map", "cpu-offload", "--max-memory", "20 parsecs"], "not a size"),
    (["--device-map", "cpu-offload", "--max-memory", "cpu=0KB"], "more than 0 bytes"),
    (["--device-map", "cpu-offload", "--max-memory", "gpu=1GiB"], "unknown device 'gpu'"),
    (["--device-map", "cpu-offload", "--max-memory", "cpu=1GiB,cpu=2GiB"], "names cpu twice"),
    (["--device-map", "cpu-offload", "--max-memory", "1GiB,cpu=2GiB"], "not a mix"),
    (["--device-map", "cpu-offload", "--max-memory", "disk=1GiB"], "cannot limit disk"),
    (["--device-map", "auto", "--max-memory", "3=1GiB"], "names GPU 3"),
    (["--max-memory", "1GiB"], "--max-memory limits what --device-map places"),
    (["--device-map", "auto", "--device", "cpu"], "chooses the devices itself"),
    (["--quantize", "3bit"], "unknown --quantize '3bit'"),
    (["--quantize", "4bit", "--device-map", "cpu-offload"], "cannot be combined with --device-map cpu-offload"),
]


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def _one_error_line(res, expect: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command", ["extract", "mia"])
@pytest.mark.parametrize("extra, expect", BAD, ids=[b[1].split("'")[0][:30] for b in BAD])
def test_bad_placement_options(tiny, tmp_path, run_cli, monkeypatch, command, extra, expect):
    root, _, _ = tiny
    _no_model_load(monkeypatch)
    data = (["--data", root / "members.jsonl"] if command == "extract" else
            ["--members", root / "members.jsonl", "--nonmembers", root / "nonmembers.jsonl"])
    res = run_cli(command, root / "model", *data, "--out", tmp_path / "out", *extra)
    _one_error_line(res, expect)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("installed, expect", [
    (None, "needs bitsandbytes, which is not installed"),
    ((0, 45), "without a CUDA device needs bitsandbytes >= 0.50"),
])
def test_quantize_refused_where_it_cannot_run(tiny, tmp_path, run_cli, monkeypatch, installed, expect):
    """--quantize without bitsandbytes, or on a CPU with a release that has no CPU kernels: one line, up front."""
    root, _, _ = tiny
    _no_model_load(monkeypatch)
    monkeypatch.setattr(devices, "_bitsandbytes_version", lambda: installed)
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    res = run_cli("extract", root / "model", "--data", root / "members.jsonl", "--quantize", "8bit",
                  "--out", tmp_path / "out")
    _one_error_line(res, expect)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_model_is_what_bitsandbytes_loads(tiny, bits):
    """Where bitsandbytes is installed (CUDA, or CPU from 0.50): memaudit's quantized model computes what plain
    transformers loads with the same BitsAndBytesConfig, and gradnorm is refused (quantized weights take no
    gradient)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    root, _, _ = tiny
    try:
        devices.check_placement(None, None, bits)
    except MemauditError as exc:
        pytest.skip(str(exc))
    lm = load_model(root / "model", quantize=bits)
    cfg = (BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else
           BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=lm.dtype))
    plain = AutoModelForCausalLM.from_pretrained(root / "model", quantization_config=cfg, dtype=lm.dtype,
                                                 device_map={"": lm.device})
    ids = torch.randint(3, 200, (3, 20), device=lm.device)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, plain(ids).logits)
    assert devices.gradient_blocker(lm.model) is not None
