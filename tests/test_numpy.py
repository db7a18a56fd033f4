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
