"""The NumPy backend: torch's semantics without torch, and the (loss, gradient) pair for scipy.optimize."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import bcekit.numpy as bnp
from _cases import Case, cases, lay_out

NUMPY_DTYPES = ("float16", "float32", "float64")
_RNG = np.random.default_rng(0)


def _torch_reference(case: Case, logits: bool, dtype: np.dtype):
    """torch in float64 on the very numbers the NumPy backend sees (already rounded to ``dtype``)."""
    x, y = (
        torch.tensor(a.astype(dtype).astype(np.float64), requires_grad=True)
        for a in (case.input, case.target)
    )
    w = None if case.weight is None else torch.tensor(case.weight.astype(dtype).astype(np.float64))
    p = None if case.pos_weight is None else torch.tensor(case.pos_weight.astype(dtype).astype(np.float64))
    if logits:
        loss = F.binary_cross_entropy_with_logits(x, y, w, reduction=case.reduction, pos_weight=p)
    else:
        loss = F.binary_cross_entropy(x, y, w, reduction=case.reduction)
    (grad,) = torch.autograd.grad(loss.sum(), x) if loss.numel() else (torch.zeros_like(x),)
    return loss.detach().numpy(), grad.numpy()


def _check(case: Case, logits: bool) -> None:
    dtype = np.dtype(case.dtype)
    x, y = case.input.astype(dtype), case.target.astype(dtype)
    w = None if case.weight is None else case.weight.astype(dtype)
    p = None if case.pos_weight is None else case.pos_weight.astype(dtype)
    x, y = lay_out(x, case.layout), lay_out(y, case.layout)
    if logits:
        loss = bnp.binary_cross_entropy_with_logits(x, y, w, reduction=case.reduction, pos_weight=p)
        paired, grad = bnp.binary_cross_entropy_with_logits_and_grad(x, y, w, case.reduction, pos_weight=p)
    else:
        loss = bnp.binary_cross_entropy(x, y, w, reduction=case.reduction)
        paired, grad = bnp.binary_cross_entropy_and_grad(x, y, w, case.reduction)
    expected_loss, expected_grad = _torch_reference(case, logits, dtype)

    eps = np.finfo(dtype).eps
    tolerance = {"rtol": 4 * eps, "atol": 4 * eps if dtype == np.float16 else 1e-12, "equal_nan": True}
    assert isinstance(loss, np.ndarray) and loss.dtype == dtype and loss.shape == expected_loss.shape
    np.testing.assert_allclose(loss.astype(np.float64), expected_loss, **tolerance)
    np.testing.assert_array_equal(paired, loss)
    assert grad.dtype == dtype and grad.shape == x.shape
    with np.errstate(over="ignore"):  # 1e12-sized gradients at x = 0 or 1 overflow float16, as ours do
        finite = np.isfinite(expected_grad.astype(dtype))
    np.testing.assert_allclose(grad[finite].astype(np.float64), expected_grad[finite], **tolerance)


@settings(max_examples=200, deadline=None)
@given(cases(logits=True, dtypes=NUMPY_DTYPES))
def test_logits_loss_and_grad_match_torch(case: Case) -> None:
    _check(case, logits=True)


@settings(max_examples=200, deadline=None)
@given(cases(logits=False, dtypes=NUMPY_DTYPES))
def test_probability_loss_and_grad_match_torch(case: Case) -> None:
    _check(case, logits=False)


ERROR_CASES = [
    # (name, kwargs builder): each builds (input, target, extra kwargs) as float64 NumPy arrays
    ("size", lambda: (_RNG.random(4), _RNG.random(3), {})),
    ("reduction", lambda: (_RNG.random(4), _RNG.random(4), {"reduction": "avg"})),
    ("weight", lambda: (_RNG.random(4), _RNG.random(4), {"weight": _RNG.random(3)})),
    ("wide weight", lambda: (_RNG.random(4), _RNG.random(4), {"weight": _RNG.random((2, 4))})),
    ("int target", lambda: (_RNG.random(4), np.ones(4, dtype=np.int64), {})),
    ("bool target", lambda: (_RNG.random(4), np.ones(4, dtype=bool), {})),
    ("int input", lambda: (np.ones(4, dtype=np.int64), np.ones(4, dtype=np.int64), {})),
]


@pytest.mark.parametrize(("name", "build"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("logits", [False, True])
def test_errors_have_torchs_exception_types(name, build, logits) -> None:
    x, y, kwargs = build()
    ours_fn = bnp.binary_cross_entropy_with_logits if logits else bnp.binary_cross_entropy
    torch_fn = F.binary_cross_entropy_with_logits if logits else F.binary_cross_entropy
    torch_kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with pytest.raises(Exception) as theirs:
        torch_fn(torch.from_numpy(x), torch.from_numpy(y), **torch_kwargs)
    with pytest.raises(theirs.type):
        ours_fn(x, y, **kwargs)


@pytest.mark.parametrize("bad", [-0.1, 1.1, np.nan])
def test_probabilities_outside_unit_interval_raise(bad) -> None:
    x = np.array([0.5, bad])
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        bnp.binary_cross_entropy(x, np.array([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="all elements of target should be between 0 and 1"):
        bnp.binary_cross_entropy(np.array([0.0, 1.0]), x)


def test_numpy_messages_use_numpy_shapes_and_dtype_names() -> None:
    with pytest.raises(ValueError, match=r"Target size \(\(3,\)\) must be the same as input size \(\(4,\)\)"):
        bnp.binary_cross_entropy_with_logits(np.zeros(4), np.zeros(3))
    with pytest.raises(RuntimeError, match="Found dtype float32 but expected float64"):
        bnp.binary_cross_entropy(np.zeros(2), np.zeros(2, dtype=np.float32))


def test_empty_input_mean_is_nan_sum_is_zero_without_warnings() -> None:
    with np.errstate(all="raise"):
        assert np.isnan(bnp.binary_cross_entropy_with_logits(np.zeros(0), np.zeros(0)))
        assert bnp.binary_cross_entropy(np.zeros((0, 3)), np.zeros((0, 3)), reduction="sum") == 0


def test_infinite_logits_are_exact_with_finite_gradient() -> None:
    x = np.array([np.inf, -np.inf, np.inf, -np.inf])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    loss, grad = bnp.binary_cross_entropy_with_logits_and_grad(x, y, reduction="none")
    np.testing.assert_array_equal(loss, [0.0, 0.0, np.inf, np.inf])
    np.testing.assert_array_equal(grad, [0.0, 0.0, 1.0, -1.0])


def test_legacy_arguments_and_warning() -> None:
    x, y = _RNG.random(5), _RNG.random(5)
    with pytest.warns(UserWarning, match="please use reduction='sum' instead"):
        total = bnp.binary_cross_entropy(x, y, size_average=False)
    np.testing.assert_allclose(total, bnp.binary_cross_entropy(x, y, reduction="sum"))


def test_array_likes_are_accepted() -> None:
    np.testing.assert_allclose(bnp.binary_cross_entropy([0.25, 0.75], [0.0, 1.0]), -np.log(0.75), rtol=1e-15)


def test_scipy_minimize_fits_a_logistic_regression() -> None:
    """The ``jac=True`` convention: L-BFGS on our (loss, gradient) lands on the optimum that Newton's
    method, run here from the closed-form gradient and Hessian, finds."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 3))
    labels = (features @ np.array([1.5, -2.0, 0.5]) + rng.normal(size=200) > 0).astype(np.float64)

    def objective(w):
        loss, grad_logits = bnp.binary_cross_entropy_with_logits_and_grad(features @ w, labels)
        return loss, features.T @ grad_logits

    fit = scipy.optimize.minimize(
        objective, np.zeros(3), jac=True, method="L-BFGS-B", options={"gtol": 1e-10}
    )
    assert fit.success
    w = np.zeros(3)
    for _ in range(25):  # Newton's method on the same mean log-loss
        p = 1 / (1 + np.exp(-(features @ w)))
        gradient = features.T @ (p - labels) / len(labels)
        hessian = (features * (p * (1 - p))[:, None]).T @ features / len(labels)
        w -= np.linalg.solve(hessian, gradient)
    np.testing.assert_allclose(fit.x, w, rtol=1e-5)


def test_numpy_backend_works_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        import bcekit.numpy as bnp
        loss = bnp.binary_cross_entropy_with_logits(np.array([0.0]), np.array([1.0]))
        assert abs(float(loss) - np.log(2)) < 1e-15, loss
        assert "torch" not in [name.split(".")[0] for name, m in sys.modules.items() if m is not None]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------------------------------------
# arrays in the other byte order, and masked arrays
# --------------------------------------------------------------------------------------------------------

_SWAPPED = ">" if sys.byteorder == "little" else "<"


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("swapped", ["all", "weight", "pos_weight"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_arrays_in_the_other_byte_order_give_the_native_results(
    dtype: str, swapped: str, reduction: str
) -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(0, 2, (6, 5)).astype(dtype)
    y = rng.random((6, 5)).astype(dtype)
    w = rng.random(5).astype(dtype)
    p = (rng.random(5) * 3).astype(dtype)
    probabilities = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(dtype)

    def other(a: np.ndarray, role: str) -> np.ndarray:
        return a.astype(a.dtype.newbyteorder(_SWAPPED)) if swapped in ("all", role) else a

    calls = [
        (bnp.binary_cross_entropy_with_logits_and_grad, dict(reduction=reduction, pos_weight=p), "x", x),
        (bnp.binary_cross_entropy_and_grad, dict(reduction=reduction), "x", probabilities),
    ]
    for function, options, _, input in calls:
        native = function(input, y, w, **options)
        options = {k: other(v, k) if isinstance(v, np.ndarray) else v for k, v in options.items()}
        got = function(other(input, "input"), other(y, "target"), other(w, "weight"), **options)
        for a, b in zip(got, native, strict=True):
            assert a.dtype == b.dtype and a.dtype.isnative
            assert a.tobytes() == b.tobytes()
    swapped_x = other(x, "input")
    assert (
        bnp.sigmoid_focal_loss(swapped_x, other(y, "target")).tobytes()
        == bnp.sigmoid_focal_loss(x, y).tobytes()
    )


def _masked_case(loss: str) -> tuple[np.ma.MaskedArray, np.ma.MaskedArray, np.ma.MaskedArray, np.ndarray]:
    rng = np.random.default_rng(12)
    x = rng.normal(0, 2, (7, 4))
    if loss == "bce":
        x = 1 / (1 + np.exp(-x))
    y = rng.random((7, 4))
    w = rng.random(4) + 0.5
    x_mask = rng.random((7, 4)) < 0.2
    y_mask = rng.random((7, 4)) < 0.2
    w_mask = np.array([False, False, True, False])
    # what lies under a mask is garbage the loss must never see: out of range, NaN
    x_data = np.where(x_mask, 7.0, x)
    y_data = np.where(y_mask, np.nan, y)
    w_data = np.where(w_mask, np.nan, w)
    masked = x_mask | y_mask | w_mask[None, :]
    return (
        np.ma.MaskedArray(x_data, mask=x_mask),
        np.ma.MaskedArray(y_data, mask=y_mask),
        np.ma.MaskedArray(w_data, mask=w_mask),
        masked,
    )


@pytest.mark.parametrize("loss", ["bce", "logits"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_masked_elements_are_left_out_as_if_absent(loss: str, reduction: str) -> None:
    """torch on the elements no mask covers is the reference: masked input, target and weight entries
    (a masked weight leaving out its whole column) add no loss and no gradient, and 'mean' does not count
    them; per-element results are masked arrays with the combined mask."""
    x, y, w, masked = _masked_case(loss)
    keep = ~masked
    xt = torch.tensor(np.ma.getdata(x)[keep], requires_grad=True)
    yt = torch.tensor(np.ma.getdata(y)[keep])
    wt = torch.tensor(np.broadcast_to(np.ma.getdata(w), x.shape)[keep])
    if loss == "bce":
        expected = F.binary_cross_entropy(xt, yt, wt, reduction=reduction)
        value, grad = bnp.binary_cross_entropy_and_grad(x, y, w, reduction=reduction)
        plain = bnp.binary_cross_entropy(x, y, w, reduction=reduction)
    else:
        expected = F.binary_cross_entropy_with_logits(xt, yt, wt, reduction=reduction)
        value, grad = bnp.binary_cross_entropy_with_logits_and_grad(x, y, w, reduction=reduction)
        plain = bnp.binary_cross_entropy_with_logits(x, y, w, reduction=reduction)
    (expected_grad,) = torch.autograd.grad(expected.sum(), xt)
    for got in (value, plain):
        if reduction == "none":
            assert isinstance(got, np.ma.MaskedArray)
            np.testing.assert_array_equal(np.ma.getmaskarray(got), masked)
            np.testing.assert_allclose(got.compressed(), expected.detach().numpy(), rtol=1e-14)
        else:
            assert not isinstance(got, np.ma.MaskedArray) and got.shape == ()
            np.testing.assert_allclose(got, expected.item(), rtol=1e-14)
    assert isinstance(grad, np.ma.MaskedArray)
    np.testing.assert_array_equal(np.ma.getmaskarray(grad), masked)
    np.testing.assert_array_equal(np.ma.getdata(grad)[masked], 0.0)
    np.testing.assert_allclose(grad.compressed(), expected_grad.numpy(), rtol=1e-12)


def test_masked_focal_loss_and_masks_with_nothing_masked() -> None:
    x, y, _, _ = _masked_case("logits")
    keep = ~(np.ma.getmaskarray(x) | np.ma.getmaskarray(y))  # no weight here
    focal = bnp.sigmoid_focal_loss(x, y, reduction="mean")
    np.testing.assert_allclose(
        focal,
        bnp.sigmoid_focal_loss(np.ma.getdata(x)[keep], np.ma.getdata(y)[keep], reduction="mean"),
        rtol=1e-15,
    )
    # a masked array that masks nothing is its data; every element masked leaves an empty mean (NaN)
    data = np.ma.getdata(x)[keep], np.ma.getdata(y)[keep]
    nothing = bnp.binary_cross_entropy_with_logits(np.ma.MaskedArray(data[0]), data[1], reduction="none")
    assert nothing.tobytes() == bnp.binary_cross_entropy_with_logits(*data, reduction="none").tobytes()
    everything = np.ma.MaskedArray(data[0], mask=True)
    assert np.isnan(bnp.binary_cross_entropy_with_logits(everything, data[1]))
    assert bnp.binary_cross_entropy_with_logits(everything, data[1], reduction="sum") == 0.0
