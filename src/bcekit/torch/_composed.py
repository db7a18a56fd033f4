"""The losses composed of torch operations: :mod:`bcekit._math`'s pipeline over torch tensors.

What every call the kernels do not serve runs (CUDA without Triton, mixed dtypes, the focal loss, other
broadcasts), and what the torch.func transforms, double backward, traced backwards and ONNX exports run:
differentiable torch operations in the compute precision (float32 for half types, float64 otherwise).
float64 results of CPU tensors are evaluated in ``long double`` by :mod:`bcekit._numpy_core` instead,
where a value (not a graph) is wanted.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bcekit import _math, _numpy_core, _semantics
from bcekit._math import LossSpec
from bcekit._semantics import MEAN

__all__ = [
    "compute_dtype",
    "composed_loss",
    "loss",
    "elementwise_gradients",
    "gradients",
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


OPS = _TorchOps()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for operands of these floating dtypes (rule: ``compute_precision``)."""
    bits = max(dtype.itemsize * 8 for dtype in dtypes)
    return torch.float32 if _semantics.compute_precision(bits) == 32 else torch.float64


def _cast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _use_extended(result_dtype: torch.dtype, *tensors: Tensor | None) -> bool:
    """float64 results of CPU tensors are evaluated in long double (see :mod:`bcekit._numpy_core`)."""
    return (
        result_dtype == torch.float64
        and _numpy_core.EXTENDED is not None
        and all(t is None or t.device.type == "cpu" for t in tensors)
    )


def _as_numpy(tensor: Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().resolve_conj().resolve_neg().numpy()


def loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    result_dtype: torch.dtype,
) -> Tensor:
    """The loss's value: in long double for float64 results of CPU tensors, else :func:`composed_loss`."""
    if _use_extended(result_dtype, input, target, weight, pos_weight):
        arrays = (_as_numpy(t) for t in (input, target, weight, pos_weight))
        value = _numpy_core.loss(spec, *arrays, compute=_numpy_core.EXTENDED).astype(np.float64)
        return torch.from_numpy(np.array(value, copy=True))
    return composed_loss(spec, input, target, weight, pos_weight, result_dtype)


def composed_loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    result_dtype: torch.dtype,
) -> Tensor:
    """The loss composed of torch operations only (no NumPy, no data-dependent Python): what the
    torch.func transforms can batch and differentiate (:mod:`bcekit.torch._transforms`), and what an ONNX
    export writes."""
    dtype = compute_dtype(input.dtype, target.dtype)
    values, kept = _math.elementwise_loss(
        OPS,
        spec,
        input.to(dtype),
        target.to(dtype),
        _cast(weight, dtype),
        _cast(pos_weight, dtype),
        compensated=result_dtype == torch.float64,
    )
    return _math.reduce(OPS, values, kept, spec.reduction).to(result_dtype)


def elementwise_gradients(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    need_input: bool,
    need_target: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Per-element derivatives in input and target, and what they are multiplied by for the reduction
    (1/count for ``'mean'``, else 1), all in the compute dtype and composed of differentiable torch ops."""
    dtype = compute_dtype(input.dtype, target.dtype)
    x, y = input.to(dtype), target.to(dtype)
    grad_input, grad_target = _math.elementwise_grads(
        OPS, spec, x, y, _cast(weight, dtype), _cast(pos_weight, dtype), need_input, need_target
    )
    reduction_scale = torch.ones((), dtype=dtype, device=x.device)
    if spec.reduction == MEAN:
        kept = _math.kept_mask(OPS, y, spec.ignore_index)
        # an all-ignored mean is NaN, but its gradient is zero, not NaN: it must not poison a training step
        reduction_scale = reduction_scale / (max(x.numel(), 1) if kept is None else kept.sum().clamp_min(1))
    return grad_input, grad_target, reduction_scale


def gradients(spec: LossSpec, ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Input and target gradients of a backward's saved ``(input, target, weight, pos_weight)``, composed
    of differentiable torch operations (so double backward works)."""
    input, target, weight, pos_weight = ctx.saved_tensors[:4]
    grad_input, grad_target, reduction_scale = elementwise_gradients(
        spec, input, target, weight, pos_weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    )
    scale = grad_output.to(reduction_scale.dtype) * reduction_scale
    if grad_input is not None:
        grad_input = (grad_input * scale).to(input.dtype)
    if grad_target is not None:
        grad_target = (grad_target * scale).to(target.dtype)
    return grad_input, grad_target


def check_probabilities(input: Tensor, target: Tensor, ignore_index: float | None) -> None:
    """torch's range errors of the probability loss (the kernels check in their pass instead)."""
    # NaN fails both comparisons, so it is reported as out of range, as torch does.
    if not bool(((input >= 0) & (input <= 1)).all()):
        raise _semantics.input_range_error()
    if not bool(_math.valid_targets(OPS, target, ignore_index).all()):
        raise _semantics.target_range_error()
