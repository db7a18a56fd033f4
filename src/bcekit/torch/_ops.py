"""The ``bcekit::`` operators: registered with ``torch.library`` so ``torch.compile`` sees them whole.

Each op takes tensors already checked by :mod:`bcekit.torch.functional` (shapes, dtypes, option values)
and owns only what needs the data: the [0, 1] check of the probability loss and the arithmetic. The
arithmetic is the shared pipeline of :mod:`bcekit._math`, evaluated here with torch operations in the
compute precision (float32 for half types, float64 otherwise); float64 results of CPU tensors are
evaluated in ``long double`` by :mod:`bcekit._numpy_core`. A fake implementation gives ``torch.compile``
and the meta device the output's shape and dtype; the autograd formulas are composed of differentiable
torch operations, so double backward works.

(No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the type hints, and
torch releases before PEP 604 support need ``Optional[...]``.)
"""

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from bcekit import _math, _numpy_core, _semantics
from bcekit._math import LossSpec
from bcekit._semantics import MEAN, NONE

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "compute_dtype",
    "composed_loss",
    "elementwise_gradients",
    "check_probabilities",
]


class _TorchOps:
    """The elementwise namespace :mod:`bcekit._math` computes with."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    abs = staticmethod(torch.abs)
    isinf = staticmethod(torch.isinf)
    isfinite = staticmethod(torch.isfinite)
    isnan = staticmethod(torch.isnan)
    where = staticmethod(torch.where)
    clamp_min = staticmethod(torch.clamp_min)
    clamp_max = staticmethod(torch.clamp_max)
    sum = staticmethod(torch.sum)

    @staticmethod
    def log1p(a: Tensor) -> Tensor:
        # log1p(a) rounds to a once |a| < 2**-54 (the next term, a**2 / 2, is below half an ulp); saying
        # so sidesteps torch's vectorised float64 log1p, which is ~1 ulp off on subnormal arguments.
        return torch.where(a.abs() < 2.0**-54, a, torch.log1p(a))

    @staticmethod
    def size(a: Tensor) -> int:
        return a.numel()


_OPS = _TorchOps()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for operands of these floating dtypes (rule: ``compute_precision``)."""
    bits = max(dtype.itemsize * 8 for dtype in dtypes)
    return torch.float32 if _semantics.compute_precision(bits) == 32 else torch.float64


def _cast(tensor: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if tensor is None else tensor.to(dtype)


def _use_extended(result_dtype: torch.dtype, *tensors: Optional[Tensor]) -> bool:
    """float64 results of CPU tensors are evaluated in long double (see :mod:`bcekit._numpy_core`)."""
    return (
        result_dtype == torch.float64
        and _numpy_core.EXTENDED is not None
        and all(t is None or t.device.type == "cpu" for t in tensors)
    )


def _as_numpy(tensor: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if tensor is None else tensor.detach().resolve_conj().resolve_neg().numpy()


def _loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    result_dtype: torch.dtype,
) -> Tensor:
    if _use_extended(result_dtype, input, target, weight, pos_weight):
        arrays = (_as_numpy(t) for t in (input, target, weight, pos_weight))
        value = _numpy_core.loss(spec, *arrays, compute=_numpy_core.EXTENDED).astype(np.float64)
        return torch.from_numpy(np.array(value, copy=True))
    return composed_loss(spec, input, target, weight, pos_weight, result_dtype)


def composed_loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    result_dtype: torch.dtype,
) -> Tensor:
    """The loss composed of torch operations only (no NumPy, no data-dependent Python): what the
    torch.func transforms can batch and differentiate (:mod:`bcekit.torch._transforms`)."""
    dtype = compute_dtype(input.dtype, target.dtype)
    values, kept = _math.elementwise_loss(
        _OPS,
        spec,
        input.to(dtype),
        target.to(dtype),
        _cast(weight, dtype),
        _cast(pos_weight, dtype),
        compensated=result_dtype == torch.float64,
    )
    return _math.reduce(_OPS, values, kept, spec.reduction).to(result_dtype)


def elementwise_gradients(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    need_input: bool,
    need_target: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """Per-element derivatives in input and target, and what they are multiplied by for the reduction
    (1/count for ``'mean'``, else 1), all in the compute dtype and composed of differentiable torch ops."""
    dtype = compute_dtype(input.dtype, target.dtype)
    x, y = input.to(dtype), target.to(dtype)
    grad_input, grad_target = _math.elementwise_grads(
        _OPS, spec, x, y, _cast(weight, dtype), _cast(pos_weight, dtype), need_input, need_target
    )
    reduction_scale = torch.ones((), dtype=dtype, device=x.device)
    if spec.reduction == MEAN:
        kept = _math.kept_mask(_OPS, y, spec.ignore_index)
        # an all-ignored mean is NaN, but its gradient is zero, not NaN: it must not poison a training step
        reduction_scale = reduction_scale / (max(x.numel(), 1) if kept is None else kept.sum().clamp_min(1))
    return grad_input, grad_target, reduction_scale


def _gradients(spec: LossSpec, ctx, grad_output: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Input and target gradients, composed of differentiable torch operations (so double backward works)."""
    input, target, weight, pos_weight = ctx.saved_tensors
    grad_input, grad_target, reduction_scale = elementwise_gradients(
        spec, input, target, weight, pos_weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    )
    scale = grad_output.to(reduction_scale.dtype) * reduction_scale
    if grad_input is not None:
        grad_input = (grad_input * scale).to(input.dtype)
    if grad_target is not None:
        grad_target = (grad_target * scale).to(target.dtype)
    return grad_input, grad_target


def _output_shape(input: Tensor, reduction: int):
    return input.shape if reduction == NONE else ()


def check_probabilities(input: Tensor, target: Tensor, ignore_index: Optional[float]) -> None:
    # NaN fails both comparisons, so it is reported as out of range, as torch does.
    if not bool(((input >= 0) & (input <= 1)).all()):
        raise _semantics.input_range_error()
    if not bool(_math.valid_targets(_OPS, target, ignore_index).all()):
        raise _semantics.target_range_error()


# --------------------------------------------------------------------------------------------------------
# Probability loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::binary_cross_entropy", mutates_args=())
def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    reduction: int,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> Tensor:
    check_probabilities(input, target, ignore_index)
    spec = LossSpec("bce", reduction, label_smoothing, ignore_index)
    return _loss(spec, input, target, weight, None, input.dtype)


@binary_cross_entropy.register_fake
def _(input, target, weight, reduction, label_smoothing, ignore_index):
    return input.new_empty(_output_shape(input, reduction))


def _bce_setup_context(ctx, inputs, output) -> None:
    input, target, weight, reduction, label_smoothing, ignore_index = inputs
    ctx.save_for_backward(input, target, weight, None)
    ctx.spec = LossSpec("bce", reduction, label_smoothing, ignore_index)


def _bce_backward(ctx, grad_output: Tensor):
    return (*_gradients(ctx.spec, ctx, grad_output), None, None, None, None)


binary_cross_entropy.register_autograd(_bce_backward, setup_context=_bce_setup_context)


# --------------------------------------------------------------------------------------------------------
# Logits loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::binary_cross_entropy_with_logits", mutates_args=())
def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: int,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> Tensor:
    spec = LossSpec("logits", reduction, label_smoothing, ignore_index)
    return _loss(spec, input, target, weight, pos_weight, target.dtype)


@binary_cross_entropy_with_logits.register_fake
def _(input, target, weight, pos_weight, reduction, label_smoothing, ignore_index):
    return target.new_empty(_output_shape(input, reduction))


def _logits_setup_context(ctx, inputs, output) -> None:
    input, target, weight, pos_weight, reduction, label_smoothing, ignore_index = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.spec = LossSpec("logits", reduction, label_smoothing, ignore_index)


def _logits_backward(ctx, grad_output: Tensor):
    return (*_gradients(ctx.spec, ctx, grad_output), None, None, None, None, None)


binary_cross_entropy_with_logits.register_autograd(_logits_backward, setup_context=_logits_setup_context)


# --------------------------------------------------------------------------------------------------------
# Sigmoid focal loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::sigmoid_focal_loss", mutates_args=())
def sigmoid_focal_loss(input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: int) -> Tensor:
    spec = LossSpec("focal", reduction, alpha=alpha, gamma=gamma)
    return _loss(spec, input, target, None, None, target.dtype)


@sigmoid_focal_loss.register_fake
def _(input, target, alpha, gamma, reduction):
    return target.new_empty(_output_shape(input, reduction))


def _focal_setup_context(ctx, inputs, output) -> None:
    input, target, alpha, gamma, reduction = inputs
    ctx.save_for_backward(input, target, None, None)
    ctx.spec = LossSpec("focal", reduction, alpha=alpha, gamma=gamma)


def _focal_backward(ctx, grad_output: Tensor):
    return (*_gradients(ctx.spec, ctx, grad_output), None, None, None)


sigmoid_focal_loss.register_autograd(_focal_backward, setup_context=_focal_setup_context)
