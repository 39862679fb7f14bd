"""Trainers: standard next-token loss and the memorization mitigations compared against it."""
from ..canaries import make_canaries
from .sinks import export_release_model
from .trainer import TrainConfig, TrainResult, train, train_or_reuse

__all__ = ["TrainConfig", "TrainResult", "train", "train_or_reuse", "export_release_model", "make_canaries"]
