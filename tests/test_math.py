"""The shared formulas themselves, on the paths this machine's backends do not take by default.

On x86-64 and aarch64 Linux, float64 losses run in ``long double`` (:mod:`bcekit._numpy_core`); elsewhere
(and on CUDA) they run in float64 with the double-double combination of :mod:`bcekit._math`. That fallback
is exercised here directly, against the exact reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from _reference import bce_exact, logits_exact, ulp_error
from bcekit import _math, _numpy_core

OPS = _numpy_core.NUMPY_OPS


def _random_logits_points(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n) * 10.0 ** rng.uniform(-3, 2.5, n)
    y = rng.uniform(0, 1, n)
    p = np.where(rng.uniform(size=n) < 0.5, 1.0, rng.uniform(0.1, 5, n))
    return x, y, p


def _max_ulp(values, exact_values) -> float:
    return max(ulp_error(v, e, "float64") for v, e in zip(values, exact_values, strict=True))


def test_double_double_fallback_is_within_2_ulp_on_random_soft_targets() -> None:
    x, y, p = _random_logits_points(1500, seed=1)
    with np.errstate(all="ignore"):
        compensated = _math.logits_loss(OPS, x, y, p, compensated=True)
    assert _max_ulp(compensated, [logits_exact(*t) for t in zip(x, y, p, strict=True)]) <= 2.0


def test_double_double_fallback_beats_plain_float64() -> None:
    """The plain sum of two rounded products drifts past 2 ulp on this sample; the fallback does not."""
    x, y, p = _random_logits_points(1500, seed=1)
    exact = [logits_exact(*t) for t in zip(x, y, p, strict=True)]
    with np.errstate(all="ignore"):
        plain = _math.logits_loss(OPS, x, y, p)
        compensated = _math.logits_loss(OPS, x, y, p, compensated=True)
    assert _max_ulp(compensated, exact) < _max_ulp(plain, exact)


@pytest.mark.parametrize("seed", [2, 3])
def test_double_double_fallback_probability_loss(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, 1000) ** rng.uniform(0.1, 30, 1000)
    x = np.where(rng.uniform(size=1000) < 0.5, x, 1 - x)
    y = rng.uniform(0, 1, 1000)
    with np.errstate(all="ignore"):
        compensated = _math.bce_loss(OPS, x, y, compensated=True)
    assert _max_ulp(compensated, [bce_exact(*t) for t in zip(x, y, strict=True)]) <= 2.0


def test_infinite_logits_fall_back_to_the_plain_formula() -> None:
    x = np.array([np.inf, -np.inf, np.inf])
    y = np.array([1.0, 0.0, 0.5])
    with np.errstate(all="ignore"):
        loss = _math.logits_loss(OPS, x, y, None, compensated=True)
    np.testing.assert_array_equal(loss, [0.0, 0.0, np.inf])
