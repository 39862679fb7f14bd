"""Canary exposure (Carlini 2019) against an independent enumeration, and on a model trained with a canary."""
import json
import math

import numpy as np
import pytest
import torch

from memaudit.canaries import Canary, canary_record, make_canaries, read_canaries, write_canaries
from memaudit.exposure import canary_exposure, exposure_from_rank, sampled_exposure, skewnorm_exposure


def _independent_ll(model, tok, text):
    """Log-likelihood of a whole text, BOS-conditioned, with a plain forward pass (not the scoring engine)."""
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lsm = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return float(lsm[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())


def test_exact_rank_matches_independent_enumeration_and_estimate_agrees(canary_model):
    from memaudit.models import load_model

    m = load_model(canary_model)
    (trained,) = read_canaries(canary_model)
    control = Canary("x", trained.template, "123")  # never inserted: 3 digits, |R| = 1000
    exact = canary_exposure(m, control, exact_limit=1000, batch_size=64)
    lls = np.array([_independent_ll(m.model, m.tokenizer, control.fill(str(n).zfill(3))) for n in range(1000)])
    rank = 1 + int((lls > lls[123]).sum())
    assert exact["method"] == "exact" and exact["rank"] == rank
    assert exact["exposure"] == pytest.approx(math.log2(1000) - math.log2(rank), abs=1e-9)
    est = canary_exposure(m, control, exact_limit=10, sample_size=400, batch_size=64)
    assert est["method"] == "estimated" and est["candidates_scored"] == 401
    assert est["exposure_low"] <= exact["exposure"] <= est["exposure_high"]
    assert abs(est["exposure"] - exact["exposure"]) < 0.5


def test_repeated_canary_is_exposed_far_more_than_unseen_ones(canary_model, tmp_path, run_cli):
    out = tmp_path / "exp"
    r = run_cli("exposure", canary_model, "--controls", "2", "--exact-limit", "100", "--sample-size", "500",
                "--out", out, "--batch-size", "128")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_canaries"] == 1 and summary["n_controls"] == 2 and summary["methods"] == ["estimated"]
    assert summary["max_possible_exposure_bits"] == pytest.approx(math.log2(1e9))
    # inserted 40 times: above every sampled candidate; an unseen secret's rank is uniform (mean ~1.44 bits)
    assert summary["mean_exposure_bits"] > 15
    assert summary["mean_exposure_bits"] > summary["mean_control_exposure_bits"] + 5
    assert (out / "exposure.png").stat().st_size > 0


def test_python_api_returns_what_the_run_directory_holds(canary_model, tmp_path):
    import pandas as pd

    from memaudit.exposure import ExposureSettings, exposure

    settings = ExposureSettings(model_dir=canary_model, controls=1, exact_limit=10, sample_size=50,
                                batch_size=64, out=tmp_path / "exp")
    res = exposure(settings)
    assert res.path == tmp_path / "exp"
    assert res.summary == json.loads((res.path / "summary.json").read_text())
    assert list(res.summary)[:2] == ["schema_version", "command"] and res.summary["command"] == "exposure"
    pd.testing.assert_frame_equal(res.canaries, pd.read_parquet(res.path / "samples.parquet"))
    assert res.canaries["inserted"].tolist() == [True, False] and res.summary["methods"] == ["estimated"]
    with pytest.raises(TypeError, match="not both"):
        exposure(settings, seed=1)


def test_sampled_and_skewnorm_estimators_on_synthetic_likelihoods():
    from scipy.stats import skewnorm

    rng = np.random.default_rng(0)
    population = skewnorm.rvs(4.0, loc=-60, scale=8, size=200_000, random_state=rng)
    secret_ll = float(np.quantile(population, 0.999))  # 0.1% of candidates are more likely
    true = exposure_from_rank(1 + int((population > secret_ll).sum()), len(population) + 1)
    sample = rng.choice(population, 20_000, replace=False)
    est = sampled_exposure(secret_ll, sample, len(population) + 1)
    assert est["exposure_low"] <= true <= est["exposure_high"]
    assert skewnorm_exposure(secret_ll, sample, len(population) + 1) == pytest.approx(true, abs=0.3)
    assert exposure_from_rank(1, 1024) == 10 and exposure_from_rank(1024, 1024) == 0


def test_canary_file_formats_and_errors(tmp_path, run_cli):
    f = tmp_path / "c.jsonl"
    trainer_format = canary_record(make_canaries(1, 7, seed=1, n_digits=6)[0])
    f.write_text(json.dumps({"secret": "0042", "prefix": "pin: "}) + "\n"
                 + json.dumps({"id": "b", "secret": "17", "text": "call 17 now", "repeats": 3}) + "\n"
                 + json.dumps(trainer_format) + "\n")
    a, b, c = read_canaries(f)
    assert a.text == "pin: 0042" and a.digits == 4 and b.template == "call {secret} now" and b.repeats == 3
    assert c.text == trainer_format["secret"] and c.secret == trainer_format["digits"] and c.repeats == 7
    write_canaries(tmp_path / "again.jsonl", [a, b, c])
    assert [x.text for x in read_canaries(tmp_path / "again.jsonl")] == [a.text, b.text, c.text]
    f.write_text(json.dumps({"secret": "12ab", "template": "x {secret}"}) + "\n")
    r = run_cli("exposure", tmp_path, "--canaries", f)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "decimal digits" in r.stderr
    assert "Traceback" not in r.stderr
