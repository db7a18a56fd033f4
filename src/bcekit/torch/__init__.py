"""PyTorch backend: drop-in BCE losses with torch's signatures, exact at the edges.

>>> import torch
>>> import bcekit.torch as bce
>>> bce.binary_cross_entropy_with_logits(torch.zeros(3), torch.tensor([0.0, 1.0, 0.5]))
tensor(0.6931)
"""

from bcekit.torch._range_check import check_errors, set_sync_checks
from bcekit.torch.functional import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    linear_binary_cross_entropy_with_logits,
    linear_topk,
    sigmoid_focal_loss,
)
from bcekit.torch.modules import BCELoss, BCEWithLogitsLoss, LinearBCEWithLogitsLoss, SigmoidFocalLoss

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "SigmoidFocalLoss",
    "linear_binary_cross_entropy_with_logits",
    "linear_topk",
    "LinearBCEWithLogitsLoss",
    "check_errors",
    "set_sync_checks",
]
