"""float64 losses on the CPU, evaluated in the platform's extended ``long double`` and rounded once.

Why: a float64 loss is ``p y sp(-x) + (1 - y) sp(x)`` (or the probability loss's two log terms), and a
libm ``exp``/``log1p`` carries up to ~1 ulp of error into ``sp``. Multiplying by ``p`` or a weight can turn
that into 2 ulp of the product (an ulp is relative to the leading digit, which a product may move), and
below 2^-1022 a subnormal ``exp(-|x|)`` or ``p y`` loses digits outright. The x87 80-bit long double (x86-64
Linux) and IEEE quad (aarch64 Linux) have 11 or more extra bits and a far wider exponent, so the same
formulas evaluated there and rounded once to float64 are within 0.5 ulp plus 2^-11 ulp, subnormals
included. Where ``long double`` is plain double (Windows, macOS on arm64) :data:`EXTENDED` is ``None`` and
the backends fall back to float64 with double-double combination (``compensated=True`` in :mod:`_math`).

The NumPy elementwise namespace lives here too, since both the NumPy backend and this path use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bcekit import _math
from bcekit._semantics import MEAN, NONE

__all__ = ["EXTENDED", "NumpyOps", "NUMPY_OPS", "bce_loss", "logits_loss", "reduce_loss"]


class NumpyOps:
    """The elementwise namespace :mod:`bcekit._math` computes with, over NumPy arrays of any dtype."""

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    abs = staticmethod(np.abs)
    isinf = staticmethod(np.isinf)
    isfinite = staticmethod(np.isfinite)
    where = staticmethod(np.where)

    @staticmethod
    def clamp_min(a: Any, bound: float) -> Any:
        return np.maximum(a, bound)

    @staticmethod
    def clamp_max(a: Any, bound: float) -> Any:
        return np.minimum(a, bound)


NUMPY_OPS = NumpyOps()

#: The extended floating type used for float64 results, or None where the platform has none.
EXTENDED: type[np.floating] | None = np.longdouble if np.finfo(np.longdouble).nmant >= 63 else None


def reduce_loss(loss: np.ndarray, reduction: int) -> np.ndarray:
    """Apply a reduction in the array's own dtype (NumPy sums pairwise); the mean divides by the count."""
    if reduction == NONE:
        return loss
    total = np.sum(loss, dtype=loss.dtype)
    return total / loss.size if reduction == MEAN else total


def _extend(array: np.ndarray | None) -> np.ndarray | None:
    assert EXTENDED is not None
    return None if array is None else np.asarray(array).astype(EXTENDED)


def bce_loss(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None, reduction: int) -> np.ndarray:
    """The probability loss, reduced, in extended precision, rounded once to float64."""
    xe, ye, we = _extend(x), _extend(y), _extend(weight)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        loss = _math.bce_loss(NUMPY_OPS, xe, ye)
        if we is not None:
            loss = loss * we
        return np.asarray(reduce_loss(loss, reduction)).astype(np.float64)


def logits_loss(
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    pos_weight: np.ndarray | None,
    reduction: int,
) -> np.ndarray:
    """The logits loss, reduced, in extended precision, rounded once to float64."""
    xe, ye, we, pe = _extend(x), _extend(y), _extend(weight), _extend(pos_weight)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        loss = _math.logits_loss(NUMPY_OPS, xe, ye, pe)
        if we is not None:
            loss = loss * we
        return np.asarray(reduce_loss(loss, reduction)).astype(np.float64)
