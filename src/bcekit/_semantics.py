"""The framework-free rules of the BCE loss family: one home for every fact a backend must agree on.

This module knows nothing of NumPy, torch or JAX. Backends describe their arguments with :class:`ArraySpec`
(shape, dtype kind and dtype name) and call the checks here, in the order torch 2.x performs them, so that
every backend raises the same exception type with the same text for the same mistake.

Reductions use torch's enum (``torch/nn/_reduction.py``): 0 = ``'none'``, 1 = ``'mean'``, 2 = ``'sum'``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = [
    "NONE",
    "MEAN",
    "SUM",
    "LOG_CLAMP",
    "GRAD_EPSILON",
    "ArraySpec",
    "reduction_enum",
    "legacy_reduction",
    "resolve_reduction",
    "check_binary_cross_entropy",
    "check_binary_cross_entropy_with_logits",
    "weight_requires_grad_error",
    "input_range_error",
    "target_range_error",
    "compute_precision",
    "check_label_smoothing",
    "check_focal_parameters",
    "check_linear_binary_cross_entropy",
    "linear_chunk_size",
]

NONE, MEAN, SUM = 0, 1, 2

#: The probability loss clamps each log term at >= -100 (torch's choice, see the BCELoss docs):
#: a prediction of exactly 0 or 1 costs at most 100 per element instead of infinity.
LOG_CLAMP = -100.0
#: The probability loss's input gradient is (x - y) / max(x (1 - x), GRAD_EPSILON), torch's formula,
#: which keeps it finite at x = 0 and x = 1. torch's constant is the float32 nearest to 1e-12 (seen in
#: float64: at x = 1, y = 0 its gradient is 1000000003995.8029, not 1e12), so ours is too.
GRAD_EPSILON = 9.999999960041972e-13

ShapeFormatter = Callable[[tuple[int, ...]], str]


class ArraySpec(NamedTuple):
    """What the rules need to know of an array: its shape and its dtype.

    ``kind`` is ``'f'`` (real floating), ``'i'`` (integer), ``'b'`` (bool) or ``'c'`` (complex).
    ``name`` is the dtype's name as the backend prints it in messages (torch: ``Float``; NumPy: ``float32``).
    ``bits`` is the width of a floating dtype's significand plus exponent; it orders floating precisions.
    """

    shape: tuple[int, ...]
    kind: str
    name: str
    bits: int = 0


def _default_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


# --------------------------------------------------------------------------------------------------------
# Reductions, including the legacy size_average / reduce pair
# --------------------------------------------------------------------------------------------------------


def reduction_enum(reduction: str) -> int:
    """Map a reduction string to torch's enum, with torch's warning for ``'elementwise_mean'``."""
    if reduction == "none":
        return NONE
    if reduction == "mean":
        return MEAN
    if reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            UserWarning,
            stacklevel=3,
        )
        return MEAN
    if reduction == "sum":
        return SUM
    raise ValueError(f"{reduction} is not a valid value for reduction")


def legacy_reduction(size_average: bool | None, reduce: bool | None, emit_warning: bool = True) -> str:
    """torch's truth table for the deprecated ``size_average`` / ``reduce`` pair.

    ==============  ========  ==========
    size_average    reduce    reduction
    ==============  ========  ==========
    None / True     None/True ``'mean'``
    False           None/True ``'sum'``
    any             False     ``'none'``
    ==============  ========  ==========
    """
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        result = "mean"
    elif reduce:
        result = "sum"
    else:
        result = "none"
    if emit_warning:
        warnings.warn(
            f"size_average and reduce args will be deprecated, please use reduction='{result}' instead.",
            UserWarning,
            stacklevel=3,
        )
    return result


def resolve_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> int:
    """The functionals' rule: either legacy argument, when given, overrides ``reduction``."""
    if size_average is not None or reduce is not None:
        return reduction_enum(legacy_reduction(size_average, reduce))
    return reduction_enum(reduction)


# --------------------------------------------------------------------------------------------------------
# Broadcasting, with torch's two families of error text
# --------------------------------------------------------------------------------------------------------


def _infer_size(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """Broadcast two shapes the way TensorIterator does (``a`` and ``b`` named as in its message)."""
    ndim = max(len(a), len(b))
    out = [0] * ndim
    for i in range(ndim - 1, -1, -1):
        offset = ndim - 1 - i
        dim_a, dim_b = len(a) - 1 - offset, len(b) - 1 - offset
        size_a = a[dim_a] if dim_a >= 0 else 1
        size_b = b[dim_b] if dim_b >= 0 else 1
        if not (size_a == size_b or size_a == 1 or size_b == 1):
            raise RuntimeError(
                f"The size of tensor a ({size_a}) must match the size of tensor b ({size_b}) "
                f"at non-singleton dimension {i}"
            )
        out[i] = size_b if size_a == 1 else size_a
    return tuple(out)


def _broadcast_shapes(shapes: Sequence[tuple[int, ...]], format_shape: ShapeFormatter) -> tuple[int, ...]:
    """Broadcast shapes the way ``torch.broadcast_shapes`` does, with its error text."""
    common = [1] * max([0, *(len(s) for s in shapes)])  # (torch.compile cannot trace max's default=)
    for arg_index, shape in enumerate(shapes):
        for idx in range(-1, -1 - len(shape), -1):
            if shape[idx] == common[idx]:
                continue
            if common[idx] == 1:
                common[idx] = shape[idx]
            if shape[idx] == 1:
                continue
            if common[idx] != shape[idx]:
                raise RuntimeError(
                    f"Attempting to broadcast a dimension of length {shape[idx]} at {idx}! "
                    f"Mismatching argument at index {arg_index} had {format_shape(shape)}; but expected "
                    f"shape should be broadcastable to {common}"
                )
    return tuple(common)


def _check_fits_output(output_shape: tuple[int, ...], other_shape: tuple[int, ...]) -> None:
    """An operand may broadcast *to* the loss's shape, never widen it (an in-place op in torch)."""
    shape = _infer_size(output_shape, other_shape)
    if shape != tuple(output_shape):
        raise RuntimeError(
            f"output with shape {list(output_shape)} doesn't match the broadcast shape {list(shape)}"
        )


# --------------------------------------------------------------------------------------------------------
# Per-loss argument checks, in torch's order
# --------------------------------------------------------------------------------------------------------


def _not_implemented(kernel: str, spec: ArraySpec) -> NotImplementedError:
    return NotImplementedError(f"\"{kernel}\" not implemented for '{spec.name}'")


def check_binary_cross_entropy(
    input: ArraySpec,
    target: ArraySpec,
    weight: ArraySpec | None,
    format_shape: ShapeFormatter = _default_shape,
) -> ArraySpec:
    """Check the probability loss's arguments; return the spec of the result's dtype (the input's).

    Value checks (probabilities in [0, 1]) need the data and are the backends' job, after these.
    """
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"Using a target size ({format_shape(target.shape)}) that is different to the input size "
            f"({format_shape(input.shape)}) is deprecated. Please ensure they have the same size."
        )
    if weight is not None:
        full = _broadcast_shapes((tuple(target.shape), tuple(weight.shape)), format_shape)
    if target.name != input.name:
        raise RuntimeError(f"Found dtype {target.name} but expected {input.name}")
    if input.kind != "f":
        raise _not_implemented("binary_cross_entropy", input)
    if weight is not None:
        _check_fits_output(tuple(input.shape), full)
    return input


def check_binary_cross_entropy_with_logits(
    input: ArraySpec,
    target: ArraySpec,
    weight: ArraySpec | None,
    pos_weight: ArraySpec | None,
    format_shape: ShapeFormatter = _default_shape,
) -> ArraySpec:
    """Check the logits loss's arguments; return the spec of the result's dtype.

    torch computes ``(1 - target) * input - log_weight * log_sigmoid(input)`` into a buffer of the target's
    dtype, so with two different floating dtypes the result has the *target's* dtype; we keep that rule.
    """
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"Target size ({format_shape(target.shape)}) must be the same as input size "
            f"({format_shape(input.shape)})"
        )
    if input.kind != "f":
        raise _not_implemented("log_sigmoid_cpu", input)
    if pos_weight is not None:
        if pos_weight.kind == "b":
            raise RuntimeError(
                "Subtraction, the `-` operator, with a bool tensor is not supported. "
                "If you are trying to invert a mask, use the `~` or `logical_not()` operator instead."
            )
        _check_fits_output(tuple(input.shape), _infer_size(pos_weight.shape, target.shape))
    if target.kind == "b":
        raise RuntimeError(
            "Subtraction, the `-` operator, with two bool tensors is not supported. "
            "Use the `^` or `logical_xor()` operator instead."
        )
    if target.kind != "f":
        raise RuntimeError(f"result type {input.name} can't be cast to the desired output type {target.name}")
    if weight is not None:
        _check_fits_output(tuple(input.shape), tuple(weight.shape))
    return target


def weight_requires_grad_error(function: str, argument: str) -> RuntimeError:
    """torch's error for a weight that asks for a gradient: these losses are not differentiable in it."""
    return RuntimeError(
        f"The function '{function}' is not differentiable with respect to argument '{argument}'. "
        "This input cannot have requires_grad True."
    )


def input_range_error() -> RuntimeError:
    return RuntimeError("all elements of input should be between 0 and 1")


def target_range_error() -> RuntimeError:
    return RuntimeError("all elements of target should be between 0 and 1")


def compute_precision(bits: int) -> int:
    """The floating width the math runs in for a result of ``bits`` bits.

    Half types (16 bits) are computed in float32, as torch does. float32 is computed in float64: every
    per-element result is then within 0.5 ulp (plus a 2^-29 relative error) of the exact value after rounding,
    which no float32 formulation with libm-quality exp/log can promise. float64 losses on the CPU are
    evaluated in ``long double`` where the platform has one (:mod:`bcekit._numpy_core`), elsewhere in float64
    with a double-double combination step; gradients are computed in float64.
    """
    return 32 if bits <= 16 else 64


def check_label_smoothing(label_smoothing: float) -> None:
    """Keras's label smoothing takes a fraction in [0, 1]; anything else is a mistake, not a choice."""
    if not 0.0 <= label_smoothing <= 1.0:  # NaN fails too
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")


def check_focal_parameters(alpha: float, gamma: float) -> None:
    """``gamma >= 0`` (a negative power rewards confident mistakes); ``alpha <= 1`` (a larger one gives the
    negative class a negative weight); ``alpha < 0`` is torchvision's "no class weighting"."""
    if not (gamma >= 0.0 and gamma != float("inf")):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if not alpha <= 1.0:
        raise ValueError(f"alpha must be <= 1 (or negative to disable class weighting), got {alpha!r}")


# -- fused linear + BCE -------------------------------------------------------------------------------------

LINEAR_FUNCTION = "linear_binary_cross_entropy_with_logits"


def check_linear_binary_cross_entropy(
    input_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    pos_weight_shape: tuple[int, ...] | None,
    reduction: int,
    sparse_target: bool,
) -> tuple[int, int, int]:
    """The rules of ``linear_binary_cross_entropy_with_logits``; returns ``(rows N, features D, labels C)``.

    ``input`` is ``(*, D)`` (its leading dimensions are the N rows), ``weight`` ``(C, D)``, ``bias`` ``(C,)``,
    ``target`` ``(*, C)`` (a sparse target: exactly ``(N, C)``), ``pos_weight`` broadcastable to ``(C,)``.
    ``'none'`` is refused: its ``(N, C)`` result is the matrix the fused op exists not to build.
    """
    if reduction == NONE:
        raise ValueError(
            f"{LINEAR_FUNCTION}: reduction='none' would return the (N, C) loss matrix that this function "
            "exists to avoid building; use 'mean' or 'sum', or, for per-element losses of some labels, "
            "binary_cross_entropy_with_logits(F.linear(input, weight[labels], bias[labels]), "
            "target[:, labels], reduction='none')"
        )
    if len(input_shape) < 1 or len(weight_shape) != 2:
        raise ValueError(
            f"{LINEAR_FUNCTION}: expected input of shape (*, D) and weight of shape (C, D), got input "
            f"{tuple(input_shape)} and weight {tuple(weight_shape)}"
        )
    labels, features = weight_shape
    if input_shape[-1] != features:
        raise ValueError(
            f"{LINEAR_FUNCTION}: input has {input_shape[-1]} features (last dimension) but weight "
            f"{tuple(weight_shape)} expects {features}"
        )
    rows = 1
    for size in input_shape[:-1]:
        rows *= size
    expected = (rows, labels) if sparse_target else (*input_shape[:-1], labels)
    if tuple(target_shape) != expected:
        what = "sparse target" if sparse_target else "target"
        raise ValueError(
            f"{LINEAR_FUNCTION}: {what} of shape {tuple(target_shape)} does not match the logits' shape "
            f"{expected} (input {tuple(input_shape)}, weight {tuple(weight_shape)})"
        )
    if bias_shape is not None and tuple(bias_shape) != (labels,):
        raise ValueError(f"{LINEAR_FUNCTION}: bias must have shape ({labels},), got {tuple(bias_shape)}")
    if pos_weight_shape is not None and tuple(pos_weight_shape) not in ((), (1,), (labels,)):
        raise ValueError(
            f"{LINEAR_FUNCTION}: pos_weight must have shape ({labels},), (1,) or (), got "
            f"{tuple(pos_weight_shape)}"
        )
    return rows, features, labels


def linear_chunk_size(rows: int, labels: int, itemsize: int, budget_bytes: int) -> int:
    """Labels per chunk: as many as keep one ``(rows, chunk)`` buffer within ``budget_bytes``, a multiple of
    64 (matmul-friendly), at least 64 and at most ``labels``."""
    chunk = budget_bytes // max(1, rows * itemsize)
    return max(1, min(labels, max(64, chunk // 64 * 64)))
