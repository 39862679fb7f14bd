"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"), METHODS.md section 6.

A canary (memaudit.canaries: the record, its file, making them) is a template with a random secret of `digits`
decimal digits filled in. The candidate space R is every digit string of that length (|R| = 10**digits).
Candidates are ranked by the model's log-likelihood of the whole canary text (BOS + tokens, summed over every
token, from the one scoring engine); rank 1 is the most likely. exposure = log2 |R| - log2 rank, in bits: 0 when the secret is the least likely candidate, log2 |R|
when it is the most likely.

- Exact: when |R| <= `exact_limit` every candidate is scored; rank = 1 + #{r != secret : ll(r) > ll(secret)}
  (an exact tie goes to the secret; with float log-likelihoods of distinct token sequences ties are rare).
- Estimated (|R| larger): `sample_size` candidates other than the secret are drawn uniformly without
  replacement; with k of them more likely than the secret, rank_hat = 1 + (|R| - 1) * k / M, an unbiased
  estimate of the rank. A 95% Clopper-Pearson interval on k / M gives an interval on the exposure. When k = 0
  the sampled rank is 1 (exposure log2 |R|, the most it can be) and only the interval's lower end is
  informative, so the skew-normal estimate of Carlini 2019 (section 4.3: fit a skew-normal to the sampled
  log-likelihoods, exposure = -log2 P(ll > ll(secret)), capped at log2 |R|) is reported beside it;
  `estimator` picks which one is the headline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypedDict

import numpy as np
import pandas as pd

from . import checks, distributed
from .canaries import Canary, default_canary_file, read_canaries
from .data import file_hash, tokenize
from .devices import check_placement, placement
from .errors import MemauditError
from .figures import pyplot
from .models import LoadedModel, first_token, load_model, weights_hash
from .progress import progress_bar
from .rundir import RunDir, check_output, summary_header
from .scoring import score
from .settings import settings_from

ESTIMATORS = ("sampling", "skewnorm")
MAX_CANDIDATES = 10**8  # each candidate is one scored sequence


def random_secret(digits: int, rng: np.random.Generator) -> str:
    return str(int(rng.integers(0, 10 ** digits))).zfill(digits)


# ---- the arithmetic (no model): exposure from a rank, from a sample, from a skew-normal fit ----

def exposure_from_rank(rank: float, space_size: int) -> float:
    """log2 |R| - log2 rank (bits); rank 1 is the most likely candidate."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank {rank} outside [1, {space_size}]")
    return math.log2(space_size) - math.log2(rank)


def exact_rank(secret_ll: float, other_ll: np.ndarray) -> int:
    """1 + the number of other candidates strictly more likely than the secret."""
    return 1 + int(np.count_nonzero(np.asarray(other_ll) > secret_ll))


def sampled_exposure(secret_ll: float, sample_ll: np.ndarray, space_size: int,
                     confidence: float = 0.95) -> dict[str, float]:
    """Exposure from M uniformly sampled other candidates: rank_hat = 1 + (|R|-1) k/M, with a
    Clopper-Pearson interval on k/M turned into an exposure interval."""
    from scipy.stats import beta  # lazy: scipy.stats is slow to import and only the estimates need it

    m = len(sample_ll)
    if m == 0:
        raise ValueError("no sampled candidates")
    k = int(np.count_nonzero(np.asarray(sample_ll) > secret_ll))
    frac = k / m
    a = 1 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, m - k + 1))
    hi = 1.0 if k == m else float(beta.ppf(1 - a / 2, k + 1, m - k))
    rank = 1 + (space_size - 1) * frac
    return {"rank": rank, "exposure": exposure_from_rank(rank, space_size), "more_likely_in_sample": k,
            "sample_size": m,
            "exposure_low": exposure_from_rank(1 + (space_size - 1) * hi, space_size),
            "exposure_high": exposure_from_rank(1 + (space_size - 1) * lo, space_size)}


def skewnorm_exposure(secret_ll: float, sample_ll: np.ndarray, space_size: int) -> float:
    """Carlini 2019, section 4.3: fit a skew-normal to the candidates' log-likelihoods and take
    -log2 P(ll > ll(secret)), capped at log2 |R| (no estimate can exceed the exact maximum)."""
    from scipy.stats import skewnorm  # lazy: scipy.stats is slow to import and only the estimates need it

    params = skewnorm.fit(np.asarray(sample_ll, dtype=np.float64))
    tail = float(skewnorm.logsf(secret_ll, *params)) / math.log(2)  # log2 P(ll > secret)
    return float(min(math.log2(space_size), max(0.0, -tail)))


# ---- the model part: log-likelihoods of filled-in canaries through the one scoring engine ----

def canary_log_likelihoods(loaded: LoadedModel, texts: Sequence[str], *, batch_size: int | str = "auto",
                           on_progress=None) -> np.ndarray:
    """Sum of ln p over every token of each text (BOS-conditioned), in nats, via memaudit.scoring.score. Under
    torchrun each rank scores every world-th text and every rank gets them all."""
    tok = loaded.tokenizer
    bos = first_token(tok)
    mine = distributed.shard_indices(len(texts))
    seqs = tokenize(tok, [texts[i] for i in mine])
    world = distributed.world_size()
    stats = score(loaded.model, seqs, batch_size=batch_size, bos_id=bos, pad_id=tok.pad_token_id or 0,
                  on_progress=(lambda k: on_progress(k * world)) if on_progress else None,
                  max_length=loaded.max_length)
    local = [float(s.logprob.astype(np.float64).sum()) for s in stats]
    return np.array(distributed.broadcast_object(distributed.gather_sharded(local, mine, len(texts))))


def _candidate_strings(numbers: np.ndarray, digits: int) -> list[str]:
    return [str(int(n)).zfill(digits) for n in numbers]


def canary_exposure(loaded: LoadedModel, canary: Canary, *, exact_limit: int = 100_000, sample_size: int = 5_000,
                    estimator: str = "sampling", seed: int = 0, batch_size: int | str = "auto",
                    force_method: str | None = None, on_progress=None) -> dict:
    """Exposure of one canary: exact over all 10**digits candidates when that is <= `exact_limit`,
    otherwise estimated from `sample_size` sampled candidates (`force_method` overrides: exact|estimated)."""
    if estimator not in ESTIMATORS:
        raise MemauditError(f"unknown --estimator {estimator!r}: use sampling or skewnorm")
    space = 10 ** canary.digits
    method = force_method or ("exact" if space <= exact_limit else "estimated")
    secret_n = int(canary.secret)
    rng = np.random.default_rng([seed, secret_n, canary.digits])
    if method == "exact":
        others = np.array([n for n in range(space) if n != secret_n], dtype=np.int64)
    elif method == "estimated":
        m = min(sample_size, space - 1)
        if m < 1:
            raise MemauditError("--sample-size must be >= 1")
        draw = rng.choice(space - 1, size=m, replace=False)  # indices among the |R| - 1 other candidates
        others = np.where(draw >= secret_n, draw + 1, draw)
    else:
        raise MemauditError(f"unknown method {method!r}: use exact or estimated")
    texts = [canary.text] + [canary.fill(s) for s in _candidate_strings(others, canary.digits)]
    ll = canary_log_likelihoods(loaded, texts, batch_size=batch_size, on_progress=on_progress)
    secret_ll, other_ll = float(ll[0]), ll[1:]
    row = {"id": canary.id, "secret": canary.secret, "digits": canary.digits, "repeats": canary.repeats,
           "text": canary.text, "log_likelihood_nats": secret_ll, "space_size": space, "method": method,
           "candidates_scored": len(other_ll) + 1}
    if method == "exact":
        rank = exact_rank(secret_ll, other_ll)
        row.update(rank=float(rank), exposure=exposure_from_rank(rank, space), exposure_low=None,
                   exposure_high=None, exposure_skewnorm=skewnorm_exposure(secret_ll, other_ll, space),
                   estimator="exact enumeration")
    else:
        est = sampled_exposure(secret_ll, other_ll, space)
        sn = skewnorm_exposure(secret_ll, other_ll, space)
        row.update(rank=est["rank"], exposure_low=est["exposure_low"], exposure_high=est["exposure_high"],
                   exposure_sampling=est["exposure"], exposure_skewnorm=sn,
                   exposure=est["exposure"] if estimator == "sampling" else sn,
                   estimator=("sampled rank: 1 + (|R|-1) k/M" if estimator == "sampling"
                              else "skew-normal fit (Carlini 2019 s4.3)"))
    return row


def control_canaries(canaries: Sequence[Canary], n: int, seed: int) -> list[Canary]:
    """Fresh random secrets in the same templates, never inserted: the exposure an unseen secret gets."""
    rng = np.random.default_rng([seed, 7919])
    used = {(c.template, c.secret) for c in canaries}
    out = []
    templates = sorted({(c.template, c.digits) for c in canaries})
    for i in range(n):
        template, digits = templates[i % len(templates)]
        for _ in range(100):
            s = random_secret(digits, rng)
            if (template, s) not in used:
                break
        used.add((template, s))
        out.append(Canary(id=f"control-{i}", template=template, secret=s, repeats=0))
    return out


@dataclass(kw_only=True)
class ExposureSettings:
    """Every option of `memaudit exposure`: the CLI flags' names and defaults (the CLI only parses)."""
    model_dir: str | Path  # a model trained with canaries
    canaries: str | Path | None = None  # None: MODEL_DIR/canaries.jsonl (what `memaudit train --canaries` wrote)
    controls: int = 5  # fresh secrets in the same templates, never trained on: the baseline
    exact_limit: int = 100_000  # enumerate every candidate when 10**digits is at most this
    sample_size: int = 5_000  # otherwise, candidates sampled without replacement
    estimator: str = "sampling"  # the headline when sampling: sampling or skewnorm
    seed: int = 0
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # auto, balanced, cpu-offload: accelerate places the model (None: all on device)
    max_memory: str | None = None  # device_map's limit per device: "0=20GiB,cpu=60GiB", or one size for each
    quantize: str | None = None  # 8bit or 4bit through bitsandbytes (None: full precision)
    out: str | Path | None = None  # None: RunDir.default_out("exposure")
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def canary_file(self) -> Path:
        return Path(self.canaries) if self.canaries is not None else default_canary_file(self.model_dir)

    def validate(self) -> None:
        """Cheap checks before anything is loaded: one MemauditError line each."""
        checks.integer("--controls", self.controls, low=0, high=10_000)
        checks.integer("--exact-limit", self.exact_limit, high=MAX_CANDIDATES)
        checks.integer("--sample-size", self.sample_size, high=MAX_CANDIDATES)
        checks.choice("--estimator", self.estimator, ESTIMATORS)
        checks.seed(self.seed)
        checks.batch_size(self.batch_size)
        checks.device(self.device)
        check_placement(self.device_map, self.max_memory, self.quantize, self.device)
        if self.canaries is None and not self.canary_file().is_file():
            raise MemauditError(f"no canaries.jsonl in {self.model_dir}: pass --canaries FILE")
        checks.readable_file(self.canary_file(), "canary file")


class ExposureSummary(TypedDict, total=False):
    """summary.json of `memaudit exposure` (schema rundir.SUMMARY_SCHEMA_VERSION); exposures in bits."""
    schema_version: int
    command: str  # "exposure"
    n_canaries: int  # canaries inserted into training (repeats > 0, or not stated)
    mean_exposure_bits: float  # over the inserted canaries
    max_exposure_bits: float
    max_possible_exposure_bits: float  # log2 |R| of the largest candidate space among the inserted canaries
    mean_control_exposure_bits: float | None  # over the never-inserted secrets; None without any
    n_controls: int  # fresh control secrets plus listed canaries with repeats 0
    methods: list[str]  # "exact" and/or "estimated"
    estimator: str  # the --estimator setting


@dataclass
class ExposureResult:
    summary: ExposureSummary  # exactly what summary.json holds
    path: Path | None  # the run directory
    canaries: pd.DataFrame  # samples.parquet: one row per canary and control (canary_exposure's fields, inserted)


def exposure(settings: ExposureSettings | None = None, /, **options: Any) -> ExposureResult | None:
    """Canary exposure (Carlini et al. 2019): for each canary (and `controls` never-inserted secrets) the rank of
    its secret among all, or sampled, candidates of its template, as log2 |R| - log2 rank bits. Takes an
    ExposureSettings or its fields as keywords; writes a run directory (samples.parquet, summary.json,
    exposure.png) and returns its summary, path and per-canary table. Under torchrun every rank scores a share of
    each canary's candidates and rank 0 writes; the other ranks return None."""
    s = settings_from(ExposureSettings, settings, options)
    s.validate()
    # The canaries are read before the model directory is checked: errors keep the order they have always had.
    cans = _read_inserted(s.canary_file())
    checks.model_dir(s.model_dir, allow_pickle=s.allow_pickle)
    device = distributed.start(s.device)
    out = s.out or distributed.broadcast_object(RunDir.default_out("exposure"))
    if distributed.is_main():
        check_output(out, "exposure", inputs=[s.model_dir, s.canary_file()], overwrite=s.overwrite)
    loaded = load_model(s.model_dir, device=device, dtype=s.dtype, allow_pickle=s.allow_pickle,
                        trust_remote_code=s.trust_remote_code, **placement(s))
    run = _open_run(s, out) if distributed.is_main() else None
    df = _compute(s, loaded, cans)
    if run is None:  # under torchrun rank 0 writes
        return None
    return _write(s, run, df)


def _read_inserted(canary_file: Path) -> list[Canary]:
    """The canary file's records; at least one must have been inserted into training."""
    cans = read_canaries(canary_file)
    if all(c.repeats == 0 for c in cans):
        raise MemauditError(f"{canary_file}: every canary has repeats 0: none was inserted into training")
    return cans


def _open_run(s: ExposureSettings, out: str | Path) -> RunDir:
    """The run directory and its config.json (keep these settings as they are: runs record them)."""
    settings = {"controls": s.controls, "exact_limit": s.exact_limit, "sample_size": s.sample_size,
                "estimator": s.estimator, "seed": s.seed, "batch_size": s.batch_size, "device": s.device,
                "dtype": s.dtype}
    inputs = {"model": str(s.model_dir), "model_weights_sha256": weights_hash(s.model_dir),
              "canaries": str(s.canary_file()), "canaries_sha256": file_hash(s.canary_file())}
    return RunDir(out, "exposure", settings, inputs=inputs, overwrite=s.overwrite)


def _compute(s: ExposureSettings, loaded: LoadedModel, cans: list[Canary]) -> pd.DataFrame:
    """One row per canary, then per control secret (canary_exposure's fields and `inserted`)."""
    every = list(cans) + control_canaries(cans, s.controls, s.seed)
    total = sum(10 ** c.digits if 10 ** c.digits <= s.exact_limit else min(s.sample_size, 10 ** c.digits - 1) + 1
                for c in every)
    rows = []
    with progress_bar(total, "exposure") as advance:
        for i, c in enumerate(every):
            row = canary_exposure(loaded, c, exact_limit=s.exact_limit, sample_size=s.sample_size,
                                  estimator=s.estimator, seed=s.seed, batch_size=s.batch_size, on_progress=advance)
            # a canary listed with repeats == 0 was kept out of training on purpose: it is a control too
            row["inserted"] = i < len(cans) and (c.repeats is None or c.repeats > 0)
            rows.append(row)
    return pd.DataFrame(rows)


def _write(s: ExposureSettings, run: RunDir, df: pd.DataFrame) -> ExposureResult:
    run.write_samples(df)
    inserted = df[df["inserted"]]
    control = df[~df["inserted"]]
    summary = ExposureSummary(
        **summary_header("exposure"),
        n_canaries=int(len(inserted)),
        mean_exposure_bits=float(inserted["exposure"].mean()),
        max_exposure_bits=float(inserted["exposure"].max()),
        max_possible_exposure_bits=float(math.log2(inserted["space_size"].max())),
        mean_control_exposure_bits=float(control["exposure"].mean()) if len(control) else None,
        n_controls=int(len(control)),
        methods=sorted(df["method"].unique().tolist()),
        estimator=s.estimator,
    )
    run.write_summary(summary)
    _exposure_figure(run, df)
    run.finish()
    return ExposureResult(summary=summary, path=run.path, canaries=df)


def _exposure_figure(run: RunDir, df: pd.DataFrame) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{'canary' if ins else 'control'} {i}".replace("control control-", "control ")
              for i, ins in zip(df["id"], df["inserted"])]
    colors = ["#d62728" if ins else "#7f7f7f" for ins in df["inserted"]]
    ax.barh(range(len(df)), df["exposure"], color=colors)
    ax.axvline(float(np.log2(df["space_size"].max())), color="k", ls="--", lw=1, label="log2 |R| (maximum)")
    ax.set_yticks(range(len(df)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("exposure (bits)")
    ax.set_ylabel("canary or control secret")
    ax.set_title("Canary exposure: inserted (red) vs never-seen controls (grey)")
    ax.legend(fontsize=7, loc="lower right")
    run.save_figure(fig, "exposure.png")
