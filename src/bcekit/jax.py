r"""JAX backend: torch's BCE semantics as JAX functions that work under ``jit``, ``grad`` and ``vmap``.

Same signatures and semantics as :mod:`bcekit.torch` (weights, ``pos_weight``, reductions, the legacy
``size_average`` / ``reduce`` pair, the log clamp at -100, soft targets, ``label_smoothing``,
``ignore_index``, exact infinite logits) and the same formulas, shared through :mod:`bcekit._math`.
Gradients come from a ``jax.custom_vjp`` that evaluates torch's derivative formulas (the probability loss's
``(x - y) / max(x (1 - x), 1e-12)``, ``-logit(x)`` for its target, the rearranged sigmoid form for logits),
for input and target, and also for ``weight`` and ``pos_weight`` (torch refuses those; JAX cannot refuse,
so they are exact instead of silently zero). The backward rule is itself JAX code, so ``jax.hessian``
(forward over reverse) and ``grad`` of ``grad`` work; pure forward mode (``jax.jvp``, ``jacfwd`` of the
loss itself) does not, as for any ``custom_vjp``.

Precision: half types compute in float32; float32 computes in float64 when ``jax_enable_x64`` is on (then
within 0.5 ulp), else in float32 with the same cancellation-free formulas; float64 (x64 on) uses the
double-double combination step.

Errors: shapes, dtypes, reduction strings and option values are static and raise at trace time, with the
exception types and texts of the other backends. The probability loss's [0, 1] check needs the values: it
raises ``RuntimeError`` when called eagerly on concrete arrays; under ``jit`` it cannot raise, so wrap the
function with :func:`checked` (``jax.experimental.checkify``) to get the check as a returned error.

>>> import jax, jax.numpy as jnp
>>> from bcekit.jax import binary_cross_entropy_with_logits
>>> x = jnp.full((10, 64), 1.5); y = jnp.ones((10, 64))
>>> print(f"{float(jax.jit(binary_cross_entropy_with_logits)(x, y, pos_weight=jnp.ones(64))):.6f}")
0.201413
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from bcekit import _math, _semantics
from bcekit._math import LossSpec
from bcekit._semantics import MEAN, ArraySpec

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "checked",
]

ArrayLike = Any


class _JaxOps:
    """The elementwise namespace :mod:`bcekit._math` computes with."""

    exp = staticmethod(jnp.exp)
    log = staticmethod(jnp.log)
    log1p = staticmethod(jnp.log1p)
    abs = staticmethod(jnp.abs)
    isinf = staticmethod(jnp.isinf)
    isfinite = staticmethod(jnp.isfinite)
    isnan = staticmethod(jnp.isnan)
    where = staticmethod(jnp.where)
    sum = staticmethod(jnp.sum)

    @staticmethod
    def clamp_min(a: jax.Array, bound: float) -> jax.Array:
        return jnp.maximum(a, bound)

    @staticmethod
    def clamp_max(a: jax.Array, bound: float) -> jax.Array:
        return jnp.minimum(a, bound)

    @staticmethod
    def size(a: jax.Array) -> int:
        return a.size


_OPS = _JaxOps()

#: Set by :func:`checked` while it traces: the probability loss then emits ``checkify`` checks.
_CHECK_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("bcekit_jax_check_values", default=False)


def _spec(array: jax.Array) -> ArraySpec:
    dtype = np.dtype(array.dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        kind = "f"
    elif dtype == np.bool_:
        kind = "b"
    elif jnp.issubdtype(dtype, jnp.complexfloating):
        kind = "c"
    else:
        kind = "i"
    return ArraySpec(tuple(array.shape), kind, dtype.name, dtype.itemsize * 8)


def _compute_dtype(*dtypes: Any) -> Any:
    bits = max(np.dtype(dtype).itemsize * 8 for dtype in dtypes)
    if _semantics.compute_precision(bits) == 32 or not jax.config.jax_enable_x64:
        return jnp.float32
    return jnp.float64


def _sum_to_shape(value: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Undo broadcasting: sum ``value`` down to ``shape`` (the shape of a broadcast weight)."""
    value = value.sum(axis=tuple(range(value.ndim - len(shape))))
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and value.shape[i] != 1)
    return value.sum(axis=axes, keepdims=True).reshape(shape)


@functools.cache
def _loss_function(spec: LossSpec, result_dtype: Any) -> Callable[..., jax.Array]:
    """The loss as a ``custom_vjp`` function of ``(input, target, weight, pos_weight)`` for one spec."""

    def compute_dtype(x: jax.Array, y: jax.Array) -> Any:
        return _compute_dtype(x.dtype, y.dtype)

    def cast(value: jax.Array | None, dtype: Any) -> jax.Array | None:
        return None if value is None else value.astype(dtype)

    def primal(x, y, weight, pos_weight):
        dtype = compute_dtype(x, y)
        values, kept = _math.elementwise_loss(
            _OPS,
            spec,
            x.astype(dtype),
            y.astype(dtype),
            cast(weight, dtype),
            cast(pos_weight, dtype),
            compensated=dtype == jnp.float64 and np.dtype(result_dtype) == np.float64,
        )
        return _math.reduce(_OPS, values, kept, spec.reduction).astype(result_dtype)

    # forward calls the plain computation, not the custom_vjp function: then forward-over-reverse
    # (jax.hessian, jacfwd of grad) differentiates ordinary JAX code
    def forward(x, y, weight, pos_weight):
        return primal(x, y, weight, pos_weight), (x, y, weight, pos_weight)

    def backward(residuals, grad_output):
        x, y, weight, pos_weight = residuals
        dtype = compute_dtype(x, y)
        xc, yc, wc, pc = x.astype(dtype), y.astype(dtype), cast(weight, dtype), cast(pos_weight, dtype)
        grad_input, grad_target = _math.elementwise_grads(_OPS, spec, xc, yc, wc, pc, True, True)
        y_used, kept = _math.prepare_targets(_OPS, yc, spec.label_smoothing, spec.ignore_index)
        scale = grad_output.astype(dtype)
        if spec.reduction == MEAN:  # an all-ignored mean is NaN, its gradient zero
            scale = scale / jnp.maximum(_math.count(_OPS, xc, kept), 1)
        grad_weight = grad_pos_weight = None
        if weight is not None:
            unweighted, _ = _math.elementwise_loss(_OPS, spec, xc, yc, None, pc)
            grad_weight = _sum_to_shape(unweighted * scale, weight.shape).astype(weight.dtype)
        if pos_weight is not None:
            per_element = _math.logits_grad_pos_weight(_OPS, xc, y_used)
            per_element = per_element if wc is None else per_element * wc
            per_element = per_element if kept is None else jnp.where(kept, per_element, 0.0)
            grad_pos_weight = _sum_to_shape(per_element * scale, pos_weight.shape).astype(pos_weight.dtype)
        return (
            (grad_input * scale).astype(x.dtype),
            (grad_target * scale).astype(y.dtype),
            grad_weight,
            grad_pos_weight,
        )

    loss = jax.custom_vjp(primal)
    loss.defvjp(forward, backward)
    return loss


def _as_array(value: ArrayLike) -> jax.Array:
    return value if isinstance(value, jax.Array) else jnp.asarray(value)


def _is_concrete(*arrays: jax.Array) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_probabilities(x: jax.Array, y: jax.Array, ignore_index: float | None) -> None:
    input_ok = jnp.all((x >= 0) & (x <= 1))
    target_ok = jnp.all(_math.valid_targets(_OPS, y, ignore_index))
    if _CHECK_VALUES.get():
        checkify.check(input_ok, str(_semantics.input_range_error()))
        checkify.check(target_ok, str(_semantics.target_range_error()))
    elif _is_concrete(x, y):
        if not bool(input_ok):
            raise _semantics.input_range_error()
        if not bool(target_ok):
            raise _semantics.target_range_error()


def _options(label_smoothing: float, ignore_index: float | None) -> tuple[float, float | None]:
    _semantics.check_label_smoothing(label_smoothing)
    return float(label_smoothing), None if ignore_index is None else float(ignore_index)


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
) -> jax.Array:
    r"""Binary cross-entropy between probabilities and targets; see :func:`bcekit.torch.binary_cross_entropy`.

    .. math::
        \ell_n = -w_n \left[ y_n \max(\log x_n, -100) + (1 - y_n) \max(\log(1 - x_n), -100) \right]

    Differentiable in ``input``, ``target`` and ``weight``. Values outside [0, 1] raise eagerly; under
    ``jit`` use :func:`checked`.
    """
    enum = _semantics.resolve_reduction(size_average, reduce, reduction)
    smoothing, ignore = _options(label_smoothing, ignore_index)
    x, y = _as_array(input), _as_array(target)
    w = None if weight is None else _as_array(weight)
    _semantics.check_binary_cross_entropy(_spec(x), _spec(y), None if w is None else _spec(w))
    _check_probabilities(x, y, ignore)
    spec = LossSpec("bce", enum, smoothing, ignore)
    return _loss_function(spec, np.dtype(x.dtype))(x, y, w, None)


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
) -> jax.Array:
    r"""Binary cross-entropy on logits; see :func:`bcekit.torch.binary_cross_entropy_with_logits`.

    .. math::
        \ell_n = w_n \left[ p\, y_n \log(1 + e^{-x_n}) + (1 - y_n) \log(1 + e^{x_n}) \right]

    Differentiable in ``input``, ``target``, ``weight`` and ``pos_weight``; exact at infinite logits.
    """
    enum = _semantics.resolve_reduction(size_average, reduce, reduction)
    smoothing, ignore = _options(label_smoothing, ignore_index)
    x, y = _as_array(input), _as_array(target)
    w = None if weight is None else _as_array(weight)
    p = None if pos_weight is None else _as_array(pos_weight)
    _semantics.check_binary_cross_entropy_with_logits(
        _spec(x), _spec(y), None if w is None else _spec(w), None if p is None else _spec(p)
    )
    spec = LossSpec("logits", enum, smoothing, ignore)
    return _loss_function(spec, np.dtype(y.dtype))(x, y, w, p)


def sigmoid_focal_loss(
    input: ArrayLike,
    target: ArrayLike,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Sigmoid focal loss, torchvision's semantics in log space; see :func:`bcekit.torch.sigmoid_focal_loss`.

    .. math::
        \ell = \alpha_t\, \mathrm{BCEWithLogits}(x, y)\, (1 - p_t)^\gamma
    """
    enum = _semantics.reduction_enum(reduction)
    _semantics.check_focal_parameters(alpha, gamma)
    x, y = _as_array(input), _as_array(target)
    _semantics.check_binary_cross_entropy_with_logits(_spec(x), _spec(y), None, None)
    spec = LossSpec("focal", enum, alpha=float(alpha), gamma=float(gamma))
    return _loss_function(spec, np.dtype(y.dtype))(x, y, None, None)


def checked(function: Callable[..., Any]) -> Callable[..., tuple[checkify.Error, Any]]:
    """``function`` with the probability loss's [0, 1] checks turned into ``checkify`` errors.

    Returns a function giving ``(error, result)``, as ``checkify.checkify`` does; ``error.throw()`` raises
    the torch-compatible message. Put it outermost (``checked(jax.jit(f))`` or ``jax.jit(checked(f))``)
    on a function that has not been traced without it.

    >>> import jax, jax.numpy as jnp
    >>> from bcekit.jax import binary_cross_entropy, checked
    >>> error, loss = jax.jit(checked(binary_cross_entropy))(jnp.array([0.5, 1.5]), jnp.array([0.0, 1.0]))
    >>> print(error.get())
    all elements of input should be between 0 and 1 (`check` failed)
    """
    checkified = checkify.checkify(function, errors=checkify.user_checks)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> tuple[checkify.Error, Any]:
        token = _CHECK_VALUES.set(True)
        try:
            return checkified(*args, **kwargs)
        finally:
            _CHECK_VALUES.reset(token)

    return wrapper
