"""The ``bcekit::`` operators: registered with ``torch.library`` so ``torch.compile`` sees them whole.

Each op takes tensors already checked by :mod:`bcekit.torch.functional` (shapes, dtypes) and owns only
what needs the data: the [0, 1] check of the probability loss and the arithmetic. The arithmetic is the
shared formulas of :mod:`bcekit._math`, evaluated here with torch operations in the compute precision
(float32 for half types, float64 for float32 and float64). A fake implementation gives ``torch.compile``
and the meta device the output's shape and dtype; the autograd formula is composed of differentiable torch
operations, so double backward works.

(No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the type hints.)
"""

from typing import Optional

import torch
from torch import Tensor

from bcekit import _extended, _math, _semantics
from bcekit._semantics import MEAN, NONE

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "compute_dtype"]


class _TorchOps:
    """The elementwise namespace :mod:`bcekit._math` computes with."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)

    @staticmethod
    def log1p(a: Tensor) -> Tensor:
        # log1p(a) rounds to a once |a| < 2**-54 (the next term, a**2 / 2, is below half an ulp); saying
        # so sidesteps torch's vectorised float64 log1p, which is ~1 ulp off on subnormal arguments.
        return torch.where(a.abs() < 2.0**-54, a, torch.log1p(a))

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


def _grad_scale(grad_output: Tensor, weight: Optional[Tensor], reduction: int, numel: int, dtype) -> Tensor:
    """What the elementwise derivative is multiplied by: grad_output, the weight, 1/n for the mean."""
    scale = grad_output.to(dtype)
    if weight is not None:
        scale = scale * weight.to(dtype)
    if reduction == MEAN:
        scale = scale / numel
    return scale


def _use_extended(result_dtype: torch.dtype, *tensors: Optional[Tensor]) -> bool:
    """float64 results of CPU tensors are evaluated in long double (see :mod:`bcekit._extended`)."""
    return (
        result_dtype == torch.float64
        and _extended.EXTENDED is not None
        and all(t is None or t.device.type == "cpu" for t in tensors)
    )


def _to_numpy(*tensors: Optional[Tensor]):
    return tuple(None if t is None else t.detach().resolve_conj().resolve_neg().numpy() for t in tensors)


def _from_numpy(array, like: Tensor) -> Tensor:
    return torch.from_numpy(array.copy()).to(like.device)


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
def binary_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int) -> Tensor:
    _check_probabilities(input, target)
    if _use_extended(input.dtype, input, target, weight):
        return _from_numpy(_extended.bce_loss(*_to_numpy(input, target, weight), reduction), input)
    dtype = compute_dtype(input.dtype)
    compensated = input.dtype == torch.float64
    loss = _math.bce_loss(_OPS, input.to(dtype), target.to(dtype), compensated)
    if weight is not None:
        loss = loss * weight.to(dtype)
    return _reduce(loss, reduction).to(input.dtype)


@binary_cross_entropy.register_fake
def _(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int) -> Tensor:
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
    input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], reduction: int
) -> Tensor:
    if _use_extended(target.dtype, input, target, weight, pos_weight):
        arrays = _to_numpy(input, target, weight, pos_weight)
        return _from_numpy(_extended.logits_loss(*arrays, reduction), input)
    dtype = compute_dtype(input.dtype, target.dtype)
    p = None if pos_weight is None else pos_weight.to(dtype)
    compensated = target.dtype == torch.float64  # the result's dtype
    loss = _math.logits_loss(_OPS, input.to(dtype), target.to(dtype), p, compensated)
    if weight is not None:
        loss = loss * weight.to(dtype)
    return _reduce(loss, reduction).to(target.dtype)


@binary_cross_entropy_with_logits.register_fake
def _(
    input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], reduction: int
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
