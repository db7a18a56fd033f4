"""The C++ kernels (``bcekit._core``), through the NumPy and torch backends and the test hook for their math.

* the vector exp/log functions of ``vector_kernel.h`` against mpmath, on each ISA's build;
* results bitwise independent of the thread count (and equal between NumPy and torch);
* each in-place broadcast form against torch on materialised weights, and the composed fallback;
* float16/bfloat16 within 1 ulp of torch's float32 computation; non-contiguous operands;
* the probability loss's [0, 1] check inside the kernel, and ignore_index/label_smoothing against the
  composed path.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcekit
import bcekit.numpy as bnp
import bcekit.torch as bce
from _cases import OPTION_CASES
from _reference import bce_exact, logits_exact, ulp_error
from bcekit import _native

_core = _native._core
CHUNK = int(_core.CHUNK)
TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
REDUCTIONS = ("none", "mean", "sum")
ISAS = [
    "baseline",
    pytest.param("avx2", marks=pytest.mark.skipif(_core.ISA != "avx2", reason="this CPU has no AVX2 + FMA")),
]

MP = mpmath.MPContext()
MP.dps = 60


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def _data(logits: bool, shape, seed: int, hard: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """float64 inputs and targets: logits ~ N(0, 4), or probabilities with some exact 0 and 1."""
    rng = np.random.default_rng(seed)
    if logits:
        x = rng.normal(0.0, 4.0, shape)
    else:
        x = rng.uniform(0.0, 1.0, shape)
        flat = x.reshape(-1)
        flat[::97] = 0.0
        flat[1::89] = 1.0
    y = rng.integers(0, 2, shape).astype(np.float64) if hard else rng.random(shape)
    if not hard:
        y.reshape(-1)[::3] = np.round(y.reshape(-1)[::3])
    return x, y


def _weights(shape, seed: int) -> np.ndarray | None:
    if shape is None:
        return None
    return np.random.default_rng(seed).uniform(0.25, 2.0, shape)


def _bits(value) -> np.ndarray:
    """The raw bits of an array or tensor (so NaN payloads and signed zeros compare too)."""
    if isinstance(value, torch.Tensor):
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()]
        return value.detach().contiguous().view(ints).numpy().view(f"u{value.element_size()}").copy()
    value = np.asarray(value)
    return value.view(f"u{value.dtype.itemsize}").copy()


def _assert_same_bits(a, b, what: str = "") -> None:
    a_bits, b_bits = _bits(a), _bits(b)
    assert a_bits.shape == b_bits.shape, what
    mismatches = int(np.count_nonzero(a_bits != b_bits))
    assert mismatches == 0, f"{what}: {mismatches} elements differ"


def _numpy_call(logits: bool, x, y, w, p, reduction: str, **options):
    if logits:
        return bnp.binary_cross_entropy_with_logits_and_grad(x, y, w, reduction, pos_weight=p, **options)
    return bnp.binary_cross_entropy_and_grad(x, y, w, reduction, **options)


def _torch_call(logits: bool, x, y, w, p, reduction: str, **options):
    if logits:
        return bce.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p, **options)
    return bce.binary_cross_entropy(x, y, w, reduction=reduction, **options)


def _torch_loss_and_grads(logits: bool, x, y, w, p, reduction: str, target_grad: bool = False, **options):
    """bcekit.torch's loss and the gradients of its sum (grad_output 1) in the input (and the target)."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(target_grad)
    loss = _torch_call(logits, x, y, w, p, reduction, **options)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), x.grad, (y.grad if target_grad else None)


def _reference(logits: bool, x, y, w, p, reduction: str, dtype=torch.float64):
    """torch.nn.functional in ``dtype`` on the same values, weights materialised to the input's shape."""
    shape = np.shape(x)
    xt = torch.tensor(np.asarray(x, dtype=np.float64), dtype=dtype, requires_grad=True)
    yt = torch.tensor(np.asarray(y, dtype=np.float64), dtype=dtype)
    wt = None if w is None else torch.tensor(np.broadcast_to(w, shape).copy(), dtype=dtype)
    pt = None if p is None else torch.tensor(np.broadcast_to(p, shape).copy(), dtype=dtype)
    if logits:
        loss = F.binary_cross_entropy_with_logits(xt, yt, wt, reduction=reduction, pos_weight=pt)
    else:
        loss = F.binary_cross_entropy(xt, yt, wt, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), xt)
    return loss.detach(), grad


class _Spy:
    """Counts the kernel passes: the calls of ``_native.run_planned`` (torch tensors) and
    ``_native.run_arrays`` (NumPy arrays), which every pass of both backends goes through."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        for name in ("run_planned", "run_arrays"):
            original = getattr(_native, name)

            def counting(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(_native, name, counting)


@pytest.fixture
def restore_threads():
    numpy_threads, torch_threads = bcekit.get_num_threads(), torch.get_num_threads()
    yield
    bcekit.set_num_threads(numpy_threads)
    torch.set_num_threads(torch_threads)


# --------------------------------------------------------------------------------------------------------
# The vector math against mpmath (_core.elementwise applies the kernel's own functions to float64 data)
# --------------------------------------------------------------------------------------------------------


def _elementwise(name: str, values: np.ndarray, isa: str) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.full_like(values, -12345.0)
    _core.elementwise(name, values, out, isa)
    return out


def _around(centers, count: int = 3) -> np.ndarray:
    """``centers`` and their ``count`` nearest float64 neighbours on either side."""
    points = []
    for c in np.atleast_1d(np.asarray(centers, dtype=np.float64)):
        below = above = c
        points.append(c)
        for _ in range(count):
            below, above = np.nextafter(below, -np.inf), np.nextafter(above, np.inf)
            points += [below, above]
    return np.array(points)


@functools.cache
def _exp_neg_points() -> tuple[np.ndarray, tuple]:
    rng = np.random.default_rng(1)
    reduction_edges = (np.arange(0, 1021) + 0.5) * math.log(2)  # where k of a = k ln2 + r changes
    a = np.concatenate(
        [
            rng.uniform(0.0, 700.0, 1500),
            rng.uniform(0.0, 2.0, 300),
            np.geomspace(1e-300, 1e-3, 200),  # dense near 0
            np.linspace(0.0, 1e-6, 50),
            _around(reduction_edges[rng.choice(reduction_edges.size, 40, replace=False)], 2),
            _around([0.0, 1.0, math.log(2), 100.0, 700.0], 2),
            rng.uniform(690.0, 708.0, 100),
            [708.0, 2.0**-1074, 2.0**-1022],
        ]
    )
    a = a[a >= 0]
    return a, tuple(MP.exp(-MP.mpf(float(v))) for v in a)


@functools.cache
def _log1p_points() -> tuple[np.ndarray, tuple]:
    rng = np.random.default_rng(2)
    e = np.concatenate(
        [
            rng.uniform(0.0, 1.0, 1500),
            np.geomspace(2.0**-1022, 1.0, 400),
            np.geomspace(1e-300, 1e-290, 10),
            _around([math.sqrt(2) - 1, 0.41421356237309503, 0.5, 1.0, 2.0**-30], 3),
            rng.random(300).astype(np.float32).astype(np.float64),  # float32 data, the kernel's domain
        ]
    )
    e = e[(e >= 0) & (e <= 1)]
    return e, tuple(MP.log1p(MP.mpf(float(v))) for v in e)


@functools.cache
def _log_points() -> tuple[np.ndarray, tuple]:
    rng = np.random.default_rng(3)
    u = np.concatenate(
        [
            rng.uniform(0.0, 1.0, 1500),
            np.geomspace(2.0**-1022, 1.0, 400),
            1.0 - np.arange(1, 200) * 2.0**-53,  # the float64 numbers just below 1
            1.0 - np.geomspace(2.0**-52, 0.3, 200),
            _around([math.sqrt(0.5), 0.5, 0.25, 2.0**-100, 1.0 - 2.0**-24], 3),
            [1e-45, 2.0**-149, 2.0**-126, 2.0**-24, 2.0**-14, 2.0**-24 * 2.0**-14],  # tiny float32/half
            rng.random(300).astype(np.float32).astype(np.float64),
        ]
    )
    u = u[(u >= 2.0**-1022) & (u <= 1)]
    return u, tuple(MP.log(MP.mpf(float(v))) for v in u)


def _max_relative_error(values: np.ndarray, exact: tuple, points: np.ndarray) -> tuple[float, float]:
    worst, where = 0.0, math.nan
    for value, reference, point in zip(values, exact, points, strict=True):
        if reference == 0:
            error = 0.0 if value == 0 else math.inf
        else:
            error = float(abs(MP.mpf(float(value)) - reference) / abs(reference))
        if not error <= worst:
            worst, where = error, float(point)
    return worst, where


@pytest.mark.parametrize("isa", ISAS)
def test_exp_neg_relative_error(isa: str) -> None:
    a, exact = _exp_neg_points()
    worst, where = _max_relative_error(_elementwise("exp_neg", a, isa), exact, a)
    assert worst <= 2.0**-34, f"relative error 2^{math.log2(worst):.2f} at a = {where!r}"


@pytest.mark.parametrize("isa", ISAS)
def test_exp_neg_special_values(isa: str) -> None:
    out = _elementwise("exp_neg", np.array([0.0, np.inf, np.nan, 708.5, 745.2, 1e300, 2.0**-60]), isa)
    assert out[0] == 1.0  # exactly
    assert out[1] == 0.0 and math.isnan(out[2])
    # beyond 708, exp(-a) < 2^-1021 is flushed to 0 (the header's documented choice): tiny absolute error
    assert out[3] == 0.0 and out[4] == 0.0 and out[5] == 0.0
    assert float(MP.exp(-MP.mpf(708.5))) < 2.0**-1021
    assert out[6] == 1.0 - 2.0**-60 or out[6] == 1.0  # rounds within half an ulp of 1


@pytest.mark.parametrize("isa", ISAS)
def test_log1p_unit_relative_error(isa: str) -> None:
    e, exact = _log1p_points()
    worst, where = _max_relative_error(_elementwise("log1p_unit", e, isa), exact, e)
    assert worst <= 2.0**-33, f"relative error 2^{math.log2(worst):.2f} at e = {where!r}"


@pytest.mark.parametrize("isa", ISAS)
def test_log1p_unit_tiny_and_special_values(isa: str) -> None:
    tiny = np.array([1e-300, 2.0**-1022, 1e-200, 2.0**-60, 2.0**-149, 1e-45])  # log1p(e) rounds to e
    np.testing.assert_array_equal(_elementwise("log1p_unit", tiny, isa), tiny)
    out = _elementwise("log1p_unit", np.array([0.0, np.nan, 1.0]), isa)
    assert out[0] == 0.0 and math.isnan(out[1])
    assert abs(out[2] - math.log(2)) <= 2.0**-33 * math.log(2)
    # Subnormal e: f / (2 + f) keeps fewer bits than e, so the result is e only to within one subnormal
    # step (2^-1074). The kernel never passes a subnormal here: its e is exp(-|x|), flushed to 0 below
    # 2^-1021, and float32/half data are normal numbers in double.
    subnormal = np.array([2.0**-1074, 3 * 2.0**-1074, 1e-310, 2.0**-1023, 2.0**-1022 - 2.0**-1074])
    assert np.all(np.abs(_elementwise("log1p_unit", subnormal, isa) - subnormal) <= 2.0**-1074)


@pytest.mark.parametrize("isa", ISAS)
def test_log_unit_relative_error(isa: str) -> None:
    # Relative error is the demanding measure here: near u = 1, log(u) ~ u - 1 goes to 0, and an error
    # that is small in absolute terms (k ln2 + log1p(m - 1) with k != 0 would cancel) is not small relative
    # to it. The arguments are exact floats, so the exact logarithm is what the kernel must approach.
    u, exact = _log_points()
    worst, where = _max_relative_error(_elementwise("log_unit", u, isa), exact, u)
    assert worst <= 2.0**-33, f"relative error 2^{math.log2(worst):.2f} at u = {where!r}"


@pytest.mark.parametrize("isa", ISAS)
def test_log_unit_near_one_and_special_values(isa: str) -> None:
    near_one = 1.0 - np.arange(1, 64) * 2.0**-53
    values = _elementwise("log_unit", near_one, isa)
    exact = [MP.log(MP.mpf(float(v))) for v in near_one]
    # absolute error near 1 far below float64's resolution of the argument (2^-53): log(1 - d) = -d + ...
    assert max(float(abs(MP.mpf(float(v)) - r)) for v, r in zip(values, exact, strict=True)) <= 2.0**-80
    assert np.all(values < 0)  # no u < 1 maps to 0 (or above)
    out = _elementwise("log_unit", np.array([1.0, 0.0, 1e-45, 0.5]), isa)
    assert out[0] == 0.0  # exactly
    assert out[1] == -math.inf
    assert abs(out[2] - math.log(1e-45)) <= 2.0**-33 * abs(math.log(1e-45))
    assert abs(out[3] + math.log(2)) <= 2.0**-33 * math.log(2)


def _has(name: str) -> bool:
    try:
        _elementwise(name, np.ones(1), "baseline")
    except ValueError:
        return False
    return True


@functools.cache
def _log_pair_points() -> tuple[np.ndarray, tuple, tuple]:
    rng = np.random.default_rng(4)
    x = np.concatenate(
        [
            rng.uniform(0.0, 1.0, 1000),
            np.geomspace(2.0**-1022, 1.0, 300),
            1.0 - np.geomspace(2.0**-53, 0.5, 200),
            _around([0.29289321881345248, 0.5, 0.7071067811865476, 1.0 - 2.0**-24], 3),
            rng.random(300).astype(np.float32).astype(np.float64),
            [2.0**-149, 2.0**-24, 1.0 - 2.0**-24],
        ]
    )
    x = x[(x >= 2.0**-1022) & (x < 1)]
    exact_log = tuple(MP.log(MP.mpf(float(v))) for v in x)
    exact_log1p = tuple(MP.log1p(-MP.mpf(float(v))) for v in x)
    return x, exact_log, exact_log1p


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["log_x", "log1p_neg_x"])
def test_log_pair_relative_error(name: str, isa: str) -> None:
    """log(x) and log1p(-x) of the probability loss (``log_pair``): one reduction each, the same 6-term
    atanh series as log1p_reduced (2^-34), and 1 - x exact above 0.2929."""
    if not _has(name):
        pytest.skip(f"this build of bcekit._core has no '{name}'")  # an older kernel: log_unit above
    x, exact_log, exact_log1p = _log_pair_points()
    exact = exact_log if name == "log_x" else exact_log1p
    worst, where = _max_relative_error(_elementwise(name, x, isa), exact, x)
    assert worst <= 2.0**-33, f"relative error 2^{math.log2(worst):.2f} at x = {where!r}"
    ends = _elementwise(name, np.array([0.0, 1.0]), isa)
    if name == "log_x":
        assert ends[0] == -math.inf and ends[1] == 0.0
    else:
        assert ends[0] == 0.0 and ends[1] == -math.inf


def test_elementwise_rejects_unknown_names_and_isas() -> None:
    with pytest.raises(ValueError, match="no function"):
        _elementwise("no_such_function", np.ones(3), "baseline")
    with pytest.raises(ValueError, match="isa must be"):
        _elementwise("exp_neg", np.ones(3), "sse9")
    with pytest.raises(ValueError, match="sizes differ"):
        _core.elementwise("exp_neg", np.ones(3), np.ones(4), "baseline")


def test_elementwise_handles_lengths_off_the_vector_width() -> None:
    for n in (1, 3, 5, 7):
        a = np.linspace(0.0, 3.0, n)
        np.testing.assert_allclose(_elementwise("exp_neg", a, "baseline"), np.exp(-a), rtol=2.0**-34)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_float32_per_element_losses_within_one_ulp_of_exact(logits: bool) -> None:
    """The whole pipeline in double lanes, rounded once: every float32 loss within 1 ulp of the exact one."""
    rng = np.random.default_rng(11)
    if logits:
        x = np.concatenate([rng.normal(0, 5, 300), rng.uniform(-90, 90, 100), [0.0, 1e-30, -1e-30, 88.0]])
    else:
        x = np.concatenate([rng.random(300), np.geomspace(1e-40, 1e-3, 50), 1 - np.geomspace(1e-7, 1e-2, 50)])
    x = x.astype(np.float32)
    y = rng.random(x.size).astype(np.float32)
    y[::4] = np.round(y[::4])
    loss = (bnp.binary_cross_entropy_with_logits if logits else bnp.binary_cross_entropy)(
        x, y, reduction="none"
    )
    exact = logits_exact if logits else bce_exact
    errors = [ulp_error(v, exact(float(a), float(b)), np.float32) for v, a, b in zip(loss, x, y, strict=True)]
    assert max(errors) <= 1.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 705.0, -703.0])
def test_a_non_finite_logit_leaves_its_neighbours_alone(bad: float) -> None:
    """Blocks of finite logits with |x| <= 700 take shorter formulas than blocks holding an infinity, a
    NaN or a larger logit: the other elements of such a block must get the same float32 results."""
    x, y = _data(True, (3 * 256 + 5,), seed=30)
    x, y = x.astype(np.float32), y.astype(np.float32)
    p = _weights((x.size,), 31).astype(np.float32)
    plain = bnp.binary_cross_entropy_with_logits_and_grad(x, y, reduction="none", pos_weight=p)
    for position in (0, 300, x.size - 1):
        spoiled = x.copy()
        spoiled[position] = bad
        loss, grad = bnp.binary_cross_entropy_with_logits_and_grad(spoiled, y, reduction="none", pos_weight=p)
        others = np.arange(x.size) != position
        np.testing.assert_allclose(loss[others], plain[0][others], rtol=2.0**-23, atol=0)
        np.testing.assert_allclose(grad[others], plain[1][others], rtol=2.0**-23, atol=1e-45)
        if math.isnan(bad):
            assert math.isnan(loss[position]) and math.isnan(grad[position])
        else:
            expected = logits_exact(float(bad), float(y[position]), float(p[position]))
            assert ulp_error(loss[position], expected, np.float32) <= 1.0


# --------------------------------------------------------------------------------------------------------
# Determinism across thread counts
# --------------------------------------------------------------------------------------------------------

THREADS = (1, 2, 3, 7)
# (rows, columns): 3 chunks and a partial one; ~2^20 elements (2^17 for float64, whose long double pass
# is ~30x slower) so that several threads share the work (a thread gets at least 2^15 elements)
SIZES = {"small": (673, 37), "large": (28341, 37), "large64": (3600, 37)}
WEIGHT_FORMS = {  # (weight shape, pos_weight shape) as functions of (rows, columns)
    "none": lambda n, c: (None, None),
    "class_row": lambda n, c: ((c,), (n, 1)),
    "full_scalar": lambda n, c: ((n, c), ()),
}


def test_sizes_are_not_multiples_of_the_chunk() -> None:
    for rows, columns in SIZES.values():
        assert (rows * columns) % CHUNK and rows * columns > 3 * CHUNK
    assert SIZES["large"][0] * SIZES["large"][1] >= 2**20


def _size(name: str, dtype: str) -> tuple[int, int]:
    return SIZES["large64"] if name == "large" and dtype == "float64" else SIZES[name]


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_numpy_results_do_not_depend_on_threads(restore_threads, logits, dtype, size) -> None:
    rows, columns = _size(size, dtype)
    x, y = _data(logits, (rows, columns), seed=rows)
    x, y = x.astype(dtype), y.astype(dtype)
    for form in WEIGHT_FORMS if size == "small" else ["class_row"]:
        w_shape, p_shape = WEIGHT_FORMS[form](rows, columns)
        w = None if w_shape is None else _weights(w_shape, 1).astype(dtype)
        p = None if (p_shape is None or not logits) else _weights(p_shape, 2).astype(dtype)
        for reduction in REDUCTIONS:
            results = []
            for threads in (*THREADS, 1):  # and once more: repeated runs agree too
                bcekit.set_num_threads(threads)
                with np.errstate(over="ignore"):  # a float16 sum of 2^20 losses overflows, as in torch
                    loss, grad = _numpy_call(logits, x, y, w, p, reduction)
                results.append((loss.copy(), grad.copy()))
            for threads, (loss, grad) in zip((*THREADS, 1), results, strict=True):
                what = f"{form}, {reduction}, {threads} threads"
                _assert_same_bits(loss, results[0][0], what + " (loss)")
                _assert_same_bits(grad, results[0][1], what + " (grad)")


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_torch_results_do_not_depend_on_threads(restore_threads, logits, dtype, size) -> None:
    rows, columns = _size(size, dtype)
    x, y = _data(logits, (rows, columns), seed=rows + 1)
    torch_dtype = TORCH_DTYPES[dtype]
    xt, yt = torch.tensor(x, dtype=torch_dtype), torch.tensor(y, dtype=torch_dtype)
    w_shape, p_shape = WEIGHT_FORMS["class_row" if size == "large" else "full_scalar"](rows, columns)
    w = torch.tensor(_weights(w_shape, 3), dtype=torch_dtype)
    p = torch.tensor(_weights(p_shape, 4), dtype=torch_dtype) if logits else None
    for reduction in REDUCTIONS if size == "small" else ("none", "mean"):  # (sum is mean's pass)
        results = []
        for threads in (*THREADS, 1):
            torch.set_num_threads(threads)
            results.append(_torch_loss_and_grads(logits, xt, yt, w, p, reduction, target_grad=True))
        for threads, result in zip((*THREADS, 1), results, strict=True):
            for name, got, expected in zip(
                ("loss", "grad input", "grad target"), result, results[0], strict=True
            ):
                _assert_same_bits(got, expected, f"{reduction}, {threads} threads ({name})")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_numpy_and_torch_kernels_agree_bitwise(restore_threads, logits: bool, dtype: str) -> None:
    rows, columns = SIZES["small"]
    x, y = _data(logits, (rows, columns), seed=5)
    w, p = _weights((columns,), 6), (_weights((rows, 1), 7) if logits else None)
    x, y, w = x.astype(dtype), y.astype(dtype), w.astype(dtype)
    p = None if p is None else p.astype(dtype)
    bcekit.set_num_threads(3)
    torch.set_num_threads(2)
    as_tensor = lambda a: None if a is None else torch.from_numpy(a.copy())  # noqa: E731
    for reduction in REDUCTIONS:
        loss, grad = _numpy_call(logits, x, y, w, p, reduction)
        t_loss, t_grad, _ = _torch_loss_and_grads(
            logits, as_tensor(x), as_tensor(y), as_tensor(w), as_tensor(p), reduction
        )
        _assert_same_bits(loss, t_loss, f"{reduction} loss")
        _assert_same_bits(grad, t_grad, f"{reduction} grad")


# --------------------------------------------------------------------------------------------------------
# Broadcast forms against torch on materialised weights; the composed fallback for other forms
# --------------------------------------------------------------------------------------------------------

# (input shape, weight shape, pos_weight shape, whether the kernel serves it: True, False or one loss)
FORM_CASES = {
    "scalar": ((37, 5), (), (1,), True),
    "scalar_2d": ((37, 5), (1, 1), (1, 1), True),
    "per_class": ((37, 5), (5,), (5,), True),
    "per_class_3d": ((4, 6, 5), (1, 5), (5,), True),
    "per_row": ((37, 5), (37, 1), (37, 1), True),
    "per_row_3d": ((4, 6, 5), (4, 1, 1), (4, 6, 1), True),
    "full": ((37, 5), (37, 5), (37, 5), True),
    "full_and_scalar": ((4, 6, 5), (4, 6, 5), (), True),
    "class_and_row": ((37, 5), (5,), (37, 1), True),
    "weight_only": ((3 * CHUNK + 17,), (3 * CHUNK + 17,), None, True),
    "mid_broadcast": ((4, 6, 5), (6, 1), None, False),  # (C, 1) against (N, C, D)
    "mid_and_class": ((4, 6, 5), (4, 1, 5), (6, 1), False),
    "bad_pos_weight": ((4, 6, 5), (5,), (6, 1), "bce"),  # the probability loss has no pos_weight
}
TOLERANCES = {"float32": {"rtol": 1e-6, "atol": 1e-12}, "float64": {"rtol": 1e-12, "atol": 1e-13}}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(FORM_CASES))
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_broadcast_forms_match_torch_on_materialised_weights(monkeypatch, logits, case, dtype) -> None:
    shape, w_shape, p_shape, kernel = FORM_CASES[case]
    kernel = kernel is True or kernel == ("logits" if logits else "bce")
    x, y = _data(logits, shape, seed=len(case))
    w = _weights(w_shape, 8).astype(dtype)
    p = None if (p_shape is None or not logits) else _weights(p_shape, 9).astype(dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    assert (
        _native.eligible(
            "logits" if logits else "bce", [dtype] * 2, shape, w.shape, None if p is None else p.shape
        )
        == kernel
    )
    spy = _Spy(monkeypatch)
    for reduction in REDUCTIONS:
        expected_loss, expected_grad = _reference(logits, x, y, w, p, reduction)
        calls = spy.calls
        loss, grad = _numpy_call(logits, x, y, w, p, reduction)
        assert spy.calls - calls == int(kernel)
        np.testing.assert_allclose(loss, expected_loss.numpy(), **TOLERANCES[dtype])
        np.testing.assert_allclose(grad, expected_grad.numpy(), **TOLERANCES[dtype])

        calls = spy.calls
        as_tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        t_loss, t_grad, _ = _torch_loss_and_grads(
            logits, as_tensor(x), as_tensor(y), as_tensor(w), as_tensor(p), reduction
        )
        assert (spy.calls > calls) == kernel
        np.testing.assert_allclose(t_loss.numpy(), expected_loss.numpy(), **TOLERANCES[dtype])
        np.testing.assert_allclose(t_grad.numpy(), expected_grad.numpy(), **TOLERANCES[dtype])


# --------------------------------------------------------------------------------------------------------
# Half types: torch's float32 computation, rounded; non-contiguous operands
# --------------------------------------------------------------------------------------------------------


def _ulps_apart(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest distance between two results of ``dtype``, in ulps of the larger magnitude."""
    got, expected = got.to(torch.float64), expected.to(torch.float64)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(got[~finite], expected[~finite])
    got, expected = got[finite], expected[finite]
    if not got.numel():
        return 0.0
    info = torch.finfo(dtype)
    magnitude = torch.maximum(got.abs(), expected.abs())
    ulp = torch.exp2(torch.floor(torch.log2(magnitude.clamp_min(info.tiny)))) * info.eps
    ulp = ulp.clamp_min(info.tiny * info.eps)  # the subnormal step
    return float(((got - expected).abs() / ulp).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_half_types_match_torch_float32_rounded(logits: bool, dtype: str) -> None:
    torch_dtype = TORCH_DTYPES[dtype]
    shape = (211, 7)
    # moderate values and hard targets for the gradients: torch's float32 formulas cancel elsewhere, and
    # then the float32 reference, not the kernel, is off by many half ulps
    rng = np.random.default_rng(12)
    x = rng.normal(0, 2, shape).clip(-4, 4) if logits else rng.uniform(0.02, 0.98, shape)
    y = rng.integers(0, 2, shape).astype(np.float64)
    soft = rng.random(shape)
    w, p = _weights((7,), 13), (_weights((211, 1), 14) if logits else None)
    half = lambda a: None if a is None else torch.tensor(a).to(torch_dtype)  # noqa: E731
    for targets, with_grad in ((y, True), (soft, False)):
        xt, yt, wt, pt = half(x), half(targets), half(w), half(p)
        for reduction in REDUCTIONS:
            loss, grad, _ = _torch_loss_and_grads(logits, xt, yt, wt, pt, reduction)
            f32 = lambda t: None if t is None else t.float()  # noqa: E731
            expected_loss, expected_grad = _reference(
                logits, f32(xt), f32(yt), f32(wt), f32(pt), reduction, torch.float32
            )
            assert loss.dtype == torch_dtype and grad.dtype == torch_dtype
            assert _ulps_apart(loss, expected_loss.to(torch_dtype), torch_dtype) <= 1.0, reduction
            if with_grad:
                assert _ulps_apart(grad, expected_grad.to(torch_dtype), torch_dtype) <= 1.0, reduction
            if dtype == "float16":  # the NumPy backend takes float16 through the same kernel
                as_np = lambda t: None if t is None else t.numpy()  # noqa: E731
                np_loss, np_grad = _numpy_call(logits, as_np(xt), as_np(yt), as_np(wt), as_np(pt), reduction)
                _assert_same_bits(np_loss, loss, f"numpy {reduction} loss")
                _assert_same_bits(np_grad, grad, f"numpy {reduction} grad")


def _layouts(array: np.ndarray):
    """Non-contiguous arrays with ``array``'s values: a transpose, and a strided slice of a wider buffer."""
    transposed = np.ascontiguousarray(array.T).T
    wide = np.zeros((array.shape[0], 3 * array.shape[1]), dtype=array.dtype)
    wide[:, 1::3] = array
    return {"transposed": transposed, "strided": wide[:, 1::3]}


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_non_contiguous_operands_give_the_contiguous_results(logits: bool, dtype: str) -> None:
    shape = (CHUNK // 8 + 3, 11)
    x, y = _data(logits, shape, seed=15)
    x, y = x.astype(dtype), y.astype(dtype)
    w = _weights((2 * 11,), 16).astype(dtype)[::2]  # a strided per-class weight
    p = _weights((shape[0], 1), 17).astype(dtype) if logits else None
    assert not x.T.flags.c_contiguous and not w.flags.c_contiguous
    for reduction in REDUCTIONS:
        expected = _numpy_call(logits, x, y, w.copy(), p, reduction)
        expected_t = _torch_loss_and_grads(
            logits, *(None if a is None else torch.from_numpy(a.copy()) for a in (x, y, w, p)), reduction
        )
        xs, ys = _layouts(x), _layouts(y)
        for layout in xs:
            xl, yl = xs[layout], ys[layout]
            assert not xl.flags.c_contiguous
            got = _numpy_call(logits, xl, yl, w, p, reduction)
            _assert_same_bits(got[0], expected[0], f"numpy {layout} {reduction} loss")
            _assert_same_bits(got[1], expected[1], f"numpy {layout} {reduction} grad")
        # torch: gradients flow back to a non-contiguous view's base
        base = torch.from_numpy(np.ascontiguousarray(x.T)).requires_grad_(True)
        xt = base.t()
        yt = torch.from_numpy(np.ascontiguousarray(y.T)).t()
        wt, pt = torch.from_numpy(w), None if p is None else torch.from_numpy(p)
        loss = _torch_call(logits, xt, yt, wt, pt, reduction)
        loss.backward(torch.ones_like(loss))
        _assert_same_bits(loss.detach(), expected_t[0], f"torch {reduction} loss")
        _assert_same_bits(base.grad.t(), expected_t[1], f"torch {reduction} grad")


# --------------------------------------------------------------------------------------------------------
# The probability loss's [0, 1] check, inside the kernel
# --------------------------------------------------------------------------------------------------------

RANGE_N = 3 * CHUNK + 17  # the last element sits alone in the last (partial) vector of the last chunk
POSITIONS = (0, CHUNK - 1, 3 * CHUNK, RANGE_N - 1)


def _bad_values(dtype: str) -> list[float]:
    info = torch.finfo(TORCH_DTYPES[dtype])
    # just outside [0, 1] in this dtype, far outside, infinite and NaN
    return [-info.tiny * info.eps, 1.0 + info.eps, -0.5, 7.0, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("which", ["input", "target"])
def test_out_of_range_values_raise_torchs_error(which: str, dtype: str) -> None:
    torch_dtype = TORCH_DTYPES[dtype]
    x, y = _data(False, (RANGE_N,), seed=18)
    message = f"all elements of {which} should be between 0 and 1"
    cases = [(pos, bad) for pos in POSITIONS for bad in _bad_values(dtype)[:3]]
    cases += [(RANGE_N - 1, bad) for bad in _bad_values(dtype)[3:]]
    for position, bad in cases:
        xt, yt = torch.tensor(x, dtype=torch_dtype), torch.tensor(y, dtype=torch_dtype)
        (xt if which == "input" else yt)[position] = bad
        assert not bool(
            ((xt if which == "input" else yt)[position] >= 0)
            & ((xt if which == "input" else yt)[position] <= 1)
        )
        with pytest.raises(RuntimeError, match=message):
            bce.binary_cross_entropy(xt, yt, reduction="none")
        with pytest.raises(RuntimeError, match=message):  # the fused path
            bce.binary_cross_entropy(xt.clone().requires_grad_(True), yt, reduction="mean")
        if dtype != "bfloat16":
            with pytest.raises(RuntimeError, match=message):
                bnp.binary_cross_entropy_and_grad(xt.numpy(), yt.numpy(), reduction="sum")
            with pytest.raises(RuntimeError, match=message):
                bnp.binary_cross_entropy(xt.numpy(), yt.numpy(), torch.ones(1, dtype=torch_dtype).numpy())


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_the_range_ends_and_negative_zero_are_accepted(dtype: str) -> None:
    torch_dtype = TORCH_DTYPES[dtype]
    x = torch.tensor([0.0, -0.0, 1.0, 0.5] * 5, dtype=torch_dtype)
    y = torch.tensor([-0.0, 1.0, 0.0, 1.0] * 5, dtype=torch_dtype)
    loss = bce.binary_cross_entropy(x, y, reduction="none")
    expected = F.binary_cross_entropy(x.double(), y.double(), reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=torch.finfo(torch_dtype).eps, atol=0)


@pytest.mark.parametrize("ignore_index", [5.0, -1.0, math.nan])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_ignored_targets_are_not_range_checked(monkeypatch, dtype: str, ignore_index: float) -> None:
    x, y = _data(False, (RANGE_N,), seed=19)
    x, y = x.astype(dtype), y.astype(dtype)
    y[list(POSITIONS)] = ignore_index
    spy = _Spy(monkeypatch)
    loss, grad = bnp.binary_cross_entropy_and_grad(x, y, reduction="mean", ignore_index=ignore_index)
    xt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(y)
    t_loss = bce.binary_cross_entropy(xt, yt, ignore_index=ignore_index, label_smoothing=0.1)
    t_loss.backward()
    assert spy.calls == 2 and np.isfinite(loss) and bool(torch.isfinite(t_loss))
    keep = np.ones(RANGE_N, dtype=bool)
    keep[list(POSITIONS)] = False
    expected, expected_grad = bnp.binary_cross_entropy_and_grad(x[keep], y[keep], reduction="mean")
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(loss, expected, rtol=4 * eps)
    assert np.all(grad[~keep] == 0)
    np.testing.assert_allclose(grad[keep], expected_grad, rtol=4 * eps, atol=float(np.finfo(dtype).tiny))
    # an input out of range is an error even where the target is ignored (as on the composed path)
    x[POSITIONS[-1]] = 2.0
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        bnp.binary_cross_entropy(x, y, ignore_index=ignore_index)
    # a target out of range that is not the ignored value is still an error
    y[POSITIONS[-1]], x[POSITIONS[-1]] = 3.0, 0.5
    with pytest.raises(RuntimeError, match="all elements of target should be between 0 and 1"):
        bnp.binary_cross_entropy(x, y, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------------------
# ignore_index and label_smoothing: the kernel against the composed path
# --------------------------------------------------------------------------------------------------------


def _with_ignored(y: np.ndarray, ignore_index: float | None, seed: int) -> np.ndarray:
    y = y.copy()
    if ignore_index is not None and ignore_index != 0.0:
        mask = np.random.default_rng(seed).random(y.shape) < 0.3
        y[mask] = ignore_index
    return y


def _composed(monkeypatch, call):
    """``call()`` with the kernels declined: ``_native.plan`` decides for both backends (bcekit.torch's
    eager calls remember the plans they got, so they start here with a fresh memory)."""
    with monkeypatch.context() as patch:
        patch.setattr(_native, "plan", lambda *args, **kwargs: None)
        patch.setattr(bcekit.torch.functional, "_EAGER_CALLS", {})
        spy = _Spy(patch)
        result = call()
        assert spy.calls == 0
    return result


def _option_tolerance(dtype: str) -> dict[str, float]:
    """Kernel against composed path. float64: the kernel smooths targets in long double where the composed
    path rounds the smoothed target to float64 first (a few ulp of the loss), and the target gradient
    log(1 - x) - log(x) cancels near x = 1/2 (absolute differences ~1e-17)."""
    if dtype in ("float64", torch.float64):
        return {"rtol": 1e-13, "atol": 1e-15}
    if dtype in ("float32", torch.float32):
        return {"rtol": 4 * 2.0**-23, "atol": 1e-30}
    # half types: the composed path computes in float32, the kernel in double (a smoothed target equal to
    # the input gives a gradient of exactly 0 in double, and ~1e-7 in float32)
    return {"rtol": 4 * 2.0**-7 if dtype in ("bfloat16", torch.bfloat16) else 4 * 2.0**-10, "atol": 1e-6}


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_numpy_options_match_the_composed_path(monkeypatch, logits: bool, dtype: str) -> None:
    shape = (CHUNK // 16 + 5, 9)
    x, y0 = _data(logits, shape, seed=20)
    w = _weights((9,), 21).astype(dtype)
    p = _weights((shape[0], 1), 22).astype(dtype) if logits else None
    x = x.astype(dtype)
    spy = _Spy(monkeypatch)
    for ignore_index, smoothing in OPTION_CASES:
        y = _with_ignored(y0, ignore_index, seed=23).astype(dtype)
        options = {"ignore_index": ignore_index, "label_smoothing": smoothing}
        for reduction in REDUCTIONS:
            calls = spy.calls
            loss, grad = _numpy_call(logits, x, y, w, p, reduction, **options)
            assert spy.calls == calls + 1
            expected_loss, expected_grad = _composed(
                monkeypatch, functools.partial(_numpy_call, logits, x, y, w, p, reduction, **options)
            )
            what = f"ignore_index={ignore_index}, label_smoothing={smoothing}, {reduction}"
            np.testing.assert_allclose(loss, expected_loss, **_option_tolerance(dtype), err_msg=what)
            np.testing.assert_allclose(grad, expected_grad, **_option_tolerance(dtype), err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # float64's kernel: the NumPy test above
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_torch_options_match_the_composed_path(monkeypatch, logits: bool, dtype: str) -> None:
    torch_dtype = TORCH_DTYPES[dtype]
    shape = (CHUNK // 16 + 5, 9)
    x, y0 = _data(logits, shape, seed=24)
    w = torch.tensor(_weights((9,), 25), dtype=torch_dtype)
    p = torch.tensor(_weights((shape[0], 1), 26), dtype=torch_dtype) if logits else None
    xt = torch.tensor(x, dtype=torch_dtype)
    tolerance = _option_tolerance(dtype)
    for ignore_index, smoothing in OPTION_CASES:
        yt = torch.tensor(_with_ignored(y0, ignore_index, seed=27), dtype=torch_dtype)
        options = {"ignore_index": ignore_index, "label_smoothing": smoothing}
        for reduction in REDUCTIONS:
            got = _torch_loss_and_grads(logits, xt, yt, w, p, reduction, target_grad=True, **options)
            expected = _composed(
                monkeypatch,
                functools.partial(
                    _torch_loss_and_grads, logits, xt, yt, w, p, reduction, target_grad=True, **options
                ),
            )
            for name, a, b in zip(("loss", "grad input", "grad target"), got, expected, strict=True):
                what = f"ignore_index={ignore_index}, label_smoothing={smoothing}, {reduction}: {name}"
                torch.testing.assert_close(a, b, equal_nan=True, msg=what, **tolerance)


@pytest.mark.parametrize("ignore_index", [-1.0, math.nan])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_all_ignored(monkeypatch, logits: bool, ignore_index: float) -> None:
    x, _ = _data(logits, (CHUNK + 3, 2), seed=28)
    x = x.astype(np.float32)
    y = np.full_like(x, ignore_index)
    w = np.float32(2.0) * np.ones(2, np.float32)
    spy = _Spy(monkeypatch)
    for reduction, expected in (("mean", math.nan), ("sum", 0.0), ("none", 0.0)):
        calls = spy.calls
        loss, grad = _numpy_call(logits, x, y, w, None, reduction, ignore_index=ignore_index)
        np.testing.assert_array_equal(loss, np.full_like(loss, expected))
        np.testing.assert_array_equal(grad, np.zeros_like(x))
        t_loss, t_grad, t_target_grad = _torch_loss_and_grads(
            logits,
            torch.from_numpy(x),
            torch.from_numpy(y),
            torch.from_numpy(w),
            None,
            reduction,
            target_grad=True,
            ignore_index=ignore_index,
        )
        assert spy.calls >= calls + 2
        np.testing.assert_array_equal(t_loss.numpy(), loss)
        assert not t_grad.any() and not t_target_grad.any()
        composed = _composed(
            monkeypatch,
            functools.partial(_numpy_call, logits, x, y, w, None, reduction, ignore_index=ignore_index),
        )
        np.testing.assert_array_equal(composed[0], loss)
        np.testing.assert_array_equal(composed[1], grad)


# --------------------------------------------------------------------------------------------------------
# Large outputs (the buffer cache): live results never share memory
# --------------------------------------------------------------------------------------------------------


def test_large_outputs_do_not_alias_live_results() -> None:
    shape = (2**18 + 3, 2)  # 2 MiB of float32: above the cache's threshold
    x1, y = _data(True, shape, seed=29)
    x1, y = x1.astype(np.float32), y.astype(np.float32)
    x2 = -x1
    loss1, grad1 = bnp.binary_cross_entropy_with_logits_and_grad(x1, y, reduction="none")
    saved = loss1.copy(), grad1.copy()
    loss2, grad2 = bnp.binary_cross_entropy_with_logits_and_grad(x2, y, reduction="none")
    for a in (loss1, grad1):
        for b in (loss2, grad2):
            assert not np.shares_memory(a, b)
    _assert_same_bits(loss1, saved[0])
    _assert_same_bits(grad1, saved[1])
    del loss1, grad1, loss2, grad2
    bcekit.empty_cache()
    loss3, grad3 = bnp.binary_cross_entropy_with_logits_and_grad(x1, y, reduction="none")
    _assert_same_bits(loss3, saved[0])
    _assert_same_bits(grad3, saved[1])
    xt = torch.from_numpy(x1).requires_grad_(True)
    first = bce.binary_cross_entropy_with_logits(xt, torch.from_numpy(y), reduction="none")
    second = bce.binary_cross_entropy_with_logits(-xt, torch.from_numpy(y), reduction="none")
    assert first.data_ptr() != second.data_ptr()
    _assert_same_bits(first.detach(), saved[0])


@pytest.mark.parametrize("nbytes", [2**20, 2**22 - 4, 2**22, 2**22 + 4, 3 * 2**21 + 8])
def test_cached_buffers_are_aligned_whole_and_handed_out_again(nbytes: int) -> None:
    """Buffers of 4 MiB and more start on a 2 MiB boundary (the huge-page layout), smaller ones on 64
    bytes; every byte of the data is usable (under ASan, the padding around it is poisoned), two live
    buffers never overlap, and a freed buffer is handed out again for the same size (the cache is on for
    this test even where BCEKIT_CACHE_BYTES turns it off, as the sanitizer run does)."""
    bcekit.empty_cache()
    _native._core.set_cache_limit(2**30)
    try:
        n = nbytes // 4
        a = _native.empty((n,), "float32", torch=False)
        assert a.ctypes.data % (2**21 if nbytes >= 2**22 else 64) == 0
        a[:] = np.arange(n, dtype=np.float32)
        b = _native.empty((n,), "float32", torch=False)
        assert not np.shares_memory(a, b)
        b[:] = -1.0
        np.testing.assert_array_equal(a, np.arange(n, dtype=np.float32))
        address = a.ctypes.data
        del a
        again = _native.empty((n,), "float32", torch=False)
        assert again.ctypes.data == address
        del again, b
    finally:
        _native._core.set_cache_limit(int(os.environ.get("BCEKIT_CACHE_BYTES", 2**30)))
        bcekit.empty_cache()


# --------------------------------------------------------------------------------------------------------
# The baseline build (what CPUs without AVX2 + FMA run), forced with BCEKIT_ISA=baseline
# --------------------------------------------------------------------------------------------------------

_BASELINE_SCRIPT = """
import json, sys
import numpy as np
import torch
import bcekit.torch as bce
from bcekit import _native
rng = np.random.default_rng(3)
out = {"isa": _native.ISA}
for dtype in ("float32", "float16", "bfloat16"):
    for logits in (True, False):
        x = rng.normal(0.0, 4.0, 5000) if logits else rng.random(5000)
        y = rng.random(5000)
        xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
        yt = torch.tensor(y, dtype=getattr(torch, dtype))
        f = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
        per_element = f(xt, yt, reduction="none")
        mean = f(xt, yt)
        (grad,) = torch.autograd.grad(mean, xt)
        out[f"{dtype}-{logits}"] = [
            per_element.detach().double().tolist(), float(mean), grad.double().tolist()
        ]
        # targets all 0 or 1 (the probability loss's product form)
        hard = torch.round(yt)
        mean = f(xt, hard)
        (grad,) = torch.autograd.grad(mean, xt)
        per_element = f(xt, hard, reduction="none")
        out[f"{dtype}-{logits}-hard"] = [
            per_element.detach().double().tolist(), float(mean), grad.double().tolist()
        ]
        # the fast path's other modes: options without weights, and weights
        w = torch.tensor(rng.uniform(0.5, 2.0, 5000), dtype=getattr(torch, dtype))
        yi = yt.clone()
        yi[::7] = -1.0
        for name, options in (("options", {"label_smoothing": 0.1, "ignore_index": -1.0}), ("weighted", {})):
            weight = w if name == "weighted" else None
            per_element = f(xt, yi if options else yt, weight, reduction="none", **options)
            mean = f(xt, yi if options else yt, weight, **options)
            (grad,) = torch.autograd.grad(mean, xt)
            out[f"{dtype}-{logits}-{name}"] = [
                per_element.detach().double().tolist(), float(mean), grad.double().tolist()
            ]
json.dump(out, sys.stdout)
"""


def _run_isa(isa: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BCEKIT_ISA"}
    if isa is not None:
        env["BCEKIT_ISA"] = isa
    result = subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def test_baseline_build_agrees_with_the_dispatched_one() -> None:
    """The vector kernel compiled for the architecture's baseline (no FMA: products round separately)
    gives the dispatched build's results to within one ulp of the storage type."""
    baseline, dispatched = _run_isa("baseline"), _run_isa(None)
    assert baseline.pop("isa") == "baseline"
    dispatched.pop("isa")
    for key, (per_element, mean, grad) in dispatched.items():
        dtype = getattr(torch, key.split("-")[0])  # "dtype-logits" or "dtype-logits-mode"
        eps = torch.finfo(dtype).eps
        # Label smoothing's y (1 - s) + s / 2 is one FMA in one build and two roundings in the other: the
        # smoothed targets differ by up to an ulp of float64, which is all of a gradient x - y that
        # cancels to (nearly) zero. 1e-15 is far below the gradients' scale (1 / 5000 here).
        atol = 1e-15 if key.endswith("-options") else 0.0
        other = baseline[key]
        for mine, theirs in ((per_element, other[0]), ([mean], [other[1]]), (grad, other[2])):
            torch.testing.assert_close(
                torch.tensor(theirs),
                torch.tensor(mine),
                rtol=2 * eps,
                atol=atol,
                msg=lambda m, k=key: f"{k}: {m}",
            )
