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
    def where(self, condition: Array, a: Array, b: Array | float) -> Array: ...
    def clamp_min(self, a: Array, bound: float) -> Array: ...
    def clamp_max(self, a: Array, bound: float) -> Array: ...


def _scaled(ops: Ops, coefficient: Array, value: Array) -> Array:
    """``coefficient * value`` with 0 * inf = 0: a term whose coefficient is zero is absent, even when its
    value is infinite (an infinite logit). NaN still propagates, as it should."""
    product = coefficient * value
    return ops.where((coefficient == 0) & ops.isinf(value), 0.0, product)


def _softplus_pair(ops: Ops, x: Array) -> tuple[Array, Array, Array]:
    """Return ``(sp(x), sp(-x), exp(-|x|))``.

    ``sp(x) = max(x, 0) + log1p(exp(-|x|))``: exp never overflows, and for x > 0 both summands are
    non-negative, so the sum is accurate to its last bit; for x < 0 it is log1p of a small number.
    """
    e = ops.exp(-ops.abs(x))
    tail = ops.log1p(e)
    return ops.clamp_min(x, 0.0) + tail, ops.clamp_min(-x, 0.0) + tail, e


def _sigmoid_pair(ops: Ops, x: Array, e: Array) -> tuple[Array, Array]:
    """Return ``(sigmoid(x), sigmoid(-x))`` from ``e = exp(-|x|)``, each without cancellation."""
    large = 1.0 / (1.0 + e)  # sigmoid(|x|)
    small = e / (1.0 + e)  # sigmoid(-|x|), accurate even where it underflows gradually
    positive = x >= 0
    return ops.where(positive, large, small), ops.where(positive, small, large)


# --------------------------------------------------------------------------------------------------------
# Probability loss
# --------------------------------------------------------------------------------------------------------


def bce_loss(ops: Ops, x: Array, y: Array) -> Array:
    """Per-element ``y * min(-log x, 100) + (1 - y) * min(-log(1 - x), 100)``."""
    neg_log_x = ops.clamp_max(-ops.log(x), -LOG_CLAMP)
    neg_log_1mx = ops.clamp_max(-ops.log1p(-x), -LOG_CLAMP)
    return y * neg_log_x + (1.0 - y) * neg_log_1mx


def bce_grad_input(ops: Ops, x: Array, y: Array) -> Array:
    """torch's ``(x - y) / max(x (1 - x), 1e-12)``."""
    return (x - y) / ops.clamp_min(x * (1.0 - x), GRAD_EPSILON)


def bce_grad_target(ops: Ops, x: Array) -> Array:
    """``log(1 - x) - log(x)``: torch's ``-logit(x)``, without forming ``x / (1 - x)``."""
    return ops.log1p(-x) - ops.log(x)


# --------------------------------------------------------------------------------------------------------
# Logits loss
# --------------------------------------------------------------------------------------------------------


def logits_loss(ops: Ops, x: Array, y: Array, pos_weight: Array | None) -> Array:
    """Per-element ``p y sp(-x) + (1 - y) sp(x)``; an infinite logit of the target's sign costs 0."""
    sp_x, sp_neg_x, _ = _softplus_pair(ops, x)
    positive = y if pos_weight is None else pos_weight * y
    return _scaled(ops, positive, sp_neg_x) + _scaled(ops, 1.0 - y, sp_x)


def logits_grad_input(ops: Ops, x: Array, y: Array, pos_weight: Array | None) -> Array:
    """``(1 - y) sigmoid(x) - p y sigmoid(-x)``: torch's ``(p y + 1 - y) sigmoid(x) - p y`` rearranged so
    that it is finite at infinite logits and exact where sigmoid(x) rounds to 1."""
    _, _, e = _softplus_pair(ops, x)
    sig_x, sig_neg_x = _sigmoid_pair(ops, x, e)
    positive = y if pos_weight is None else pos_weight * y
    return (1.0 - y) * sig_x - positive * sig_neg_x


def logits_grad_target(ops: Ops, x: Array, pos_weight: Array | None) -> Array:
    """``p sp(-x) - sp(x)``, which is exactly ``-x`` without a positive weight (torch's formulas)."""
    if pos_weight is None:
        return -x
    sp_x, sp_neg_x, _ = _softplus_pair(ops, x)
    return _scaled(ops, pos_weight, sp_neg_x) - sp_x
