"""A training step on the Triton route, through the public API: no host synchronisation, and the fused
backward's in-place rewrite of the stored gradient.

``_kernel._TRITON_ON_CPU`` sends CPU tensors down the branch CUDA tensors take (Triton's interpreter runs the
kernels). On a GPU, reading a device value on the host (``.item()``, ``.tolist()``, ``bool()``,
``float()``, ``.numpy()``, ...) waits for the GPU and cannot be captured in a CUDA graph, and building a
tensor from host data (``torch.tensor([...])``) copies it to the device on every call. On CPU tensors
neither costs anything, so the test records every such call made from bcekit's code (directly, or through
torch functions bcekit called) while steps run: both losses, every dtype, weight form, option, reduction
and gradient, ``loss.backward()`` and other grad_outputs. Work done inside Triton's interpreter is the
interpreter's own (a GPU has none of it) and is not counted.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

import bcekit  # noqa: E402
import bcekit.torch as bce  # noqa: E402
from bcekit.torch import _kernel, _triton  # noqa: E402

BCEKIT = str(Path(bcekit.__file__).parent)
TRITON = str(Path(triton.__file__).parent)

#: (owner, name) of every host read of tensor data and every tensor built from host data.
HOST_READS = [
    (torch.Tensor, name) for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
]
HOST_READS += [(torch.Tensor, "__index__")]
HOST_TENSORS = [(torch, name) for name in ("tensor", "as_tensor", "asarray", "scalar_tensor", "from_numpy")]


class _HostAccess:
    """Wraps the functions above; a call counts when, walking out from its caller, a frame of bcekit's
    source comes before any frame of Triton's."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        self.recording = False
        for owner, name in HOST_READS + HOST_TENSORS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, function, name: str):
        def wrapper(*args, **kwargs):
            if self.recording:
                frame = sys._getframe(1)
                while frame is not None:
                    filename = frame.f_code.co_filename
                    if filename.startswith(TRITON):
                        break
                    if filename.startswith(BCEKIT):
                        self.calls.append(f"{name} at {filename}:{frame.f_lineno}")
                        break
                    frame = frame.f_back
            return function(*args, **kwargs)

        return wrapper


@pytest.fixture
def triton_route(monkeypatch) -> None:
    monkeypatch.setattr(_kernel, "_TRITON_ON_CPU", True)


@pytest.fixture
def host(monkeypatch, triton_route) -> _HostAccess:
    return _HostAccess(monkeypatch)


SHAPE = (37, 29)  # 1073 elements: two programs of float32's block, the second partial
WEIGHT_SHAPES = {
    "absent": None,
    "scalar": (),
    "per-class": (SHAPE[1],),
    "per-row": (SHAPE[0], 1),
    "full": SHAPE,
}
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "ignore": {"ignore_index": -1.0},
    "ignore-nan": {"ignore_index": math.nan, "label_smoothing": 0.05},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _inputs(kind: str, dtype: torch.dtype, options: dict, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, SHAPE) if kind == "logits" else rng.uniform(0.02, 0.98, SHAPE)
    y = rng.random(SHAPE)
    ignore = options.get("ignore_index")
    if ignore is not None:
        y[rng.random(SHAPE) < 0.2] = ignore
    return torch.tensor(x).to(dtype), torch.tensor(y).to(dtype)


def _weight(shape, dtype, seed):
    if shape is None:
        return None
    return torch.tensor(np.random.default_rng(seed).uniform(0.5, 2.0, shape)).to(dtype)


def _loss(kind, x, y, weight, pos_weight, reduction, options):
    if kind == "logits":
        return bce.binary_cross_entropy_with_logits(
            x, y, weight, reduction=reduction, pos_weight=pos_weight, **options
        )
    return bce.binary_cross_entropy(x, y, weight, reduction=reduction, **options)


def _step(kind, x, y, weight, pos_weight, reduction, options, target_grad: bool, backward: str):
    """One step; returns the loss and the gradients (on the Triton route: nothing read on the host)."""
    leaf = x.clone().requires_grad_(True)
    target = y.clone().requires_grad_(target_grad)
    loss = _loss(kind, leaf, target, weight, pos_weight, reduction, options)
    if backward == "backward":
        (loss.sum() if reduction == "none" else loss).backward()
    else:  # a grad_output that is not 1, as a GradScaler or a weighted sum of losses gives
        loss.backward(torch.full_like(loss, 0.75))
    return loss.detach(), leaf.grad, target.grad


def _cases():
    """Every (loss, dtype, reduction, weight form); the options, target gradients (every other case) and
    the two grad_outputs in turn across them."""
    combinations = itertools.product(("logits", "bce"), DTYPES, ("mean", "sum", "none"), WEIGHT_SHAPES)
    options = itertools.cycle(OPTIONS)
    for index, (kind, dtype, reduction, form) in enumerate(combinations):
        backward = ("backward", "scaled")[index // 2 % 2]
        yield kind, dtype, form, next(options), reduction, index % 2 == 0, backward


CASES = list(_cases())


def test_a_training_step_never_reads_the_device_on_the_host(host: _HostAccess) -> None:
    """Every (loss, dtype, reduction, weight form), every option, with and without target gradients, with
    ``loss.backward()`` and a grad_output of 0.75; pos_weight in the next form for the logits loss."""
    forms = list(WEIGHT_SHAPES)
    # the first call on a device makes its range counters (once per process): not a step
    bce.binary_cross_entropy(torch.full((4,), 0.5), torch.full((4,), 0.5))
    for kind, dtype_name, form, option, reduction, target_grad, backward in CASES:
        dtype, options = DTYPES[dtype_name], OPTIONS[option]
        x, y = _inputs(kind, dtype, options, seed=1)
        weight = _weight(WEIGHT_SHAPES[form], dtype, seed=2)
        pos_form = forms[(forms.index(form) + 1) % len(forms)]
        pos_weight = _weight(WEIGHT_SHAPES[pos_form], dtype, seed=3) if kind == "logits" else None
        host.recording = True
        try:
            _step(kind, x, y, weight, pos_weight, reduction, options, target_grad, backward)
        finally:
            host.recording = False
        assert not host.calls, (kind, dtype_name, form, option, reduction, host.calls)


def test_modules_and_a_second_backward_never_read_the_device(host: _HostAccess) -> None:
    bce.binary_cross_entropy(torch.full((4,), 0.5), torch.full((4,), 0.5))
    x, y = _inputs("logits", torch.float32, {}, seed=4)
    module = bce.BCEWithLogitsLoss(
        weight=_weight((SHAPE[1],), torch.float32, 5), pos_weight=_weight((SHAPE[1],), torch.float32, 6)
    )
    probability_module = bce.BCELoss(weight=_weight((SHAPE[0], 1), torch.float32, 7))
    host.recording = True
    for loss_module, inputs in ((module, x), (probability_module, torch.sigmoid(x))):
        leaf = inputs.clone().requires_grad_(True)
        loss = loss_module(leaf, y)
        loss.backward(retain_graph=True)
        loss.backward()
    host.recording = False
    assert not host.calls, host.calls


def test_the_host_access_check_sees_a_planted_read(host: _HostAccess, monkeypatch) -> None:
    """The check itself: a ``.item()`` or a ``torch.tensor`` in bcekit's launcher is found."""
    original = _triton.scale_unless_one

    def planted(grad, scale):
        torch.tensor([1.0])  # a host-data tensor
        if scale.item() != 1.0:  # a host read
            original(grad, scale)

    monkeypatch.setattr(_triton, "scale_unless_one", planted)
    monkeypatch.setattr(planted, "__code__", planted.__code__.replace(co_filename=_triton.__file__))
    x, y = _inputs("logits", torch.float32, {}, seed=8)
    host.recording = True
    _step("logits", x, y, None, None, "mean", {}, False, "backward")
    host.recording = False
    assert [call.split(" ")[0] for call in host.calls] == ["tensor", "item"]


# --------------------------------------------------------------------------------------------------------
# The fused backward rewrites the stored gradient in place, decided on the device
# --------------------------------------------------------------------------------------------------------


def _reference_step(kind, x, y, weight, pos_weight, reduction, options, grad_output):
    """The same step through the C++ kernels (the CPU route), float64 for a tight comparison."""
    leaf = x.double().requires_grad_(True)
    loss = _loss(
        kind,
        leaf,
        y.double(),
        None if weight is None else weight.double(),
        None if pos_weight is None else pos_weight.double(),
        reduction,
        options,
    )
    loss.backward(torch.full_like(loss, grad_output))
    return leaf.grad


@pytest.mark.parametrize("kind", ["logits", "bce"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("option", ["plain", "ignore"])
def test_each_backward_of_a_retained_graph_gets_its_own_gradient(triton_route, kind, dtype, option) -> None:
    """``loss.backward(g1, retain_graph=True)`` then ``loss.backward(g2)``: the first rewrites the stored
    gradient (untouched for g1 = 1, scaled or recomputed otherwise), the second recomputes it, so each
    equals its own grad_output's gradient (not g1 g2's, not the stored one's), and writing into the
    first one's result does not change the second."""
    torch_dtype, options = DTYPES[dtype], OPTIONS[option]
    x, y = _inputs(kind, torch_dtype, options, seed=9)
    weight = _weight((SHAPE[1],), torch_dtype, 10)
    tolerance = (
        {"rtol": 2e-2, "atol": 1e-6} if torch_dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-8}
    )
    for first, second in ((1.0, 2.5), (2.5, 1.0), (0.75, 0.75)):
        leaf = x.clone().requires_grad_(True)
        loss = _loss(kind, leaf, y, weight, None, "mean", options)
        (grad_first,) = torch.autograd.grad(
            loss, leaf, torch.tensor(first, dtype=torch_dtype), retain_graph=True
        )
        expected_first = _reference_step(kind, x, y, weight, None, "mean", options, first)
        torch.testing.assert_close(grad_first.double(), expected_first, **tolerance)
        grad_first.mul_(100.0)
        (grad_second,) = torch.autograd.grad(loss, leaf, torch.tensor(second, dtype=torch_dtype))
        expected_second = _reference_step(kind, x, y, weight, None, "mean", options, second)
        torch.testing.assert_close(grad_second.double(), expected_second, **tolerance)


def test_a_grad_output_of_one_leaves_the_stored_gradient_untouched(triton_route, monkeypatch) -> None:
    """``loss.backward()``: the scale kernel runs (nothing is asked on the host) and writes nothing; the
    gradient autograd gets is the buffer the forward pass filled."""
    launched = []
    original = _triton._launch

    def record(kernel, grid, *args, **kwargs):
        launched.append(kernel.fn.__name__)
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_triton, "_launch", record)
    x, y = _inputs("logits", torch.float32, {}, seed=11)
    leaf = x.clone().requires_grad_(True)
    loss = bce.binary_cross_entropy_with_logits(leaf, y)
    stored = loss.grad_fn.stored.data_ptr()  # (a reference held would make autograd copy it)
    loss.backward()
    assert launched == ["_bce_kernel", "_scale_kernel"]
    assert leaf.grad.data_ptr() == stored


def test_the_scale_kernel_writes_only_when_the_scale_is_not_one(triton_route) -> None:
    for dtype in (torch.float32, torch.float64):
        grad = torch.full((3000,), math.nan, dtype=dtype)
        _triton.scale_unless_one(grad, torch.ones(1, dtype=dtype))
        assert grad.isnan().all()  # not read, not written
        grad = torch.arange(3000, dtype=dtype)
        _triton.scale_unless_one(grad, torch.full((1,), -0.5, dtype=dtype))
        assert torch.equal(grad, torch.arange(3000, dtype=dtype) * -0.5)


@pytest.mark.parametrize("kind", ["logits", "bce"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_losses_rewrite_the_stored_gradient_for_any_grad_output(triton_route, kind, dtype, n) -> None:
    """One element: its grad_output is read as one per element (the kernel's other backward), where the
    skip-when-1 rule does not apply; the gradient must still follow grad_output."""
    torch_dtype = DTYPES[dtype]
    x = torch.tensor([0.3, -1.2][:n]) if kind == "logits" else torch.tensor([0.3, 0.8][:n])
    x, y = x.to(torch_dtype), torch.tensor([1.0, 0.25][:n]).to(torch_dtype)
    for grad_output in (1.0, 2.5):
        leaf = x.clone().requires_grad_(True)
        _loss(kind, leaf, y, None, None, "mean", {}).backward(torch.tensor(grad_output, dtype=torch_dtype))
        expected = _reference_step(kind, x, y, None, None, "mean", {}, grad_output)
        torch.testing.assert_close(leaf.grad.double(), expected, rtol=1e-2, atol=1e-6)
