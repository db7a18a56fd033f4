"""The exact sums behind ``bcekit score``: the kernel's fixed-point accumulator and :class:`ExactSum`.

References are Python's :class:`fractions.Fraction` sums of the same float64 values, never bcekit's own
sums: the kernel's per-element losses (checked against mpmath in ``tests/test_accuracy.py``) are summed
here exactly, and the kernel must give the same integer whatever the threads and the batching.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import bcekit
from bcekit import _native
from bcekit.cli._scoring import ExactSum

pytestmark = pytest.mark.skipif(not _native.AVAILABLE, reason="the C++ kernels are not built")

SCALE = 2**1074


def _columns(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, 0/1 and soft targets, and weights from 1e-310 to 1e300 of both signs, so that the losses
    cover the whole float64 range (subnormals included) and their sum carries and borrows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 4.0, n)
    y = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n), rng.random(n)).astype(np.float64)
    w = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-310.0, 300.0, n)
    return x, y, w


def _losses(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    out = np.empty_like(x)
    _native._core.losses64(1, x, y, w, None, 0.0, None, out, "auto")
    return out


def _fraction_sum(values: np.ndarray) -> Fraction:
    return sum((Fraction(v) for v in values.tolist()), Fraction(0))


def _kernel_sum(x, y, w, threads: int = 2) -> ExactSum:
    previous = bcekit.get_num_threads()
    bcekit.set_num_threads(threads)
    try:
        [(digits, pos_inf, neg_inf, nan, kept, flags)] = _native.score(
            True, [x], [y], w, None, 0.0, None, None
        )
    finally:
        bcekit.set_num_threads(previous)
    return ExactSum(int.from_bytes(digits, "little", signed=True), pos_inf, neg_inf, nan)


def test_kernel_sum_is_exact() -> None:
    x, y, w = _columns(200_003, seed=1)
    total = _kernel_sum(x, y, w)
    assert total.scaled == _fraction_sum(_losses(x, y, w)) * SCALE
    assert (total.pos_inf, total.neg_inf, total.nan) == (0, 0, 0)


def test_kernel_sum_independent_of_threads_and_batches() -> None:
    x, y, w = _columns(300_000, seed=2)
    whole = [_kernel_sum(x, y, w, threads) for threads in (1, 2, 3)]
    assert whole[0] == whole[1] == whole[2]
    pieces = ExactSum()
    for start, stop in ((0, 1), (1, 8_193), (8_193, 150_001), (150_001, 300_000)):
        pieces += _kernel_sum(x[start:stop], y[start:stop], w[start:stop])
    assert pieces == whole[0]


def test_kernel_counts_infinities_and_nan_apart() -> None:
    x = np.array([math.inf, -math.inf, math.nan, 1.0, 2.0])
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    w = np.array([1.0, -1.0, 1.0, 1.0, 1.0])
    total = _kernel_sum(x, y, w)
    assert (total.pos_inf, total.neg_inf, total.nan) == (1, 1, 1)
    assert total.scaled == _fraction_sum(_losses(x[3:], y[3:], w[3:])) * SCALE


def test_python_sum_matches_fractions() -> None:
    """ExactSum.of, the path without the kernels, against Fraction sums (and the kernel's)."""
    x, y, w = _columns(20_000, seed=3)
    losses = _losses(x, y, w)
    values = np.concatenate([losses, [5e-324, -5e-324, 1.7976931348623157e308, -2.2250738585072014e-308]])
    assert ExactSum.of(values).scaled == _fraction_sum(values) * SCALE
    assert ExactSum.of(losses) == _kernel_sum(x, y, w)
    special = ExactSum.of(np.array([1.0, math.inf, math.inf, -math.inf, math.nan]))
    assert (special.pos_inf, special.neg_inf, special.nan) == (2, 1, 1)


@pytest.mark.parametrize(
    ("values", "count"),
    [
        ([0.1, 0.2, 0.3], 3),
        ([1e308, 1e308, 1e308], 3),  # the sum overflows, the mean does not
        ([1e308, 1e308], 1),  # overflows: inf
        ([-1e308, -1e308], 1),
        ([5e-324, 5e-324, 5e-324], 2),  # rounds to nearest even in the subnormals
        ([1.0, -1.0], 1),
    ],
)
def test_value_is_correctly_rounded(values: list[float], count: int) -> None:
    exact = _fraction_sum(np.array(values)) / count
    try:
        expected = float(exact)
    except OverflowError:
        expected = math.inf if exact > 0 else -math.inf
    assert ExactSum.of(np.array(values)).value(count) == expected


@pytest.mark.parametrize(
    ("pos_inf", "neg_inf", "nan", "expected"),
    [
        (1, 0, 0, math.inf),
        (0, 2, 0, -math.inf),
        (1, 1, 0, math.nan),
        (0, 0, 1, math.nan),
        (3, 0, 1, math.nan),
    ],
)
def test_value_follows_ieee_for_special_terms(pos_inf: int, neg_inf: int, nan: int, expected: float) -> None:
    value = ExactSum(12345, pos_inf, neg_inf, nan).value(7)
    assert value == expected or (math.isnan(value) and math.isnan(expected))
