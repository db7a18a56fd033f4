"""The JAX backend: parity with bcekit.torch (values and gradients), jit / vmap / grad / hessian, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bcekit.jax as bjx
import bcekit.torch as bce
from _cases import Case, cases

jax.config.update("jax_enable_x64", True)  # float64 is tested; this process imports jax only here

DTYPES = {
    "float16": (jnp.float16, torch.float16),
    "bfloat16": (jnp.bfloat16, torch.bfloat16),
    "float32": (jnp.float32, torch.float32),
    "float64": (jnp.float64, torch.float64),
}


def _pair(array: np.ndarray | None, dtype: str):
    """The same numbers as a JAX array and a torch tensor of ``dtype`` (rounded once, in torch)."""
    if array is None:
        return None, None
    t = torch.tensor(array, dtype=torch.float64).to(DTYPES[dtype][1])
    return jnp.asarray(t.double().numpy()).astype(DTYPES[dtype][0]), t


def _tolerance(dtype: str) -> dict[str, float]:
    eps = float(jnp.finfo(DTYPES[dtype][0]).eps)
    return {"rtol": 4 * eps, "atol": 4 * eps if eps > 1e-4 else 1e-12}


def _close(ours: jax.Array, theirs: torch.Tensor, dtype: str) -> None:
    np.testing.assert_allclose(
        np.asarray(ours, dtype=np.float64),
        theirs.detach().double().numpy(),
        equal_nan=True,
        **_tolerance(dtype),
    )


@st.composite
def option_cases(draw: st.DrawFn, logits: bool):
    case = draw(cases(logits=logits))
    options = {
        "label_smoothing": draw(st.sampled_from([0.0, 0.2])),
        "ignore_index": draw(st.sampled_from([None, 0.0])),
    }
    return case, options


def _check(case: Case, options: dict, logits: bool) -> None:
    (x, tx), (y, ty) = _pair(case.input, case.dtype), _pair(case.target, case.dtype)
    (w, tw), (p, tp) = _pair(case.weight, case.dtype), _pair(case.pos_weight, case.dtype)
    tx.requires_grad_()
    ty.requires_grad_()
    if logits:

        def ours(x, y):
            return bjx.binary_cross_entropy_with_logits(
                x, y, w, reduction=case.reduction, pos_weight=p, **options
            )

        theirs = bce.binary_cross_entropy_with_logits(
            tx, ty, tw, reduction=case.reduction, pos_weight=tp, **options
        )
    else:

        def ours(x, y):
            return bjx.binary_cross_entropy(x, y, w, reduction=case.reduction, **options)

        theirs = bce.binary_cross_entropy(tx, ty, tw, reduction=case.reduction, **options)
    value = ours(x, y)
    assert np.dtype(value.dtype).name == str(theirs.dtype).removeprefix("torch.")
    assert value.shape == tuple(theirs.shape)
    _close(value, theirs, case.dtype)

    if theirs.numel() == 0 or not theirs.isfinite().all():
        return
    cotangent = np.random.default_rng(0).uniform(0.5, 1.5, theirs.shape)
    torch_grads = torch.autograd.grad(theirs, (tx, ty), torch.tensor(cotangent).to(theirs.dtype))
    _, vjp = jax.vjp(ours, x, y)
    jax_grads = vjp(jnp.asarray(cotangent).astype(value.dtype))
    for mine, expected in zip(jax_grads, torch_grads, strict=True):
        finite = expected.isfinite().numpy()
        assert mine.dtype == x.dtype and mine.shape == x.shape
        np.testing.assert_allclose(
            np.asarray(mine, dtype=np.float64)[finite],
            expected.double().numpy()[finite],
            **_tolerance(case.dtype),
        )


@settings(max_examples=50, deadline=None)
@given(option_cases(logits=True))
def test_logits_loss_matches_bcekit_torch(drawn) -> None:
    _check(*drawn, logits=True)


@settings(max_examples=50, deadline=None)
@given(option_cases(logits=False))
def test_probability_loss_matches_bcekit_torch(drawn) -> None:
    _check(*drawn, logits=False)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.5), (0.5, 0.0)])
def test_focal_loss_matches_bcekit_torch(reduction, alpha, gamma) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 4, (5, 3)), rng.uniform(0, 1, (5, 3))
    tx = torch.tensor(x, requires_grad=True)
    theirs = bce.sigmoid_focal_loss(tx, torch.tensor(y), alpha, gamma, reduction)

    def ours(x):
        return bjx.sigmoid_focal_loss(x, jnp.asarray(y), alpha, gamma, reduction).sum()

    _close(bjx.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(y), alpha, gamma, reduction), theirs, "float64")
    (expected,) = torch.autograd.grad(theirs.sum(), tx)
    _close(jax.jit(jax.grad(ours))(jnp.asarray(x)), expected, "float64")


# --------------------------------------------------------------------------------------------------------
# Transformations
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits", [False, True])
def test_jit_equals_eager(logits) -> None:
    rng = np.random.default_rng(6)
    x, y = rng.uniform(0.01, 0.99, (4, 3)), rng.uniform(size=(4, 3))
    function = bjx.binary_cross_entropy_with_logits if logits else bjx.binary_cross_entropy
    for reduction in ("none", "mean", "sum"):
        eager = function(jnp.asarray(x), jnp.asarray(y), jnp.asarray([1.0, 2.0, 3.0]), reduction=reduction)
        jitted = jax.jit(lambda a, b, r=reduction: function(a, b, jnp.asarray([1.0, 2.0, 3.0]), reduction=r))
        np.testing.assert_allclose(jitted(jnp.asarray(x), jnp.asarray(y)), eager, rtol=1e-14)


def test_vmap_over_a_batch_equals_a_loop() -> None:
    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.uniform(size=(6, 4)))
    pos_weight = jnp.asarray([1.0, 2.0, 0.5, 3.0])

    def per_row(x, y):
        return bjx.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight)

    batched = jax.vmap(per_row)(x, y)
    looped = jnp.stack([per_row(x[i], y[i]) for i in range(6)])
    np.testing.assert_allclose(batched, looped, rtol=1e-15)


def test_per_sample_gradients_with_vmap_of_grad() -> None:
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.uniform(size=(5, 3)))
    grads = jax.vmap(jax.grad(bjx.binary_cross_entropy_with_logits))(x, y)
    for i in range(5):
        tx = torch.tensor(np.asarray(x[i]), requires_grad=True)
        (expected,) = torch.autograd.grad(
            bce.binary_cross_entropy_with_logits(tx, torch.tensor(np.asarray(y[i]))), tx
        )
        np.testing.assert_allclose(grads[i], expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize("logits", [False, True])
def test_hessian_matches_torch(logits) -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(0.1, 0.9, 4) if not logits else rng.normal(0, 2, 4)
    y = rng.uniform(size=4)
    weight = rng.uniform(0.5, 2, 4)
    jax_fn = bjx.binary_cross_entropy_with_logits if logits else bjx.binary_cross_entropy
    torch_fn = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
    ours = jax.hessian(lambda a: jax_fn(a, jnp.asarray(y), jnp.asarray(weight)))(jnp.asarray(x))
    theirs = torch.autograd.functional.hessian(
        lambda a: torch_fn(a, torch.tensor(y), torch.tensor(weight)), torch.tensor(x)
    )
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_weight_and_pos_weight_gradients_are_exact(reduction) -> None:
    """torch refuses these gradients; JAX cannot refuse, so they are computed (checked against torch
    autograd through an explicit float64 composition)."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(0, 2, (4, 3)), rng.uniform(size=(4, 3))
    weight, pos_weight = rng.uniform(0.5, 2, (1, 3)), rng.uniform(0.5, 2, (3,))

    def ours(w, p):
        loss = bjx.binary_cross_entropy_with_logits(
            jnp.asarray(x), jnp.asarray(y), w, reduction=reduction, pos_weight=p
        )
        return loss.sum()

    tw, tp = torch.tensor(weight, requires_grad=True), torch.tensor(pos_weight, requires_grad=True)
    tx, ty = torch.tensor(x), torch.tensor(y)
    composed = tw * (
        tp * ty * torch.nn.functional.softplus(-tx) + (1 - ty) * torch.nn.functional.softplus(tx)
    )
    reference = {"none": composed, "sum": composed.sum(), "mean": composed.mean()}[reduction].sum()
    expected = torch.autograd.grad(reference, (tw, tp))
    got = jax.grad(ours, argnums=(0, 1))(jnp.asarray(weight), jnp.asarray(pos_weight))
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-12)


def test_float32_without_x64_stays_accurate() -> None:
    """With x64 off float32 is computed in float32: still cancellation-free (torch loses every digit here)."""
    x = np.array([-40.0, -20.0, 0.5, 30.0], dtype=np.float32)
    y = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    exact = np.log1p(np.exp(np.where(y == 0, x, -x).astype(np.float64)))
    with jax.enable_x64(False):
        ours = bjx.binary_cross_entropy_with_logits(jnp.asarray(x), jnp.asarray(y), reduction="none")
        assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float64), exact, rtol=4 * np.finfo(np.float32).eps)


def test_infinite_logits() -> None:
    x = jnp.asarray([math.inf, -math.inf, math.inf])
    y = jnp.asarray([1.0, 0.0, 0.0])
    loss = bjx.binary_cross_entropy_with_logits(x, y, reduction="none")
    np.testing.assert_array_equal(loss, [0.0, 0.0, math.inf])
    grad = jax.grad(lambda a: bjx.binary_cross_entropy_with_logits(a, y, reduction="sum"))(x)
    np.testing.assert_array_equal(grad, [0.0, 0.0, 1.0])


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


def _torch_error(function, *args, **kwargs) -> type[Exception]:
    with pytest.raises(Exception) as error:
        function(*args, **kwargs)
    return error.type


STATIC_ERRORS = [
    ("size", lambda: (np.zeros(4), np.zeros(3), {})),
    ("reduction", lambda: (np.zeros(4), np.zeros(4), {"reduction": "avg"})),
    ("weight", lambda: (np.zeros(4), np.zeros(4), {"weight": np.ones(3)})),
    ("int target", lambda: (np.zeros(4), np.zeros(4, dtype=np.int32), {})),
    ("smoothing", lambda: (np.zeros(4), np.zeros(4), {"label_smoothing": 2.0})),
]


@pytest.mark.parametrize(("name", "build"), STATIC_ERRORS, ids=[e[0] for e in STATIC_ERRORS])
@pytest.mark.parametrize("logits", [False, True])
def test_static_errors_raise_at_trace_time_with_torchs_types(name, build, logits) -> None:
    x, y, kwargs = build()
    jax_fn = bjx.binary_cross_entropy_with_logits if logits else bjx.binary_cross_entropy
    torch_fn = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
    torch_kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    expected = _torch_error(torch_fn, torch.from_numpy(x), torch.from_numpy(y), **torch_kwargs)
    array_kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with pytest.raises(expected):
        jax.jit(lambda a, b: jax_fn(a, b, **array_kwargs))(jnp.asarray(x), jnp.asarray(y))


def test_probabilities_outside_unit_interval_raise_eagerly_and_are_checkified_under_jit() -> None:
    x, y = jnp.asarray([0.5, 1.5]), jnp.asarray([0.0, 1.0])
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        bjx.binary_cross_entropy(x, y)
    with pytest.raises(RuntimeError, match="all elements of target should be between 0 and 1"):
        bjx.binary_cross_entropy(y, x)
    jax.jit(bjx.binary_cross_entropy)(x, y)  # under jit a value check cannot raise
    error, _ = jax.jit(bjx.checked(bjx.binary_cross_entropy))(x, y)
    with pytest.raises(Exception, match="all elements of input should be between 0 and 1"):
        error.throw()
    error, loss = jax.jit(bjx.checked(bjx.binary_cross_entropy))(y * 0.5, y)
    assert error.get() is None and np.isfinite(loss)
    error, _ = bjx.checked(lambda a, b: bjx.binary_cross_entropy(a, b, ignore_index=7.0))(
        y, jnp.asarray([7.0, 1.0])
    )
    assert error.get() is None  # ignored targets are not range-checked
