"""memaudit: audit and measure what language models memorize.

The public Python API. Every CLI command is a thin shell over one of these functions.
"""
from .version import __version__  # noqa: E402

from .data import read_documents, tokenize, train_tokenizer, write_documents  # noqa: E402
from .samples import make_windows  # noqa: E402
from .errors import MemauditError  # noqa: E402
from .models import LoadedModel, build_config, load_model  # noqa: E402
from .scoring import TokenStats, iter_scored_batches, score  # noqa: E402
from .training import TrainConfig, TrainResult, train  # noqa: E402
from .training import export_release_model  # noqa: E402
from .canaries import read_canaries  # noqa: E402

__all__ = [
    "__version__", "MemauditError", "LoadedModel", "load_model", "build_config", "read_documents",
    "write_documents", "tokenize", "make_windows", "train_tokenizer", "TokenStats", "score",
    "iter_scored_batches", "TrainConfig", "TrainResult", "train",
]
__all__ += ["export_release_model", "read_canaries"]
from .membership import MiaResult, mia  # noqa: E402
from .attacks import ATTACKS  # noqa: E402

__all__ += ["mia", "MiaResult", "ATTACKS"]
from .extraction import extract, extract_windows  # noqa: E402

__all__ += ["extract", "extract_windows"]
