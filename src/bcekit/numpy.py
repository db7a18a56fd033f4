r"""NumPy backend: torch's BCE semantics over NumPy arrays, with no torch import anywhere on this path.

The functions mirror :mod:`bcekit.torch` (and so ``torch.nn.functional``) argument for argument: weights,
``pos_weight``, the three reductions, the legacy ``size_average`` / ``reduce`` pair, the log clamp at -100,
soft targets and the same exception types and texts. Results are NumPy arrays (0-d for ``'mean'`` and
``'sum'``) in the input's dtype (for the logits loss, the target's when the two floating dtypes differ, as
torch does). float16 is computed in float32, float32 in float64.

The probability and logits losses run in bcekit's C++ kernels (one pass giving loss and gradient) when
every array has the same dtype and each weight broadcasts as a scalar, ``(C,)``, ``(N, 1)`` or the full
shape; the threads they use are :func:`bcekit.set_num_threads`'s. Other calls take the composed NumPy path,
with the same results.

Masked arrays (:class:`numpy.ma.MaskedArray`, as input, target or a weight) are honoured: a masked
element (or one a masked weight broadcasts to) is left out as if it were not there, ``'mean'`` counting
only the others; per-element losses and gradients come back as masked arrays with the same mask (and 0
under it). Arrays in the other byte order (``'>f4'`` on a little-endian machine) are read through a
byte-swapped copy; results are in the machine's order.

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

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bcekit import _math, _native, _numpy_core, _semantics
from bcekit._semantics import NONE, ArraySpec

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_and_grad",
    "binary_cross_entropy_with_logits_and_grad",
    "sigmoid_focal_loss",
]


def _as_array(value: ArrayLike) -> np.ndarray:
    """``value`` as an array in the machine's byte order (a byte-swapped copy of a big-endian one on a
    little-endian machine); a masked array stays one."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _mask(x: np.ndarray, *others: np.ndarray | None) -> np.ndarray | None:
    """Where any operand is masked (a weight's mask broadcast to the input's shape), or None when no
    element is."""
    masks = [np.ma.getmask(a) for a in (x, *others) if isinstance(a, np.ma.MaskedArray)]
    masks = [m for m in masks if m is not np.ma.nomask]
    if not masks:
        return None
    combined = np.zeros(x.shape, dtype=bool)
    for m in masks:
        combined |= np.broadcast_to(m, np.broadcast_shapes(m.shape, x.shape)).reshape(x.shape)
    return combined if combined.any() else None


def _evaluate_masked(
    spec: _math.LossSpec,
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    pos_weight: np.ndarray | None,
    result: np.dtype,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_evaluate`, honouring masked arrays: masked elements are left out, exactly as
    if the call had been made on the others alone (``'mean'`` counts only those); per-element results
    and gradients are masked arrays of the input's shape, with the mask and 0 where it is set."""
    if not any(isinstance(a, np.ma.MaskedArray) for a in (x, y, weight, pos_weight)):
        return _evaluate(spec, x, y, weight, pos_weight, result, with_grad)
    masked = _mask(x, y, weight, pos_weight)
    data = [None if a is None else np.ma.getdata(a) for a in (x, y, weight, pos_weight)]
    if masked is None:
        return _evaluate(spec, *data, result, with_grad)
    keep = ~masked
    x_kept, y_kept, w_kept, p_kept = (
        None
        if a is None
        else np.broadcast_to(a, np.broadcast_shapes(a.shape, x.shape)).reshape(x.shape)[keep]
        for a in data
    )
    loss, grad = _evaluate(spec, x_kept, y_kept, w_kept, p_kept, result, with_grad)

    def spread(values: np.ndarray) -> np.ndarray:
        full = np.zeros(x.shape, dtype=values.dtype)
        full[keep] = values
        return np.ma.MaskedArray(full, mask=masked)

    if spec.reduction == NONE:
        loss = spread(loss)
    return loss, None if grad is None else spread(grad)


def _spec(array: np.ndarray) -> ArraySpec:
    kind = {"f": "f", "i": "i", "u": "i", "b": "b", "c": "c"}.get(array.dtype.kind, array.dtype.kind)
    return ArraySpec(tuple(array.shape), kind, array.dtype.name, array.dtype.itemsize * 8)


def _compute(result: np.dtype) -> tuple[Any, bool]:
    """The precision to evaluate a loss of dtype ``result`` in, and whether float64 needs compensation."""
    if result == np.float64:
        return (_numpy_core.EXTENDED, False) if _numpy_core.EXTENDED is not None else (np.float64, True)
    return np.dtype(
        np.float32 if _semantics.compute_precision(result.itemsize * 8) == 32 else np.float64
    ), False


def _check_probabilities(x: np.ndarray, y: np.ndarray, ignore_index: float | None) -> None:
    if not np.all((x >= 0) & (x <= 1)):  # NaN fails both comparisons
        raise _semantics.input_range_error()
    if not np.all(_math.valid_targets(_numpy_core.NUMPY_OPS, y, ignore_index)):
        raise _semantics.target_range_error()


def _evaluate(
    spec: _math.LossSpec,
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    pos_weight: np.ndarray | None,
    result: np.dtype,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    plan = _native.plan(
        spec.kind,
        x.dtype.name if all(a is None or a.dtype == x.dtype for a in (y, weight, pos_weight)) else None,
        x.shape,
        None if weight is None else weight.shape,
        None if pos_weight is None else pos_weight.shape,
        spec.reduction,
        spec.label_smoothing,
        spec.ignore_index,
    )
    if plan is not None:
        return _kernel(plan, x, y, weight, pos_weight, with_grad)  # checks [0, 1] in the same pass
    if spec.kind == "bce":
        _check_probabilities(x, y, spec.ignore_index)
    compute, compensated = _compute(result)
    loss = _numpy_core.loss(spec, x, y, weight, pos_weight, compute, compensated).astype(result)
    if not with_grad:
        return loss, None
    # gradients carry no accuracy promise: float64 (float32 for half types) is plenty
    gradient_compute = np.float64 if compute != np.float32 else np.float32
    grad, _ = _numpy_core.gradients(spec, x, y, weight, pos_weight, gradient_compute)
    with np.errstate(over="ignore"):  # torch's 1e12 gradient at x = 0 or 1 is inf in float16, as in torch
        return loss, grad.astype(x.dtype)


def _output(x: np.ndarray) -> np.ndarray:
    """An array shaped like ``x``: from the kernels' buffer cache when large (see :mod:`bcekit._native`)."""
    cached = _native.empty(x.shape, x.dtype.name, torch=False)
    return np.empty_like(x) if cached is None else cached


def _kernel(
    plan: _native.Plan,
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    pos_weight: np.ndarray | None,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The C++ kernels: loss and gradient in one pass over the data (see :mod:`bcekit._native`)."""
    contiguous = [None if a is None else np.asarray(a, order="C") for a in (x, y, weight, pos_weight)]
    x, y, weight, pos_weight = contiguous
    per_element = _output(x) if plan.reduction == NONE else None
    grad = _output(x) if with_grad else None
    value, kept = _native.run_arrays(
        plan, x, y, weight, pos_weight, loss=per_element, grad_input=grad, grad_scale=plan.grad_scale
    )
    if grad is not None and plan.mean_over_kept and kept:
        grad /= kept  # the mean's denominator is known only after the pass
    loss = per_element if per_element is not None else np.asarray(value, dtype=np.float64).astype(x.dtype)
    return loss, grad


def _bce(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None,
    spec: _math.LossSpec,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    _semantics.check_label_smoothing(spec.label_smoothing)
    x, y = _as_array(input), _as_array(target)
    w = None if weight is None else _as_array(weight)
    _semantics.check_binary_cross_entropy(_spec(x), _spec(y), None if w is None else _spec(w))
    return _evaluate_masked(spec, x, y, w, None, x.dtype, with_grad)


def _bce_with_logits(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None,
    pos_weight: ArrayLike | None,
    spec: _math.LossSpec,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    _semantics.check_label_smoothing(spec.label_smoothing)
    x, y = _as_array(input), _as_array(target)
    w = None if weight is None else _as_array(weight)
    p = None if pos_weight is None else _as_array(pos_weight)
    _semantics.check_binary_cross_entropy_with_logits(
        _spec(x), _spec(y), None if w is None else _spec(w), None if p is None else _spec(p)
    )
    return _evaluate_masked(spec, x, y, w, p, y.dtype, with_grad)


def binary_cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
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
        label_smoothing: ``s`` in [0, 1]; targets become ``y (1 - s) + s / 2`` (Keras's definition).
        ignore_index: elements whose target equals it add no loss and no gradient, and are not counted by
            ``'mean'`` (NaN matches NaN); their targets are not range-checked.

    Returns:
        The loss, in ``input``'s dtype: 0-d for ``'mean'``/``'sum'``, ``input``'s shape for ``'none'``.

    Raises:
        ValueError: target shape differs from input shape; invalid ``reduction``.
        RuntimeError: values outside [0, 1] (NaN included); weight not broadcastable; mismatched dtypes.
        NotImplementedError: a non-floating input.
    """
    spec = _math.LossSpec(
        "bce", _semantics.resolve_reduction(size_average, reduce, reduction), label_smoothing, ignore_index
    )
    return _bce(input, target, weight, spec, with_grad=False)[0]


def binary_cross_entropy_with_logits(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
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
        label_smoothing, ignore_index: as in :func:`binary_cross_entropy`.

    Returns:
        The loss in the target's dtype (which is ``input``'s unless you mixed floating dtypes).
    """
    spec = _math.LossSpec(
        "logits", _semantics.resolve_reduction(size_average, reduce, reduction), label_smoothing, ignore_index
    )
    return _bce_with_logits(input, target, weight, pos_weight, spec, with_grad=False)[0]


def binary_cross_entropy_and_grad(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    r""":func:`binary_cross_entropy` and its gradient with respect to ``input``, in one pass.

    The gradient is torch's (divided by the element count for ``'mean'``), in ``input``'s dtype and shape:

    .. math::
        \frac{\partial \ell_n}{\partial x_n} = w_n \frac{x_n - y_n}{\max(x_n (1 - x_n), 10^{-12})}
    """
    spec = _math.LossSpec("bce", _semantics.reduction_enum(reduction), label_smoothing, ignore_index)
    loss, grad = _bce(input, target, weight, spec, with_grad=True)
    assert grad is not None
    return loss, grad


def binary_cross_entropy_with_logits_and_grad(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    r""":func:`binary_cross_entropy_with_logits` and its gradient with respect to ``input``.

    The gradient (divided by the element count for ``'mean'``), in ``input``'s dtype and shape, finite for
    infinite logits:

    .. math::
        \frac{\partial \ell_n}{\partial x_n}
            = w_n \left[ (1 - y_n)\, \sigma(x_n) - p\, y_n\, \sigma(-x_n) \right]

    >>> import numpy as np
    >>> loss, grad = binary_cross_entropy_with_logits_and_grad(np.zeros(2), np.array([0.0, 1.0]))
    >>> grad.tolist()
    [0.25, -0.25]
    """
    spec = _math.LossSpec("logits", _semantics.reduction_enum(reduction), label_smoothing, ignore_index)
    loss, grad = _bce_with_logits(input, target, weight, pos_weight, spec, with_grad=True)
    assert grad is not None
    return loss, grad


def sigmoid_focal_loss(
    input: ArrayLike,
    target: ArrayLike,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> NDArray[np.floating]:
    r"""Sigmoid focal loss (Lin et al., 2017) with torchvision's semantics, computed in log space.

    .. math::
        \ell = \alpha_t\, \mathrm{BCEWithLogits}(x, y)\, (1 - p_t)^\gamma,\quad
        1 - p_t = \sigma(x)(1 - y) + \sigma(-x) y,\quad \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    ``alpha < 0`` disables the class weighting; soft targets are allowed. Finite, and within 2 ulp of the
    exact value, for logits up to ``|1e4|`` and any ``gamma >= 0``.

    Args:
        input: logits, any shape.
        target: same shape, values in [0, 1].
        alpha: weight of the positive class in [0, 1], or negative for none.
        gamma: focusing exponent, ``>= 0`` (0 gives the alpha-weighted BCE).
        reduction: ``'none'`` (the default, as in torchvision) | ``'mean'`` | ``'sum'``.
    """
    _semantics.check_focal_parameters(alpha, gamma)
    spec = _math.LossSpec("focal", _semantics.reduction_enum(reduction), alpha=alpha, gamma=gamma)
    x, y = _as_array(input), _as_array(target)
    _semantics.check_binary_cross_entropy_with_logits(_spec(x), _spec(y), None, None)
    return _evaluate_masked(spec, x, y, None, None, y.dtype, with_grad=False)[0]
