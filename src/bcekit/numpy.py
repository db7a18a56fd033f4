r"""NumPy backend: torch's BCE semantics over NumPy arrays, with no torch import anywhere on this path.

The functions mirror :mod:`bcekit.torch` (and so ``torch.nn.functional``) argument for argument: weights,
``pos_weight``, the three reductions, the legacy ``size_average`` / ``reduce`` pair, the log clamp at -100,
soft targets and the same exception types and texts. Results are NumPy arrays (0-d for ``'mean'`` and
``'sum'``) in the input's dtype (for the logits loss, the target's when the two floating dtypes differ, as
torch does). float16 is computed in float32, float32 in float64.

The ``*_and_grad`` variants return ``(loss, gradient of the loss with respect to input)``, the
``jac=True`` convention of :func:`scipy.optimize.minimize`. With ``reduction='none'`` the gradient is the
elementwise derivative of each element's loss.

>>> import numpy as np
>>> from bcekit.numpy import binary_cross_entropy_with_logits
>>> x = np.full((10, 64), 1.5, dtype=np.float32)
>>> y = np.ones((10, 64), dtype=np.float32)
>>> print(round(float(binary_cross_entropy_with_logits(x, y, pos_weight=np.ones(64))), 6))
0.201413
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bcekit import _extended, _math, _semantics
from bcekit._semantics import MEAN, ArraySpec

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_and_grad",
    "binary_cross_entropy_with_logits_and_grad",
]


_OPS = _extended.NUMPY_OPS


def _as_array(value: ArrayLike) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _spec(array: np.ndarray) -> ArraySpec:
    kind = {"f": "f", "i": "i", "u": "i", "b": "b", "c": "c"}.get(array.dtype.kind, array.dtype.kind)
    return ArraySpec(tuple(array.shape), kind, array.dtype.name, array.dtype.itemsize * 8)


def _compute_dtype(result: np.dtype) -> np.dtype:
    return np.dtype(np.float32 if _semantics.compute_precision(result.itemsize * 8) == 32 else np.float64)


def _scale_grad(grad: np.ndarray, weight: np.ndarray | None, reduction: int, size: int) -> np.ndarray:
    if weight is not None:
        grad = grad * weight
    return grad / size if reduction == MEAN and size else grad


def _bce(
    input: ArrayLike, target: ArrayLike, weight: ArrayLike | None, reduction: int, with_grad: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    x, y = _as_array(input), _as_array(target)
    w = None if weight is None else _as_array(weight)
    _semantics.check_binary_cross_entropy(_spec(x), _spec(y), None if w is None else _spec(w))
    compute = _compute_dtype(x.dtype)
    xc, yc = x.astype(compute, copy=False), y.astype(compute, copy=False)
    wc = None if w is None else w.astype(compute, copy=False)
    if not np.all((xc >= 0) & (xc <= 1)):  # NaN fails both comparisons
        raise _semantics.input_range_error()
    if not np.all((yc >= 0) & (yc <= 1)):
        raise _semantics.target_range_error()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        if x.dtype == np.float64 and _extended.EXTENDED is not None:
            loss = _extended.bce_loss(x, y, w, reduction)
        else:
            per_element = _math.bce_loss(_OPS, xc, yc, compensated=x.dtype == np.float64)
            loss = _extended.reduce_loss(per_element if wc is None else per_element * wc, reduction)
        grad = None
        if with_grad:
            grad = _scale_grad(_math.bce_grad_input(_OPS, xc, yc), wc, reduction, x.size).astype(x.dtype)
        return np.asarray(loss).astype(x.dtype), grad


def _bce_with_logits(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None,
    pos_weight: ArrayLike | None,
    reduction: int,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    x, y = _as_array(input), _as_array(target)
    w = None if weight is None else _as_array(weight)
    p = None if pos_weight is None else _as_array(pos_weight)
    _semantics.check_binary_cross_entropy_with_logits(
        _spec(x), _spec(y), None if w is None else _spec(w), None if p is None else _spec(p)
    )
    result_dtype = y.dtype
    compute = _compute_dtype(np.promote_types(x.dtype, y.dtype))
    xc, yc = x.astype(compute, copy=False), y.astype(compute, copy=False)
    wc = None if w is None else w.astype(compute, copy=False)
    pc = None if p is None else p.astype(compute, copy=False)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        if result_dtype == np.float64 and _extended.EXTENDED is not None:
            loss = _extended.logits_loss(x, y, w, p, reduction)
        else:
            per_element = _math.logits_loss(_OPS, xc, yc, pc, compensated=result_dtype == np.float64)
            loss = _extended.reduce_loss(per_element if wc is None else per_element * wc, reduction)
        grad = None
        if with_grad:
            grad = _math.logits_grad_input(_OPS, xc, yc, pc)
            grad = _scale_grad(grad, wc, reduction, x.size).astype(x.dtype)
        return np.asarray(loss).astype(result_dtype), grad


def binary_cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> NDArray[np.floating]:
    r"""Binary cross-entropy between probabilities ``input`` and targets ``target``, both in [0, 1].

    .. math::
        \ell_n = -w_n \left[ y_n \max(\log x_n, -100) + (1 - y_n) \max(\log(1 - x_n), -100) \right]

    Args:
        input: probabilities, any shape, float16/32/64.
        target: same shape and dtype as ``input``; soft targets allowed.
        weight: rescaling weight, broadcastable to ``input``'s shape.
        size_average, reduce: deprecated; either one, when given, overrides ``reduction`` (with a warning).
        reduction: ``'none'`` | ``'mean'`` (divides by the element count) | ``'sum'``.

    Returns:
        The loss, in ``input``'s dtype: 0-d for ``'mean'``/``'sum'``, ``input``'s shape for ``'none'``.

    Raises:
        ValueError: target shape differs from input shape; invalid ``reduction``.
        RuntimeError: values outside [0, 1] (NaN included); weight not broadcastable; mismatched dtypes.
        NotImplementedError: a non-floating input.
    """
    enum = _semantics.resolve_reduction(size_average, reduce, reduction)
    return _bce(input, target, weight, enum, with_grad=False)[0]


def binary_cross_entropy_with_logits(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
) -> NDArray[np.floating]:
    r"""Binary cross-entropy on logits: sigmoid and BCE in one numerically exact step.

    .. math::
        \ell_n = w_n \left[ p\, y_n \log(1 + e^{-x_n}) + (1 - y_n) \log(1 + e^{x_n}) \right]

    with ``p = pos_weight`` broadcast against ``input`` (per class along the last dimension). Infinite
    logits are handled exactly: 0 when the sign agrees with the target, +inf otherwise.

    Args:
        input: logits, any shape, floating.
        target: same shape as ``input``, values in [0, 1] (not checked, as in torch).
        weight: rescaling weight, broadcastable to ``input``'s shape.
        size_average, reduce: deprecated; either one, when given, overrides ``reduction``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        pos_weight: weight of positive examples, broadcastable to ``input``'s shape.

    Returns:
        The loss in the target's dtype (which is ``input``'s unless you mixed floating dtypes).
    """
    enum = _semantics.resolve_reduction(size_average, reduce, reduction)
    return _bce_with_logits(input, target, weight, pos_weight, enum, with_grad=False)[0]


def binary_cross_entropy_and_grad(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """:func:`binary_cross_entropy` and its gradient with respect to ``input``, in one pass.

    The gradient is torch's ``w (x - y) / max(x (1 - x), 1e-12)`` (divided by the element count for
    ``'mean'``), in ``input``'s dtype and shape.
    """
    loss, grad = _bce(input, target, weight, _semantics.reduction_enum(reduction), with_grad=True)
    assert grad is not None
    return loss, grad


def binary_cross_entropy_with_logits_and_grad(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """:func:`binary_cross_entropy_with_logits` and its gradient with respect to ``input``.

    The gradient is ``w [(1 - y) sigmoid(x) - p y sigmoid(-x)]`` (divided by the element count for
    ``'mean'``), in ``input``'s dtype and shape; finite for infinite logits.

    >>> import numpy as np
    >>> loss, grad = binary_cross_entropy_with_logits_and_grad(np.zeros(2), np.array([0.0, 1.0]))
    >>> grad.tolist()
    [0.25, -0.25]
    """
    loss, grad = _bce_with_logits(
        input, target, weight, pos_weight, _semantics.reduction_enum(reduction), with_grad=True
    )
    assert grad is not None
    return loss, grad
