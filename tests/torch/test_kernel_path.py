"""The torch backend's kernel path: the fused loss-and-gradient ops and their backward.

A reduced loss of an input that needs a gradient runs ``bcekit::*_fused``: one kernel pass gives the loss and
the input gradient, which the backward hands over (times ``grad_output``). These tests check that the path
is taken, that its gradients equal the ones of ``reduction='none'`` reduced by hand and torch's own, and
that ``grad_output``, target gradients, ``retain_graph`` and double backward behave as in torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcekit.torch as bce
from bcekit.torch import _kernel

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _per_element(grad_output, input) -> bool:
    """A grad_output with one value per element (reduction 'none'), not a reduced loss's single one."""
    return grad_output is not None and grad_output.shape == input.shape


@pytest.fixture
def passes(monkeypatch) -> list[dict]:
    """The kernel passes (``_kernel.kernel_pass``) made while a test runs: the outputs each one asked for."""
    made: list[dict] = []
    original = _kernel.kernel_pass

    def recording(*args, **kwargs):
        made.append(
            {
                "grad_input": kwargs.get("grad_input", False),
                "grad_target": kwargs.get("grad_target", False),
                "per_element_grad_output": _per_element(kwargs.get("grad_output"), args[1]),
            }
        )
        return original(*args, **kwargs)

    monkeypatch.setattr(_kernel, "kernel_pass", recording)
    return made


FUSED_PASS = {"grad_input": True, "grad_target": False, "per_element_grad_output": False}
FORWARD_PASS = {"grad_input": False, "grad_target": False, "per_element_grad_output": False}


def _data(logits: bool, shape=(53, 7), dtype=torch.float32, seed: int = 0):
    """Input, target, a per-class weight and a per-row pos_weight (None for the probability loss)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, shape) if logits else rng.uniform(0.01, 0.99, shape)
    y = rng.random(shape)
    y[::2] = np.round(y[::2])
    w = rng.uniform(0.5, 2.0, shape[-1:])
    p = rng.uniform(0.5, 2.0, (shape[0], 1)) if logits else None
    as_tensor = lambda a: None if a is None else torch.tensor(a).to(dtype)  # noqa: E731
    return as_tensor(x), as_tensor(y), as_tensor(w), as_tensor(p)


def _loss(logits: bool, x, y, w, p, reduction: str):
    if logits:
        return bce.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p)
    return bce.binary_cross_entropy(x, y, w, reduction=reduction)


def _torch_loss(logits: bool, x, y, w, p, reduction: str):
    if logits:
        return F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p)
    return F.binary_cross_entropy(x, y, w, reduction=reduction)


def _leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().clone().to(dtype or t.dtype).requires_grad_(True)


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    eps = torch.finfo(dtype).eps
    return {"rtol": 4 * eps, "atol": 4 * eps if dtype in (torch.float16, torch.bfloat16) else 1e-12}


LOSSES = pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])


@LOSSES
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_losses_of_inputs_needing_grad_take_the_fused_path(passes, logits, dtype, reduction) -> None:
    x, y, w, p = _data(logits, dtype=DTYPES[dtype])
    x = _leaf(x)
    loss = _loss(logits, x, y, w, p, reduction)
    assert passes == [FUSED_PASS]  # one pass: the loss and the input gradient
    loss.backward()
    assert passes == [FUSED_PASS]  # grad_output 1: the forward's gradient, handed over
    # the same value as the plain kernel pass of an input that needs no gradient
    plain = _loss(logits, x.detach(), y, w, p, reduction)
    assert passes == [FUSED_PASS, FORWARD_PASS]
    assert torch.equal(loss.detach(), plain)


@LOSSES
def test_other_calls_do_not_fuse(passes, logits) -> None:
    x, y, w, p = _data(logits)
    _loss(logits, _leaf(x), y, w, p, "none").sum().backward()  # per element: a backward pass of its own
    backward = {"grad_input": True, "grad_target": False, "per_element_grad_output": True}
    assert passes == [FORWARD_PASS, backward]
    _loss(logits, x, y, w, p, "mean")  # no gradient needed
    with torch.no_grad():
        _loss(logits, _leaf(x), y, w, p, "mean")
    assert passes[2:] == [FORWARD_PASS, FORWARD_PASS]
    _loss(logits, x, _leaf(y), w, p, "mean").backward()  # the target's gradient only: a backward pass
    assert passes[4:] == [
        FORWARD_PASS,
        {"grad_input": False, "grad_target": True, "per_element_grad_output": False},
    ]
    del passes[:]
    _loss(logits, _leaf(x), y, w.double(), p, "mean").backward()  # mixed dtypes: the composed path
    assert passes == []


@LOSSES
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_gradient_equals_the_reduced_per_element_one(logits, dtype, reduction) -> None:
    torch_dtype = DTYPES[dtype]
    x, y, w, p = _data(logits, dtype=torch_dtype, seed=1)
    fused_x, none_x, reference_x = _leaf(x), _leaf(x), _leaf(x, torch.float64)
    _loss(logits, fused_x, y, w, p, reduction).backward()
    per_element = _loss(logits, none_x, y, w, p, "none")
    (per_element.sum() if reduction == "sum" else per_element.mean()).backward()
    tolerance = _tolerance(torch_dtype)
    if reduction == "sum":  # the same kernel gradient scaled by 1 either way
        assert torch.equal(fused_x.grad, none_x.grad)
    else:
        torch.testing.assert_close(fused_x.grad, none_x.grad, **tolerance)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    _torch_loss(logits, reference_x, f64(y), f64(w), f64(p), reduction).backward()
    torch.testing.assert_close(fused_x.grad.double(), reference_x.grad, **tolerance)


@LOSSES
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scale", [3.5, -0.25])
def test_grad_output_scales_the_fused_gradient(passes, logits, dtype, scale) -> None:
    torch_dtype = DTYPES[dtype]
    x, y, w, p = _data(logits, dtype=torch_dtype, seed=2)
    unit_x, scaled_x, reference_x = _leaf(x), _leaf(x), _leaf(x, torch.float64)
    _loss(logits, unit_x, y, w, p, "mean").backward()
    del passes[:]
    (_loss(logits, scaled_x, y, w, p, "mean") * scale).backward()
    if torch_dtype in (torch.float32, torch.float64):
        assert passes == [FUSED_PASS]  # the stored gradient times grad_output: no second pass
        assert torch.equal(scaled_x.grad, unit_x.grad * scale)
    else:
        assert passes == [FUSED_PASS, FUSED_PASS]  # half types recompute, rather than round twice
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    (_torch_loss(logits, reference_x, f64(y), f64(w), f64(p), "mean") * scale).backward()
    torch.testing.assert_close(scaled_x.grad.double(), reference_x.grad, **_tolerance(torch_dtype))


@LOSSES
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_target_gradients(logits, dtype, reduction) -> None:
    torch_dtype = DTYPES[dtype]
    x, y, w, p = _data(logits, dtype=torch_dtype, seed=3)
    bx, by = _leaf(x), _leaf(y)
    rx, ry = _leaf(x, torch.float64), _leaf(y, torch.float64)
    grad_output = torch.tensor(1.5 if reduction != "none" else np.linspace(-1, 2, x.numel()).reshape(x.shape))
    _loss(logits, bx, by, w, p, reduction).backward(grad_output.to(torch_dtype))
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    _torch_loss(logits, rx, ry, f64(w), f64(p), reduction).backward(grad_output.to(torch_dtype).double())
    tolerance = _tolerance(torch_dtype)
    if not logits:  # -logit(x) in float64 cancels near x = 1/2
        tolerance["atol"] = max(tolerance["atol"], 1e-10)
    torch.testing.assert_close(bx.grad.double(), rx.grad, **tolerance)
    torch.testing.assert_close(by.grad.double(), ry.grad, **tolerance)


@LOSSES
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_retain_graph_gives_the_same_gradient_every_time(logits, dtype) -> None:
    x, y, w, p = _data(logits, dtype=DTYPES[dtype], seed=4)
    x = _leaf(x)
    loss = _loss(logits, x, y, w, p, "mean")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(retain_graph=True)
    assert torch.equal(x.grad, first)
    x.grad.zero_()  # an optimizer's zero_grad must not reach the gradient the graph keeps
    loss.backward(retain_graph=True)
    assert torch.equal(x.grad, first)
    loss.backward(retain_graph=True)  # accumulation
    assert torch.equal(x.grad, first + first)
    x.grad = None
    (loss * 2).backward()
    torch.testing.assert_close(x.grad, first * 2, rtol=0, atol=0)


@LOSSES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_matches_torch(logits, reduction) -> None:
    x, y, w, p = _data(logits, shape=(17, 5), dtype=torch.float64, seed=5)
    bx, tx = _leaf(x), _leaf(x)
    direction = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
    grads = []
    for leaf, function in ((bx, _loss), (tx, _torch_loss)):
        loss = function(logits, leaf, y, w, p, reduction)
        (grad,) = torch.autograd.grad(loss.sum(), leaf, create_graph=True)
        (hessian_vector,) = torch.autograd.grad((grad * direction).sum(), leaf)
        grads.append((grad.detach(), hessian_vector))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    # torch's own second derivative of the probability loss is ~2e-10 off near x = 0 or 1 (bcekit's is
    # within 1e-15 of the exact w d/dx[(x - y) / (x (1 - x))] there)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10 if logits else 1e-9, atol=1e-12)


@LOSSES
def test_gradcheck_through_the_fused_path(passes, logits) -> None:
    x, y, w, p = _data(logits, shape=(6, 3), dtype=torch.float64, seed=6)
    if not logits:  # finite differences must stay inside [0, 1]
        x, y = x.clamp(0.05, 0.95), y.clamp(0.05, 0.95)

    def loss(a, b):
        return _loss(logits, a, b, w, p, "mean")

    inputs = (_leaf(x), _leaf(y))
    assert torch.autograd.gradcheck(loss, inputs)
    assert FUSED_PASS in passes
    assert torch.autograd.gradgradcheck(loss, inputs)


@LOSSES
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_registered_fused_ops_match_the_eager_path(logits, dtype) -> None:
    """torch.compile traces the registered ``bcekit::*_fused`` ops: same loss, gradients and grad_output
    handling as the eager path."""
    torch_dtype = DTYPES[dtype]
    x, y, w, p = _data(logits, dtype=torch_dtype, seed=7)
    for reduction, enum in (("mean", 1), ("sum", 2)):
        eager_x, op_x = _leaf(x), _leaf(x)
        eager = _loss(logits, eager_x, y, w, p, reduction)
        (eager * 2.5).backward()
        if logits:
            loss, grad = torch.ops.bcekit.binary_cross_entropy_with_logits_fused(
                op_x, y, w, p, enum, 0.0, None
            )
        else:
            loss, grad = torch.ops.bcekit.binary_cross_entropy_fused(op_x, y, w, enum, 0.0, None)
        assert not grad.requires_grad
        (loss * 2.5).backward()
        assert torch.equal(loss.detach(), eager.detach())
        assert torch.equal(op_x.grad, eager_x.grad)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("shape", [(64, 16), (1024, 1024)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("edit", ["mul_", "zero_"])
def test_a_returned_gradient_is_the_callers_to_edit(logits, shape, weighted, edit) -> None:
    """``torch.autograd.grad(loss, x, retain_graph=True)`` returns a tensor the caller owns: editing it in
    place (``mul_``, ``zero_``) changes neither what the next backward of the same graph gives nor whether
    it runs, as with torch's loss (the plain call's path and the weighted one's)."""
    torch.manual_seed(8)
    x, y = torch.randn(shape), torch.rand(shape)
    if not logits:
        x = torch.sigmoid(x)
    weight = torch.rand(shape[-1]) + 0.5 if weighted else None
    ours, theirs = (
        (bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits)
        if logits
        else (bce.binary_cross_entropy, F.binary_cross_entropy)
    )
    results = []
    for fn in (ours, theirs):
        leaf = x.clone().requires_grad_()
        loss = fn(leaf, y, weight)
        (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        kept = first.clone()
        getattr(first, edit)(*([100.0] if edit == "mul_" else []))
        (second,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        loss.backward()
        results.append((kept, second, leaf.grad))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------------------------
# The eager route: every option and weight form, and the checks it remembers
# --------------------------------------------------------------------------------------------------------

#: (name, the call's options given the shape (N, C)): every weight form and option the kernels serve
EAGER_OPTIONS = {
    "plain": lambda n, c, dt: {},
    "pos_weight (C,)": lambda n, c, dt: {"pos_weight": torch.linspace(0.5, 2.0, c, dtype=dt)},
    "weight (C,)": lambda n, c, dt: {"weight": torch.linspace(0.5, 2.0, c, dtype=dt)},
    "weight (N, 1)": lambda n, c, dt: {"weight": torch.linspace(0.5, 2.0, n, dtype=dt).reshape(n, 1)},
    "weight scalar": lambda n, c, dt: {"weight": torch.tensor(1.5, dtype=dt)},
    "weight full": lambda n, c, dt: {"weight": torch.linspace(0.5, 2.0, n * c, dtype=dt).reshape(n, c)},
    "label_smoothing": lambda n, c, dt: {"label_smoothing": 0.1},
    "ignore_index": lambda n, c, dt: {"ignore_index": -1.0},
    "everything": lambda n, c, dt: {
        "weight": torch.linspace(0.5, 2.0, c, dtype=dt),
        "pos_weight": torch.linspace(2.0, 0.5, n, dtype=dt).reshape(n, 1),
        "label_smoothing": 0.2,
        "ignore_index": -1.0,
    },
}


def _registered(logits: bool, x, y, options: dict, reduction: int):
    """The same loss through the registered operator (torch.library's dispatch: what compile records)."""
    args = (options.get("weight"), options.get("label_smoothing", 0.0), options.get("ignore_index"))
    if logits:
        return torch.ops.bcekit.binary_cross_entropy_with_logits(
            x, y, args[0], options.get("pos_weight"), reduction, args[1], args[2]
        )
    return torch.ops.bcekit.binary_cross_entropy(x, y, args[0], reduction, args[1], args[2])


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("option", list(EAGER_OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option_takes_the_eager_route(passes, logits, option, reduction) -> None:
    """Eager calls with any weight form and option run the kernels' eager Function (no torch.library
    dispatch), twice (the second from the remembered plan), with the registered operator's results."""
    options = EAGER_OPTIONS[option](53, 7, torch.float32)
    if not logits:
        options.pop("pos_weight", None)
    x, y, _, _ = _data(logits, seed=3)
    y[::5, 1] = -1.0 if "ignore_index" in options else 0.0
    enum = {"none": 0, "mean": 1, "sum": 2}[reduction]
    loss_fn = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
    reference_x = _leaf(x)
    reference = _registered(logits, reference_x, y, options, enum)
    reference.sum().backward()
    for _ in range(2):
        made = len(passes)
        leaf = _leaf(x)
        loss = loss_fn(leaf, y, reduction=reduction, **options)
        assert type(loss.grad_fn).__name__ == "_EagerLossBackward"
        assert len(passes) == made + 1
        loss.sum().backward()
        assert torch.equal(loss.detach(), reference.detach())
        assert torch.equal(leaf.grad, reference_x.grad)


def test_remembered_calls_still_check_what_changes(monkeypatch) -> None:
    """What the eager route remembers depends on the dtypes, shapes and options only: a call that differs
    in any of them is checked afresh, and raises torch's errors as the first call would."""
    monkeypatch.setattr(bce.functional, "_EAGER_CALLS", {})
    x, y, w, _ = _data(True, seed=4)
    bce.binary_cross_entropy_with_logits(x, y, w)  # remembered
    with pytest.raises(RuntimeError, match="must match the size|expanded size|broadcast"):
        bce.binary_cross_entropy_with_logits(x, y, torch.ones(3))  # a weight that does not broadcast
    with pytest.raises(ValueError):
        bce.binary_cross_entropy_with_logits(x, y, w, reduction="average")
    with pytest.raises(ValueError):
        bce.binary_cross_entropy_with_logits(x, y, w, label_smoothing=1.5)
    with pytest.raises(RuntimeError):  # a weight that requires grad, as torch refuses it (see _semantics)
        bce.binary_cross_entropy_with_logits(x, y, w.clone().requires_grad_())
    with pytest.raises(ValueError):  # a target of another shape
        bce.binary_cross_entropy_with_logits(x, y[:-1], w)
    double = bce.binary_cross_entropy_with_logits(x.double(), y.double(), w.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(
        double, F.binary_cross_entropy_with_logits(x.double(), y.double(), w.double()), rtol=1e-12, atol=0
    )
    probabilities = torch.sigmoid(x)
    bce.binary_cross_entropy(probabilities, y)  # remembered
    with pytest.raises(RuntimeError, match="between 0 and 1"):  # the values are checked on every call
        bce.binary_cross_entropy(probabilities * 2, y)
