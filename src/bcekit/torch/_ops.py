"""The ``bcekit::`` operators: registered with ``torch.library`` so ``torch.compile`` sees them whole.

Each op takes tensors already checked by :mod:`bcekit.torch.functional` (shapes, dtypes) and owns only
what needs the data: the [0, 1] check of the probability loss and the arithmetic. The arithmetic is the
shared formulas of :mod:`bcekit._math`, evaluated here with torch operations in the compute precision
(float32 for half types, float64 for float32 and float64). A fake implementation gives ``torch.compile``
and the meta device the output's shape and dtype; the autograd formula is composed of differentiable torch
operations, so double backward works.

(No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the type hints.)
"""

import torch
from torch import Tensor

from bcekit import _math, _semantics
from bcekit._semantics import MEAN, NONE

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "compute_dtype"]


class _TorchOps:
    """The elementwise namespace :mod:`bcekit._math` computes with."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    log1p = staticmethod(torch.log1p)
    abs = staticmethod(torch.abs)
    isinf = staticmethod(torch.isinf)
    isfinite = staticmethod(torch.isfinite)
    where = staticmethod(torch.where)
    clamp_min = staticmethod(torch.clamp_min)
    clamp_max = staticmethod(torch.clamp_max)


_OPS = _TorchOps()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for operands of these floating dtypes (rule: ``compute_precision``)."""
    bits = max(dtype.itemsize * 8 for dtype in dtypes)
    return torch.float32 if _semantics.compute_precision(bits) == 32 else torch.float64


def _reduce(loss: Tensor, reduction: int) -> Tensor:
    if reduction == NONE:
        return loss
    total = loss.sum()  # cascade-summed by torch, in the compute precision
    return total / loss.numel() if reduction == MEAN else total


def _grad_scale(grad_output: Tensor, weight: Tensor | None, reduction: int, numel: int, dtype) -> Tensor:
    """What the elementwise derivative is multiplied by: grad_output, the weight, 1/n for the mean."""
    scale = grad_output.to(dtype)
    if weight is not None:
        scale = scale * weight.to(dtype)
    if reduction == MEAN:
        scale = scale / numel
    return scale


def _check_probabilities(input: Tensor, target: Tensor) -> None:
    # NaN fails both comparisons, so it is reported as out of range, as torch does.
    if not bool(((input >= 0) & (input <= 1)).all()):
        raise _semantics.input_range_error()
    if not bool(((target >= 0) & (target <= 1)).all()):
        raise _semantics.target_range_error()


# --------------------------------------------------------------------------------------------------------
# Probability loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::binary_cross_entropy", mutates_args=())
def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, reduction: int) -> Tensor:
    _check_probabilities(input, target)
    dtype = compute_dtype(input.dtype)
    compensated = input.dtype == torch.float64
    loss = _math.bce_loss(_OPS, input.to(dtype), target.to(dtype), compensated)
    if weight is not None:
        loss = loss * weight.to(dtype)
    return _reduce(loss, reduction).to(input.dtype)


@binary_cross_entropy.register_fake
def _(input: Tensor, target: Tensor, weight: Tensor | None, reduction: int) -> Tensor:
    return input.new_empty(input.shape if reduction == NONE else ())


def _bce_setup_context(ctx, inputs, output) -> None:
    input, target, weight, reduction = inputs
    ctx.save_for_backward(input, target, weight)
    ctx.reduction = reduction


def _bce_backward(ctx, grad_output: Tensor):
    input, target, weight = ctx.saved_tensors
    dtype = compute_dtype(input.dtype)
    scale = _grad_scale(grad_output, weight, ctx.reduction, input.numel(), dtype)
    x, y = input.to(dtype), target.to(dtype)
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_input = (_math.bce_grad_input(_OPS, x, y) * scale).to(input.dtype)
    if ctx.needs_input_grad[1]:
        grad_target = (_math.bce_grad_target(_OPS, x) * scale).to(target.dtype)
    return grad_input, grad_target, None, None


binary_cross_entropy.register_autograd(_bce_backward, setup_context=_bce_setup_context)


# --------------------------------------------------------------------------------------------------------
# Logits loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::binary_cross_entropy_with_logits", mutates_args=())
def binary_cross_entropy_with_logits(
    input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None, reduction: int
) -> Tensor:
    dtype = compute_dtype(input.dtype, target.dtype)
    p = None if pos_weight is None else pos_weight.to(dtype)
    compensated = target.dtype == torch.float64  # the result's dtype
    loss = _math.logits_loss(_OPS, input.to(dtype), target.to(dtype), p, compensated)
    if weight is not None:
        loss = loss * weight.to(dtype)
    return _reduce(loss, reduction).to(target.dtype)


@binary_cross_entropy_with_logits.register_fake
def _(
    input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None, reduction: int
) -> Tensor:
    return target.new_empty(input.shape if reduction == NONE else ())


def _logits_setup_context(ctx, inputs, output) -> None:
    input, target, weight, pos_weight, reduction = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.reduction = reduction


def _logits_backward(ctx, grad_output: Tensor):
    input, target, weight, pos_weight = ctx.saved_tensors
    dtype = compute_dtype(input.dtype, target.dtype)
    scale = _grad_scale(grad_output, weight, ctx.reduction, input.numel(), dtype)
    x, y = input.to(dtype), target.to(dtype)
    p = None if pos_weight is None else pos_weight.to(dtype)
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_input = (_math.logits_grad_input(_OPS, x, y, p) * scale).to(input.dtype)
    if ctx.needs_input_grad[1]:
        grad_target = (_math.logits_grad_target(_OPS, x, p) * scale).to(target.dtype)
    return grad_input, grad_target, None, None, None


binary_cross_entropy_with_logits.register_autograd(_logits_backward, setup_context=_logits_setup_context)
