"""Capacity experiments (Morris et al., arXiv 2505.24832): how many bits a model can store, and what follows.

- `command`: `memaudit capacity`'s settings, summaries and Python entry, `capacity` (the grid, or `text=`).
- `random_data`: the random-token grid, bits per parameter with its plateau and saturation checks.
- `text`: fixed models on growing amounts of real text, double descent and the MIA law (`memaudit capacity --text`).
- `laws`: the published capacity figures (3.6 bits/parameter) and the MIA scaling law (fit, predict).
- `ensemble_model`: many GPT-2 models of one shape as one module (stacked parameters, fused kernels, HF export).
- `ensemble_train`: training that ensemble (loop, optimizer, plateau rule, checkpoints, compile settings).
- `allocator`: glibc malloc settings the training process runs with.
"""
from .command import CapacityResult, CapacitySettings, CapacitySummary, capacity
from .ensemble_model import EnsembleGPT, GPTShape
from .ensemble_train import EnsembleConfig, ModelRecord, check_compile_setting, train_ensemble
from .laws import (LAW_SOURCES, LAWS, PUBLISHED_ALPHA, PUBLISHED_ALPHA_BF16, PUBLISHED_ALPHA_FP32, PUBLISHED_CHECKS,
                   PUBLISHED_CONSTANTS, fit_mia_law, mia_law, predict_mia_f1)
from .random_data import (PAPER_GRID, BitsPerParamFit, RandomCapacitySummary, capacities, fit_bits_per_param,
                          model_shape, random_dataset)
from .text import TextCapacitySummary, best_f1

__all__ = [
    "capacity", "CapacitySettings", "CapacityResult", "CapacitySummary", "RandomCapacitySummary",
    "TextCapacitySummary", "BitsPerParamFit",
    "EnsembleGPT", "GPTShape", "EnsembleConfig", "ModelRecord", "check_compile_setting", "train_ensemble",
    "LAW_SOURCES", "LAWS", "PUBLISHED_ALPHA", "PUBLISHED_ALPHA_BF16", "PUBLISHED_ALPHA_FP32", "PUBLISHED_CHECKS",
    "PUBLISHED_CONSTANTS", "fit_mia_law", "mia_law", "predict_mia_f1",
    "PAPER_GRID", "capacities", "fit_bits_per_param", "model_shape", "random_dataset", "best_f1",
]
