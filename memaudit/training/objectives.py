"""Training objectives as label transforms: each returns the labels a batch is trained on
(-100 = position excluded from the loss). The loss is always the mean over kept positions."""
from __future__ import annotations

import torch

IGNORE = -100


def standard_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Next-token labels: every real token is a target; padding is ignored."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE)


OBJECTIVES = {"standard": standard_labels}
