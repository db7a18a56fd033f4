"""torchvision's sigmoid focal loss written in torch operations: the reference the focal-loss tests
compare bcekit's with (torchvision itself is not a test dependency)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torchvision_focal(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float, reduction: str
) -> torch.Tensor:
    """``torchvision.ops.sigmoid_focal_loss``, line for line (``torchvision/ops/focal_loss.py``)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss
