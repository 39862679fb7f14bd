"""The Python API: one function per command, each taking its settings dataclass or the same fields as keywords.

    from memaudit.api import extract, mia
    res = extract(model_dir="models/standard", data="train.jsonl", prefix=32, suffix=32)
    res.summary["exact_rate"], res.path, res.samples

Every function checks its inputs before any work (one MemauditError line each), writes the run directory the
command line would write (`out=`, default runs/<command>-<time>), and returns a result holding `summary` (what
summary.json holds) and the command's tables. The settings dataclasses list every option with its default.
"""
from .capacity import CapacityResult, CapacitySettings, capacity
from .exposure import ExposureResult, ExposureSettings, exposure
from .extraction import ExtractResult, ExtractSettings, extract
from .membership import MiaResult, MiaSettings, mia
from .memorization import MemorizationResult, MemorizationSettings, memorization
from .report import ReportResult, ReportSettings, report
from .risk import RiskResult, RiskSettings, risk
from .training import TrainConfig, TrainResult, train

__all__ = [
    "extract", "ExtractSettings", "ExtractResult",
    "mia", "MiaSettings", "MiaResult",
    "memorization", "MemorizationSettings", "MemorizationResult",
    "exposure", "ExposureSettings", "ExposureResult",
    "capacity", "CapacitySettings", "CapacityResult",
    "train", "TrainConfig", "TrainResult",
    "risk", "RiskSettings", "RiskResult",
    "report", "ReportSettings", "ReportResult",
]
