"""Trainers: standard next-token loss and the memorization mitigations compared against it."""
from .trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
