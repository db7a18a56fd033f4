r"""The formulas of the BCE loss family, written once over a tiny array namespace.

Each backend hands in an object with ``exp, log, log1p, abs, where, isinf, clamp_min, clamp_max`` that act
elementwise on its arrays (NumPy, torch, JAX); the math below never sees which. Arrays arrive already in the
compute precision (see :func:`bcekit._semantics.compute_precision`), weights already broadcastable.

Probability loss, ``x`` in [0, 1], ``y`` in [0, 1], torch's clamp of each log term at -100:

.. math::
    \ell(x, y) = y \min(-\log x, 100) + (1 - y) \min(-\log(1 - x), 100)

    \partial_x \ell = \frac{x - y}{\max(x (1 - x), 10^{-12})}, \qquad
    \partial_y \ell = \log(1 - x) - \log x = -\operatorname{logit}(x)

(both derivatives are torch's formulas: the first ignores the clamp and stays finite at 0 and 1).

Logits loss, with ``p`` the positive-class weight (1 when absent) and
:math:`\operatorname{sp}(x) = \log(1 + e^x) = -\log\sigma(-x)`:

.. math::
    \ell(x, y) = p\,y\,\operatorname{sp}(-x) + (1 - y)\operatorname{sp}(x)

    \partial_x \ell = (1 - y)\,\sigma(x) - p\,y\,\sigma(-x), \qquad
    \partial_y \ell = p\,\operatorname{sp}(-x) - \operatorname{sp}(x)

Why each term is a softplus: torch evaluates ``(1 - y) x - (1 + (p - 1) y) log_sigmoid(x)``, which for
``y = 0`` and ``x << 0`` subtracts two numbers of size ``|x|`` to get ``exp(x)``, and loses every digit.
Both softplus terms are non-negative, so their weighted sum has no cancellation anywhere.

In float64 the loss is a sum of two products of rounded numbers (``1 - y``, ``p y``, the softplus sum),
four or five roundings that together can exceed 2 ulp for soft targets. With ``compensated=True`` those
steps are carried out in double-double arithmetic (Dekker's error-free TwoSum and TwoProduct), leaving only
the error of the libm ``log``/``log1p``/``exp`` calls and one final rounding.
"""

from __future__ import annotations

from typing import Any, Protocol

from bcekit._semantics import GRAD_EPSILON, LOG_CLAMP

__all__ = [
    "Ops",
    "bce_loss",
    "bce_grad_input",
    "bce_grad_target",
    "logits_loss",
    "logits_grad_input",
    "logits_grad_target",
]

Array = Any


class Ops(Protocol):
    """The elementwise operations the formulas need; every backend supplies one."""

    def exp(self, a: Array) -> Array: ...
    def log(self, a: Array) -> Array: ...
    def log1p(self, a: Array) -> Array: ...
    def abs(self, a: Array) -> Array: ...
    def isinf(self, a: Array) -> Array: ...
    def isfinite(self, a: Array) -> Array: ...
    def where(self, condition: Array, a: Array, b: Array | float) -> Array: ...
    def clamp_min(self, a: Array, bound: float) -> Array: ...
    def clamp_max(self, a: Array, bound: float) -> Array: ...


# --------------------------------------------------------------------------------------------------------
# Error-free transformations for the float64 combination step
# --------------------------------------------------------------------------------------------------------

_SPLITTER = 134217729.0  # 2**27 + 1 splits a float64 into two 26-bit halves (Dekker)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: Array) -> tuple[Array, Array]:
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def _two_product(a: Array, b: Array) -> tuple[Array, Array]:
    product = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return product, ((a_hi * b_hi - product) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _dd_multiply(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
    high, low = _two_product(a[0], b[0])
    return high, low + (a[0] * b[1] + a[1] * b[0])


def _dd_dot2(
    ops: Ops,
    c1: tuple[Array, Array],
    v1: tuple[Array, Array],
    c2: tuple[Array, Array],
    v2: tuple[Array, Array],
) -> Array:
    """``c1 v1 + c2 v2`` of non-negative double-doubles, rounded once. Where an operand is infinite (or the
    splitting overflows) the arithmetic yields NaN; the caller then falls back to the plain formula."""
    t1, t2 = _dd_multiply(c1, v1), _dd_multiply(c2, v2)
    high, low = _two_sum(t1[0], t2[0])
    return high + (low + t1[1] + t2[1])


def _exact(value: Array, zeros: Array) -> tuple[Array, Array]:
    return value, zeros


def _scaled(ops: Ops, coefficient: Array, value: Array) -> Array:
    """``coefficient * value`` with 0 * inf = 0: a term whose coefficient is zero is absent, even when its
    value is infinite (an infinite logit). NaN still propagates, as it should."""
    product = coefficient * value
    return ops.where((coefficient == 0) & ops.isinf(value), 0.0, product)


def _softplus_parts(ops: Ops, x: Array) -> tuple[Array, Array, Array, Array]:
    """Return ``(max(x, 0), max(-x, 0), log1p(exp(-|x|)), exp(-|x|))``.

    ``sp(x) = max(x, 0) + log1p(exp(-|x|))`` and ``sp(-x) = max(-x, 0) + log1p(exp(-|x|))``: exp never
    overflows, both summands are non-negative, and for x < 0 ``sp(x)`` is log1p of a small number.
    """
    e = ops.exp(-ops.abs(x))
    return ops.clamp_min(x, 0.0), ops.clamp_min(-x, 0.0), ops.log1p(e), e


def _sigmoid_pair(ops: Ops, x: Array, e: Array) -> tuple[Array, Array]:
    """Return ``(sigmoid(x), sigmoid(-x))`` from ``e = exp(-|x|)``, each without cancellation."""
    large = 1.0 / (1.0 + e)  # sigmoid(|x|)
    small = e / (1.0 + e)  # sigmoid(-|x|), accurate even where it underflows gradually
    positive = x >= 0
    return ops.where(positive, large, small), ops.where(positive, small, large)


# --------------------------------------------------------------------------------------------------------
# Probability loss
# --------------------------------------------------------------------------------------------------------


def bce_loss(ops: Ops, x: Array, y: Array, compensated: bool = False) -> Array:
    """Per-element ``y * min(-log x, 100) + (1 - y) * min(-log(1 - x), 100)``."""
    neg_log_x = ops.clamp_max(-ops.log(x), -LOG_CLAMP)
    neg_log_1mx = ops.clamp_max(-ops.log1p(-x), -LOG_CLAMP)
    plain = y * neg_log_x + (1.0 - y) * neg_log_1mx
    if not compensated:
        return plain
    zeros = 0.0 * x
    combined = _dd_dot2(
        ops, _exact(y, zeros), _exact(neg_log_x, zeros), _two_sum(1.0, -y), _exact(neg_log_1mx, zeros)
    )
    return ops.where(ops.isfinite(combined), combined, plain)


def bce_grad_input(ops: Ops, x: Array, y: Array) -> Array:
    """torch's ``(x - y) / max(x (1 - x), 1e-12)``."""
    return (x - y) / ops.clamp_min(x * (1.0 - x), GRAD_EPSILON)


def bce_grad_target(ops: Ops, x: Array) -> Array:
    """``log(1 - x) - log(x)``: torch's ``-logit(x)``, without forming ``x / (1 - x)``."""
    return ops.log1p(-x) - ops.log(x)


# --------------------------------------------------------------------------------------------------------
# Logits loss
# --------------------------------------------------------------------------------------------------------


def logits_loss(ops: Ops, x: Array, y: Array, pos_weight: Array | None, compensated: bool = False) -> Array:
    """Per-element ``p y sp(-x) + (1 - y) sp(x)``; an infinite logit of the target's sign costs 0."""
    x_pos, x_neg, tail, _ = _softplus_parts(ops, x)
    positive = y if pos_weight is None else pos_weight * y
    plain = _scaled(ops, positive, x_neg + tail) + _scaled(ops, 1.0 - y, x_pos + tail)
    if not compensated:
        return plain
    combined = _dd_dot2(
        ops,
        _exact(y, 0.0 * x) if pos_weight is None else _two_product(pos_weight, y),
        _two_sum(x_neg, tail),
        _two_sum(1.0, -y),
        _two_sum(x_pos, tail),
    )
    return ops.where(ops.isfinite(combined), combined, plain)


def logits_grad_input(ops: Ops, x: Array, y: Array, pos_weight: Array | None) -> Array:
    """``(1 - y) sigmoid(x) - p y sigmoid(-x)``: torch's ``(p y + 1 - y) sigmoid(x) - p y`` rearranged so
    that it is finite at infinite logits and exact where sigmoid(x) rounds to 1."""
    sig_x, sig_neg_x = _sigmoid_pair(ops, x, ops.exp(-ops.abs(x)))
    positive = y if pos_weight is None else pos_weight * y
    return (1.0 - y) * sig_x - positive * sig_neg_x


def logits_grad_target(ops: Ops, x: Array, pos_weight: Array | None) -> Array:
    """``p sp(-x) - sp(x)``, which is exactly ``-x`` without a positive weight (torch's formulas)."""
    if pos_weight is None:
        return -x
    x_pos, x_neg, tail, _ = _softplus_parts(ops, x)
    return _scaled(ops, pos_weight, x_neg + tail) - (x_pos + tail)
