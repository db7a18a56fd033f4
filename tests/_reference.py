"""Exact reference values for the BCE losses, and the ulp error of a floating result against them.

Everything here is independent of bcekit: the losses are evaluated in mpmath at 200 bits from the exact
values of the (already rounded) floating arguments, and the error is measured in units in the last place
of the *exact* value in the result's dtype. Used by ``tests/test_accuracy.py`` and
``benchmarks/accuracy.py``.

Definitions (the project's promise, see ``bcekit._math``):

* probability loss: ``y min(-log x, 100) + (1 - y) min(-log(1 - x), 100)``;
* logits loss: ``p y sp(-x) + (1 - y) sp(x)`` with ``sp(t) = log(1 + e^t)`` and ``p`` the positive
  weight (1 when absent); a term whose coefficient is exactly zero is absent, so ``x = +inf, y = 1`` gives
  0 and ``x = -inf, y = 1`` gives +inf;
* sigmoid focal loss (torchvision's): ``alpha_t ce (1 - p_t)^gamma`` with ``ce`` the logits loss,
  ``1 - p_t = sigmoid(x) (1 - y) + sigmoid(-x) y`` and ``alpha_t = alpha y + (1 - alpha)(1 - y)`` (1 when
  ``alpha < 0``); its derivatives in ``x`` and ``y`` by the product rule, with the size of their terms.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import mpmath
import numpy as np

__all__ = [
    "MP",
    "bce_exact",
    "logits_exact",
    "focal_exact",
    "focal_mp",
    "focal_grad_exact",
    "FocalGrad",
    "ulp",
    "ulp_error",
    "FORMATS",
]

#: A private mpmath context, so that the precision never leaks into (or from) other code using ``mpmath.mp``.
MP = mpmath.MPContext()
MP.prec = 200

#: dtype -> (explicit mantissa bits, exponent of the smallest subnormal, exponent of 2 that overflows).
FORMATS: dict[type, tuple[int, int, int]] = {
    np.float32: (23, -149, 128),
    np.float64: (52, -1074, 1024),
}

_LOG_CLAMP = 100  # -log terms of the probability loss are clamped at 100, as torch does


def _format(dtype: object) -> tuple[int, int, int]:
    return FORMATS[np.dtype(dtype).type]


def _log1p(t: mpmath.mpf) -> mpmath.mpf:
    """``log(1 + t)`` for ``t >= -1``, with full relative precision even where ``|t|`` is tiny."""
    if t == 0:
        return MP.zero
    if abs(t) < MP.mpf(2) ** -60:
        # Alternating series; four terms leave a relative error below 2**-240.
        return t - t**2 / 2 + t**3 / 3 - t**4 / 4
    return MP.log(1 + t)  # 1 + t has cancelled at most 60 of the 200 bits


def _softplus(t: mpmath.mpf) -> mpmath.mpf:
    """``sp(t) = log(1 + e^t) = max(t, 0) + log1p(e^-|t|)``, exact at +-inf."""
    if MP.isinf(t):
        return MP.inf if t > 0 else MP.zero
    return max(t, MP.zero) + _log1p(MP.exp(-abs(t)))


def _smoothed(y: float, smoothing: float) -> mpmath.mpf:
    """``y (1 - s) + s / 2``, exact at 200 bits for float64 ``y`` and ``s``."""
    ym = MP.mpf(y)
    return ym if smoothing == 0 else ym * (1 - MP.mpf(smoothing)) + MP.mpf(smoothing) / 2


@functools.cache
def logits_exact(
    x: float, y: float, pos_weight: float | None = None, smoothing: float = 0.0, weight: float = 1.0
) -> mpmath.mpf:
    """The exact logits loss at floating ``x``, ``y`` (and ``pos_weight``, label ``smoothing``, ``weight``),
    as an mpmath number."""
    xm, ym = MP.mpf(x), _smoothed(y, smoothing)
    positive = ym if pos_weight is None else MP.mpf(pos_weight) * ym  # exact at 200 bits
    negative = 1 - ym  # exact at 200 bits for any float64 y in [0, 1]
    total = MP.zero
    if positive != 0:
        total += positive * _softplus(-xm)
    if negative != 0:
        total += negative * _softplus(xm)
    return total * MP.mpf(weight)


def _clamped_neg_log(value: mpmath.mpf) -> mpmath.mpf:
    """``min(-log(value), 100)`` for ``value`` in [0, 1] (``-log 0 = inf`` clamps to 100)."""
    if value == 0:
        return MP.mpf(_LOG_CLAMP)
    return min(-MP.log(value), MP.mpf(_LOG_CLAMP))


@functools.cache
def bce_exact(x: float, y: float, smoothing: float = 0.0, weight: float = 1.0) -> mpmath.mpf:
    """The exact probability loss at floating ``x`` in [0, 1] and ``y`` in [0, 1] (with label ``smoothing``
    and ``weight``)."""
    xm, ym = MP.mpf(x), _smoothed(y, smoothing)
    neg_log_x = _clamped_neg_log(xm)
    neg_log_1mx = MP.mpf(_LOG_CLAMP) if xm == 1 else min(-_log1p(-xm), MP.mpf(_LOG_CLAMP))
    total = MP.zero
    if ym != 0:
        total += ym * neg_log_x
    if ym != 1:
        total += (1 - ym) * neg_log_1mx
    return total * MP.mpf(weight)


def ulp(exact: mpmath.mpf, dtype: object) -> mpmath.mpf:
    """``2**(floor(log2|exact|) - mantissa_bits)``, floored at the dtype's smallest subnormal."""
    mantissa, subnormal, _ = _format(dtype)
    if exact == 0:
        return MP.ldexp(1, subnormal)
    _, exponent = MP.frexp(abs(exact))  # |exact| = m 2**exponent with 0.5 <= m < 1
    return MP.ldexp(1, max(int(exponent) - 1 - mantissa, subnormal))


def _overflows(exact: mpmath.mpf, dtype: object) -> bool:
    """Whether ``exact`` rounds to infinity in ``dtype`` (round to nearest: at or past max + ulp(max)/2)."""
    mantissa, _, overflow = _format(dtype)
    threshold = MP.ldexp(2 - MP.ldexp(1, -mantissa - 1), overflow - 1)
    return abs(exact) >= threshold


def ulp_error(value: float, exact: mpmath.mpf, dtype: object) -> float:
    """``|value - exact| / ulp(exact)`` in ``dtype``; ``inf`` for NaN, and unless ``value`` is exactly 0
    where ``exact`` is 0, and exactly the right infinity where ``exact`` is infinite or rounds to one."""
    value = float(value)
    if math.isnan(value) or MP.isnan(exact):
        return math.inf
    if MP.isinf(exact) or _overflows(exact, dtype):
        return 0.0 if value == math.copysign(math.inf, float(MP.sign(exact))) else math.inf
    if exact == 0:
        return 0.0 if value == 0 else math.inf
    if math.isinf(value):
        return math.inf
    return float(abs(MP.mpf(value) - exact) / ulp(exact, dtype))


# --------------------------------------------------------------------------------------------------------
# Sigmoid focal loss (finite x only)
# --------------------------------------------------------------------------------------------------------


def _sigmoid(t: mpmath.mpf) -> mpmath.mpf:
    """``1 / (1 + e^-t)``, with full relative precision both ways (mpmath's exponent range is unbounded)."""
    return 1 / (1 + MP.exp(-t))


def _focal_parts(xm: mpmath.mpf, ym: mpmath.mpf, alpha: float) -> tuple:
    """``(sigmoid(x), sigmoid(-x), 1 - p_t, alpha_t, ce)`` at mpmath arguments."""
    s_pos, s_neg = _sigmoid(xm), _sigmoid(-xm)
    one_minus_pt = s_pos * (1 - ym) + s_neg * ym  # both terms >= 0: no cancellation
    alpha_t = MP.one if alpha < 0 else MP.mpf(alpha) * ym + (1 - MP.mpf(alpha)) * (1 - ym)
    ce = MP.zero
    if ym != 0:
        ce += ym * _softplus(-xm)
    if ym != 1:
        ce += (1 - ym) * _softplus(xm)
    return s_pos, s_neg, one_minus_pt, alpha_t, ce


def focal_mp(xm: mpmath.mpf, ym: mpmath.mpf, alpha: float, gamma: float) -> mpmath.mpf:
    """The focal loss at mpmath arguments (finite ``x``, ``y`` in [0, 1]); what :func:`focal_exact`
    evaluates, exposed so that derivatives can be checked by numerical differentiation."""
    *_, one_minus_pt, alpha_t, ce = _focal_parts(xm, ym, alpha)
    return alpha_t * ce * (one_minus_pt ** MP.mpf(gamma) if gamma != 0 else MP.one)


@functools.cache
def focal_exact(x: float, y: float, alpha: float, gamma: float) -> mpmath.mpf:
    """The exact sigmoid focal loss at finite floating ``x`` and ``y`` in [0, 1] (torchvision's definition;
    ``alpha < 0`` means no class weighting, ``gamma = 0`` gives ``(1 - p_t)^0 = 1``)."""
    return focal_mp(MP.mpf(x), MP.mpf(y), alpha, gamma)


class FocalGrad(NamedTuple):
    """Exact derivatives of the focal loss, and for each the sum of the absolute values of the terms it is
    made of: the scale against which a floating evaluation's (unavoidable) cancellation error is measured.
    (Where the terms cancel almost completely, the 200-bit sum is itself only accurate to ``2^-200`` of the
    scale, far below any floating tolerance.)"""

    input: mpmath.mpf
    target: mpmath.mpf
    input_scale: mpmath.mpf
    target_scale: mpmath.mpf


@functools.cache
def focal_grad_exact(x: float, y: float, alpha: float, gamma: float) -> FocalGrad:
    r"""Derivatives of ``L = A C M`` with ``A = alpha_t``, ``C = ce``, ``M = u^gamma``, ``u = 1 - p_t``:

    * ``dL/dx = A [C_x M + C g u^(g-1) u_x]``, ``C_x = (1 - y) s(x) - y s(-x)``,
      ``u_x = s(x) s(-x) (1 - 2y)``;
    * ``dL/dy = A_y C M + A [C_y M + C g u^(g-1) u_y]``, ``A_y = 2 alpha - 1`` (0 when ``alpha < 0``),
      ``C_y = sp(-x) - sp(x) = -x``, ``u_y = s(-x) - s(x)``.
    """
    xm, ym = MP.mpf(x), MP.mpf(y)
    s_pos, s_neg, u, alpha_t, ce = _focal_parts(xm, ym, alpha)
    g = MP.mpf(gamma)
    modulation = u**g if gamma != 0 else MP.one
    focus = g * ce * u ** (g - 1) if gamma != 0 else MP.zero  # C dM/du
    d_alpha = MP.zero if alpha < 0 else 2 * MP.mpf(alpha) - 1
    input_terms = [
        alpha_t * (1 - ym) * s_pos * modulation,
        -alpha_t * ym * s_neg * modulation,
        alpha_t * focus * s_pos * s_neg * (1 - 2 * ym),
    ]
    target_terms = [
        d_alpha * ce * modulation,
        -alpha_t * xm * modulation,
        alpha_t * focus * s_neg,
        -alpha_t * focus * s_pos,
    ]
    return FocalGrad(
        MP.fsum(input_terms),
        MP.fsum(target_terms),
        MP.fsum(abs(t) for t in input_terms),
        MP.fsum(abs(t) for t in target_terms),
    )
