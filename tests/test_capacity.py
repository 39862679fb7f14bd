"""Capacity (Morris et al.): the ensemble trainer is exact GPT-2, stacking changes no model, fits and laws."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from memaudit.capacity import (EnsembleConfig, EnsembleGPT, GPTShape, fit_bits_per_param, model_shape,
                               random_dataset, train_ensemble)
from memaudit.capacity.ensemble_train import compile_unavailable


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memaudit", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_NO_PROGRESS": "1"})


def test_ensemble_is_hf_gpt2_with_same_parameter_count():
    from memaudit.models import count_parameters

    shape = GPTShape(layers=2, width=16, heads=2, vocab=33, positions=12)
    ens = EnsembleGPT(shape, seeds=[0, 1, 2])
    idx = torch.randint(0, 33, (3, 4, 12))
    logits = ens(idx)
    for m in range(3):
        hf = ens.to_hf(m)
        with torch.no_grad():
            ref = hf(input_ids=idx[m]).logits
        torch.testing.assert_close(logits[m].detach(), ref, rtol=1e-5, atol=1e-5)
        assert count_parameters(hf) == shape.parameters
    assert not torch.allclose(logits[0], logits[1])  # seeds give different models


def test_stacking_changes_no_model():
    """Two models trained together end exactly where each ends when trained alone."""
    shape = model_shape(1, 8, 16, 8)
    data = [random_dataset(20, 8, 16, 1), random_dataset(45, 8, 16, 2)]
    cfg = EnsembleConfig(max_steps=30, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=10, drop_converged=False)
    together = train_ensemble(shape, data, [3, 4], cfg, bos_id=16)
    for m in range(2):
        alone = train_ensemble(shape, [data[m]], [[3, 4][m]], cfg, bos_id=16)[0]
        for k, v in alone.final_state.items():
            torch.testing.assert_close(together[m].final_state[k], v, rtol=1e-4, atol=1e-5)
        assert together[m].history[-1][2] == pytest.approx(alone.history[-1][2], rel=1e-4)


def test_fused_head_matches_autograd_cross_entropy():
    """The chunked head+loss gives autograd's loss and gradients, also when chunks do not divide the tokens."""
    torch.manual_seed(0)
    shape = GPTShape(layers=1, width=16, heads=2, vocab=41, positions=10)
    ens = EnsembleGPT(shape, seeds=[0, 1, 2])
    idx, tg = torch.randint(0, 41, (3, 5, 10)), torch.randint(0, 40, (3, 5, 10))
    weights = torch.tensor([1.0, 2.0, 0.5])  # per-model upstream gradients differ
    fused = ens.loss(idx, tg, chunk=7)
    (fused * weights).sum().backward()
    g_fused = {k: p.grad.clone() for k, p in ens.params.items()}
    ens.zero_grad()
    ref = F.cross_entropy(ens(idx).flatten(0, 2), tg.flatten(), reduction="none").view(3, -1).mean(1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for k, p in ens.params.items():
        torch.testing.assert_close(g_fused[k], p.grad, rtol=1e-4, atol=1e-7)
    nll = ens.token_nll(idx, tg, chunk=9)
    torch.testing.assert_close(nll.mean((1, 2)), ref.detach(), rtol=1e-5, atol=1e-6)


def test_gelu_tanh_is_gpt2_gelu_new():
    """The sigmoid form of gelu_new has gelu_new's values and gradients (float64 reference) and stays finite."""
    from memaudit.capacity.ensemble_model import gelu_tanh

    torch.manual_seed(0)
    x = torch.cat([torch.randn(4000) * s for s in (0.5, 2.0, 8.0)] + [torch.tensor([0.0, -19.9, 20.1, -1e6, 1e13])])
    x = x.requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = F.gelu(xd, approximate="tanh")
    (ref_grad,) = torch.autograd.grad(ref.sum(), xd)
    y = gelu_tanh(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=5e-6)
    assert torch.isfinite(grad).all()


def test_training_process_keeps_freed_memory():
    """After the trainer's allocator setting a 4 MB activation comes from the heap, not a fresh mmap, and freeing
    it keeps the memory for the next step (nothing trimmed back to the kernel). Read from glibc's own accounting
    (mallinfo2) in fresh processes, with and without the setting: page-fault counts flake with the heap's shape."""
    code = """
import ctypes, ctypes.util, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(libc, "mallinfo2"):
    sys.exit(3)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "on":
    from memaudit.capacity.allocator import keep_freed_memory
    if not keep_freed_memory():
        sys.exit(3)
before = libc.mallinfo2()
block = libc.malloc(4 << 20)
held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(held.hblkhd - before.hblkhd, after.arena - before.arena)
"""
    got = {}
    for setting in ("on", "off"):
        r = subprocess.run([sys.executable, "-c", code, setting], capture_output=True, text=True)
        if r.returncode == 3:
            pytest.skip("not glibc malloc (or a glibc without mallinfo2)")
        assert r.returncode == 0, r.stderr
        got[setting] = [int(v) for v in r.stdout.split()]
    mmapped, kept = got["on"]
    assert mmapped == 0 and kept > 2 << 20  # from the heap, and still held after the free
    assert got["off"][0] >= 4 << 20 and got["off"][1] == 0  # glibc's default: a fresh mmap, returned on free


def test_lr_scale_zero_leaves_model_untouched():
    shape = model_shape(1, 8, 16, 8)
    data = [random_dataset(20, 8, 16, 1)] * 2
    cfg = EnsembleConfig(max_steps=10, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=5, drop_converged=False)
    recs = train_ensemble(shape, data, [3, 3], cfg, bos_id=16, lr_scales=[0.0, 1.0])
    init = EnsembleGPT(shape, [3])
    for k, v in recs[0].final_state.items():
        torch.testing.assert_close(v, init.params[k][0].detach())
    assert not torch.allclose(recs[1].final_state["wte"], init.params["wte"][0])


def test_small_dataset_is_memorized_and_bits_are_exact():
    """Below capacity a model memorizes (nearly) all the data; the convergence rule stops it; the ensemble's
    code lengths equal an independent HF computation."""
    shape = model_shape(1, 16, 16, 16)
    data = random_dataset(8, 16, 16, 5)  # 512 bits for a ~3.8K-parameter model
    H = data.size * math.log2(16)
    cfg = EnsembleConfig(max_steps=1500, batch_size=8, lr=1e-2, warmup_steps=20, eval_every=50,
                         plateau_window=200, anneal_fraction=0.2)
    rec = train_ensemble(shape, [data], [0], cfg, bos_id=16, data_bits=[H])[0]
    assert rec.converged and rec.steps < 1500
    one = EnsembleGPT(shape, [0])
    with torch.no_grad():
        for k, v in rec.final_state.items():
            one.params[k].copy_(v[None])
        hf = one.to_hf(0)
        x = torch.cat([torch.full((8, 1), 16), torch.as_tensor(data)], 1)
        lp = torch.log_softmax(hf(input_ids=x[:, :-1]).logits.double(), -1)
        bits = float(-lp.gather(-1, x[:, 1:, None]).sum() / math.log(2))
    assert rec.history[-1][2] == pytest.approx(bits, rel=1e-4, abs=1e-3)
    # the first token of each row is coded from BOS alone, so at most about 15/16 of the bits can be memorized
    assert (H - bits) / H >= 0.9


def test_capacity_cli_tiny_grid_reports_lower_bound(tmp_path):
    out = tmp_path / "cap"
    r = _cli("capacity", "--widths", "8,12", "--vocab", "32", "--seq-len", "8", "--sizes", "0.5x,2x",
             "--max-steps", "60", "--eval-every", "20", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "lower bound" in r.stdout and "no capacity reported" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["capacity_reached"] is False and s["bits_per_param"]["is_lower_bound"] is True
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 4 and set(res["params"]) == {model_shape(1, w, 32, 8).parameters for w in (8, 12)}
    np.testing.assert_allclose(res["data_bits"], res["n_sequences"] * 8 * 5)
    np.testing.assert_allclose(res["memorized_bits"], res["data_bits"] - res["model_bits"])
    caps = pd.read_csv(out / "capacities.csv")
    for _, c in caps.iterrows():
        g = res[res["width"] == c["width"]]
        assert c["capacity_bits"] == pytest.approx(g["memorized_bits"].max())
    assert (out / "capacity_vs_params.png").exists() and (out / "memorization_vs_data.png").exists()
    assert (out / "training_curves.png").exists()
    assert "below_measured_capacity_min_memorized_fraction" in s


def test_capacity_bad_input_one_line(tmp_path):
    from memaudit.capacity import CapacitySettings
    from memaudit.errors import MemauditError

    r = _cli("capacity", "--widths", "a,b", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--widths" in r.stderr and "Traceback" not in r.stderr
    for kwargs, words in (({"dtype": "float16"}, "--dtype"), ({"sizes": ["zz"]}, "dataset size"),
                          ({"vocab": 1}, "--vocab"), ({"plateau_epochs": 0}, "--plateau-epochs"),
                          ({"text": str(tmp_path / "none.jsonl")}, "--text file"),
                          ({"text": __file__, "text_steps": 0}, "text_steps")):
        with pytest.raises(MemauditError, match=words):
            CapacitySettings(**kwargs).validate()
    CapacitySettings(vocab=1, paper_grid=True).validate()  # checked as it runs: the paper's V=2048
    CapacitySettings(vocab=1, text=__file__).validate()  # the text experiment has no random tokens


def test_capacity_python_api_returns_what_it_wrote(tmp_path):
    """capacity(): settings or keywords (not both); the returned summary is summary.json, the table results.csv,
    and config.json records the grid as RandomGridConfig's dict (what --resume compares)."""
    from memaudit.capacity import CapacitySettings, capacity
    from memaudit.rundir import read_summary

    kw = dict(widths=[8], vocab=16, seq_len=8, sizes=["4", 6], max_steps=4, batch_size=2, warmup_steps=1,
              eval_every=2, plateau_window=2, torch_compile="off", threads=1, out=tmp_path / "api")
    with pytest.raises(TypeError, match="not both"):
        capacity(CapacitySettings(), vocab=16)
    res = capacity(**kw)
    assert res.path == tmp_path / "api"
    assert res.summary == read_summary(res.path) and res.summary["command"] == "capacity"
    assert res.results.to_csv(index=False) == (res.path / "results.csv").read_text()
    settings = json.loads((res.path / "config.json").read_text())["settings"]
    assert list(settings) == ["layers", "widths", "vocab", "seq_len", "sizes", "seeds", "max_steps", "batch_size",
                              "lr", "warmup_steps", "eval_every", "plateau_window", "plateau_tol", "anneal_fraction",
                              "plateau_epochs", "head_dim", "dtype", "threads", "data_seed", "torch_compile"]
    assert settings["sizes"] == ["4", "6"] and settings["vocab"] == 16
    again = capacity(CapacitySettings(**{**kw, "resume": True}))  # finished: refit and redraw only
    assert again.summary == res.summary


def test_fit_through_origin_and_bootstrap():
    P = np.array([1e4, 2e4, 4e4, 8e4])
    rng = np.random.default_rng(0)
    C = 3.6 * P * (1 + 0.03 * rng.standard_normal(4))
    caps = pd.DataFrame({"params": P, "capacity_bits": C, "bits_per_param": C / P, "lower_bound": False})
    fit = fit_bits_per_param(caps)
    assert fit["estimate"] == pytest.approx((P * C).sum() / (P * P).sum())
    assert fit["ci95"][0] <= fit["estimate"] <= fit["ci95"][1]
    assert 3.3 < fit["estimate"] < 3.9 and fit["is_lower_bound"] is False


def test_mia_law_published_checks_and_fit():
    from memaudit.capacity.laws import PUBLISHED_CHECKS, fit_mia_law, mia_law, predict_mia_f1

    # METHODS.md constants against the published validation table (Morris et al.): 0.980 and 0.534.
    assert predict_mia_f1(123.7e6, 1.50e6) == pytest.approx(0.980, abs=0.035)
    assert predict_mia_f1(123.7e6, 13.57e6) == pytest.approx(0.534, abs=0.02)
    assert predict_mia_f1(1e6, 1e3) > predict_mia_f1(1e6, 1e5)  # more data per parameter, weaker attack
    assert len(PUBLISHED_CHECKS) == 2
    x = np.logspace(-3.5, -0.5, 25)
    y = mia_law(x, 1.2, 40.0, 0.02)
    fit = fit_mia_law(x, y)
    assert fit["c1"] == pytest.approx(1.2, rel=1e-3) and fit["c2"] == pytest.approx(40.0, rel=1e-2)
    assert predict_mia_f1(1e6, 2e4, law=fit) == pytest.approx(float(mia_law(0.02, 1.2, 40.0, 0.02)), rel=1e-3)


def test_best_f1_against_brute_force():
    from memaudit.capacity.text import best_f1

    rng = np.random.default_rng(1)
    m, n = rng.normal(1, 1, 30).round(1), rng.normal(0, 1, 40).round(1)
    brute = 0.0
    for t in np.unique(np.concatenate([m, n])):
        tp, fp = (m >= t).sum(), (n >= t).sum()
        brute = max(brute, 2 * tp / (2 * tp + fp + (len(m) - tp)))
    assert best_f1(m, n) == pytest.approx(brute)


def test_plateau_window_in_epochs_judges_every_dataset_after_equal_training_per_sequence():
    """Two models whose memorization follows the same curve in epochs: a window in steps finds the larger
    dataset's plateau after fewer epochs than the smaller one's; a window in epochs finds both at the same epoch."""
    from memaudit.capacity.ensemble_train import ModelRecord, _plateaued, plateau_window_steps

    H, batch, every = 1e6, 64, 100

    def plateau_epoch(n_rows: int, cfg: EnsembleConfig) -> float:
        rec = ModelRecord(index=0, seed=0, n_rows=n_rows)
        for step in range(every, 400_000, every):
            epochs = step * batch / n_rows
            rec.history.append((step, 0.0, H - 0.5 * H * (1 - 1 / (1 + epochs / 100))))  # bits left on the data
            if _plateaued(rec, cfg, H):
                return epochs
        raise AssertionError("no plateau found")

    steps_cfg = EnsembleConfig(batch_size=batch, warmup_steps=0, plateau_window=4000, plateau_tol=0.005)
    epochs_cfg = EnsembleConfig(batch_size=batch, warmup_steps=0, plateau_epochs=415, plateau_tol=0.005)
    assert plateau_window_steps(epochs_cfg, 617) == 4000 and plateau_window_steps(epochs_cfg, 896) == 5810
    assert plateau_epoch(896, steps_cfg) < 0.9 * plateau_epoch(617, steps_cfg)
    assert plateau_epoch(896, epochs_cfg) == pytest.approx(plateau_epoch(617, epochs_cfg), rel=0.02)


def test_run_recorded_before_a_new_setting_still_resumes(tmp_path):
    """A setting added since a run was recorded matches it while unset; set to a value, it is another run."""
    from memaudit.errors import MemauditError
    from memaudit.rundir import RunDir

    RunDir(tmp_path / "r", "capacity", {"lr": 0.02})
    RunDir(tmp_path / "r", "capacity", {"lr": 0.02, "plateau_epochs": None}, resume=True)
    with pytest.raises(MemauditError, match=r"other settings \(plateau_epochs: None -> 415.0\)"):
        RunDir(tmp_path / "r", "capacity", {"lr": 0.02, "plateau_epochs": 415.0}, resume=True)
    with pytest.raises(MemauditError, match=r"other settings \(lr: 0.02 -> 0.01\)"):  # names what changed
        RunDir(tmp_path / "r", "capacity", {"lr": 0.01, "plateau_epochs": None}, resume=True)


needs_compiler = pytest.mark.skipif(bool(compile_unavailable()), reason="torch.compile needs a C++ compiler")


@pytest.mark.parametrize("torch_compile", ["off", pytest.param("on", marks=needs_compiler)])
def test_interrupted_training_resumes_to_the_same_models(tmp_path, torch_compile):
    """A training killed mid-run and resumed from its checkpoint ends with exactly the weights, histories and
    convergence of the uninterrupted run, including a model that had already converged and left the ensemble
    (also compiled, where each ensemble size has its own graph); a checkpoint of other settings is refused."""
    from memaudit.errors import MemauditError

    torch.set_num_threads(1)
    shape = model_shape(1, 8, 16, 8)
    data = [random_dataset(8, 8, 16, 1), random_dataset(40, 8, 16, 2)]
    H = [d.size * 4.0 for d in data]
    cfg = EnsembleConfig(max_steps=60, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=5, plateau_epochs=2,
                         plateau_tol=10.0, anneal_fraction=0.5,  # plateaus at once: model 0 leaves at step 15
                         torch_compile=torch_compile)

    def train(checkpoint=None, on_eval=None, config=cfg):
        return train_ensemble(shape, data, [1, 2], config, bos_id=16, data_bits=H, checkpoint=checkpoint,
                              on_eval=on_eval)

    whole = train(checkpoint=tmp_path / "unused.ckpt")

    class Killed(Exception):
        pass

    def kill_at_20(step, _records):
        if step == 20:
            raise Killed

    ckpt = tmp_path / "shape.ckpt"
    with pytest.raises(Killed):
        train(ckpt, kill_at_20)
    assert ckpt.is_file()
    with pytest.raises(MemauditError, match="other data, seeds or settings"):
        train(ckpt, config=EnsembleConfig(**{**cfg.__dict__, "lr": 2e-2}))
    resumed = train(ckpt)
    assert whole[0].steps == 15 and whole[1].steps > 20  # the kill fell between the two models' ends
    for a, b in zip(whole, resumed):
        assert (a.steps, a.converged, a.anneal_start, a.history) == (b.steps, b.converged, b.anneal_start, b.history)
        for k in a.final_state:
            assert torch.equal(a.final_state[k], b.final_state[k]), k


@needs_compiler
def test_compiled_body_gives_the_eager_loss_and_gradients():
    shape = model_shape(1, 8, 16, 8)
    ens = EnsembleGPT(shape, seeds=[1, 2])
    idx, tg = torch.randint(0, 17, (2, 8, 8)), torch.randint(0, 16, (2, 8, 8))
    grads = {}
    for compiled in (False, True):
        ens.compiled = compiled
        ens.zero_grad()
        loss = ens.loss(idx, tg)
        loss.sum().backward()
        grads[compiled] = (loss.detach(), {k: p.grad.clone() for k, p in ens.params.items()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-6)
    for k, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][k], g, rtol=1e-4, atol=1e-6)


def test_failed_compile_falls_back_to_the_eager_run(monkeypatch, capsys):
    """A compiler or Inductor failure costs a warning, not the run: training ends exactly as an uncompiled run."""
    from memaudit.capacity import ensemble_model, ensemble_train
    from memaudit.errors import MemauditError

    def broken():
        def fail(*args):
            raise RuntimeError("C++ compile error: cannot find -lgomp")
        return fail

    shape = model_shape(1, 8, 16, 8)
    data = [random_dataset(20, 8, 16, 1)]
    cfg = EnsembleConfig(max_steps=20, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=10, drop_converged=False)
    eager = train_ensemble(shape, data, [3], cfg, bos_id=16)[0]
    monkeypatch.setattr(ensemble_model, "_compiled_hidden", broken)
    monkeypatch.setattr(ensemble_train, "compile_unavailable", lambda: None)
    fallen = train_ensemble(shape, data, [3], EnsembleConfig(**{**cfg.__dict__, "torch_compile": "on"}), bos_id=16)[0]
    assert "torch.compile failed (RuntimeError: C++ compile error" in capsys.readouterr().err
    assert fallen.history == eager.history
    for k, v in eager.final_state.items():
        assert torch.equal(fallen.final_state[k], v), k
    monkeypatch.setattr(ensemble_train, "compile_unavailable", lambda: "no C++ compiler found")
    with pytest.raises(MemauditError, match="--compile on cannot work here: no C"):
        train_ensemble(shape, data, [3], EnsembleConfig(**{**cfg.__dict__, "torch_compile": "on"}), bos_id=16)


def test_text_mode_end_to_end(tmp_path):
    """capacity --text on real docstrings: the smallest dataset is memorized (more mem_U per sample, a stronger
    loss attack, train loss far below test loss) and the largest less so; the capacity reached under the budget is
    the largest total mem_U; the test-loss peak is reported on both axes; a refit with --resume changes nothing."""
    from memaudit.corpus import stdlib_docstrings
    from memaudit.data import write_documents

    corpus = write_documents(tmp_path / "docs.jsonl", stdlib_docstrings(min_chars=200, max_chars=20000))
    args = ["capacity", "--text", str(corpus), "--widths", "16", "--threads", "1", "--out", str(tmp_path / "t")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_NO_PROGRESS": "1"}
    code = ("import sys; from memaudit.capacity import capacity; "
            "capacity(text=sys.argv[1], widths=[16], text_sizes=[8, 32, 512], text_test_windows=64, text_steps=400, "
            "text_lr=1e-2, threads=1, out=sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "t")], check=True, env=env)
    res = pd.read_csv(tmp_path / "t" / "text_results.csv").sort_values("n_sequences")
    small, large = res.iloc[0], res.iloc[-1]
    assert small.mem_u_bits_per_sample > 3 * large.mem_u_bits_per_sample
    assert small.mia_f1 > large.mia_f1 and small.mia_f1 > 0.9
    assert small.train_loss_nats < 0.5 * small.test_loss_nats
    reached = res.mem_u_bits_total.max()
    np.testing.assert_allclose(res.data_over_measured_capacity, res.dataset_bits_ref / reached)
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    peak = res.loc[res.test_loss_nats.idxmax()]
    assert summary["test_loss_peak_at_data_over_capacity"][0]["n_sequences"] == peak.n_sequences
    assert summary["measured_capacity"][0]["bits"] == pytest.approx(reached)
    before = (tmp_path / "t" / "text_results.csv").read_text()
    out = _cli(*args[:-2], "--out", str(tmp_path / "t"), "--resume")  # the CLI's own settings differ: refused
    assert out.returncode != 0 and "other settings" in out.stderr and "Traceback" not in out.stderr
    subprocess.run([sys.executable, "-c", code.replace("sys.argv[2])", "sys.argv[2], resume=True)"), str(corpus),
                    str(tmp_path / "t")], check=True, env=env)
    assert (tmp_path / "t" / "text_results.csv").read_text() == before
