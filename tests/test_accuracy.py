"""The accuracy promise: every per-element loss is within 2 ulp of the exact value, float32 and float64.

The exact values come from :mod:`_reference` (mpmath at 200 bits, from the exact values of the rounded
arguments); nothing here compares bcekit with itself. Both backends (``bcekit.torch`` and
``bcekit.numpy``) are checked on a deterministic grid of extremes, on float64 points built so that a
rounding error inside the computation is scaled up by ``pos_weight * y`` (where random inputs almost never
land), and on Hypothesis draws, with soft targets and ``pos_weight``. Two further tests document where
torch's own losses stand: its logits loss cancels for ``x << 0, y = 0``, and our ``'mean'`` must be at
least as accurate as its.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bcekit.numpy as bce_np
import bcekit.torch as bce_torch
from _reference import MP, bce_exact, logits_exact, ulp, ulp_error
from bcekit import _native as native

MAX_ULP = 2.0
DTYPES = ("float32", "float64")
BACKENDS = ("torch", "numpy")

# --------------------------------------------------------------------------------------------------------
# Evaluation helpers: NumPy arrays in, NumPy arrays out, whatever the backend
# --------------------------------------------------------------------------------------------------------


def _logits_loss(backend: str, x: np.ndarray, y: np.ndarray, p: np.ndarray | None) -> np.ndarray:
    if backend == "torch":
        pos_weight = None if p is None else torch.from_numpy(p)
        out = bce_torch.binary_cross_entropy_with_logits(
            torch.from_numpy(x), torch.from_numpy(y), pos_weight=pos_weight, reduction="none"
        )
        assert out.dtype == torch.from_numpy(y).dtype
        return out.numpy()
    out = np.asarray(bce_np.binary_cross_entropy_with_logits(x, y, pos_weight=p, reduction="none"))
    assert out.dtype == y.dtype
    return out


def _probability_loss(backend: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if backend == "torch":
        out = bce_torch.binary_cross_entropy(torch.from_numpy(x), torch.from_numpy(y), reduction="none")
        assert out.dtype == torch.from_numpy(x).dtype
        return out.numpy()
    out = np.asarray(bce_np.binary_cross_entropy(x, y, reduction="none"))
    assert out.dtype == x.dtype
    return out


def _cast(values, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # float64 magnitudes past float32's range become inf, on purpose
        return np.asarray(values, dtype=np.float64).astype(dtype)


def _assert_within(
    label: str, results: np.ndarray, arguments: list[tuple], exact_of, dtype: str, limit: float = MAX_ULP
) -> None:
    """Assert that every result is within ``limit`` ulp of ``exact_of(*arguments[i])``; report the worst."""
    errors = [ulp_error(r, exact_of(*a), dtype) for r, a in zip(results.tolist(), arguments, strict=True)]
    worst = int(np.argmax(errors))
    exact = exact_of(*arguments[worst])
    assert errors[worst] <= limit, (
        f"{label}: {errors[worst]:.4g} ulp at arguments {arguments[worst]}: "
        f"got {results[worst]!r}, exact {MP.nstr(exact, 20)}"
    )


# --------------------------------------------------------------------------------------------------------
# The reference itself (so that a broken reference cannot make the tests below pass vacuously)
# --------------------------------------------------------------------------------------------------------


def test_reference_agrees_with_plain_float64_formulas() -> None:
    for x, y, p in [
        (-3.0, 0.0, None),
        (0.5, 0.3, None),
        (2.0, 0.7, 2.5),
        (-40.0, 0.0, None),
        (30.0, 1.0, 0.5),
    ]:
        exact = float(logits_exact(x, y, p))
        p_ = 1.0 if p is None else p
        plain = p_ * y * math.log1p(math.exp(-x)) + (1 - y) * math.log1p(math.exp(x))
        assert math.isclose(exact, plain, rel_tol=1e-15), (x, y, p)
    for x, y in [(0.3, 0.0), (0.3, 1.0), (0.25, 0.6), (1e-30, 0.0), (1e-30, 1.0)]:
        plain = -y * math.log(x) - (1 - y) * math.log1p(-x)
        assert math.isclose(float(bce_exact(x, y)), plain, rel_tol=1e-15), (x, y)
    # The clamp at 100 and the absent terms.
    assert bce_exact(0.0, 1.0) == 100 and bce_exact(1.0, 0.0) == 100 and bce_exact(0.0, 0.0) == 0
    assert logits_exact(math.inf, 1.0) == 0 and logits_exact(-math.inf, 0.0) == 0
    assert logits_exact(-math.inf, 1.0) == math.inf and logits_exact(math.inf, 0.5) == math.inf


def test_ulp_helper() -> None:
    assert ulp(MP.mpf(1), "float32") == MP.mpf(2) ** -23
    assert ulp(MP.mpf(0.75), "float64") == MP.mpf(2) ** -53
    assert ulp(MP.mpf(1e-320), "float64") == MP.mpf(2) ** -1074  # floored at the smallest subnormal
    assert ulp(MP.mpf(1e-40), "float32") == MP.mpf(2) ** -149
    one_up = float(np.nextafter(np.float32(1), np.float32(2)))
    assert ulp_error(one_up, MP.mpf(1), "float32") == 1.0
    assert ulp_error(1.0, MP.mpf(1) + MP.mpf(2) ** -54, "float64") == 0.25
    assert ulp_error(0.0, MP.zero, "float32") == 0.0
    assert ulp_error(1e-45, MP.zero, "float32") == math.inf  # exact 0 must be exactly 0
    assert ulp_error(math.inf, MP.inf, "float64") == 0.0
    assert ulp_error(1e308, MP.inf, "float64") == math.inf
    assert ulp_error(math.inf, MP.mpf(2) ** 1100, "float64") == 0.0  # rounds to inf
    assert ulp_error(math.nan, MP.mpf(1), "float64") == math.inf


# --------------------------------------------------------------------------------------------------------
# Deterministic grids of extremes
# --------------------------------------------------------------------------------------------------------

LOGIT_MAGNITUDES = (0.0, 1e-30, 1e-8, 0.1, 1.0, 2.0, 10.0, 16.0, 17.0, 20.0, 30.0, 40.0, 88.0, 89.0, 100.0)
LOGIT_MAGNITUDES += (104.0, 700.0, 710.0, 745.0, 750.0, 1000.0, 1e4)
LOGITS = tuple(s * m for m in LOGIT_MAGNITUDES for s in (1.0, -1.0)) + (math.inf, -math.inf)
LOGIT_TARGETS = (0.0, 1.0, 0.5, 0.1, 0.999, 1e-3)
POS_WEIGHTS = (None, 0.5, 3.0)


@pytest.mark.parametrize("pos_weight", POS_WEIGHTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_loss_grid(dtype: str, backend: str, pos_weight: float | None) -> None:
    xs, ys = zip(*itertools.product(LOGITS, LOGIT_TARGETS), strict=True)
    x, y = _cast(xs, dtype), _cast(ys, dtype)
    p = None if pos_weight is None else np.full_like(x, pos_weight)
    results = _logits_loss(backend, x, y, p)
    arguments = [
        (a, b, None if p is None else float(p[0])) for a, b in zip(x.tolist(), y.tolist(), strict=True)
    ]
    _assert_within(
        f"{backend} logits {dtype} pos_weight={pos_weight}", results, arguments, logits_exact, dtype
    )
    # Infinite exact values are +inf, never NaN or a large finite number.
    infinite = [i for i, a in enumerate(arguments) if MP.isinf(logits_exact(*a))]
    assert infinite and all(results[i] == math.inf for i in infinite)


def _probabilities(dtype: str) -> np.ndarray:
    special = [0.0, 1.0, 1e-45, 5e-324, 1e-300, 1e-30, 1e-8, 0.1, 0.5, 0.9, 1 - 2**-24, 1 - 2**-53]
    rng = np.random.default_rng(20240601)
    random = np.concatenate(
        [rng.random(16), 10.0 ** rng.uniform(-40, 0, 16), 1 - 10.0 ** rng.uniform(-15, -1, 8)]
    )
    x = _cast(np.concatenate([special, random]), dtype)
    # Both neighbours of exp(-100), where -log x crosses the clamp at 100.
    edge = _cast([math.exp(-100)], dtype)
    x = np.concatenate([x, edge, np.nextafter(edge, 0), np.nextafter(edge, 1)]).astype(dtype)
    return np.unique(x)


PROBABILITY_TARGETS = (0.0, 1.0, 0.5, 0.1, 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_probability_loss_grid(dtype: str, backend: str) -> None:
    xs, ys = zip(*itertools.product(_probabilities(dtype).tolist(), PROBABILITY_TARGETS), strict=True)
    x, y = _cast(xs, dtype), _cast(ys, dtype)
    results = _probability_loss(backend, x, y)
    arguments = list(zip(x.tolist(), y.tolist(), strict=True))
    _assert_within(f"{backend} probabilities {dtype}", results, arguments, bce_exact, dtype)


# Points where an intermediate of the float64 computation is subnormal, so rounded to an absolute 2**-1075,
# and then scaled up: exp(-|x|) for |x| > 708.4 times pos_weight > 1, or pos_weight * y below 2**-1022
# times sp(-x) >> 1. The promise holds there all the same: the error is measured in ulp of the exact loss.
SUBNORMAL_INTERMEDIATES = [
    (710.0, 1.0, 3.0),
    (720.0, 1.0, 100.0),
    (740.0, 1.0, 100.0),
    (-706.0, 2.2250738585072014e-308, 0.01),
    (-1e4, 5e-324, 0.5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("point", SUBNORMAL_INTERMEDIATES, ids=lambda t: "x={:g},y={:g},p={:g}".format(*t))
def test_logits_loss_subnormal_intermediates_float64(point: tuple[float, float, float], backend: str) -> None:
    x, y, p = (_cast([v], "float64") for v in point)
    _assert_within(
        f"{backend} logits float64", _logits_loss(backend, x, y, p), [point], logits_exact, "float64"
    )


def _amplifying_points(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits where ``tail = log1p(exp(-x))`` lies just above 0.5, the bottom of its binade (where one ulp
    is relatively largest), with ``pos_weight`` putting ``p * tail`` just below a power of two, the top of
    its binade (where one ulp is relatively smallest): an error of k ulp in the tail is nearly 2k ulp of
    the loss ``p * sp(-x)`` (``y = 1``). Random inputs almost never land here."""
    rng = np.random.default_rng(11)
    x = rng.uniform(0.39, 0.433, n)
    tail = np.log1p(np.exp(-x))
    p = 2.0 ** rng.integers(0, 7, n) * (1.0 - rng.uniform(0.0, 0.01, n)) / tail
    return x, np.ones(n), p


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_loss_where_libm_errors_are_amplified_float64(backend: str) -> None:
    x, y, p = _amplifying_points(1500)
    arguments = list(zip(x.tolist(), y.tolist(), p.tolist(), strict=True))
    _assert_within(
        f"{backend} logits float64", _logits_loss(backend, x, y, p), arguments, logits_exact, "float64"
    )


# --------------------------------------------------------------------------------------------------------
# Hypothesis properties
# --------------------------------------------------------------------------------------------------------

_signed_magnitudes = st.builds(
    lambda sign, mantissa, exponent: sign * mantissa * 10.0**exponent,
    st.sampled_from((-1.0, 1.0)),
    st.floats(1.0, 10.0),
    st.integers(-45, 4),
)
logits = st.one_of(st.floats(allow_nan=False, width=64), _signed_magnitudes)
targets = st.one_of(st.sampled_from((0.0, 1.0, 0.5)), st.floats(0.0, 1.0))
pos_weights = st.one_of(st.none(), st.floats(0.01, 100.0))
probabilities = st.one_of(
    st.floats(0.0, 1.0),
    st.floats(0.0, 330.0).map(lambda e: 10.0**-e),  # near 0, down into the subnormals
    st.floats(1.0, 17.0).map(lambda e: 1.0 - 10.0**-e),  # near 1
)


@settings(max_examples=200, deadline=None)
@given(x=logits, y=targets, pos_weight=pos_weights, dtype=st.sampled_from(DTYPES))
def test_logits_loss_property(x: float, y: float, pos_weight: float | None, dtype: str) -> None:
    xa, ya = _cast([x], dtype), _cast([y], dtype)
    pa = None if pos_weight is None else _cast([pos_weight], dtype)
    arguments = [(xa.item(), ya.item(), None if pa is None else pa.item())]
    for backend in BACKENDS:
        results = _logits_loss(backend, xa, ya, pa)
        _assert_within(f"{backend} logits {dtype}", results, arguments, logits_exact, dtype)


@settings(max_examples=200, deadline=None)
@given(x=probabilities, y=targets, dtype=st.sampled_from(DTYPES))
def test_probability_loss_property(x: float, y: float, dtype: str) -> None:
    xa, ya = _cast([x], dtype), _cast([y], dtype)
    arguments = [(xa.item(), ya.item())]
    for backend in BACKENDS:
        results = _probability_loss(backend, xa, ya)
        _assert_within(f"{backend} probabilities {dtype}", results, arguments, bce_exact, dtype)


# --------------------------------------------------------------------------------------------------------
# bcekit score's float64 losses: double-double lanes (each ISA's build), long double where they stop
# --------------------------------------------------------------------------------------------------------

ISAS = native._core.DD_ISAS if native.AVAILABLE else ()
# What docs/accuracy.md says of them: the final rounding (0.5) plus at most 2^-58 relative before it.
LANES_MAX_ULP = 0.52


def _lanes(kind: int, x, y, weight=None, pos_weight=None, smoothing=0.0, isa="baseline") -> np.ndarray:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    full = [
        None if v is None else np.broadcast_to(np.float64(v), x.shape).copy() for v in (weight, pos_weight)
    ]
    out = np.empty_like(x)
    native._core.losses64(kind, x, y, full[0], full[1], smoothing, None, out, isa)
    return out


@pytest.mark.parametrize("pos_weight", POS_WEIGHTS)
@pytest.mark.parametrize("isa", ISAS)
def test_score_lanes_logits_grid(isa: str, pos_weight: float | None) -> None:
    xs, ys = zip(*itertools.product(LOGITS, LOGIT_TARGETS), strict=True)
    results = _lanes(1, xs, ys, pos_weight=pos_weight, isa=isa)
    arguments = [(a, b, pos_weight) for a, b in zip(xs, ys, strict=True)]
    _assert_within(
        f"lanes {isa} logits pos_weight={pos_weight}",
        results,
        arguments,
        logits_exact,
        "float64",
        LANES_MAX_ULP,
    )


@pytest.mark.parametrize("isa", ISAS)
def test_score_lanes_probability_grid(isa: str) -> None:
    xs, ys = zip(
        *itertools.product(_probabilities("float64").tolist(), PROBABILITY_TARGETS),
        strict=True,
    )
    results = _lanes(0, xs, ys, isa=isa)
    _assert_within(
        f"lanes {isa} probabilities",
        results,
        list(zip(xs, ys, strict=True)),
        bce_exact,
        "float64",
        LANES_MAX_ULP,
    )


@pytest.mark.parametrize("isa", ISAS)
def test_score_lanes_amplifying_and_subnormal_points(isa: str) -> None:
    x, y, p = _amplifying_points(1500)
    x = np.concatenate([x, [t[0] for t in SUBNORMAL_INTERMEDIATES]])
    y = np.concatenate([y, [t[1] for t in SUBNORMAL_INTERMEDIATES]])
    p = np.concatenate([p, [t[2] for t in SUBNORMAL_INTERMEDIATES]])
    out = np.empty_like(x)
    native._core.losses64(1, x, y, None, p, 0.0, None, out, isa)
    arguments = list(zip(x.tolist(), y.tolist(), p.tolist(), strict=True))
    _assert_within(f"lanes {isa} logits", out, arguments, logits_exact, "float64", LANES_MAX_ULP)


# Label smoothing down to 1e-300 (where 1 - y' = s/2 for y = 1 needs more than long double's 64 bits) and
# weights of both signs, soft targets, logits over the lanes' whole range.
SMOOTHINGS = (0.1, 1e-3, 1e-20, 1e-300)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("isa", ISAS)
def test_score_lanes_options(isa: str, smoothing: float) -> None:
    rng = np.random.default_rng(5)
    n = 400
    x = np.concatenate([rng.normal(0.0, 4.0, n), rng.uniform(-600.0, 600.0, n)])
    y = np.concatenate([rng.integers(0, 2, n).astype(float), rng.random(n)])
    w = rng.normal(0.0, 2.0, 2 * n)
    p = 10.0 ** rng.uniform(-2.0, 2.0, 2 * n)
    results = _lanes(1, x, y, w, None, smoothing, isa)
    arguments = [
        (a, b, None, smoothing, c) for a, b, c in zip(x.tolist(), y.tolist(), w.tolist(), strict=True)
    ]
    _assert_within(
        f"lanes {isa} logits s={smoothing}", results, arguments, logits_exact, "float64", LANES_MAX_ULP
    )
    out = np.empty_like(x)
    native._core.losses64(1, x, y, w, p, smoothing, None, out, isa)
    arguments = [(*a[:2], q, smoothing, a[4]) for a, q in zip(arguments, p.tolist(), strict=True)]
    _assert_within(
        f"lanes {isa} logits s={smoothing} pos_weight", out, arguments, logits_exact, "float64", LANES_MAX_ULP
    )
    xp = np.concatenate(
        [rng.random(n), 10.0 ** rng.uniform(-45.0, 0.0, n // 2), 1 - 10.0 ** -rng.uniform(1, 16, n // 2)]
    )
    results = _lanes(0, xp, y, w, None, smoothing, isa)
    arguments = [(a, b, smoothing, c) for a, b, c in zip(xp.tolist(), y.tolist(), w.tolist(), strict=True)]
    _assert_within(
        f"lanes {isa} probabilities s={smoothing}", results, arguments, bce_exact, "float64", LANES_MAX_ULP
    )


@settings(max_examples=300, deadline=None)
@given(x=logits, y=targets, pos_weight=pos_weights, isa=st.sampled_from(ISAS))
def test_score_lanes_logits_property(x: float, y: float, pos_weight: float | None, isa: str) -> None:
    _assert_within(
        f"lanes {isa} logits",
        _lanes(1, [x], [y], None, pos_weight, 0.0, isa),
        [(x, y, pos_weight)],
        logits_exact,
        "float64",
    )


@settings(max_examples=300, deadline=None)
@given(x=probabilities, y=targets, isa=st.sampled_from(ISAS))
def test_score_lanes_probability_property(x: float, y: float, isa: str) -> None:
    _assert_within(
        f"lanes {isa} probabilities",
        _lanes(0, [x], [y], isa=isa),
        [(x, y)],
        bce_exact,
        "float64",
        LANES_MAX_ULP,
    )


# --------------------------------------------------------------------------------------------------------
# Where torch stands
# --------------------------------------------------------------------------------------------------------


def test_torch_logits_loss_cancels_where_ours_does_not() -> None:
    x, y = torch.tensor([-40.0]), torch.tensor([0.0])
    exact = logits_exact(-40.0, 0.0)
    assert math.isclose(float(exact), math.exp(-40.0), rel_tol=1e-15)  # log1p(e) = e (1 - e/2 + ...)
    theirs = F.binary_cross_entropy_with_logits(x, y, reduction="none").item()
    ours = bce_torch.binary_cross_entropy_with_logits(x, y, reduction="none").item()
    assert ulp_error(theirs, exact, "float32") > 1000
    assert ulp_error(ours, exact, "float32") <= MAX_ULP


_N = 2**20


def _mean_case(loss: str, mixture: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """float32 arguments: ``mixed`` has tiny, moderate and large losses; ``tiny`` has only tiny ones."""
    q = _N // 4
    if loss == "logits":
        tiny_negative = -rng.uniform(17.0, 90.0, q)  # with y = 0: losses 1e-8 .. 1e-39
        tiny_positive = rng.uniform(17.0, 90.0, q)  # with y = 1
        if mixture == "tiny":
            x = np.concatenate([tiny_negative, tiny_positive, tiny_negative, tiny_positive])
            y = np.concatenate([np.zeros(q), np.ones(q), np.zeros(q), np.ones(q)])
        else:
            x = np.concatenate(
                [tiny_negative, rng.normal(0.0, 3.0, q), -rng.uniform(20.0, 90.0, q), tiny_positive]
            )
            y = np.concatenate([np.zeros(q), rng.random(q), np.ones(q), np.ones(q)])
    else:
        near_zero = 10.0 ** -rng.uniform(8.0, 40.0, q)  # with y = 0: losses ~x; with y = 1: ~18 .. 92
        near_one = 1.0 - 10.0 ** -rng.uniform(1.0, 7.0, q)
        if mixture == "tiny":
            x = np.concatenate([near_zero, near_zero[::-1], 10.0 ** -rng.uniform(8.0, 40.0, 2 * q)])
            y = np.zeros(_N)
        else:
            x = np.concatenate([near_zero, rng.random(q), near_zero[::-1], near_one])
            y = np.concatenate([np.zeros(q), rng.random(q), np.ones(q), np.ones(q)])
    order = rng.permutation(_N)
    return x[order].astype(np.float32), y[order].astype(np.float32)


def _float64_losses(loss: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-element losses in float64 from float32 arguments, by plain formulas that do not cancel
    (relative error a few 2**-53, far below float32's ulp); independent of bcekit."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    if loss == "logits":
        return y * np.logaddexp(0.0, -x) + (1.0 - y) * np.logaddexp(0.0, x)
    with np.errstate(divide="ignore"):
        return y * np.minimum(-np.log(x), 100.0) + (1.0 - y) * np.minimum(-np.log1p(-x), 100.0)


@pytest.mark.parametrize("mixture", ["mixed", "tiny"])
@pytest.mark.parametrize("loss", ["logits", "probabilities"])
def test_mean_at_least_as_accurate_as_torch(loss: str, mixture: str) -> None:
    rng = np.random.default_rng(7)
    x, y = _mean_case(loss, mixture, rng)
    per_element = _float64_losses(loss, x, y)
    exact_of = logits_exact if loss == "logits" else bce_exact
    for i in rng.choice(_N, 64, replace=False):  # the float64 route agrees with mpmath
        exact = exact_of(float(x[i]), float(y[i]))
        assert ulp_error(per_element[i], exact, "float64") <= 8, (x[i], y[i])
    exact_mean = math.fsum(per_element.tolist()) / _N

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if loss == "logits":
        theirs = F.binary_cross_entropy_with_logits(xt, yt).item()
        ours = [
            bce_torch.binary_cross_entropy_with_logits(xt, yt),
            bce_np.binary_cross_entropy_with_logits(x, y),
        ]
    else:
        theirs = F.binary_cross_entropy(xt, yt).item()
        ours = [bce_torch.binary_cross_entropy(xt, yt), bce_np.binary_cross_entropy(x, y)]
    their_error = abs(theirs - exact_mean)
    for value in ours:
        value = np.float32(value.item())
        our_error = abs(float(value) - exact_mean)
        assert our_error <= their_error + float(np.spacing(value)), (
            f"mean {loss} {mixture}: ours {value!r} (error {our_error:.3g}), torch {theirs!r} "
            f"(error {their_error:.3g}), exact {exact_mean!r}"
        )
