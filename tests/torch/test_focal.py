r"""Sigmoid focal loss: torchvision's semantics, finite where torchvision's formula is not, within 2 ulp.

Two references, neither of them bcekit:

* torchvision's ``sigmoid_focal_loss`` formula, composed below in float64 torch (torchvision is not a
  dependency) and differentiated by autograd. It gives the semantics (``alpha < 0``, soft targets,
  reductions, dtypes, shapes) on the very same rounded numbers, but it forms ``1 - p_t`` by subtraction:
  its relative error is ``eps / (1 - p_t)``, up to ``eps e^|x|``, and once ``sigmoid(x)`` rounds to 1 the
  loss is flushed to 0 and, for ``gamma < 1``, the gradient is NaN (``0 ** (gamma - 1) * 0``);
* mpmath at 200 bits (``_reference.focal_exact`` and ``focal_grad_exact``), wherever that happens.

Tolerances are the dtype's few ulp plus the reference's own error bound; gradients carry no ulp promise, so
they are measured against the size of the terms they are made of (see ``_reference.FocalGrad``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bcekit.numpy as bce_np
import bcekit.torch as bce
from _focal import torchvision_focal
from _reference import MP, focal_exact, focal_grad_exact, focal_mp, ulp_error
from bcekit import _math, _numpy_core, _semantics

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}  # NumPy has no bfloat16
REDUCTIONS = ("none", "mean", "sum")
ALPHAS = (-1.0, 0.0, 0.25, 0.5, 1.0)
GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
MAX_ULP = 2.0
EPS64 = torch.finfo(torch.float64).eps


def _one_minus_pt(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torchvision's own ``1 - p_t`` (float64): the quantity whose relative error is ``eps / (1 - p_t)``."""
    p = torch.sigmoid(x)
    return 1 - (p * y + (1 - p) * (1 - y))


def _compute_eps(dtype: torch.dtype) -> float:
    """The unit roundoff the loss is computed in: float32 for half types, float64 otherwise."""
    return torch.finfo(torch.float32 if dtype.itemsize < 4 else torch.float64).eps


def _smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps


# --------------------------------------------------------------------------------------------------------
# The references themselves (so that a broken reference cannot make the tests below pass vacuously)
# --------------------------------------------------------------------------------------------------------


def test_references_agree_with_each_other_where_both_are_accurate() -> None:
    for x, y, alpha, gamma in [(0.3, 1.0, 0.25, 2.0), (-2.0, 0.0, 0.25, 0.5), (1.5, 0.3, -1.0, 5.0)]:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        yt = torch.tensor(y, dtype=torch.float64, requires_grad=True)
        loss = torchvision_focal(xt, yt, alpha, gamma, "none")
        dx, dy = torch.autograd.grad(loss, (xt, yt))
        exact = focal_grad_exact(x, y, alpha, gamma)
        assert math.isclose(loss.item(), float(focal_exact(x, y, alpha, gamma)), rel_tol=1e-14)
        assert math.isclose(dx.item(), float(exact.input), rel_tol=1e-13)
        assert math.isclose(dy.item(), float(exact.target), rel_tol=1e-13)
    # the product-rule derivatives agree with mpmath's numerical differentiation (at 200 bits)
    for x, y, alpha, gamma in [(0.7, 0.3, 0.25, 1.5), (-6.0, 0.9, 0.5, 0.25), (12.0, 0.05, -1.0, 5.0)]:
        exact = focal_grad_exact(x, y, alpha, gamma)
        xm, ym = MP.mpf(x), MP.mpf(y)
        by_x = MP.diff(lambda t, ym=ym, a=alpha, g=gamma: focal_mp(t, ym, a, g), xm)
        by_y = MP.diff(lambda t, xm=xm, a=alpha, g=gamma: focal_mp(xm, t, a, g), ym)
        assert abs(by_x - exact.input) <= MP.mpf(2) ** -150 * exact.input_scale
        assert abs(by_y - exact.target) <= MP.mpf(2) ** -150 * exact.target_scale
    # closed forms: 0.25 log(1 + e^-3) sigmoid(-3)^2; alpha < 0 and gamma = 0 (plain BCE); alpha_t = 0
    closed = 0.25 * math.log1p(math.exp(-3.0)) / (1 + math.exp(3.0)) ** 2
    assert math.isclose(float(focal_exact(3.0, 1.0, 0.25, 2.0)), closed, rel_tol=1e-14)
    assert focal_exact(0.0, 1.0, -1.0, 0.0) == MP.log(2)
    assert focal_exact(0.0, 1.0, 0.0, 2.0) == 0


# --------------------------------------------------------------------------------------------------------
# Parity with torchvision's formula (Hypothesis): values, dtypes, shapes, gradients
# --------------------------------------------------------------------------------------------------------

#: |x| <= 20 keeps torchvision's float64 ``1 - p_t`` accurate to ~1e-7 relative (it is ``eps e^|x|``).
PARITY_LOGITS = st.one_of(
    st.floats(-20.0, 20.0),
    st.sampled_from((0.0, 1e-8, -1e-8, 0.5, -3.0, 12.0, -17.0, 20.0, -20.0)),
)
SOFT_TARGETS = st.one_of(st.floats(0.0, 1.0), st.sampled_from((0.5, 0.1, 0.9, 1e-3, 0.999)))


@dataclass(frozen=True)
class FocalCase:
    logits: tuple[float, ...]
    targets: tuple[float, ...]
    shape: tuple[int, ...]
    dtype: str
    alpha: float
    gamma: float
    reduction: str


@st.composite
def focal_cases(draw) -> FocalCase:
    shape = draw(
        st.one_of(
            st.just(()),
            st.tuples(st.integers(1, 6)),
            st.tuples(st.integers(1, 4), st.integers(1, 4)),
        )
    )
    n = math.prod(shape)
    hard = draw(st.booleans())
    targets = st.sampled_from((0.0, 1.0)) if hard else SOFT_TARGETS
    return FocalCase(
        logits=tuple(draw(st.lists(PARITY_LOGITS, min_size=n, max_size=n))),
        targets=tuple(draw(st.lists(targets, min_size=n, max_size=n))),
        shape=shape,
        dtype=draw(st.sampled_from(tuple(DTYPES))),
        alpha=draw(st.sampled_from(ALPHAS)),
        gamma=draw(st.sampled_from(GAMMAS)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
    )


def _reduce_tolerance(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_element
    total = per_element.sum()
    return total / per_element.numel() if reduction == "mean" else total


def _assert_within(name: str, mine: torch.Tensor, expected: torch.Tensor, tolerance: torch.Tensor) -> None:
    mine = mine.double()
    error = (mine - expected).abs()
    bad = ~(error <= tolerance)  # NaN anywhere fails
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0]) if bad.dim() else ()
        raise AssertionError(
            f"{name}: got {mine[i].item()!r}, expected {expected[i].item()!r}, "
            f"error {error[i].item():.3g} > tolerance {tolerance[i].item():.3g} (at {i})"
        )


def _check_parity(case: FocalCase) -> None:
    dtype = DTYPES[case.dtype]
    eps, eps_c, sub = torch.finfo(dtype).eps, _compute_eps(dtype), _smallest_subnormal(dtype)
    alpha, gamma, reduction = case.alpha, case.gamma, case.reduction
    x = torch.tensor(case.logits, dtype=torch.float64).reshape(case.shape).to(dtype).requires_grad_()
    y = torch.tensor(case.targets, dtype=torch.float64).reshape(case.shape).to(dtype).requires_grad_()
    # the reference sees the very same (rounded) numbers, in float64
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    ours = bce.sigmoid_focal_loss(x, y, alpha, gamma, reduction)
    reference = torchvision_focal(x64, y64, alpha, gamma, reduction)
    assert ours.dtype == y.dtype
    assert ours.shape == reference.shape

    # Per element: a few ulp of the dtype; exp(gamma log(1 - p_t)) in the compute precision (its argument
    # is of size gamma |x|); torchvision's own error, eps64 / (1 - p_t) relative and eps64 |x| absolute
    # (torch's BCE-with-logits cancels for x << 0, y = 0); and gradual underflow in the dtype.
    ax = x64.detach().abs()
    u = _one_minus_pt(x64.detach(), y64.detach())
    growth = (1 + gamma) * (1 + ax)
    rtol = 4 * eps + 8 * eps_c * growth + 8 * EPS64 * (1 + gamma) * (1 + 1 / u)
    atol = 8 * EPS64 * (1 + ax) + 2 * sub
    elementwise = torchvision_focal(x64.detach(), y64.detach(), alpha, gamma, "none")
    value_tolerance = _reduce_tolerance(rtol * elementwise.abs() + atol, reduction)
    if reduction != "none":
        value_tolerance = value_tolerance + 4 * eps * reference.detach().abs()
    _assert_within(f"{case.dtype} loss", ours, reference.detach(), value_tolerance)

    if case.dtype in NUMPY_DTYPES:
        numpy_dtype = NUMPY_DTYPES[case.dtype]
        theirs_np = bce_np.sigmoid_focal_loss(x.detach().numpy(), y.detach().numpy(), alpha, gamma, reduction)
        assert theirs_np.dtype == numpy_dtype and theirs_np.shape == tuple(reference.shape)
        _assert_within(
            f"numpy {case.dtype} loss",
            torch.from_numpy(np.asarray(theirs_np)),
            reference.detach(),
            value_tolerance,
        )

    # Gradients, through torchvision's formula by autograd, where that is finite.
    grad_output = (0.5 + 0.25 * (torch.arange(reference.numel()) % 3)).reshape(reference.shape)
    ours_grads = torch.autograd.grad(ours, (x, y), grad_output.to(ours.dtype))
    reference_grads = torch.autograd.grad(reference, (x64, y64), grad_output.double())
    weight = grad_output.double() if reduction == "none" else grad_output.double().expand(x.shape)
    if reduction == "mean":
        weight = weight / x.numel()
    # gradients are sums of terms of size up to (1 + gamma)(1 + |x|), which may cancel
    grad_atol = weight * growth * 16 * (eps_c + EPS64) + 2 * sub
    for mine, expected, leaf, name in zip(
        ours_grads, reference_grads, (x, y), ("input", "target"), strict=True
    ):
        assert mine.dtype == leaf.dtype and mine.shape == leaf.shape, name
        assert mine.isfinite().all(), f"{case.dtype} {name} gradient: {mine}"
        finite = expected.isfinite()
        tolerance = rtol * expected.abs() + grad_atol
        _assert_within(f"{case.dtype} {name} gradient", mine[finite], expected[finite], tolerance[finite])


@settings(max_examples=150, deadline=None)
@given(focal_cases())
def test_matches_torchvision_formula(case: FocalCase) -> None:
    _check_parity(case)


@pytest.mark.parametrize(
    ("input_dtype", "target_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.bfloat16, torch.float16)],
)
def test_result_has_the_target_dtype(input_dtype, target_dtype) -> None:
    x = torch.linspace(-4, 4, 7, dtype=torch.float64)
    y = torch.linspace(0, 1, 7, dtype=torch.float64)
    for reduction in REDUCTIONS:
        ours = bce.sigmoid_focal_loss(x.to(input_dtype), y.to(target_dtype), reduction=reduction)
        assert ours.dtype == target_dtype
        reference = torchvision_focal(
            x.to(input_dtype).double(), y.to(target_dtype).double(), 0.25, 2.0, reduction
        )
        eps = max(torch.finfo(input_dtype).eps, torch.finfo(target_dtype).eps)
        torch.testing.assert_close(ours.double(), reference, rtol=4 * eps, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Extreme logits: finite where torchvision's formula is not; compared with mpmath
# --------------------------------------------------------------------------------------------------------

EXTREME_MAGNITUDES = (30.0, 40.0, 88.0, 100.0, 700.0, 1e3, 1e4)
EXTREME_LOGITS = tuple(s * m for m in EXTREME_MAGNITUDES for s in (1.0, -1.0))
EXTREME_TARGETS = (0.0, 1.0, 0.5, 0.1, 0.9)
EXTREME_GAMMAS = (0.25, 0.5, 1.0, 2.0, 5.0)


def _grid(dtype: torch.dtype, logits, targets) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*itertools.product(logits, targets), strict=True)
    return torch.tensor(xs, dtype=torch.float64).to(dtype), torch.tensor(ys, dtype=torch.float64).to(dtype)


def _exact_gradients(x: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float) -> tuple:
    """mpmath's input and target gradients (as float64 tensors) and the tolerances they allow ``dtype``."""
    points = [focal_grad_exact(a, b, alpha, gamma) for a, b in zip(x.tolist(), y.tolist(), strict=True)]
    exact_input = torch.tensor([float(p.input) for p in points], dtype=torch.float64)
    exact_target = torch.tensor([float(p.target) for p in points], dtype=torch.float64)
    # rounding to the dtype, and a relative error of eps64 (1 + gamma)(1 + |x|) on each term: the float64
    # gradients exponentiate log-space quantities of size (1 + gamma)|x|, whose absolute error that is
    eps, sub = torch.finfo(x.dtype).eps, _smallest_subnormal(x.dtype)
    relative = 4 * eps + 8 * EPS64 * (1 + gamma) * (1 + x.double().abs())
    scale_input = torch.tensor([float(p.input_scale) for p in points], dtype=torch.float64)
    scale_target = torch.tensor([float(p.target_scale) for p in points], dtype=torch.float64)
    # a subnormal intermediate (to 2**-1075 absolute) multiplied by up to |x| (the target gradient's -x M)
    floor = 4 * sub + 4 * (1 + x.double().abs()) * _smallest_subnormal(torch.float64)
    return (exact_input, relative * scale_input + floor), (exact_target, relative * scale_target + floor)


def _assert_losses_within_ulp(label: str, results, x, y, alpha: float, gamma: float, dtype: str) -> None:
    arguments = list(zip(x.tolist(), y.tolist(), strict=True))
    errors = [
        ulp_error(r, focal_exact(a, b, alpha, gamma), dtype)
        for r, (a, b) in zip(results, arguments, strict=True)
    ]
    worst = int(np.argmax(errors))
    exact = focal_exact(*arguments[worst], alpha, gamma)
    assert errors[worst] <= MAX_ULP, (
        f"{label} alpha={alpha} gamma={gamma}: {errors[worst]:.4g} ulp at (x, y) = {arguments[worst]}: "
        f"got {results[worst]!r}, exact {MP.nstr(exact, 20)}"
    )


@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", EXTREME_GAMMAS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_logits_finite_and_exact(dtype: str, gamma: float, alpha: float) -> None:
    x, y = _grid(DTYPES[dtype], EXTREME_LOGITS, EXTREME_TARGETS)
    x.requires_grad_(), y.requires_grad_()
    loss = bce.sigmoid_focal_loss(x, y, alpha, gamma)
    grad_input, grad_target = torch.autograd.grad(loss.sum(), (x, y))
    loss_np = bce_np.sigmoid_focal_loss(x.detach().numpy(), y.detach().numpy(), alpha, gamma)
    for name, values in [("loss", loss), ("input grad", grad_input), ("target grad", grad_target)]:
        assert values.isfinite().all(), f"{name}: {values}"
    assert np.isfinite(loss_np).all()

    xd, yd = x.detach(), y.detach()
    _assert_losses_within_ulp(f"torch {dtype}", loss.tolist(), xd, yd, alpha, gamma, dtype)
    _assert_losses_within_ulp(f"numpy {dtype}", loss_np.tolist(), xd, yd, alpha, gamma, dtype)
    (exact_input, input_tol), (exact_target, target_tol) = _exact_gradients(xd, yd, alpha, gamma)
    _assert_within(f"{dtype} input gradient (mpmath)", grad_input, exact_input, input_tol)
    _assert_within(f"{dtype} target gradient (mpmath)", grad_target, exact_target, target_tol)
    # bcekit.numpy has no public focal gradient; its NumPy evaluation of the gradient formulas is checked
    # all the same (float64, as bcekit.numpy computes gradients for float32 and float64)
    np_input, np_target = _numpy_core.gradients(
        _math.LossSpec("focal", _semantics.NONE, alpha=alpha, gamma=gamma),
        xd.numpy(),
        yd.numpy(),
        None,
        None,
        np.float64,
        need_target=True,
    )
    for name, values, exact, tolerance in [
        ("input", np_input, exact_input, input_tol),
        ("target", np_target, exact_target, target_tol),
    ]:
        values = torch.from_numpy(values.astype(NUMPY_DTYPES[dtype]))
        assert values.isfinite().all(), f"numpy {name} gradient: {values}"
        _assert_within(f"numpy {dtype} {name} gradient (mpmath)", values, exact, tolerance)

    # torchvision's formula, in the same dtype. Where its 1 - p_t rounds to 0 (hard targets of x's sign,
    # |x| past ~17 in float32, ~37 in float64) the loss is flushed to 0, and for gamma < 1 the gradient is
    # 0 ** (gamma - 1) * 0 = NaN; ours is finite there, and nonzero where the exact loss is a normal number.
    xt, yt = xd.clone().requires_grad_(), yd.clone().requires_grad_()
    theirs = torchvision_focal(xt, yt, alpha, gamma, "none")
    their_grad_input, _ = torch.autograd.grad(theirs.sum(), (xt, yt))
    collapsed = _one_minus_pt(xd, yd) == 0
    assert collapsed.any()
    assert (theirs[collapsed] == 0).all()
    if gamma < 1:
        assert their_grad_input[collapsed].isnan().all()
    else:
        assert (their_grad_input[collapsed] == 0).all()
    tiny = torch.finfo(xd.dtype).tiny
    normal = torch.tensor(
        [focal_exact(a, b, alpha, gamma) >= tiny for a, b in zip(xd.tolist(), yd.tolist(), strict=True)]
    )
    flushed = collapsed & normal
    assert flushed.any() or (dtype == "float32" and gamma > 1)
    assert (loss.detach()[flushed] > 0).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_extreme_logits_finite_in_half_precision(dtype: str) -> None:
    x, y = _grid(DTYPES[dtype], EXTREME_LOGITS, EXTREME_TARGETS)
    x.requires_grad_(), y.requires_grad_()
    for gamma in EXTREME_GAMMAS:
        loss = bce.sigmoid_focal_loss(x, y, 0.25, gamma)
        grads = torch.autograd.grad(loss.sum(), (x, y))
        assert loss.isfinite().all() and all(g.isfinite().all() for g in grads)
        if dtype in NUMPY_DTYPES:
            assert np.isfinite(
                bce_np.sigmoid_focal_loss(x.detach().numpy(), y.detach().numpy(), 0.25, gamma)
            ).all()


# --------------------------------------------------------------------------------------------------------
# Accuracy: within 2 ulp of the exact loss, both backends
# --------------------------------------------------------------------------------------------------------

ACCURACY_MAGNITUDES = (1e-8, 0.1, 1.0, 3.0, 10.0, 30.0, 88.0, 100.0, 700.0, 1e3, 1e4)
ACCURACY_LOGITS = (0.0, *(s * m for m in ACCURACY_MAGNITUDES for s in (1.0, -1.0)))
ACCURACY_TARGETS = (0.0, 1.0, 0.5, 0.1, 0.9)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_loss_within_2_ulp_of_exact(dtype: str, backend: str) -> None:
    x, y = _grid(DTYPES[dtype], ACCURACY_LOGITS, ACCURACY_TARGETS)
    for gamma, alpha in itertools.product((0.5, 1.0, 2.0, 5.0), (-1.0, 0.25)):
        if backend == "torch":
            out = bce.sigmoid_focal_loss(x, y, alpha, gamma)
            assert out.dtype == y.dtype
            results = out.tolist()
        else:
            out = bce_np.sigmoid_focal_loss(x.numpy(), y.numpy(), alpha, gamma)
            assert out.dtype == NUMPY_DTYPES[dtype]
            results = out.tolist()
        _assert_losses_within_ulp(f"{backend} {dtype}", results, x, y, alpha, gamma, dtype)


#: The documented accuracy of float64 focal losses where there is no long double (Windows, macOS arm64,
#: CUDA tensors): exp(gamma log(1 - p_t)) carries the absolute error of log(1 - p_t) ~ -|x|, e.g. 13 ulp
#: at x = -10, y = 0, gamma = 2 and about 110 ulp at x = -30, gamma = 5, always below this relative error.
FALLBACK_RELATIVE_ERROR = 1e-12


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_loss_without_long_double_meets_the_documented_relative_bound(backend: str, monkeypatch) -> None:
    monkeypatch.setattr(_numpy_core, "EXTENDED", None)  # the float64 route of platforms without one
    x, y = _grid(torch.float64, ACCURACY_LOGITS, ACCURACY_TARGETS)
    for gamma, alpha in itertools.product((0.5, 1.0, 2.0, 5.0), (-1.0, 0.25)):
        if backend == "torch":
            results = bce.sigmoid_focal_loss(x, y, alpha, gamma).tolist()
        else:
            results = bce_np.sigmoid_focal_loss(x.numpy(), y.numpy(), alpha, gamma).tolist()
        for value, a, b in zip(results, x.tolist(), y.tolist(), strict=True):
            exact = focal_exact(a, b, alpha, gamma)
            error = abs(MP.mpf(value) - exact)
            assert error <= FALLBACK_RELATIVE_ERROR * abs(exact) + MP.mpf(2) ** -1074, (a, b, gamma, alpha)


# --------------------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.5), (0.5, 1.0), (1.0, 5.0), (0.0, 0.0)])
def test_gradcheck_and_gradgradcheck(alpha: float, gamma: float, reduction: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, generator=generator, dtype=torch.float64) * 8 - 4).requires_grad_()
    y = (torch.rand(4, 3, generator=generator, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()

    def loss(x, y):
        return bce.sigmoid_focal_loss(x, y, alpha, gamma, reduction)

    assert torch.autograd.gradcheck(loss, (x, y))
    assert torch.autograd.gradgradcheck(loss, (x, y))


def test_double_backward_matches_torchvision_formula() -> None:
    generator = torch.Generator().manual_seed(1)
    x = (torch.rand(6, generator=generator, dtype=torch.float64) * 8 - 4).requires_grad_()
    y = (torch.rand(6, generator=generator, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    hessians = []
    for function in (bce.sigmoid_focal_loss, torchvision_focal):
        (g,) = torch.autograd.grad(function(x, y, 0.25, 1.5, "sum"), x, create_graph=True)
        hessians.append(torch.autograd.grad(g.sum(), (x, y)))
    for mine, theirs in zip(*hessians, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# The module, and argument checks
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.0), (0.75, 0.5)])
def test_module_matches_functional(alpha: float, gamma: float, reduction: str) -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=generator) * 4
    y = torch.rand(5, 3, generator=generator)
    module = bce.SigmoidFocalLoss(alpha=alpha, gamma=gamma, reduction=reduction)
    assert torch.equal(module(x, y), bce.sigmoid_focal_loss(x, y, alpha, gamma, reduction))
    assert list(module.parameters()) == [] and module.state_dict() == {}


def test_module_defaults_and_repr() -> None:
    module = bce.SigmoidFocalLoss()
    assert (module.alpha, module.gamma, module.reduction) == (0.25, 2.0, "none")  # torchvision's defaults
    assert repr(module) == "SigmoidFocalLoss(alpha=0.25, gamma=2.0, reduction='none')"
    assert (
        repr(bce.SigmoidFocalLoss(-1, 0.5, "mean"))
        == "SigmoidFocalLoss(alpha=-1, gamma=0.5, reduction='mean')"
    )
    x, y = torch.tensor([3.0, -3.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(module(x, y), torchvision_focal(x, y, 0.25, 2.0, "none"))


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, -0.5), (0.25, math.inf), (0.25, math.nan), (1.5, 2.0)])
def test_invalid_parameters_raise_value_error(alpha: float, gamma: float) -> None:
    x, y = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="gamma" if alpha <= 1 else "alpha"):
        bce.SigmoidFocalLoss(alpha=alpha, gamma=gamma)
    with pytest.raises(ValueError, match="gamma" if alpha <= 1 else "alpha"):
        bce.sigmoid_focal_loss(x, y, alpha, gamma)
    with pytest.raises(ValueError, match="gamma" if alpha <= 1 else "alpha"):
        bce_np.sigmoid_focal_loss(x.numpy(), y.numpy(), alpha, gamma)


@pytest.mark.parametrize(("alpha", "gamma"), [(1.0, 0.0), (0.0, 5.0), (-1.0, 2.0), (-math.inf, 0.5)])
def test_boundary_parameters_are_accepted(alpha: float, gamma: float) -> None:
    x, y = torch.zeros(3), torch.ones(3)
    bce.SigmoidFocalLoss(alpha=alpha, gamma=gamma)
    assert bce.sigmoid_focal_loss(x, y, alpha, gamma).isfinite().all()
    assert np.isfinite(bce_np.sigmoid_focal_loss(x.numpy(), y.numpy(), alpha, gamma)).all()


@pytest.mark.parametrize("reduction", ["foo", "MEAN", "", "batchmean"])
def test_invalid_reduction_raises_value_error(reduction: str) -> None:
    x, y = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="reduction"):
        bce.sigmoid_focal_loss(x, y, reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        bce_np.sigmoid_focal_loss(x.numpy(), y.numpy(), reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        bce.SigmoidFocalLoss(reduction=reduction)(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma_zero_without_alpha_is_bce_with_logits(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(64, generator=generator, dtype=torch.float64) * 10).to(dtype)
    y = torch.rand(64, generator=generator, dtype=torch.float64).to(dtype)
    y[:16] = torch.round(y[:16])
    eps = torch.finfo(dtype).eps
    ours = bce.SigmoidFocalLoss(alpha=-1, gamma=0)(x, y)
    torch.testing.assert_close(
        ours.double(),
        F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none"),
        rtol=4 * eps,
        atol=1e-12,
    )
    torch.testing.assert_close(
        ours, bce.binary_cross_entropy_with_logits(x, y, reduction="none"), rtol=2 * eps, atol=0
    )


# --------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 3, generator=generator, requires_grad=True)
    x = torch.randn(8, 6, generator=generator)
    y = torch.rand(8, 3, generator=generator).requires_grad_()

    def step(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = x @ weight
        return (
            bce.sigmoid_focal_loss(logits, y, 0.25, 2.0, "mean")
            + bce.sigmoid_focal_loss(logits * 50, y, -1.0, 0.5, "none").sum()
        )

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(weight, x, y)
    compiled_grads = torch.autograd.grad(loss, (weight, y))
    eager = step(weight, x, y)
    eager_grads = torch.autograd.grad(eager, (weight, y))
    torch.testing.assert_close(loss, eager)
    for mine, theirs in zip(compiled_grads, eager_grads, strict=True):
        assert mine.isfinite().all()
        torch.testing.assert_close(mine, theirs)
