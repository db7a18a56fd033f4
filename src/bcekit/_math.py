r"""The formulas of the BCE loss family, written once over a tiny array namespace.

Each backend hands in an :class:`Ops` object (``exp``, ``log``, ``log1p``, ``where``, ``clamp_min``, ...,
``sum``, ``size``) acting on its arrays (NumPy, torch, JAX); the math below never sees which. Arrays arrive
already in the compute precision (see :func:`bcekit._semantics.compute_precision`), weights already
broadcastable. The end of the file holds the pipeline every backend runs: targets (label smoothing,
ignore mask), per-element loss or derivatives, weight, mask, reduction.

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

Sigmoid focal loss (torchvision's definition), with :math:`1 - p_t = \sigma(x)(1 - y) + \sigma(-x)\,y` and
:math:`\alpha_t = \alpha y + (1 - \alpha)(1 - y)` (1 when ``alpha < 0``):

.. math::
    \ell(x, y) = \alpha_t\, \ell_{\mathrm{BCE}}(x, y)\, (1 - p_t)^\gamma, \qquad
    \log(1 - p_t) = \operatorname{logaddexp}\bigl(\log(1 - y) - \operatorname{sp}(-x),\;
                                               \log y - \operatorname{sp}(x)\bigr)

``1 - p_t`` is a sum of two non-negative terms, so it is taken in log space with no cancellation; the
``(1 - p_t)^{\gamma - 1}`` of the derivative is combined with the BCE factor in log space too, so that
gradients stay finite where ``1 - p_t`` underflows (large logits, ``gamma < 1``).

In float64 the loss is a sum of two products of rounded numbers (``1 - y``, ``p y``, the softplus sum),
four or five roundings that together can exceed 2 ulp for soft targets. With ``compensated=True`` those
steps are carried out in double-double arithmetic (Dekker's error-free TwoSum and TwoProduct), leaving only
the error of the libm ``log``/``log1p``/``exp`` calls and one final rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from bcekit._semantics import GRAD_EPSILON, LOG_CLAMP, MEAN, NONE

__all__ = [
    "Ops",
    "bce_loss",
    "bce_grad_input",
    "bce_grad_target",
    "logits_loss",
    "logits_grad_input",
    "logits_grad_target",
    "logits_grad_pos_weight",
    "focal_loss",
    "focal_grad_input",
    "focal_grad_target",
    "prepare_targets",
    "kept_mask",
    "valid_targets",
    "LossSpec",
    "elementwise_loss",
    "elementwise_grads",
    "reduce",
    "count",
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
    def isnan(self, a: Array) -> Array: ...
    def sum(self, a: Array) -> Array: ...
    def size(self, a: Array) -> int: ...
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


def logits_grad_pos_weight(ops: Ops, x: Array, y: Array) -> Array:
    """``y sp(-x)``: the logits loss's derivative in its positive-class weight (used by the JAX backend,
    where a weight's gradient cannot be refused as torch does)."""
    x_pos, x_neg, tail, _ = _softplus_parts(ops, x)
    return _scaled(ops, y, x_neg + tail)


# --------------------------------------------------------------------------------------------------------
# Sigmoid focal loss
# --------------------------------------------------------------------------------------------------------


def _logaddexp(ops: Ops, a: Array, b: Array) -> Array:
    """``log(exp(a) + exp(b))``, -inf when both are -inf."""
    high = ops.where(a > b, a, b)
    low = ops.where(a > b, b, a)
    summed = high + ops.log1p(ops.exp(low - high))
    return ops.where(ops.isinf(high) & (high < 0), high, summed)


def _log_softplus(ops: Ops, t: Array, softplus_t: Array) -> Array:
    """``log(sp(t))``, finite where ``sp(t)`` underflows: for t < -20, ``log(log1p(e^t)) = t - e^t / 2``
    to within ``e^(2t)``, far below an ulp of ``t``."""
    return ops.where(t < -20.0, t - ops.exp(t) / 2.0, ops.log(softplus_t))


class _FocalParts:
    """The pieces every focal formula shares, computed once: softplus both ways, sigmoid both ways,
    ``q = log(1 - p_t)``, the BCE factor ``ce`` and ``alpha_t``."""

    def __init__(self, ops: Ops, x: Array, y: Array, alpha: float) -> None:
        x_pos, x_neg, tail, e = _softplus_parts(ops, x)
        self.sp_x, self.sp_neg_x = x_pos + tail, x_neg + tail
        self.sig_x, self.sig_neg_x = _sigmoid_pair(ops, x, e)
        self.log_y, self.log_1my = ops.log(y), ops.log1p(-y)
        self.q = _logaddexp(ops, self.log_1my - self.sp_neg_x, self.log_y - self.sp_x)
        self.ce = _scaled(ops, y, self.sp_neg_x) + _scaled(ops, 1.0 - y, self.sp_x)
        self.alpha_t = 1.0 if alpha < 0 else alpha * y + (1.0 - alpha) * (1.0 - y)

    def log_ce(self, ops: Ops, x: Array) -> Array:
        return _logaddexp(
            ops,
            self.log_y + _log_softplus(ops, -x, self.sp_neg_x),
            self.log_1my + _log_softplus(ops, x, self.sp_x),
        )

    def modulation(self, ops: Ops, gamma: float) -> Array:
        """``(1 - p_t)^gamma``, which is 1 for ``gamma = 0`` even where ``1 - p_t = 0``."""
        return ops.exp(gamma * self.q) if gamma != 0 else 1.0 + 0.0 * self.q

    def gamma_term(self, ops: Ops, x: Array, gamma: float) -> Array:
        """``gamma * ce * (1 - p_t)^(gamma - 1)``, formed in log space."""
        if gamma == 0:
            return 0.0 * self.q
        return gamma * ops.exp(self.log_ce(ops, x) + (gamma - 1.0) * self.q)


def focal_loss(ops: Ops, x: Array, y: Array, alpha: float, gamma: float) -> Array:
    """Per-element ``alpha_t * bce(x, y) * (1 - p_t)^gamma`` (torchvision's ``sigmoid_focal_loss``)."""
    parts = _FocalParts(ops, x, y, alpha)
    return parts.alpha_t * parts.ce * parts.modulation(ops, gamma)


def focal_grad_input(ops: Ops, x: Array, y: Array, alpha: float, gamma: float) -> Array:
    """``alpha_t [ d(ce)/dx (1 - p_t)^g + g ce (1 - p_t)^(g-1) d(1 - p_t)/dx ]`` with
    ``d(ce)/dx = (1 - y) s(x) - y s(-x)`` and ``d(1 - p_t)/dx = s(x) s(-x) (1 - 2y)``."""
    parts = _FocalParts(ops, x, y, alpha)
    d_ce = (1.0 - y) * parts.sig_x - y * parts.sig_neg_x
    d_one_minus_pt = parts.sig_x * parts.sig_neg_x * (1.0 - 2.0 * y)
    return parts.alpha_t * (
        d_ce * parts.modulation(ops, gamma) + parts.gamma_term(ops, x, gamma) * d_one_minus_pt
    )


def focal_grad_target(ops: Ops, x: Array, y: Array, alpha: float, gamma: float) -> Array:
    """``d(alpha_t)/dy ce (1 - p_t)^g + alpha_t [ -x (1 - p_t)^g + g ce (1 - p_t)^(g-1) (s(-x) - s(x)) ]``,
    with ``d(alpha_t)/dy = 2 alpha - 1`` (0 when ``alpha < 0``) and ``d(ce)/dy = sp(-x) - sp(x) = -x``."""
    parts = _FocalParts(ops, x, y, alpha)
    modulation = parts.modulation(ops, gamma)
    d_alpha = 0.0 if alpha < 0 else 2.0 * alpha - 1.0
    inner = -x * modulation + parts.gamma_term(ops, x, gamma) * (parts.sig_neg_x - parts.sig_x)
    return d_alpha * parts.ce * modulation + parts.alpha_t * inner


# --------------------------------------------------------------------------------------------------------
# Target options: ignore_index and label smoothing
# --------------------------------------------------------------------------------------------------------


def kept_mask(ops: Ops, y: Array, ignore_index: float | None) -> Array | None:
    """Mask of the elements that count (target not equal to ``ignore_index``; NaN matches NaN), or None."""
    if ignore_index is None:
        return None
    return ~ops.isnan(y) if ignore_index != ignore_index else y != ignore_index


def valid_targets(ops: Ops, y: Array, ignore_index: float | None) -> Array:
    """Where a probability-loss target is acceptable: in [0, 1] (NaN is not), or ignored."""
    valid = (y >= 0) & (y <= 1)
    kept = kept_mask(ops, y, ignore_index)
    return valid if kept is None else valid | ~kept


def prepare_targets(
    ops: Ops, y: Array, label_smoothing: float, ignore_index: float | None
) -> tuple[Array, Array | None]:
    """Return ``(targets to compute with, mask of kept elements or None)``.

    Ignored elements (target equal to ``ignore_index``; NaN matches NaN) get target 0 so that no NaN or
    infinity from them reaches the arithmetic; callers zero their loss and gradients with the mask. Label
    smoothing (Keras's definition) then maps ``y`` to ``y (1 - s) + s / 2``.
    """
    kept = kept_mask(ops, y, ignore_index)
    if kept is not None:
        y = ops.where(kept, y, 0.0)
    if label_smoothing:
        y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return y, kept


# --------------------------------------------------------------------------------------------------------
# The pipeline every backend runs: targets -> per-element loss or gradients -> weight -> mask -> reduction
# --------------------------------------------------------------------------------------------------------


class LossSpec(NamedTuple):
    """Which loss, and its options. ``kind`` is ``'bce'`` (probabilities), ``'logits'`` or ``'focal'``."""

    kind: str
    reduction: int
    label_smoothing: float = 0.0
    ignore_index: float | None = None
    alpha: float = 0.25  # focal only
    gamma: float = 2.0  # focal only


def _finish(ops: Ops, values: Array, weight: Array | None, kept: Array | None) -> Array:
    if weight is not None:
        values = values * weight
    return values if kept is None else ops.where(kept, values, 0.0)


def elementwise_loss(
    ops: Ops,
    spec: LossSpec,
    x: Array,
    y: Array,
    weight: Array | None = None,
    pos_weight: Array | None = None,
    compensated: bool = False,
) -> tuple[Array, Array | None]:
    """Per-element loss (weighted, zero where ignored) and the mask of kept elements (None: all kept)."""
    y, kept = prepare_targets(ops, y, spec.label_smoothing, spec.ignore_index)
    if spec.kind == "bce":
        loss = bce_loss(ops, x, y, compensated)
    elif spec.kind == "logits":
        loss = logits_loss(ops, x, y, pos_weight, compensated)
    else:
        loss = focal_loss(ops, x, y, spec.alpha, spec.gamma)
    return _finish(ops, loss, weight, kept), kept


def elementwise_grads(
    ops: Ops,
    spec: LossSpec,
    x: Array,
    y: Array,
    weight: Array | None = None,
    pos_weight: Array | None = None,
    need_input: bool = True,
    need_target: bool = False,
) -> tuple[Array | None, Array | None]:
    """Per-element derivatives of the (weighted, masked) loss in input and in the *given* target; label
    smoothing contributes its chain-rule factor ``1 - label_smoothing`` to the latter."""
    y, kept = prepare_targets(ops, y, spec.label_smoothing, spec.ignore_index)
    grad_input = grad_target = None
    if need_input:
        if spec.kind == "bce":
            grad_input = bce_grad_input(ops, x, y)
        elif spec.kind == "logits":
            grad_input = logits_grad_input(ops, x, y, pos_weight)
        else:
            grad_input = focal_grad_input(ops, x, y, spec.alpha, spec.gamma)
        grad_input = _finish(ops, grad_input, weight, kept)
    if need_target:
        if spec.kind == "bce":
            grad_target = bce_grad_target(ops, x)
        elif spec.kind == "logits":
            grad_target = logits_grad_target(ops, x, pos_weight)
        else:
            grad_target = focal_grad_target(ops, x, y, spec.alpha, spec.gamma)
        if spec.label_smoothing:
            grad_target = grad_target * (1.0 - spec.label_smoothing)
        grad_target = _finish(ops, grad_target, weight, kept)
    return grad_input, grad_target


def count(ops: Ops, loss: Array, kept: Array | None) -> Array | int:
    """The mean's denominator: the number of kept elements (weights do not change it)."""
    return ops.size(loss) if kept is None else ops.sum(kept)


def reduce(ops: Ops, loss: Array, kept: Array | None, reduction: int) -> Array:
    """``'none'``, ``'sum'`` or ``'mean'`` over the kept elements (an empty or all-ignored mean is NaN)."""
    if reduction == NONE:
        return loss
    total = ops.sum(loss)
    return total / count(ops, loss, kept) if reduction == MEAN else total
