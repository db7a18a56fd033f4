"""bcekit._native, the bridge to the C++ kernels: broadcast forms, eligibility, threads, ``run``.

The expected broadcast forms are derived from NumPy's broadcasting, not written down: for a weight of shape
``W`` read against an input of shape ``S``, ``np.broadcast_to(np.arange(prod(W)).reshape(W), S)`` says which
weight element every input element reads, and the form's rule (``0``, ``i % inner``, ``i // inner`` or ``i``)
must reproduce that map exactly, with the number of weight elements the kernel expects for the form.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bcekit
import bcekit.numpy as bnp
import bcekit.torch as bce
from bcekit import _native, _semantics
from bcekit._semantics import MEAN, NONE, SUM

FORMS = {
    _native.SCALAR: "SCALAR",
    _native.PER_CLASS: "PER_CLASS",
    _native.PER_ROW: "PER_ROW",
    _native.FULL: "FULL",
}


def _index_map(weight_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> np.ndarray | None:
    """Which weight element each input element reads (in C order), by NumPy's broadcasting; None when the
    weight does not broadcast to ``input_shape`` without enlarging it. Unit dimensions in front of the
    input's rank add no elements, so they are dropped first (``(1, 1, C)`` reads like ``(C,)``)."""
    extra = len(weight_shape) - len(input_shape)
    if extra > 0:
        if any(d != 1 for d in weight_shape[:extra]):
            return None
        weight_shape = weight_shape[extra:]
    try:
        if np.broadcast_shapes(weight_shape, input_shape) != tuple(input_shape):
            return None
    except ValueError:
        return None
    indices = np.arange(math.prod(weight_shape)).reshape(weight_shape)
    return np.broadcast_to(indices, input_shape).ravel()


def _rule(form: int, inner: int, n: int) -> np.ndarray:
    """The kernel's reading rule of a form (kernel_api.h): the weight index of element i."""
    i = np.arange(n)
    return {
        _native.SCALAR: np.zeros(n, dtype=i.dtype),
        _native.PER_CLASS: i % inner,
        _native.PER_ROW: i // inner,
        _native.FULL: i,
    }[form]


def _kernel_weight_size(form: int, inner: int, n: int) -> int:
    """How many weight elements the kernel requires for a form (core.cpp's weight_size)."""
    if form == _native.SCALAR:
        return 1
    if form == _native.PER_CLASS:
        return inner
    if form == _native.PER_ROW:
        return -(-n // inner) if inner > 0 else 0
    return n


def _some_rule_matches(index_map: np.ndarray, input_shape: tuple[int, ...]) -> bool:
    """Whether any of the four forms could read this map in place (so None would be a missed form)."""
    n = index_map.size
    if n == 0:
        return True
    candidates = [(_native.SCALAR, 1), (_native.FULL, 1)]
    if input_shape:
        candidates.append((_native.PER_CLASS, input_shape[-1]))
    run = int(np.argmax(index_map != 0)) if np.any(index_map != 0) else n  # length of the first run
    candidates.append((_native.PER_ROW, max(run, 1)))
    return any(np.array_equal(_rule(form, inner, n), index_map) for form, inner in candidates)


def _check_form(weight_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> tuple[int, int] | None:
    result = _native.broadcast_form(weight_shape, input_shape)
    index_map = _index_map(weight_shape, input_shape)
    if index_map is None:
        assert result is None, f"{weight_shape} does not broadcast to {input_shape}, got {result}"
        return None
    if result is None:
        assert not _some_rule_matches(index_map, input_shape), (
            f"{weight_shape} against {input_shape} is readable in place, but broadcast_form gave None"
        )
        return None
    form, inner = result
    n = index_map.size
    assert form in FORMS
    np.testing.assert_array_equal(_rule(form, inner, n), index_map, err_msg=f"{FORMS[form]}, inner={inner}")
    if n:
        assert _kernel_weight_size(form, inner, n) == math.prod(weight_shape)
    return result


# (weight shape, input shape, the form expected by name or None); inner and the index map come from NumPy
NAMED_CASES = [
    ((), (5, 3), "SCALAR"),
    ((1,), (5, 3), "SCALAR"),
    ((1, 1), (5, 3), "SCALAR"),
    ((1, 1, 1), (2, 5, 3), "SCALAR"),
    ((), (), "SCALAR"),
    ((1,), (1,), "SCALAR"),
    ((1, 1), (1, 1), "SCALAR"),
    ((), (7,), "SCALAR"),
    ((5, 3), (5, 3), "FULL"),
    ((7,), (7,), "FULL"),
    ((2, 4, 3), (2, 4, 3), "FULL"),
    ((3,), (5, 3), "PER_CLASS"),
    ((1, 3), (5, 3), "PER_CLASS"),
    ((3,), (2, 4, 3), "PER_CLASS"),
    ((1, 3), (2, 4, 3), "PER_CLASS"),
    ((1, 1, 3), (2, 4, 3), "PER_CLASS"),
    ((1, 1, 3), (5, 3), "PER_CLASS"),  # a leading unit dimension beyond the input's rank adds nothing
    ((5, 1), (5, 3), "PER_ROW"),
    ((2, 1, 1), (2, 4, 3), "PER_ROW"),
    ((2, 4, 1), (2, 4, 3), "PER_ROW"),
    ((4, 1), (2, 4, 3), None),  # (1, 4, 1): a middle dimension only
    ((3, 1), (5, 3, 4), None),  # (C, 1) against (N, C, D)
    ((2, 1, 3), (2, 4, 3), None),
    ((1, 4, 1), (2, 4, 3), None),
    ((4, 3), (2, 4, 3), None),  # the trailing block repeated: not one of the four forms
    ((2, 3), (3,), None),  # would enlarge the input
    ((5, 3), (1, 3), None),  # would enlarge the input
    ((4,), (5, 3), None),  # not broadcastable
    ((5,), (5, 3), None),  # not broadcastable (NumPy aligns trailing dimensions)
    ((2, 2, 3), (2, 4, 3), None),
]


@pytest.mark.parametrize(("weight_shape", "input_shape", "expected"), NAMED_CASES)
def test_broadcast_form_named_cases(weight_shape, input_shape, expected) -> None:
    result = _check_form(weight_shape, input_shape)
    assert (None if result is None else FORMS[result[0]]) == expected


@pytest.mark.parametrize(
    ("weight_shape", "input_shape"),
    [((5, 1), (5, 3)), ((2, 1, 1), (2, 4, 3)), ((2, 4, 1), (2, 4, 3)), ((6, 1, 1, 1), (6, 2, 3, 5))],
)
def test_per_row_inner_is_the_trailing_block(weight_shape, input_shape) -> None:
    form, inner = _native.broadcast_form(weight_shape, input_shape)
    split = max(i for i, d in enumerate(weight_shape) if d != 1) + 1
    assert form == _native.PER_ROW and inner == math.prod(input_shape[split:])


@st.composite
def _shape_pairs(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    input_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=4)))
    if draw(st.integers(0, 4)) == 0:  # anything at all: mostly not broadcastable
        weight_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=5)))
    else:  # a random mix of kept and unit dimensions, possibly fewer (or more, leading unit) dimensions
        mixed = tuple(draw(st.sampled_from([d, 1])) for d in input_shape)
        weight_shape = mixed[draw(st.integers(0, len(mixed))) :]
        weight_shape = (1,) * draw(st.integers(0, 1)) + weight_shape
    return weight_shape, input_shape


@settings(max_examples=400, deadline=None)
@given(_shape_pairs())
def test_broadcast_form_agrees_with_numpy_broadcasting(pair) -> None:
    _check_form(*pair)


def test_weights_of_an_empty_input_take_the_composed_path() -> None:
    """An empty input reads no weight, so it has no broadcast form: a weight ``(N, 1)`` against ``(N, 0)``
    once became PER_ROW with inner 0 and the kernel refused its N elements; torch returns an empty loss."""
    assert _native.broadcast_form((3, 1), (3, 0)) is None
    x = np.zeros((3, 0), dtype=np.float32)
    weight = np.ones((3, 1), dtype=np.float32)
    assert float(bnp.binary_cross_entropy_with_logits(x, x, weight, reduction="sum")) == 0.0
    t = torch.zeros(3, 0)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(t, t, torch.ones(3, 1), reduction="sum")
    assert float(bce.binary_cross_entropy_with_logits(t, t, torch.ones(3, 1), reduction="sum")) == expected


def test_empty_inputs_with_weights_run() -> None:
    for input_shape, weight_shape in [((0, 3), (3,)), ((0, 3), (0, 1)), ((0, 3), ()), ((2, 0), (2, 0))]:
        x = np.zeros(input_shape, dtype=np.float32)
        weight = np.ones(weight_shape, dtype=np.float32)
        assert not _native.eligible("logits", ["float32"] * 3, input_shape, weight_shape)
        loss = bnp.binary_cross_entropy_with_logits(x, x, weight, reduction="none")
        assert loss.shape == input_shape
        assert float(bnp.binary_cross_entropy_with_logits(x, x, weight, reduction="sum")) == 0.0
        assert math.isnan(float(bnp.binary_cross_entropy_with_logits(x, x, weight)))


# --------------------------------------------------------------------------------------------------------
# eligible
# --------------------------------------------------------------------------------------------------------


def test_eligible_takes_the_kernel_losses_only() -> None:
    assert _native.eligible("logits", ["float32", "float32"], (4, 3))
    assert _native.eligible("bce", ["float32", "float32"], (4, 3))
    assert not _native.eligible("focal", ["float32", "float32"], (4, 3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_eligible_dtypes(dtype: str) -> None:
    expected = dtype != "float64" or bool(_native._core.EXTENDED_FLOAT64)
    assert _native.eligible("logits", [dtype] * 4, (4, 3), (3,), (4, 1)) == expected


def test_eligible_rejects_mixed_and_unsupported_dtypes() -> None:
    assert not _native.eligible("logits", ["float32", "float64"], (4, 3))
    assert not _native.eligible("logits", ["float32", "float32", "float64"], (4, 3), (3,))
    assert not _native.eligible("bce", ["int64", "int64"], (4, 3))
    assert not _native.eligible("bce", ["complex64", "complex64"], (4, 3))


def test_eligible_needs_every_weight_in_a_form() -> None:
    assert _native.eligible("logits", ["float32"] * 3, (4, 3, 2), None, (4, 1, 1))
    assert _native.eligible("logits", ["float32"] * 4, (4, 3, 2), (2,), (4, 3, 1))
    assert not _native.eligible("logits", ["float32"] * 4, (4, 3, 2), (3, 1), (2,))
    assert not _native.eligible("logits", ["float32"] * 4, (4, 3, 2), (2,), (3, 1))


# --------------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    before = bcekit.get_num_threads()
    yield
    bcekit.set_num_threads(before)


def test_set_num_threads_round_trips(restore_threads) -> None:
    assert bcekit.set_num_threads is _native.set_num_threads
    assert bcekit.get_num_threads is _native.get_num_threads
    bcekit.set_num_threads(3)
    assert bcekit.get_num_threads() == 3
    bcekit.set_num_threads(1)
    assert _native.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_rejects_non_positive(restore_threads, bad: int) -> None:
    before = bcekit.get_num_threads()
    with pytest.raises(ValueError, match="positive number of threads"):
        bcekit.set_num_threads(bad)
    assert bcekit.get_num_threads() == before


def test_default_threads_follow_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("BCEKIT_NUM_THREADS", "5")
    assert _native._default_threads() == 5
    monkeypatch.setenv("BCEKIT_NUM_THREADS", " 2 ")
    assert _native._default_threads() == 2
    monkeypatch.setenv("BCEKIT_NUM_THREADS", "")
    assert _native._default_threads() >= 1
    monkeypatch.delenv("BCEKIT_NUM_THREADS")
    assert _native._default_threads() >= 1


def _import_with(variable: str, value: str, module: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, variable: value}
    return subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("BCEKIT_NUM_THREADS", "abc", "a positive whole number of threads"),
        ("BCEKIT_NUM_THREADS", "0", "a positive whole number of threads"),
        ("BCEKIT_NUM_THREADS", "-2", "a positive whole number of threads"),
        ("BCEKIT_NUM_THREADS", "2.5", "a positive whole number of threads"),
        ("BCEKIT_CACHE_BYTES", "1GB", "a whole number of bytes"),
        ("BCEKIT_CACHE_BYTES", "-1", "a whole number of bytes"),
    ],
)
def test_a_malformed_environment_variable_is_named_with_what_it_accepts(
    variable: str, value: str, accepts: str
) -> None:
    """Like set_num_threads(0), which raises: the import of what computes fails with one ValueError that
    names the variable, its value and what it accepts; the package itself (and so the command line's
    parser, which turns the error into one line) still imports."""
    failed = _import_with(variable, value, "bcekit.numpy")
    assert failed.returncode != 0
    assert (
        failed.stderr.strip().splitlines()[-1]
        == f"ValueError: {variable}={value!r}: must be "
        + (failed.stderr.strip().splitlines()[-1].split(": must be ", 1)[1])
    )
    assert accepts in failed.stderr.strip().splitlines()[-1]
    assert _import_with(variable, value, "bcekit").returncode == 0


def test_accepted_environment_values_take_effect() -> None:
    script = (
        "import bcekit; from bcekit import _native; print(bcekit.get_num_threads(), _native._CACHE_BYTES)"
    )
    environment = {**os.environ, "BCEKIT_NUM_THREADS": "3", "BCEKIT_CACHE_BYTES": "0"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.split() == ["3", "0"]


# A memory limit under which the system refuses most of the threads a call asks
# for, while other Python threads' passes hold the worker pool (so the call starts its own threads).
_THREAD_LIMIT_SCRIPT = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "limit":
    resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))
import bcekit, bcekit.numpy as bnp
from bcekit import _native
if sys.argv[1] == "hook":
    _native._core._fail_thread_starts(10**9)
rng = np.random.default_rng(5)
x = rng.normal(0, 3, 2**22).astype(np.float32)
y = rng.random(2**22).astype(np.float32)
bcekit.set_num_threads(512)
results = []
def step():
    for _ in range(2):
        results.append(bnp.binary_cross_entropy_with_logits(x, y, reduction="sum"))
threads = [threading.Thread(target=step) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
_native._core._fail_thread_starts(0)
bcekit.set_num_threads(1)
loss = bnp.binary_cross_entropy_with_logits(x, y, reduction="sum")
assert len(results) == 6
assert all(r.tobytes() == loss.tobytes() for r in results)
print("same bits")
"""


def _sanitized() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.parametrize("how", ["limit", "hook"])
def test_a_pass_refused_threads_runs_on_those_it_has(how: str) -> None:
    """When the system refuses a thread (here under a 2.5 GB address-space limit with 512 threads asked
    for, or with every start made to fail), both the worker pool and a pass that starts its own threads
    carry on with the threads they got: no abort, and the single-threaded result's bits."""
    if how == "limit" and _sanitized():
        pytest.skip("AddressSanitizer reserves terabytes of address space: the 'hook' case covers this path")
    done = subprocess.run(
        [sys.executable, "-c", _THREAD_LIMIT_SCRIPT, how], capture_output=True, text=True, timeout=300
    )
    assert (done.returncode, done.stdout.strip()) == (0, "same bits"), done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------
# the buffer cache
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_on():
    """The cache on with its default limit (the sanitizer run turns it off), emptied before and after."""
    bcekit.empty_cache()
    _native._core.set_cache_limit(2**30)
    yield
    limit = _native._CACHE_BYTES
    _native._core.set_cache_limit(2**30 if limit is None else limit)
    bcekit.empty_cache()


def _buffer(nbytes: int) -> np.ndarray:
    return _native.empty((nbytes // 4,), "float32", torch=False)


def test_cache_hands_a_buffer_to_a_request_at_most_an_eighth_smaller(cache_on) -> None:
    size = 8 * 2**20
    first = _buffer(size)
    address = first.ctypes.data
    del first
    near = _buffer(size - size // 8)
    assert near.ctypes.data == address
    del near
    assert _native._core.cached_bytes() == size  # back at its own size
    far = _buffer(size - size // 8 - 4096)
    assert far.ctypes.data != address
    assert _native._core.cached_bytes() == size


def test_cache_releases_the_least_recently_returned_beyond_its_limit(cache_on) -> None:
    sizes = [2**20, 2**20 + 2**18, 2**20 + 2**19]  # more than 1/8 apart: no buffer serves another size
    _native._core.set_cache_limit(sizes[1] + sizes[2])
    buffers = [_buffer(s) for s in sizes]
    addresses = [b.ctypes.data for b in buffers]
    for index in range(3):
        buffers[index] = None  # returned in this order: the first is the least recent
    assert _native._core.cached_bytes() == sizes[1] + sizes[2]
    assert [_buffer(s).ctypes.data == a for s, a in zip(sizes[1:], addresses[1:], strict=True)] == [
        True,
        True,
    ]
    _native._core.set_cache_limit(0)
    assert _native._core.cached_bytes() == 0


def test_lowering_the_limit_releases_down_to_it(cache_on) -> None:
    buffers = [_buffer(2**20 * (8 + 2 * i)) for i in range(4)]
    total = sum(b.nbytes for b in buffers)
    del buffers
    assert _native._core.cached_bytes() == total
    _native._core.set_cache_limit(total // 2)
    assert 0 < _native._core.cached_bytes() <= total // 2


def test_cache_releases_a_buffer_no_request_takes_within_its_age(cache_on) -> None:
    """A buffer returned and then not handed out for CACHE_MAX_AGE requests of other sizes is released,
    so a workload whose sizes vary keeps only what its recent requests could use."""
    age = _native._core.CACHE_MAX_AGE
    old = _buffer(64 * 2**20)
    del old
    for _ in range(age):
        _buffer(2**20)  # requests of another size (one buffer, handed out and returned each time)
    assert _native._core.cached_bytes() == 64 * 2**20 + 2**20
    held = _buffer(2**20)
    assert _native._core.cached_bytes() == 0  # the 64 MiB one has waited more than `age` requests
    del held


_MEMORY_SCRIPT = """
import numpy as np, bcekit, bcekit.numpy as bnp
from bcekit import _native
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
rng = np.random.default_rng(0)
x = rng.normal(0, 2, 2**21).astype(np.float32)
y = rng.random(2**21).astype(np.float32)
bnp.binary_cross_entropy_with_logits_and_grad(x[:2**18], y[:2**18], reduction="none")
bcekit.empty_cache()
start = rss()
kept = 0
for n in rng.integers(2**18, 2**21, 400):  # per-element losses and gradients of 1-8 MiB each
    loss, grad = bnp.binary_cross_entropy_with_logits_and_grad(x[:n], y[:n], reduction="none")
    del loss, grad
    kept = max(kept, _native._core.cached_bytes())
bcekit.empty_cache()
print(kept, rss() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident size from /proc")
def test_varying_sizes_keep_a_bounded_cache_and_empty_cache_gives_memory_back() -> None:
    """400 steps whose outputs vary between 1 and 8 MiB: the cache never holds more than what its last
    CACHE_MAX_AGE requests could use (each 8 MiB at most), far below its 1 GiB limit, and after
    empty_cache() the process's resident memory is back within 32 MiB of where it started."""
    environment = {**os.environ, "BCEKIT_CACHE_BYTES": str(2**30)}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kept, grown = (int(v) for v in done.stdout.split())
    assert kept <= _native._core.CACHE_MAX_AGE * 8 * 2**20
    if not _sanitized():  # AddressSanitizer's shadow of the unmapped buffers stays resident
        assert grown <= 32 * 2**20


# --------------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(7)


def _logits_data(shape, dtype=np.float32):
    return _RNG.normal(0, 3, shape).astype(dtype), _RNG.random(shape).astype(dtype)


def test_run_returns_the_reduced_value_and_the_kept_count() -> None:
    x, y = _logits_data((6, 5))
    loss = np.empty_like(x)
    value, kept = _native.run("logits", x, y, input_shape=x.shape, reduction=0, loss=loss)
    assert (value, kept) == (0.0, 30)
    total, kept = _native.run("logits", x, y, input_shape=x.shape, reduction=2)
    assert kept == 30
    np.testing.assert_allclose(total, loss.astype(np.float64).sum(), rtol=1e-6)
    mean, _ = _native.run("logits", x, y, input_shape=x.shape, reduction=1)
    np.testing.assert_allclose(mean, total / 30, rtol=1e-15)
    y[:, 0] = -1.0
    mean, kept = _native.run("logits", x, y, input_shape=x.shape, reduction=1, ignore_index=-1.0)
    assert kept == 24
    np.testing.assert_allclose(mean, loss[:, 1:].astype(np.float64).sum() / 24, rtol=1e-6)


def test_run_scales_gradients_by_grad_scale_and_grad_output() -> None:
    x, y = _logits_data((3, 17), np.float64)
    weight = _RNG.uniform(0.5, 2, (17,))
    plain, scaled, per_element = (np.empty_like(x) for _ in range(3))
    grad_output = _RNG.normal(size=x.shape)
    common = {"input_shape": x.shape, "reduction": 0, "weight": weight, "weight_shape": weight.shape}
    _native.run("logits", x, y, grad_input=plain, **common)
    _native.run("logits", x, y, grad_input=scaled, grad_scale=0.25, **common)
    _native.run("logits", x, y, grad_input=per_element, grad_output=grad_output, grad_scale=2.0, **common)
    np.testing.assert_array_equal(scaled, plain * 0.25)
    np.testing.assert_allclose(per_element, plain * grad_output * 2.0, rtol=1e-15)


def test_run_gives_the_target_gradient() -> None:
    x, y = _logits_data((4, 9), np.float64)
    grad_target = np.empty_like(x)
    _native.run("logits", x, y, input_shape=x.shape, grad_target=grad_target)
    np.testing.assert_array_equal(grad_target, -x)  # d/dy of (1 - y) x + sp(-x) without pos_weight


def test_run_rejects_mismatched_operands() -> None:
    x, y = _logits_data((4, 3))
    with pytest.raises(ValueError, match="another dtype"):
        _native.run("logits", x, y.astype(np.float64), input_shape=x.shape)
    with pytest.raises(ValueError, match="'weight' has 4 elements, expected 3"):  # declared (3,), holds 4
        _native.run("logits", x, y, np.ones(4, np.float32), (3,), input_shape=x.shape)
    with pytest.raises(ValueError, match="'loss' has"):
        _native.run("logits", x, y, input_shape=x.shape, loss=np.empty(5, np.float32))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_run_threads_argument_gives_the_same_bits(threads: int) -> None:
    x, y = _logits_data((40000, 3))
    reference, _ = _native.run("logits", x, y, input_shape=x.shape, reduction=2, threads=1)
    value, _ = _native.run("logits", x, y, input_shape=x.shape, reduction=2, threads=threads)
    assert value == reference


def _threaded_pass(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    grad = np.empty_like(x)
    value, _ = _native.run("logits", x, y, input_shape=x.shape, reduction=2, grad_input=grad, threads=4)
    return value, grad


def test_concurrent_callers_share_the_worker_pool_correctly() -> None:
    """Passes from several Python threads at once (the GIL is released during a pass): one holds the
    worker pool, the others start their own threads; every result is the single-threaded one."""
    import concurrent.futures

    data = [_logits_data((70000 + 1000 * i, 3)) for i in range(6)]
    expected = []
    for x, y in data:
        grad = np.empty_like(x)
        value, _ = _native.run("logits", x, y, input_shape=x.shape, reduction=2, grad_input=grad, threads=1)
        expected.append((value, grad))
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as executor:
        for _ in range(3):
            results = list(executor.map(lambda d: _threaded_pass(*d), data))
            for (value, grad), (want_value, want_grad) in zip(results, expected, strict=True):
                assert value == want_value
                np.testing.assert_array_equal(grad, want_grad)


def _fork_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(90)
    return rng.normal(0, 3, (90000, 3)).astype(np.float32), rng.random((90000, 3)).astype(np.float32)


def _child_pass(queue) -> None:
    queue.put(_threaded_pass(*_fork_data())[0])


# JAX, when an earlier test has imported it, warns that its own threads do not survive fork(); the child
# here uses none of them
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_a_forked_child_runs_threaded_passes() -> None:
    """After fork() the parent's pooled worker threads do not exist in the child (as in a DataLoader
    worker): the child must start its own instead of waiting for them forever."""
    import multiprocessing

    expected = _threaded_pass(*_fork_data())[0]  # the parent's pool now has its workers
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_pass, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "the child hung or failed"
    assert queue.get(timeout=5) == expected


def test_run_raises_torchs_range_errors() -> None:
    x = np.full(10, 0.5, dtype=np.float32)
    y = x.copy()
    bad = x.copy()
    bad[-1] = 1.5
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        _native.run("bce", bad, y, input_shape=x.shape, reduction=2)
    with pytest.raises(RuntimeError, match="all elements of target should be between 0 and 1"):
        _native.run("bce", x, bad, input_shape=x.shape, reduction=2)
    _native.run("bce", x, bad, input_shape=x.shape, reduction=2, ignore_index=1.5)  # ignored: not checked
    _native.run("logits", bad, bad, input_shape=x.shape, reduction=2)  # the logits loss checks nothing


# torch tensors reach the core as raw data pointers, checked in Python


def _torch_pass(x, y, **kwargs) -> tuple[float, int]:
    return _native.run("logits", x, y, input_shape=tuple(x.shape), reduction=2, **kwargs)


def test_run_on_torch_tensors_equals_the_numpy_pass() -> None:
    x, y = _logits_data((50, 7))
    weight = _RNG.uniform(0.5, 2, 7).astype(np.float32)
    grad, grad_t = np.empty_like(x), torch.empty(50, 7)
    expected = _native.run("logits", x, y, weight, (7,), input_shape=x.shape, reduction=2, grad_input=grad)
    got = _native.run(
        "logits",
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.from_numpy(weight),
        (7,),
        input_shape=x.shape,
        reduction=2,
        grad_input=grad_t,
    )
    assert got == expected
    np.testing.assert_array_equal(grad_t.numpy(), grad)


def test_run_on_torch_views_with_a_storage_offset() -> None:
    """A contiguous view that starts inside its storage: the pointer must be the view's first element."""
    x, y = _logits_data((40, 5))
    big_x, big_y = torch.zeros(45, 5), torch.zeros(45, 5)
    big_x[5:], big_y[5:] = torch.from_numpy(x), torch.from_numpy(y)
    out = torch.full((45, 5), -1.0)
    loss = out[5:]
    assert loss.is_contiguous() and loss.storage_offset() == 25
    value = _torch_pass(big_x[5:], big_y[5:], loss=loss)
    # the same pass (a per-element loss too) on tensors that start their storage
    assert value == _torch_pass(torch.from_numpy(x), torch.from_numpy(y), loss=torch.empty(40, 5))
    assert bool((out[:5] == -1).all())  # nothing written before the view
    expected = np.empty_like(x)
    _native.run("logits", x, y, input_shape=x.shape, loss=expected)
    np.testing.assert_array_equal(loss.numpy(), expected)


def test_run_on_torch_tensors_checks_what_a_pointer_cannot_say() -> None:
    x, y = (torch.from_numpy(a) for a in _logits_data((6, 4)))
    with pytest.raises(ValueError, match="'target' must be a contiguous CPU tensor of dtype float32"):
        _torch_pass(x, y.double())
    with pytest.raises(ValueError, match="'target' must be a contiguous CPU tensor"):
        _torch_pass(x, y.t().contiguous().t())
    with pytest.raises(ValueError, match="'target' has 20 elements, expected 24"):
        _torch_pass(x, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="'weight' has 4 elements, expected 6"):
        _native.run("logits", x, y, torch.ones(4), (6, 1), input_shape=(6, 4))
    with pytest.raises(ValueError, match="'grad_input' must be a contiguous CPU tensor"):
        _torch_pass(x, y, grad_input=torch.empty(4, 6).t())


# --------------------------------------------------------------------------------------------------------
# The plan and the kernels' codes
# --------------------------------------------------------------------------------------------------------


def test_the_codes_come_from_the_core_and_agree_with_the_rules() -> None:
    """kernel_api.h is the home of the kernels' codes: _native reads them from the core, and the codes the
    rule book also defines (torch's reduction enum, the gradient's clamp) are the same numbers."""
    core = _native._core
    assert dict(core.REDUCTIONS) == {"none": NONE, "mean": MEAN, "sum": SUM}
    assert core.GRAD_EPSILON == _semantics.GRAD_EPSILON
    forms = dict(core.BROADCAST_FORMS)
    assert (_native.ABSENT, _native.SCALAR, _native.PER_CLASS, _native.PER_ROW, _native.FULL) == tuple(
        forms[name] for name in ("absent", "scalar", "per_class", "per_row", "full")
    )
    assert len(set(forms.values())) == 5
    assert set(core.DTYPES) == {"float32", "float64", "float16", "bfloat16"}
    assert set(core.KINDS) == {"bce", "logits"}


@pytest.mark.parametrize(
    ("weight_shape", "form", "inner", "size"),
    [(None, "absent", 1, 0), ((), "scalar", 1, 1), ((7,), "per_class", 7, 7), ((5, 1), "per_row", 7, 5)],
)
def test_the_plan_says_how_the_kernels_read_each_operand(weight_shape, form, inner, size) -> None:
    plan = _native.plan("logits", "float32", (5, 7), weight_shape, (7,), MEAN, 0.1, None)
    assert plan.weight_form == _native._core.BROADCAST_FORMS[form]
    assert (plan.weight_inner, plan.weight_size) == (inner, size)
    assert (plan.pos_weight_form, plan.pos_weight_size) == (_native.PER_CLASS, 7)
    assert plan.kind == _native._core.KINDS["logits"] and plan.dtype == _native._core.DTYPES["float32"]
    assert plan.n == 35 and plan.reduction == MEAN and plan.label_smoothing == 0.1
    assert plan.grad_scale == 1 / 35 and not plan.mean_over_kept
    assert plan is _native.plan("logits", "float32", (5, 7), weight_shape, (7,), MEAN, 0.1, None)  # cached


def test_the_plan_of_a_mean_over_kept_elements_scales_after_the_pass() -> None:
    plan = _native.plan("bce", "float32", (4, 3), None, None, MEAN, 0.0, -1.0)
    assert plan.mean_over_kept and plan.grad_scale == 1.0 and plan.ignore_index == -1.0
    for reduction in (NONE, SUM):
        plan = _native.plan("bce", "float32", (4, 3), None, None, reduction, 0.0, -1.0)
        assert not plan.mean_over_kept and plan.grad_scale == 1.0


@pytest.mark.parametrize(
    "arguments",
    [
        ("focal", "float32", (4, 3), None, None),  # a loss the kernels do not compute
        ("logits", None, (4, 3), None, None),  # operands of different dtypes
        ("logits", "int64", (4, 3), None, None),
        ("logits", "float32", (4, 3, 2), (3, 1), None),  # a broadcast the kernels cannot read in place
        ("logits", "float32", (0, 3), (3,), None),  # an empty input reads no weight
    ],
)
def test_no_plan_where_the_kernels_do_not_serve(arguments) -> None:
    assert _native.plan(*arguments, MEAN) is None
    assert not _native.eligible(arguments[0], [arguments[1] or "float32", "float64"], *arguments[2:])


def test_triton_plans_take_every_kernel_dtype() -> None:
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        assert _native.plan("logits", dtype, (4, 3), None, None, SUM, 0.0, None, True) is not None
