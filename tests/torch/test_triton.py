"""The Triton kernels (``bcekit.torch._triton``), run by Triton's interpreter on CPU tensors.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` on machines without CUDA before anything imports Triton,
so ``_triton.run`` executes the kernel on CPU tensors (with ``log1p`` as ``log(u) z / (u - 1)``); on a
machine with a GPU the same tests run the compiled kernel on CUDA copies of the data. Sizes are small (the
interpreter is slow) but never multiples of a block (``_triton.CONFIGS``), and span several programs.

* ``_triton.run`` against the C++ kernels (``bcekit._native.run``) and against ``torch.nn.functional`` in
  float64: per-element and reduced losses, input and target gradients, every dtype, every broadcast form
  of ``weight`` and ``pos_weight``, ``label_smoothing`` and ``ignore_index``, both ``grad_output`` shapes
  and ``grad_scale``; float64 losses against mpmath;
* the probability loss's [0, 1] check, including in the last (partial) program and for ignored targets;
* determinism, the reduction, the launch grid, empty inputs and non-contiguous operands;
* the dispatch in ``bcekit.torch._ops`` that can be reached without a GPU: ``kernel_ready`` off the CPU,
  the one-time warning when Triton is missing (CUDA tensors themselves need a GPU).
"""

from __future__ import annotations

import inspect
import math
import os
import struct
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

# NumPy's warnings inside the interpreter (log(0), inf - inf, ...): the kernel's IEEE arithmetic, as on a GPU
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

import bcekit.torch as bce  # noqa: E402
from _cases import OPTION_CASES  # noqa: E402
from _reference import MP, bce_exact, logits_exact, ulp_error  # noqa: E402
from bcekit import _native, _semantics  # noqa: E402
from bcekit._math import LossSpec  # noqa: E402
from bcekit._semantics import MEAN, NONE, SUM  # noqa: E402
from bcekit.torch import _kernel, _range_check, _triton  # noqa: E402

INTERPRETING = _triton._interpreting()
#: Where the kernel runs: CPU tensors under the interpreter, else the GPU.
DEVICE = "cpu" if INTERPRETING else "cuda"
if not INTERPRETING and not torch.cuda.is_available():  # pragma: no cover - a misconfigured environment
    pytest.skip("Triton is compiling (TRITON_INTERPRET unset) but there is no GPU", allow_module_level=True)

BLOCK = _triton.CONFIGS[torch.float32][0]  # float32's (and the half types'); float64's is half of it
SHAPE = (139, 15)  # 2085 = 2 * BLOCK + 37 elements: three programs, the last one partial
N = SHAPE[0] * SHAPE[1]
assert N == 2 * BLOCK + 37

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Weight shapes for SHAPE in each in-place broadcast form (None: absent).
FORMS = {
    "absent": None,
    "scalar": (),
    "per-class": (SHAPE[1],),
    "per-row": (SHAPE[0], 1),
    "full": SHAPE,
}
FORM_NAMES = list(FORMS)
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}
KINDS = pytest.mark.parametrize("kind", ["logits", "bce"])
GRAD_SCALE = 1.0 / 3.0  # not a float32 number: its precision matters to float64 gradients


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def _data(kind: str, dtype: torch.dtype, seed: int, shape=SHAPE, hard: bool = False):
    """Inputs and targets: logits ~ N(0, 9) with some zeros and large values, or probabilities with exact
    0 and 1; soft targets with a third of them exactly 0 or 1 (or hard targets)."""
    rng = np.random.default_rng(seed)
    if kind == "logits":
        x = rng.normal(0.0, 3.0, shape)
        x.reshape(-1)[::101] = 0.0
        x.reshape(-1)[7::211] = 25.0
        x.reshape(-1)[11::223] = -25.0
    else:
        x = rng.uniform(0.0, 1.0, shape)
        x.reshape(-1)[::97] = 0.0
        x.reshape(-1)[1::89] = 1.0
    if hard:
        y = rng.integers(0, 2, shape).astype(np.float64)
    else:
        y = rng.random(shape)
        y.reshape(-1)[::3] = np.round(y.reshape(-1)[::3])
    return torch.tensor(x).to(dtype), torch.tensor(y).to(dtype)


def _weight(shape, dtype: torch.dtype, seed: int):
    if shape is None:
        return None
    return torch.tensor(np.random.default_rng(seed).uniform(0.25, 2.0, shape)).to(dtype)


def _grad_output(reduction: int, dtype: torch.dtype, seed: int, shape=SHAPE) -> torch.Tensor:
    """One value per element for 'none' (no zeros: inf * 0 would be NaN), a one-element tensor else."""
    if reduction != NONE:
        return torch.tensor([-0.75], dtype=dtype)
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    return torch.tensor(values).to(dtype)


def _on(tensor, device):
    return None if tensor is None else tensor.to(device)


def _triton_run(kind, x, y, w=None, p=None, reduction=NONE, *, loss=True, gi=True, gt=True, **options):
    """What ``_kernel`` asks of ``_triton.run``, with fresh (NaN-filled) outputs: a forward pass (the loss,
    and the input gradient too when it is the only gradient asked for and there is no ``grad_output``: the
    fused pass) and, for the other gradients, a backward pass (``grad_output``, or a one-element 1).
    Returns ``(value, count, loss, grad_input, grad_target)``: value a float or None for 'none', the
    tensors on the CPU (None where not asked for)."""
    x, y, w, p = (_on(t, DEVICE) for t in (x, y, w, p))
    grad_output = options.pop("grad_output", None)
    grad_scale = options.pop("grad_scale", 1.0)
    output = lambda wanted: torch.full_like(x, math.nan) if wanted else None  # noqa: E731
    per_element = output(loss and reduction == NONE)
    grad_input, grad_target = output(gi), output(gt)
    fused = grad_input is not None and grad_target is None and grad_output is None
    shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
    plan = _native.plan(
        kind,
        str(x.dtype).removeprefix("torch."),
        tuple(x.shape),
        shape(w),
        shape(p),
        reduction,
        options.pop("label_smoothing", 0.0),
        options.pop("ignore_index", None),
        triton=True,
    )
    operands = (plan, x, y, w, p)
    value, count = _triton.run(
        *operands,
        loss=per_element,
        grad_input=grad_input if fused else None,
        grad_scale=grad_scale,
        **options,
    )
    if (grad_input is not None and not fused) or grad_target is not None:
        if grad_output is None:
            grad_output = torch.ones(1, dtype=x.dtype)
        _, backward_count = _triton.run(
            *operands,
            grad_input=None if fused else grad_input,
            grad_target=grad_target,
            grad_output=grad_output.to(DEVICE),
            grad_scale=grad_scale,
            **options,
        )
        assert int(backward_count) == int(count)
    if plan.ignore_index is None:
        assert type(count) is int  # known on the host: no device value
    else:
        assert count.dtype == torch.int64 and count.dim() == 0 and count.device == x.device
    if DEVICE == "cuda":  # the [0, 1] check reports at a later call on a GPU: here, at once
        _range_check.check_errors()
    if value is not None:
        assert value.dtype == x.dtype and value.dim() == 0 and value.device == x.device
        value = float(value)
    return value, int(count), *(_on(t, "cpu") for t in (per_element, grad_input, grad_target))


def _cpu_kernels(dtype: torch.dtype) -> bool:
    return _native.AVAILABLE and str(dtype).rpartition(".")[2] in _native._DTYPES


def _cpu_run(kind, x, y, w=None, p=None, reduction=NONE, *, loss=True, gi=True, gt=True, **options):
    """The same pass through the C++ kernels (``_native.run``), the reduced value rounded to the dtype."""
    if not _cpu_kernels(x.dtype):
        pytest.skip(f"no C++ kernel for {x.dtype} here")
    per_element = torch.empty_like(x) if loss and reduction == NONE else None
    grad_input = torch.empty_like(x) if gi else None
    grad_target = torch.empty_like(x) if gt else None
    grad_output = options.pop("grad_output", None)
    grad_scale = options.pop("grad_scale", 1.0)
    if grad_output is not None and grad_output.numel() == 1 and x.numel() != 1:
        grad_scale, grad_output = grad_scale * float(grad_output), None  # as _kernel.kernel_pass does
    value, count = _native.run(
        kind,
        x,
        y,
        w,
        None if w is None else tuple(w.shape),
        p,
        None if p is None else tuple(p.shape),
        input_shape=tuple(x.shape),
        reduction=reduction,
        loss=per_element,
        grad_input=grad_input,
        grad_target=grad_target,
        grad_output=grad_output,
        grad_scale=grad_scale,
        **options,
    )
    if reduction == NONE:
        value = None
    else:
        value = float(torch.tensor(value, dtype=torch.float64).to(x.dtype))
    return value, count, per_element, grad_input, grad_target


def _kept(y: torch.Tensor, ignore_index) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(y, dtype=torch.bool)
    return ~torch.isnan(y) if math.isnan(ignore_index) else y != ignore_index


def _torch_run(kind, x, y, w=None, p=None, reduction=NONE, *, grad_output=None, grad_scale=1.0, **options):
    """``torch.nn.functional`` in float64 on the same (rounded) values, weights materialised: smoothing as
    smoothed targets, ignored elements as zero weights; gradients as the kernel's (no 1/count)."""
    smoothing = options.get("label_smoothing", 0.0)
    kept = _kept(y, options.get("ignore_index"))
    xd = x.double().requires_grad_(True)
    yd = torch.where(kept, y.double(), 0.0).requires_grad_(True)
    smoothed = yd * (1.0 - smoothing) + 0.5 * smoothing
    wd = kept.double() if w is None else w.double().expand(x.shape) * kept
    if kind == "logits":
        pd = None if p is None else p.double().expand(x.shape)
        loss = F.binary_cross_entropy_with_logits(xd, smoothed, wd, reduction="none", pos_weight=pd)
    else:
        loss = F.binary_cross_entropy(xd, smoothed, wd, reduction="none")
    scale = torch.ones(x.shape, dtype=torch.float64) if grad_output is None else grad_output.double()
    gi, gt = torch.autograd.grad(loss, (xd, yd), (scale * grad_scale).expand(x.shape))
    gi, gt = (torch.where(kept, g, 0.0) for g in (gi, gt))  # 0 * inf is NaN in torch, 0 in the kernel
    total, count = float(loss.detach().sum()), int(kept.sum())
    value = {NONE: None, SUM: total, MEAN: total / count if count else math.nan}[reduction]
    return value, count, loss.detach(), gi, gt


def _magnitudes(kind, x, y, w, p, grad_output, grad_scale, torch_terms: bool = False, **options):
    """Per element, the size of the terms the loss and each gradient are made of (float64): what their
    rounding errors in the compute dtype are relative to, where the terms cancel. ``torch_terms``: those
    of torch's formulas too, which cancel elsewhere: its logits loss adds ``(1 - y) x`` to
    ``(1 + (p - 1) y) (log1p(e^-|x|) + max(-x, 0))``, its input gradient is
    ``(1 + (p - 1) y) sigmoid(x) - p y`` (both ~1 where the result is e^-25), and its probability loss and
    target gradient take ``log(1 - x)`` and ``log(x / (1 - x))`` (absolute errors ~eps)."""
    x, y = x.double(), y.double()
    smoothing = options.get("label_smoothing", 0.0)
    kept = _kept(y, options.get("ignore_index"))
    y = torch.where(kept, y, 0.0) * (1.0 - smoothing) + 0.5 * smoothing
    w = 1.0 if w is None else w.double().expand(x.shape)
    scale = (1.0 if grad_output is None else grad_output.double().abs()) * abs(grad_scale)
    if kind == "logits":
        p = 1.0 if p is None else p.double().expand(x.shape)
        sp_pos, sp_neg = F.softplus(x), F.softplus(-x)
        loss = w * (x.abs() + p * y * sp_neg + (1 - y) * sp_pos)
        gi = w * ((1 - y) * torch.sigmoid(x) + p * y * torch.sigmoid(-x)) * scale
        gt = w * (x.abs() + p * sp_neg + sp_pos) * scale
        if smoothing:  # a smoothed target is rounded in the compute dtype: its error times each derivative
            loss = loss + w * y * (p * sp_neg + sp_pos)
            gi = gi + w * y * (torch.sigmoid(x) + p * torch.sigmoid(-x)) * scale
        if torch_terms:
            loss = loss + w * (1 + p) * (x.abs() + 1)
            gi = gi + w * (1 + p) * scale
    else:
        log_x, log_1mx = torch.log(x).abs().clamp_max(100), torch.log1p(-x).abs().clamp_max(100)
        loss = w * (log_x + log_1mx)
        gi = w * (x + y) / torch.clamp_min(x * (1 - x), _semantics.GRAD_EPSILON) * scale
        gt = w * (log_x + log_1mx) * scale
        if torch_terms:
            loss, gt = loss + w, gt + w * scale
    return [torch.where(kept, m, 0.0) for m in (loss, gi, gt)]


def _assert_close(got, expected, dtype, ulps, magnitude, compute_eps, what):
    """``|got - expected| <= ulps * ulp(expected) + compute_eps * magnitude`` elementwise, ulp in ``dtype``
    (subnormal steps included); non-finite values must be equal."""
    got, expected = got.double(), expected.double()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got)), f"{what}: non-finite elements differ"
    assert torch.equal(got[~finite].nan_to_num(), expected[~finite].nan_to_num()), what
    info = torch.finfo(dtype)
    size = torch.maximum(got.abs(), expected.abs())[finite]
    ulp = torch.exp2(torch.floor(torch.log2(size.clamp_min(info.tiny)))) * info.eps
    ulp = ulp.clamp_min(info.tiny * info.eps)
    magnitude = magnitude.expand(finite.shape)[finite] if torch.is_tensor(magnitude) else magnitude
    error = (got[finite] - expected[finite]).abs()
    allowed = ulps * ulp + compute_eps * magnitude
    worst = int(torch.argmax(error - allowed)) if error.numel() else 0
    assert bool((error <= allowed).all()), (
        f"{what}: {int((error > allowed).sum())} elements off, e.g. {float(got[finite][worst])!r} "
        f"vs {float(expected[finite][worst])!r} ({float(error[worst] / ulp[worst]):.1f} ulp)"
    )


def _assert_value_close(got, expected, dtype, ulps, what):
    if expected is None:
        assert got is None, what
        return
    if math.isnan(expected):
        assert math.isnan(got), what
        return
    _assert_close(torch.tensor([got]), torch.tensor([expected]), dtype, ulps, 0.0, 0.0, what)


def _compute_eps(dtype: torch.dtype) -> float:
    """The unit roundoff of the dtype the kernel computes in (float64 for float64, else float32)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(ints)


class _Launches:
    """Records each launch through ``_triton._launch`` (the kernel's name, grid and arguments by name) and
    launches it."""

    def __init__(self, launch) -> None:
        self.launch = launch
        self.kernels: list[str] = []
        self.grids: list[tuple] = []
        self.arguments: list[dict] = []

    def __call__(self, kernel, grid, *args, **kwargs):
        names = list(inspect.signature(kernel.fn).parameters)
        self.kernels.append(kernel.fn.__name__)
        self.grids.append(tuple(grid))
        self.arguments.append({**dict(zip(names, args, strict=False)), **kwargs})
        return self.launch(kernel, grid, *args, **kwargs)


@pytest.fixture
def launches(monkeypatch) -> _Launches:
    recorder = _Launches(_triton._launch)
    monkeypatch.setattr(_triton, "_launch", recorder)
    return recorder


# --------------------------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------------------------


def test_the_kernel_is_interpreted_without_a_gpu() -> None:
    assert _triton.AVAILABLE
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        description = _triton.describe()
        assert INTERPRETING and description["available"] and description["interpreting"]
        assert description["configs"]["float32"] == list(_triton.CONFIGS[torch.float32])
        assert type(_triton._bce_kernel).__name__ == "InterpretedFunction"
    for block, warps in _triton.CONFIGS.values():  # tl.arange needs powers of two, as do warps
        assert block & (block - 1) == 0 and warps & (warps - 1) == 0


# --------------------------------------------------------------------------------------------------------
# Against the C++ kernels and torch: dtypes, broadcast forms, grad_output, grad_scale
# --------------------------------------------------------------------------------------------------------


def _weights(kind: str, form: str, dtype: torch.dtype):
    """``weight`` in ``form`` and ``pos_weight`` (logits only) in the next form, so pairs of forms mix."""
    w = _weight(FORMS[form], dtype, seed=2)
    pos_form = FORM_NAMES[(FORM_NAMES.index(form) + 1) % len(FORM_NAMES)]
    p = _weight(FORMS[pos_form], dtype, seed=3) if kind == "logits" else None
    return w, p


def _cpu_tolerances(dtype: torch.dtype) -> tuple[float, float, float, float]:
    """``(loss ulps, gradient ulps, gradient eps, reduced value ulps)`` of the Triton kernels against the
    C++ kernels, whose results are within an ulp of exact.

    * float64: the loss's terms are added in double-double on both sides (a few ulp); gradients in plain
      double against the C++ kernel's long double differ where the terms cancel.
    * float32 computes in float32 (the GPU contract): each loss within 4 ulp of exact, the C++ kernel's
      within 1; gradients within a few float32 roundings of their terms (eps relative to _magnitudes);
      the sum adds partial sums of float32 values.
    * half types compute in float32 on both sides and round once.
    """
    if dtype == torch.float64:
        return 4, 4, 4 * 2.0**-53, 4
    if dtype == torch.float32:
        return 5, 1, 8 * 2.0**-24, 16
    return 1, 1, 4 * 2.0**-24, 1


@KINDS
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_matches_the_cpu_kernels(kind: str, dtype: str, form: str, reduction: str) -> None:
    torch_dtype, enum = DTYPES[dtype], REDUCTIONS[reduction]
    x, y = _data(kind, torch_dtype, seed=1)
    w, p = _weights(kind, form, torch_dtype)
    options = {"grad_output": _grad_output(enum, torch_dtype, seed=4), "grad_scale": GRAD_SCALE}
    got = _triton_run(kind, x, y, w, p, enum, **options)
    expected = _cpu_run(kind, x, y, w, p, enum, **options)
    assert got[1] == expected[1] == N
    magnitudes = _magnitudes(kind, x, y, w, p, **options)
    loss_ulps, ulps, eps, value_ulps = _cpu_tolerances(torch_dtype)
    _assert_value_close(got[0], expected[0], torch_dtype, value_ulps, "value")
    for index, name in ((2, "loss"), (3, "grad_input"), (4, "grad_target")):
        if expected[index] is None:
            assert got[index] is None
            continue
        assert got[index].dtype == torch_dtype
        if name == "loss":
            _assert_close(got[index], expected[index], torch_dtype, loss_ulps, 0.0, 0.0, name)
        else:
            _assert_close(got[index], expected[index], torch_dtype, ulps, magnitudes[index - 2], eps, name)


@KINDS
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("form", FORM_NAMES)
def test_matches_torch_in_float64(kind: str, dtype: str, form: str) -> None:
    """torch's float64 formulas cancel (``(1 - y) x + ...`` of the logits loss, ``log(1 - x)``), so the
    reference is trusted to ~eps64 of the terms: ample for every dtype but float64's tightest digits, which
    the C++ kernels and mpmath check."""
    torch_dtype = DTYPES[dtype]
    x, y = _data(kind, torch_dtype, seed=5)
    w, p = _weights(kind, form, torch_dtype)
    loss_ulps, ulps, eps, _ = _cpu_tolerances(torch_dtype)
    eps += 16 * 2.0**-53  # torch's own rounding, relative to the terms of its formulas
    for reduction, enum in REDUCTIONS.items():
        options = {"grad_output": _grad_output(enum, torch_dtype, seed=6), "grad_scale": GRAD_SCALE}
        got = _triton_run(kind, x, y, w, p, enum, **options)
        value, count, loss, gi, gt = _torch_run(kind, x, y, w, p, enum, **options)
        magnitudes = _magnitudes(kind, x, y, w, p, torch_terms=True, **options)
        assert got[1] == count == N
        if enum != NONE:
            relative = (16 if torch_dtype == torch.float32 else 4) * torch.finfo(torch_dtype).eps
            assert got[0] == pytest.approx(value, rel=relative, abs=0), reduction
        else:
            _assert_close(
                got[2], loss.to(torch_dtype), torch_dtype, loss_ulps, magnitudes[0], 16 * 2.0**-53, "loss"
            )
        _assert_close(got[3], gi.to(torch_dtype), torch_dtype, ulps, magnitudes[1], eps, "grad_input")
        _assert_close(got[4], gt.to(torch_dtype), torch_dtype, ulps, magnitudes[2], eps, "grad_target")


@KINDS
def test_float64_losses_within_a_few_ulp_of_exact(kind: str) -> None:
    """Per-element float64 losses against mpmath at 200 bits (the interpreter's log1p: a few ulp)."""
    shape = (BLOCK + 61,)
    x, y = _data(kind, torch.float64, seed=7, shape=shape)
    p = _weight(shape, torch.float64, seed=8) if kind == "logits" else None
    _, _, loss, _, _ = _triton_run(kind, x, y, None, p, NONE, gi=False, gt=False)
    indices = range(0, shape[0], 3)  # a third of them: mpmath is slow
    errors = []
    for i in indices:
        xi, yi = float(x[i]), float(y[i])
        exact = logits_exact(xi, yi, float(p[i])) if kind == "logits" else bce_exact(xi, yi)
        errors.append(ulp_error(float(loss[i]), exact, np.float64))
    assert max(errors) <= 4.0, max(errors)


def _float32_contract_cases(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs where float32 arithmetic is hardest: logits across the whole range where the loss is
    finite and non-zero (tiny, moderate, beyond exp's subnormal threshold), probabilities near 0 and 1 and
    tiny; targets 0, 1 and soft (close to 0 and 1 too); pos_weight in [0, 4]; and, for the logits loss,
    points built to scale an inner rounding error up (as ``benchmarks/accuracy.py``'s hard cases)."""
    rng = np.random.default_rng(seed)
    count = 700
    if kind == "logits":
        magnitude = np.concatenate(
            [
                rng.uniform(0, 1, 100),
                rng.uniform(1, 20, 200),
                rng.uniform(20, 110, 200),
                10.0 ** rng.uniform(-30, 0, 200),
            ]
        )
        x = magnitude * rng.choice([-1.0, 1.0], count)
    else:
        x = np.concatenate(
            [rng.uniform(0, 1, 300), 10.0 ** rng.uniform(-38, 0, 200), 1 - 10.0 ** rng.uniform(-7.2, 0, 200)]
        )
    soft = np.where(rng.random(count) < 0.5, rng.random(count), 10.0 ** rng.uniform(-8, 0, count))
    soft = np.where(rng.random(count) < 0.3, 1 - soft, soft)  # close to 1 too
    y = np.where(rng.random(count) < 0.5, soft, rng.choice([0.0, 1.0, 0.5], count))
    if kind != "logits":
        return torch.tensor(x).float(), torch.tensor(y).float(), None
    p = rng.uniform(0.0, 4.0, count)
    # and where an inner rounding is scaled up: log1p(e) at the bottom of its binade and p log1p(e) at the
    # top of its; e subnormal times p up to 100; p y subnormal times |x| >> 1
    hard = 150
    binade = rng.uniform(0.39, 0.433, hard)
    binade_p = 2.0 ** rng.integers(0, 7, hard) * (1 - rng.uniform(0, 0.01, hard)) / np.log1p(np.exp(-binade))
    tail = rng.uniform(87.4, 110.0, hard)
    tiny_y = np.concatenate(
        [rng.uniform(0, 2.0**-126, hard // 2), 2.0**-126 * rng.uniform(1, 100, hard // 2)]
    )
    x = np.concatenate([x, binade, tail, -(10.0 ** rng.uniform(0, 2, hard))])
    y = np.concatenate([y, np.ones(2 * hard), tiny_y])
    p = np.concatenate([p, binade_p, 10.0 ** rng.uniform(0.3, 2, hard), 10.0 ** rng.uniform(-2, 0, hard)])
    return torch.tensor(x).float(), torch.tensor(y).float(), torch.tensor(p).float()


@KINDS
def test_float32_losses_within_4_ulp_of_exact(kind: str) -> None:
    """The GPU contract for float32: each per-element loss within 4 ulp of exact (mpmath, 200 bits) for
    targets in [0, 1] and non-negative weights. The kernel's float32 exp, log and log1p are float32
    arithmetic, which the interpreter evaluates as the GPU does: this measures the compiled kernel too."""
    x, y, p = _float32_contract_cases(kind, seed=27)
    _, _, loss, _, _ = _triton_run(kind, x, y, None, p, NONE, gi=False, gt=False)
    errors = []
    for i in range(x.numel()):
        xi, yi = float(x[i]), float(y[i])
        exact = logits_exact(xi, yi, float(p[i])) if kind == "logits" else bce_exact(xi, yi)
        errors.append(ulp_error(float(loss[i]), exact, np.float32))
    assert max(errors) <= 4.0, (max(errors), int(np.argmax(errors)))


def _exact_gradients(kind: str, x: float, y: float, p: float) -> tuple:
    """mpmath (200 bits): the input gradient and the target gradient (None where it is infinite)."""
    xm, ym, pm = MP.mpf(x), MP.mpf(y), MP.mpf(p)
    if kind == "logits":
        large, small = 1 / (1 + MP.exp(-xm)), 1 / (1 + MP.exp(xm))
        return (1 - ym) * large - pm * ym * small, pm * MP.log1p(MP.exp(-xm)) - MP.log1p(MP.exp(xm))
    grad_input = (xm - ym) / max(xm * (1 - xm), MP.mpf(_semantics.GRAD_EPSILON))
    return grad_input, (MP.log1p(-xm) - MP.log(xm)) if 0 < xm < 1 else None


@KINDS
def test_float32_gradients_at_least_as_accurate_as_torchs(kind: str) -> None:
    """The GPU contract's gradients, against torch's float32 ones (CPU), both measured in ulp against
    mpmath on the same points: the 99th percentile and the worst error of each gradient are no larger,
    the median no more than 0.05 ulp larger (both are below half an ulp: the final rounding's). (The
    logits loss's input gradient cancels where y is soft, torch's far more: it forms
    ``(1 + (p - 1) y) sigmoid(x) - p y``.)"""
    rng = np.random.default_rng(28)
    count = 1200
    if kind == "logits":
        x = rng.choice([-1.0, 1.0], count) * 10.0 ** rng.uniform(-6, 2, count)
    else:
        third = count // 3
        x = np.concatenate(
            [
                rng.uniform(0, 1, third),
                10.0 ** -rng.uniform(0, 30, third),
                1 - 10.0 ** -rng.uniform(0, 7, third),
            ]
        )
    y = np.where(rng.random(count) < 0.5, rng.integers(0, 2, count).astype(np.float64), rng.random(count))
    p = 10.0 ** rng.uniform(-1, 1, count)
    x, y, p = (torch.tensor(a).float() for a in (x, y, p))
    pos_weight = p if kind == "logits" else None
    ours = _triton_run(kind, x, y, None, pos_weight, SUM, loss=False)[3:]
    xt, yt = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    if kind == "logits":
        torch_loss = F.binary_cross_entropy_with_logits(xt, yt, pos_weight=p, reduction="sum")
    else:
        torch_loss = F.binary_cross_entropy(xt, yt, reduction="sum")
    theirs = torch.autograd.grad(torch_loss, (xt, yt))
    exact = [_exact_gradients(kind, float(a), float(b), float(c)) for a, b, c in zip(x, y, p, strict=True)]
    for index, name in enumerate(("input", "target")):
        reference = [e[index] for e in exact]
        kept = [i for i, e in enumerate(reference) if e is not None]
        errors = [
            np.array([ulp_error(float(gradients[index][i]), reference[i], np.float32) for i in kept])
            for gradients in (ours, theirs)
        ]
        assert np.median(errors[0]) <= np.median(errors[1]) + 0.05, (name, "median")
        for statistic in (lambda a: np.percentile(a, 99), np.max):
            assert statistic(errors[0]) <= statistic(errors[1]), (
                name,
                statistic(errors[0]),
                statistic(errors[1]),
            )


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_non_finite_logits_match_the_cpu_kernels(dtype: str) -> None:
    torch_dtype = DTYPES[dtype]
    specials = [math.inf, -math.inf, math.nan, 0.0, -0.0, 40.0, -40.0, 1e-30, -1e-30]
    targets = [0.0, 1.0, 0.25]
    grid = [(a, b) for a in specials for b in targets]
    x = torch.tensor([a for a, _ in grid] * 80, dtype=torch_dtype)[: BLOCK + 5]
    y = torch.tensor([b for _, b in grid] * 80, dtype=torch_dtype)[: BLOCK + 5]
    p = _weight((x.numel(),), torch_dtype, seed=9)
    _, _, eps, _ = _cpu_tolerances(torch_dtype)
    for pos_weight in (None, p):
        got = _triton_run("logits", x, y, None, pos_weight, NONE)
        expected = _cpu_run("logits", x, y, None, pos_weight, NONE)
        # the terms' sizes where they are finite (an infinite logit's gradients have no rounding error)
        magnitudes = _magnitudes("logits", x.nan_to_num(0.0, 0.0, 0.0), y, None, pos_weight, None, 1.0)
        for index, name in ((2, "loss"), (3, "grad_input"), (4, "grad_target")):
            magnitude = 0.0 if index == 2 else magnitudes[index - 2]
            _assert_close(got[index], expected[index], torch_dtype, 4, magnitude, eps, name)


@KINDS
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_one_element_grad_output_is_a_scale(kind: str, dtype: str) -> None:
    """A reduced loss's grad_output (one element, or 0-d) scales every gradient as the same value per
    element would, bitwise; grad_scale multiplies it; grad_scale 0 gives zeros."""
    torch_dtype = DTYPES[dtype]
    x, y = _data(kind, torch_dtype, seed=10)
    w, p = _weights(kind, "per-class", torch_dtype)
    value = torch.tensor(-1.25, dtype=torch_dtype)
    per_element = _triton_run(kind, x, y, w, p, MEAN, grad_output=value.expand(SHAPE).contiguous())
    for one in (value.reshape(1), value.reshape(())):
        got = _triton_run(kind, x, y, w, p, MEAN, grad_output=one)
        assert got[0] == per_element[0]
        for index in (3, 4):
            assert torch.equal(_bits(got[index]), _bits(per_element[index]))
    scaled = _triton_run(kind, x, y, w, p, MEAN, grad_scale=-1.25)
    for index in (3, 4):
        assert torch.equal(_bits(scaled[index]), _bits(per_element[index]))
    zero = _triton_run(kind, x, y, w, p, SUM, grad_scale=0.0)
    finite = torch.isfinite(per_element[4])  # the probability loss's target gradient is infinite at 0 and 1
    assert not zero[3].any() and not zero[4][finite].any() and zero[4][~finite].isnan().all()


@KINDS
def test_a_single_element(kind: str) -> None:
    """n = 1: a one-element grad_output is read as the per-element one."""
    x, y = _data(kind, torch.float32, seed=11, shape=(1,))
    x[0] = 0.25
    w = torch.tensor([1.5])
    go = torch.tensor([0.5])
    for reduction in REDUCTIONS.values():
        got = _triton_run(kind, x, y, w, None, reduction, grad_output=go)
        expected = _cpu_run(kind, x, y, w, None, reduction, grad_output=go)
        assert got[1] == expected[1] == 1
        loss_ulps, ulps, _, _ = _cpu_tolerances(torch.float32)
        _assert_value_close(got[0], expected[0], torch.float32, loss_ulps, "value")
        for index in (2, 3, 4):
            if expected[index] is not None:  # one element: the gradients' terms are the result's size
                _assert_close(got[index], expected[index], torch.float32, loss_ulps, 0.0, 0.0, str(index))


@KINDS
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_contiguous_operands_are_made_contiguous(kind: str, dtype: str) -> None:
    """``_triton.run`` reads raw pointers: ``_kernel.kernel_pass`` hands it ``_kernel._contiguous`` copies,
    whose results equal bcekit.torch's on the non-contiguous tensors (the C++ kernels on CPU tensors)."""
    import bcekit.torch as bce

    torch_dtype = DTYPES[dtype]
    x, y = _data(kind, torch_dtype, seed=12)
    xt = x.t().contiguous().t()  # a transposed layout
    wide = torch.zeros(SHAPE[0], 3 * SHAPE[1], dtype=torch_dtype)
    wide[:, 1::3] = y
    yt = wide[:, 1::3]  # a strided slice
    w = _weight((2 * SHAPE[1],), torch_dtype, seed=13)[::2]  # a strided per-class weight
    assert not (xt.is_contiguous() or yt.is_contiguous() or w.is_contiguous())
    plain = [_kernel._contiguous(t) for t in (xt, yt, w)]
    assert all(t.is_contiguous() for t in plain)
    for reduction, enum in REDUCTIONS.items():
        # the mean's 1/count as kernel_pass gives it (applied before rounding: half gradients are tiny)
        got = _triton_run(kind, *plain, None, enum, gt=False, grad_scale=1.0 / N if enum == MEAN else 1.0)
        leaf = xt.detach().requires_grad_(True)
        if kind == "logits":
            loss = bce.binary_cross_entropy_with_logits(leaf, yt, w, reduction=reduction)
        else:
            loss = bce.binary_cross_entropy(leaf, yt, w, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        loss_ulps, ulps, eps, value_ulps = _cpu_tolerances(torch_dtype)
        if enum == NONE:
            _assert_close(got[2], loss.detach(), torch_dtype, loss_ulps, 0.0, 0.0, reduction)
        else:
            _assert_value_close(got[0], float(loss.detach()), torch_dtype, value_ulps, reduction)
        magnitude = _magnitudes(kind, x, y, w, None, None, 1.0 / N if enum == MEAN else 1.0)[1]
        _assert_close(got[3], grad.to(torch_dtype), torch_dtype, ulps, magnitude, eps, reduction)


# --------------------------------------------------------------------------------------------------------
# label_smoothing and ignore_index
# --------------------------------------------------------------------------------------------------------


def _with_ignored(y: torch.Tensor, ignore_index, seed: int) -> torch.Tensor:
    y = y.clone()
    if ignore_index is not None and ignore_index != 0.0:
        mask = torch.tensor(np.random.default_rng(seed).random(tuple(y.shape)) < 0.3)
        mask.view(-1)[-1] = True  # one in the last (partial) program
        y[mask] = ignore_index
    return y


@KINDS
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("ignore_index", "smoothing"), OPTION_CASES)
def test_options_match_the_cpu_kernels_and_torch(kind, dtype, ignore_index, smoothing) -> None:
    torch_dtype = DTYPES[dtype]
    x, y0 = _data(kind, torch_dtype, seed=14)
    y = _with_ignored(y0, ignore_index, seed=15)
    w, p = _weights(kind, "per-row", torch_dtype)
    kept = int(_kept(y, ignore_index).sum())
    assert 0 < kept < N or ignore_index is None
    loss_ulps, ulps, eps, _ = _cpu_tolerances(torch_dtype)
    for enum in (NONE, MEAN):
        options = {
            "grad_output": _grad_output(enum, torch_dtype, seed=16),
            "grad_scale": GRAD_SCALE,
            "label_smoothing": smoothing,
            "ignore_index": ignore_index,
        }
        got = _triton_run(kind, x, y, w, p, enum, **options)
        # (source, result, size of its terms, its own error relative to them)
        references = [
            (
                "torch",
                _torch_run(kind, x, y, w, p, enum, **options),
                _magnitudes(kind, x, y, w, p, torch_terms=True, **options),
                16 * 2.0**-53,
            )
        ]
        if _cpu_kernels(torch_dtype):
            cpu = _cpu_run(kind, x, y, w, p, enum, **options)
            references.append(("cpu", cpu, _magnitudes(kind, x, y, w, p, **options), 0.0))
        for source, expected, magnitudes, reference_eps in references:
            what = f"{source}, ignore_index={ignore_index}, label_smoothing={smoothing}, reduction={enum}"
            assert got[1] == expected[1] == kept, what
            if enum != NONE:
                assert got[0] == pytest.approx(expected[0], rel=4 * torch.finfo(torch_dtype).eps), what
            for index, name in ((2, "loss"), (3, "grad_input"), (4, "grad_target")):
                if enum != NONE and index == 2:
                    continue
                expected_values = expected[index].to(torch_dtype)
                tolerance = eps + reference_eps  # the kernel's rounding in its compute dtype, the reference's
                _assert_close(
                    got[index],
                    expected_values,
                    torch_dtype,
                    ulps,
                    magnitudes[index - 2],
                    tolerance,
                    f"{what}: {name}",
                )
            ignored = ~_kept(y, ignore_index)
            for index in (2, 3, 4):
                if got[index] is not None:
                    assert not got[index][ignored].any(), f"{what}: ignored elements must give 0"


@KINDS
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("ignore_index", [-1.0, math.nan])
def test_all_ignored(kind: str, dtype: str, ignore_index: float) -> None:
    torch_dtype = DTYPES[dtype]
    x, _ = _data(kind, torch_dtype, seed=17)
    y = torch.full(SHAPE, ignore_index, dtype=torch_dtype)
    w = _weight((SHAPE[1],), torch_dtype, seed=18)
    for reduction, expected in ((MEAN, math.nan), (SUM, 0.0), (NONE, None)):
        value, count, loss, gi, gt = _triton_run(kind, x, y, w, None, reduction, ignore_index=ignore_index)
        assert count == 0
        if expected is None:
            assert value is None and not loss.any()
        elif math.isnan(expected):
            assert math.isnan(value)
        else:
            assert value == 0.0
        assert not gi.any() and not gt.any()


# --------------------------------------------------------------------------------------------------------
# The probability loss's [0, 1] check
# --------------------------------------------------------------------------------------------------------

POSITIONS = (0, BLOCK - 1, BLOCK, 2 * BLOCK, N - 1)  # the last two in the last, partial program


def _bad_values(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    # just outside [0, 1] in this dtype, further outside, infinite and NaN. Triton's interpreter converts
    # bfloat16 subnormals to float32 wrongly (-9.2e-41 becomes -0.0, 3.0e-39 becomes 3.7e-40), so there
    # the smallest miss is the smallest normal number (a GPU converts by a shift, exactly).
    smallest = info.tiny if dtype == torch.bfloat16 and INTERPRETING else info.tiny * info.eps
    return [-smallest, 1.0 + info.eps, -0.5, 7.0, math.inf, -math.inf, math.nan]


def _raises_like(error: RuntimeError, call) -> None:
    with pytest.raises(type(error)) as raised:
        call()
    assert str(raised.value) == str(error)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("which", ["input", "target"])
def test_out_of_range_values_raise_the_cpu_paths_errors(which: str, dtype: str) -> None:
    torch_dtype = DTYPES[dtype]
    x0, y0 = _data("bce", torch_dtype, seed=19)
    x0, y0 = x0.view(-1), y0.view(-1)
    error = _semantics.input_range_error() if which == "input" else _semantics.target_range_error()
    values = _bad_values(torch_dtype)
    # every value somewhere, and the smallest miss and NaN at every position
    cases = [(v, POSITIONS[i % len(POSITIONS)]) for i, v in enumerate(values)]
    cases += [(v, position) for v in (values[0], math.nan) for position in POSITIONS]
    for value, position in cases:
        x, y = x0.clone(), y0.clone()
        (x if which == "input" else y)[position] = value
        assert float((x if which == "input" else y)[position]) == value or math.isnan(value)
        for reduction in (NONE, MEAN) if position == N - 1 else (MEAN,):
            _raises_like(
                error,
                lambda x=x, y=y, r=reduction: _triton_run("bce", x, y, None, None, r, gi=False, gt=False),
            )
        if _cpu_kernels(torch_dtype) and position == N - 1:
            _raises_like(error, lambda x=x, y=y: _cpu_run("bce", x, y, None, None, MEAN))
    # the logits loss takes any input and target: every bad value at once
    x, y = x0.clone(), y0.clone()
    (x if which == "input" else y)[: len(values)] = torch.tensor(values, dtype=torch_dtype)
    assert _triton_run("logits", x, y, None, None, SUM, gi=False, gt=False)[1] == N


def test_a_bad_input_is_reported_before_a_bad_target() -> None:
    x, y = _data("bce", torch.float32, seed=20)
    x.view(-1)[N - 1], y.view(-1)[0] = 2.0, -1.0
    _raises_like(_semantics.input_range_error(), lambda: _triton_run("bce", x, y, None, None, MEAN))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_range_ends_and_negative_zero_are_accepted(dtype: str) -> None:
    torch_dtype = DTYPES[dtype]
    x = torch.tensor([0.0, -0.0, 1.0, 0.5] * (N // 4 + 1), dtype=torch_dtype)[:N]
    y = torch.tensor([-0.0, 1.0, 0.0, 1.0] * (N // 4 + 1), dtype=torch_dtype)[:N]
    got = _triton_run("bce", x, y, None, None, NONE, gi=False, gt=False)
    expected = F.binary_cross_entropy(x.double(), y.double(), reduction="none").to(torch_dtype)
    assert torch.equal(got[2], expected)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("ignore_index", [5.0, -1.0, math.nan])
def test_ignored_targets_are_not_range_checked(dtype: str, ignore_index: float) -> None:
    torch_dtype = DTYPES[dtype]
    x, y = _data("bce", torch_dtype, seed=21)
    x, y = x.view(-1), y.view(-1)
    y[list(POSITIONS)] = ignore_index
    keep = torch.ones(N, dtype=torch.bool)
    keep[list(POSITIONS)] = False
    value, count, _, gi, _ = _triton_run("bce", x, y, None, None, MEAN, gt=False, ignore_index=ignore_index)
    expected, kept, _, expected_gi, _ = _triton_run("bce", x[keep], y[keep], None, None, MEAN, gt=False)
    assert count == kept == N - len(POSITIONS)
    assert value == pytest.approx(expected, rel=4 * torch.finfo(torch_dtype).eps)
    assert torch.equal(gi[keep], expected_gi) and not gi[~keep].any()
    # an input out of range is an error even where the target is ignored
    x[N - 1] = 2.0
    _raises_like(
        _semantics.input_range_error(),
        lambda: _triton_run("bce", x, y, None, None, MEAN, ignore_index=ignore_index),
    )
    # a target out of range that is not the ignored value is still an error
    x[N - 1], y[N - 1] = 0.5, 3.0
    _raises_like(
        _semantics.target_range_error(),
        lambda: _triton_run("bce", x, y, None, None, MEAN, ignore_index=ignore_index),
    )


# --------------------------------------------------------------------------------------------------------
# Determinism and the reduction
# --------------------------------------------------------------------------------------------------------


@KINDS
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_results_are_deterministic_and_the_sum_adds_the_elements(kind: str, dtype: str) -> None:
    torch_dtype = DTYPES[dtype]
    x, y = _data(kind, torch_dtype, seed=22)
    w, p = _weights(kind, "full", torch_dtype)
    runs = {
        r: [_triton_run(kind, x, y, w, p, r, grad_scale=GRAD_SCALE) for _ in range(2)] for r in (NONE, SUM)
    }
    for first, second in runs.values():
        assert first[:2] == second[:2]
        for a, b in zip(first[2:], second[2:], strict=True):
            assert (a is None and b is None) or torch.equal(_bits(a), _bits(b))
    per_element = runs[NONE][0][2]
    total = math.fsum(per_element.double().view(-1).tolist())
    summed = runs[SUM][0][0]
    # the kernel adds unrounded (compute dtype) values; the per-element outputs are rounded to the dtype
    assert summed == pytest.approx(total, rel=2 * torch.finfo(torch_dtype).eps, abs=0)
    mean = _triton_run(kind, x, y, w, p, MEAN, gi=False, gt=False)[0]
    if torch_dtype == torch.float64:  # the mean is the float64 sum over the count, one division
        assert mean == summed / N
    else:
        assert mean == pytest.approx(summed / N, rel=torch.finfo(torch_dtype).eps)


@pytest.mark.parametrize("n", [1, 37, BLOCK - 1, BLOCK, BLOCK + 1, N])
def test_the_grid_covers_every_element_once(launches, n: int) -> None:
    """One program per BLOCK elements (``launch_count``), the last one partial; every output element is
    written (outputs start as NaN); offsets are computed in int64."""
    x, y = _data("logits", torch.float32, seed=23, shape=(n,))
    value, count, loss, gi, gt = _triton_run("logits", x, y, None, None, NONE)
    assert launches.grids == [(_triton.launch_count(n),)] * 2 and count == n  # forward, backward
    assert _triton.launch_count(n) == -(-n // BLOCK)
    assert torch.isfinite(loss).all() and torch.isfinite(gi).all() and torch.isfinite(gt).all()
    assert launches.arguments[0]["n"] == n
    sum_value = _triton_run("logits", x, y, None, None, SUM, loss=False, gi=False, gt=False)[0]
    assert sum_value == pytest.approx(math.fsum(loss.double().tolist()), rel=2**-22)


def test_launch_count() -> None:
    assert [_triton.launch_count(n) for n in (0, 1, BLOCK, BLOCK + 1, 2**31 + 1)] == [1, 1, 1, 2, 2**21 + 1]


@KINDS
def test_an_empty_input(launches, kind: str) -> None:
    x = torch.empty(0)
    value, count, *_ = _triton_run(kind, x, x, None, None, MEAN, loss=False)
    assert count == 0 and math.isnan(value) and launches.grids == [(1,), (1,)]  # forward, backward
    assert _triton_run(kind, x, x, None, None, SUM, loss=False)[:2] == (0.0, 0)
    value, count, loss, gi, gt = _triton_run(kind, x, x, None, None, NONE)
    assert value is None and count == 0 and loss.numel() == gi.numel() == gt.numel() == 0


# --------------------------------------------------------------------------------------------------------
# Dispatch in bcekit.torch._ops (CUDA tensors themselves need a GPU)
# --------------------------------------------------------------------------------------------------------

SPEC = LossSpec("logits", MEAN, 0.0, None)


@pytest.fixture
def no_triton(monkeypatch) -> None:
    monkeypatch.setattr(_kernel._triton, "AVAILABLE", False)
    monkeypatch.setattr(_kernel, "_warned_no_triton", False)


def test_without_triton_the_gpu_check_warns_once(no_triton) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _kernel._gpu_kernels_available() is False
        assert _kernel._gpu_kernels_available() is False
    assert len(caught) == 1
    assert caught[0].category is RuntimeWarning and "bcekit[gpu]" in str(caught[0].message)
    assert _kernel._warned_no_triton


def test_with_triton_the_gpu_check_is_silent(monkeypatch) -> None:
    monkeypatch.setattr(_kernel, "_warned_no_triton", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernel._gpu_kernels_available() is True
    assert not _kernel._warned_no_triton


@pytest.mark.parametrize("triton_available", [True, False])
def test_kernel_ready_off_the_cpu(monkeypatch, triton_available: bool) -> None:
    """Tensors on a device that is neither the CPU nor CUDA (meta) take no kernel, and do not ask for
    Triton (no warning); CPU tensors take the C++ kernels whether Triton is there or not."""
    monkeypatch.setattr(_kernel._triton, "AVAILABLE", triton_available)
    monkeypatch.setattr(_kernel, "_warned_no_triton", False)
    meta = torch.empty(SHAPE, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernel.plan_for(SPEC, meta, meta, None, None) is None
        assert _kernel.plan_for(SPEC, meta, meta, torch.empty(SHAPE[1], device="meta"), None) is None
        cpu = torch.zeros(SHAPE)
        assert (_kernel.plan_for(SPEC, cpu, cpu, None, None) is not None) is _native.AVAILABLE
        assert _kernel.plan_for(SPEC, cpu, meta, None, None) is None  # devices differ
    assert not _kernel._warned_no_triton


def test_non_cpu_outputs_and_grad_outputs(monkeypatch) -> None:
    """``_output`` of a non-CPU tensor is a contiguous empty_like (no C++ buffer cache), and ``_is_one``
    does not synchronise for a small non-CPU grad_output."""
    meta = torch.empty(SHAPE[1], SHAPE[0], device="meta").t()
    out = _kernel._output(meta)
    assert out.device.type == "meta" and out.shape == meta.shape and out.is_contiguous()
    assert _kernel._is_one(torch.ones((), device="meta")) is False  # .item() on meta would raise
    plan = _kernel.plan_for(SPEC, torch.empty(SHAPE), torch.empty(SHAPE), torch.empty(SHAPE[0], 1), None)
    assert (plan.weight_form, plan.weight_inner) == (_native.PER_ROW, SHAPE[1])
    assert (plan.pos_weight_form, plan.pos_weight_inner) == (_native.ABSENT, 1)


# --------------------------------------------------------------------------------------------------------
# Bugs (see each docstring)
# --------------------------------------------------------------------------------------------------------


def test_float_parameters_reach_each_kernel_in_its_precision(launches) -> None:
    """Triton passes a Python float argument to a compiled kernel as fp32 (the interpreter keeps it in
    double, so only the arguments show it). So ``grad_scale``, ``label_smoothing`` and ``ignore_index``
    reach the float64 kernels as the bit patterns of their float64 values in int64 arguments, and the
    float32 kernels as their float32 roundings, no tensor carrying them (a per-call host-to-device copy);
    an ignore_index that is not a float32 number is passed to the float32 kernels as NaN (equal to
    nothing), as a float32 target can never equal it in the float64 comparison the C++ kernels make."""
    from triton.runtime.jit import JITFunction

    params = {param.name: param for param in JITFunction(_triton._bce_kernel.fn).params}
    for name in ("grad_scale_bits", "smoothing_bits", "ignore_bits"):
        assert params[name].annotation_type in ("i64", "int64"), name
    decode = lambda bits: struct.unpack("<d", struct.pack("<q", bits))[0]  # noqa: E731
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x, y = _data("logits", dtype, seed=24, shape=(37,))
        launches.arguments.clear()
        _triton_run(
            "logits", x, y, None, None, MEAN, grad_scale=GRAD_SCALE, label_smoothing=0.1, ignore_index=0.1
        )
        for arguments in launches.arguments:
            assert [decode(arguments[n]) for n in ("grad_scale_bits", "smoothing_bits", "ignore_bits")] == [
                GRAD_SCALE,
                0.1,
                0.1,
            ]
            assert arguments["grad_scale"] == float(np.float32(GRAD_SCALE))
            assert arguments["smoothing"] == float(np.float32(0.1))
            assert math.isnan(arguments["ignore_value"]) and arguments["ignore_nan"] == 0
            assert all(type(v) in (int, float, bool, torch.Tensor) for v in arguments.values())
            # data and outputs, the partial sums (in the compute dtype), kept counts and range flags
            partial = torch.float64 if dtype == torch.float64 else torch.float32
            tensors = [v for v in arguments.values() if isinstance(v, torch.Tensor)]
            assert all(t.dtype in (dtype, partial, torch.int32) for t in tensors)
    launches.arguments.clear()
    _triton_run("logits", x, y, None, None, MEAN, ignore_index=0.25)
    assert {a["ignore_value"] for a in launches.arguments} == {0.25}


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("ignore_index", [0.1, 0.25, 2.0**24 + 1, 1e300])
def test_ignore_index_matches_the_cpu_kernels_comparison(dtype: str, ignore_index: float) -> None:
    """A target is ignored where it equals ignore_index compared in float64 (the C++ kernels' rule): a
    float32 target rounded from 0.1 is not ignored by ignore_index=0.1, a float64 one is."""
    torch_dtype = DTYPES[dtype]
    x, y = _data("logits", torch_dtype, seed=26)
    y.view(-1)[::4] = torch.tensor(ignore_index, dtype=torch.float64).to(torch_dtype)
    got = _triton_run("logits", x, y, None, None, MEAN, gt=False, ignore_index=ignore_index)
    kept = int((y.double() != ignore_index).sum())
    assert got[1] == kept
    if _cpu_kernels(torch_dtype):
        assert _cpu_run("logits", x, y, None, None, MEAN, gt=False, ignore_index=ignore_index)[1] == kept


@pytest.mark.skipif(INTERPRETING, reason="the interpreter keeps Python floats in double")
def test_float64_ignore_index_and_grad_scale_on_the_gpu() -> None:  # pragma: no cover - GPU only
    """The behaviour the annotations above protect, checked where the kernel is compiled."""
    x, y = _data("logits", torch.float64, seed=25)
    y.view(-1)[::5] = 0.1
    got = _triton_run("logits", x, y, None, None, MEAN, grad_scale=GRAD_SCALE, ignore_index=0.1)
    expected = _cpu_run("logits", x, y, None, None, MEAN, grad_scale=GRAD_SCALE, ignore_index=0.1)
    assert got[1] == expected[1] == N - len(range(0, N, 5))
    _assert_close(got[3], expected[3], torch.float64, 4, 0.0, 0.0, "grad_input")


# --------------------------------------------------------------------------------------------------------
# The device branch of the torch ops, run on CPU tensors (as CUDA tensors would take it)
# --------------------------------------------------------------------------------------------------------


def _torch_path(logits, x, y, w, p, reduction, options, grad_scale):
    """Loss, input and target gradients through bcekit.torch (eager kernel path, fused when reduced)."""
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    if logits:
        loss = bce.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p, **options)
    else:
        loss = bce.binary_cross_entropy(x, y, w, reduction=reduction, **options)
    grad_output = torch.full_like(loss, grad_scale)
    gx, gy = torch.autograd.grad(loss, (x, y), grad_output)
    return loss.detach(), gx, gy


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "options", [{}, {"ignore_index": 0.0, "label_smoothing": 0.1}], ids=["plain", "ignore+smoothing"]
)
@pytest.mark.parametrize("grad_scale", [1.0, 2.5])
def test_device_branch_of_the_ops_matches_the_cpu_kernels(
    monkeypatch, logits, dtype, reduction, options, grad_scale
) -> None:
    """``_kernel._TRITON_ON_CPU`` sends CPU tensors down the branch CUDA tensors take (Triton, loss and count
    left on the device, the ignore_index mean scaled on the device, grad_output as a tensor), so the torch
    plumbing of the GPU path is tested here against the C++ kernels' results."""
    rng = np.random.default_rng(5)
    shape = (2 * BLOCK // 7 + 3, 7)
    x = rng.normal(0, 3, shape) if logits else rng.uniform(0.01, 0.99, shape)
    y = rng.random(shape)
    y[::3] = 0.0  # some targets equal ignore_index
    x, y = torch.tensor(x).to(dtype), torch.tensor(y).to(dtype)
    w = torch.tensor(rng.uniform(0.5, 2.0, shape[-1:])).to(dtype)
    p = torch.tensor(rng.uniform(0.5, 2.0, (shape[0], 1))).to(dtype) if logits else None
    expected = _torch_path(logits, x, y, w, p, reduction, options, grad_scale)
    calls = []
    original = _triton.run
    monkeypatch.setattr(_triton, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(_kernel, "_TRITON_ON_CPU", True)
    got = _torch_path(logits, x, y, w, p, reduction, options, grad_scale)
    assert calls, "the Triton branch was not taken"
    eps = torch.finfo(dtype).eps
    for name, mine, theirs in zip(("loss", "grad_input", "grad_target"), got, expected, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        finite = theirs.isfinite()
        assert torch.equal(mine.isfinite(), finite), name
        scale = theirs.double().abs().max().item() if theirs.numel() else 0.0
        torch.testing.assert_close(
            mine.double()[finite],
            theirs.double()[finite],
            rtol=2 * eps,
            atol=4 * torch.finfo(torch.float32).eps * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )
