"""The shared formulas evaluated with NumPy, in any floating precision, ``long double`` included.

Used by the NumPy backend, and by the torch backend for float64 results on the CPU.

Why ``long double`` for float64: a float64 loss is ``p y sp(-x) + (1 - y) sp(x)`` (or the probability
loss's two log terms, or the focal loss's product), and a libm ``exp``/``log1p`` carries up to ~1 ulp of
error into ``sp``. Multiplying by ``p`` or a weight can turn that into 2 ulp of the product (an ulp is
relative to the leading digit, which a product may move), and below 2^-1022 a subnormal ``exp(-|x|)`` or
``p y`` loses digits outright. The x87 80-bit long double (x86-64 Linux) and IEEE quad (aarch64 Linux) have
11 or more extra bits and a far wider exponent, so the same formulas evaluated there and rounded once to
float64 are within 0.5 ulp plus 2^-11 ulp, subnormals included. Where ``long double`` is plain double
(Windows, macOS on arm64) :data:`EXTENDED` is ``None`` and float64 is computed in float64 with the
double-double combination step of :mod:`bcekit._math` (``compensated=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bcekit import _math
from bcekit._semantics import MEAN

__all__ = ["EXTENDED", "NumpyOps", "NUMPY_OPS", "loss", "gradients"]


class NumpyOps:
    """The elementwise namespace :mod:`bcekit._math` computes with, over NumPy arrays of any dtype."""

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    abs = staticmethod(np.abs)
    isinf = staticmethod(np.isinf)
    isfinite = staticmethod(np.isfinite)
    isnan = staticmethod(np.isnan)
    where = staticmethod(np.where)

    @staticmethod
    def clamp_min(a: Any, bound: float) -> Any:
        return np.maximum(a, bound)

    @staticmethod
    def clamp_max(a: Any, bound: float) -> Any:
        return np.minimum(a, bound)

    @staticmethod
    def sum(a: np.ndarray) -> Any:
        # pairwise summation, in the array's own dtype (booleans count)
        return np.sum(a, dtype=np.intp if a.dtype == np.bool_ else a.dtype)

    @staticmethod
    def size(a: np.ndarray) -> int:
        return a.size


NUMPY_OPS = NumpyOps()

#: The extended floating type used for float64 results, or None where the platform has none.
EXTENDED: type[np.floating] | None = np.longdouble if np.finfo(np.longdouble).nmant >= 63 else None


def _cast(array: np.ndarray | None, dtype: Any) -> np.ndarray | None:
    return None if array is None else np.asarray(array).astype(dtype, copy=False)


def loss(
    spec: _math.LossSpec,
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    pos_weight: np.ndarray | None,
    compute: Any,
    compensated: bool = False,
) -> np.ndarray:
    """The reduced (or per-element) loss, computed in ``compute`` precision and returned in it."""
    x, y, weight, pos_weight = (_cast(a, compute) for a in (x, y, weight, pos_weight))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        values, kept = _math.elementwise_loss(NUMPY_OPS, spec, x, y, weight, pos_weight, compensated)
        return np.asarray(_math.reduce(NUMPY_OPS, values, kept, spec.reduction))


def gradients(
    spec: _math.LossSpec,
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    pos_weight: np.ndarray | None,
    compute: Any,
    need_target: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Derivatives of the reduced loss in input (and target), in ``compute`` precision; for ``'none'``
    each element's own derivative."""
    x, y, weight, pos_weight = (_cast(a, compute) for a in (x, y, weight, pos_weight))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        grad_input, grad_target = _math.elementwise_grads(
            NUMPY_OPS, spec, x, y, weight, pos_weight, need_input=True, need_target=need_target
        )
        if spec.reduction == MEAN:
            kept = _math.kept_mask(NUMPY_OPS, y, spec.ignore_index)
            denominator = _math.count(NUMPY_OPS, x, kept)
            grad_input = grad_input / denominator if denominator else grad_input
            if grad_target is not None and denominator:
                grad_target = grad_target / denominator
        return grad_input, grad_target
