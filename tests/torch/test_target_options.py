"""label_smoothing and ignore_index, in both backends, against references composed in float64 torch.

The references use torch.nn.functional on Keras's smoothed targets ``y (1 - s) + s / 2`` and drop ignored
elements by masking torch's per-element loss; the mean divides by the number of elements kept.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bcekit.numpy as bnp
import bcekit.torch as bce
from _cases import Case, cases

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _kept(y: torch.Tensor, ignore_index: float | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(y, dtype=torch.bool)
    return ~torch.isnan(y) if math.isnan(ignore_index) else y != ignore_index


def _reference(logits: bool, x, y, w, p, reduction: str, label_smoothing: float, ignore_index):
    kept = _kept(y, ignore_index)
    smoothed = torch.where(kept, y, 0.0) * (1 - label_smoothing) + 0.5 * label_smoothing
    if logits:
        per_element = F.binary_cross_entropy_with_logits(x, smoothed, w, reduction="none", pos_weight=p)
    else:
        per_element = F.binary_cross_entropy(x, smoothed, w, reduction="none")
    per_element = torch.where(kept, per_element, 0.0)
    if reduction == "none":
        return per_element
    total = per_element.sum()
    return total / kept.sum() if reduction == "mean" else total


@st.composite
def option_cases(draw: st.DrawFn, logits: bool) -> tuple[Case, float, float | None]:
    case = draw(cases(logits=logits, dtypes=("float32", "float64", "bfloat16")))
    label_smoothing = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    ignore_index = draw(st.sampled_from([None, -1.0, 0.0, float("nan")]))
    if ignore_index is not None and case.target.size:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        target = case.target.copy()
        marker = 0.0 if ignore_index == 0.0 else ignore_index
        target[rng.random(target.shape) < 0.3] = marker
        case.target = target
    return case, label_smoothing, ignore_index


def _tensors(case: Case, dtype: torch.dtype):
    x = torch.tensor(case.input, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.tensor(case.target, dtype=torch.float64).to(dtype).requires_grad_()
    w = None if case.weight is None else torch.tensor(case.weight).to(dtype)
    p = None if case.pos_weight is None else torch.tensor(case.pos_weight).to(dtype)
    return x, y, w, p


def _check(case: Case, label_smoothing: float, ignore_index, logits: bool) -> None:
    dtype = DTYPES[case.dtype]
    x, y, w, p = _tensors(case, dtype)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    w64, p64 = (None if t is None else t.double() for t in (w, p))
    options = {"label_smoothing": label_smoothing, "ignore_index": ignore_index}
    if logits:
        ours = bce.binary_cross_entropy_with_logits(
            x, y, w, reduction=case.reduction, pos_weight=p, **options
        )
    else:
        ours = bce.binary_cross_entropy(x, y, w, reduction=case.reduction, **options)
    reference = _reference(logits, x64, y64, w64, p64, case.reduction, label_smoothing, ignore_index)

    eps = torch.finfo(dtype).eps
    tolerance = {"rtol": 4 * eps, "atol": 4 * eps if dtype == torch.bfloat16 else 1e-12}
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours.double(), reference.detach(), equal_nan=True, **tolerance)

    # NumPy backend: same numbers (no bfloat16 in NumPy)
    if dtype != torch.bfloat16:
        arrays = [None if t is None else t.detach().numpy() for t in (x, y, w, p)]
        if logits:
            theirs = bnp.binary_cross_entropy_with_logits(
                arrays[0], arrays[1], arrays[2], reduction=case.reduction, pos_weight=arrays[3], **options
            )
        else:
            theirs = bnp.binary_cross_entropy(
                arrays[0], arrays[1], arrays[2], reduction=case.reduction, **options
            )
        np.testing.assert_allclose(
            np.asarray(theirs, dtype=np.float64), reference.detach().numpy(), **tolerance
        )

    kept = _kept(y64.detach(), ignore_index)
    if reference.numel() == 0 or not reference.isfinite().all() or not kept.any():
        return
    grad_output = torch.rand_like(reference) + 0.5
    mine = torch.autograd.grad(ours, (x, y), grad_output.to(ours.dtype))
    expected = torch.autograd.grad(reference, (x64, y64), grad_output)
    for name, g, e in zip(("input", "target"), mine, expected, strict=True):
        assert torch.equal(g.double()[~kept], torch.zeros_like(e[~kept])), f"{name}: ignored elements"
        finite = e.isfinite() & kept
        torch.testing.assert_close(
            g.double()[finite], e[finite], **tolerance, msg=lambda m, n=name: f"{n}: {m}"
        )


@settings(max_examples=200, deadline=None)
@given(option_cases(logits=True))
def test_logits_loss_options_match_reference(drawn) -> None:
    _check(*drawn, logits=True)


@settings(max_examples=200, deadline=None)
@given(option_cases(logits=False))
def test_probability_loss_options_match_reference(drawn) -> None:
    _check(*drawn, logits=False)


# --------------------------------------------------------------------------------------------------------
# Label smoothing: Keras's definition, values, validation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_keras_definition_on_hard_labels(smoothing) -> None:
    """Hard 1 and 0 become 1 - s/2 and s/2: with s = 1 every target is 1/2 and the loss is log 2 at x = 0."""
    x, y = torch.zeros(4, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    loss = bce.binary_cross_entropy_with_logits(x, y, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(loss, torch.full_like(x, math.log(2)))  # at x = 0 every target costs log 2
    x = torch.tensor([3.0, 3.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = bce.binary_cross_entropy_with_logits(x, y, label_smoothing=smoothing, reduction="none")
    targets = torch.tensor([1 - smoothing / 2, smoothing / 2], dtype=torch.float64)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(x, targets, reduction="none"))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_label_smoothing_outside_unit_interval_raises(bad) -> None:
    x, y = torch.rand(3), torch.rand(3)
    for call in (
        lambda: bce.binary_cross_entropy(x, y, label_smoothing=bad),
        lambda: bce.binary_cross_entropy_with_logits(x, y, label_smoothing=bad),
        lambda: bce.BCELoss(label_smoothing=bad),
        lambda: bce.BCEWithLogitsLoss(label_smoothing=bad),
        lambda: bnp.binary_cross_entropy(x.numpy(), y.numpy(), label_smoothing=bad),
        lambda: bnp.binary_cross_entropy_with_logits(x.numpy(), y.numpy(), label_smoothing=bad),
    ):
        with pytest.raises(ValueError, match="label_smoothing must be a number in \\[0, 1\\]"):
            call()


def test_options_are_keyword_only() -> None:
    x, y = torch.rand(3), torch.rand(3)
    with pytest.raises(TypeError):
        bce.binary_cross_entropy_with_logits(x, y, None, None, None, "mean", None, 0.1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        bce.BCELoss(None, None, None, "mean", 0.1)  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------
# ignore_index: counts, all ignored, range check, modules
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits", [False, True])
def test_all_ignored_is_like_an_empty_input(logits) -> None:
    x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.full((2, 3), -1.0, dtype=torch.float64)
    function = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
    empty = function(torch.rand(0, dtype=torch.float64), torch.rand(0, dtype=torch.float64))
    mean = function(x, y, ignore_index=-1)
    assert mean.isnan() and empty.isnan()
    (grad,) = torch.autograd.grad(mean, x)
    assert torch.equal(grad, torch.zeros_like(grad))  # zero, not NaN: a fully ignored batch is harmless
    assert function(x, y, ignore_index=-1, reduction="sum") == 0
    assert torch.equal(function(x, y, ignore_index=-1, reduction="none"), torch.zeros_like(x))
    numpy_function = bnp.binary_cross_entropy_with_logits if logits else bnp.binary_cross_entropy
    assert np.isnan(numpy_function(x.detach().numpy(), y.numpy(), ignore_index=-1))


def test_mean_divides_by_kept_count_not_by_weights() -> None:
    x = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, -1.0, -1.0], dtype=torch.float64)
    weight = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    loss = bce.binary_cross_entropy_with_logits(x, y, weight, ignore_index=-1)
    torch.testing.assert_close(loss, torch.tensor((2 + 3) * math.log(2) / 2, dtype=torch.float64))


def test_probability_target_check_skips_ignored_elements_only() -> None:
    x = torch.tensor([0.2, 0.7, 0.5])
    y = torch.tensor([0.0, 1.0, 255.0])
    bce.binary_cross_entropy(x, y, ignore_index=255)  # the ignored 255 is not a bad target
    bnp.binary_cross_entropy(x.numpy(), y.numpy(), ignore_index=255)
    with pytest.raises(RuntimeError, match="all elements of target should be between 0 and 1"):
        bce.binary_cross_entropy(x, y, ignore_index=-1)
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        bce.binary_cross_entropy(torch.tensor([2.0, 0.5]), torch.tensor([255.0, 1.0]), ignore_index=255)


def test_nan_marks_missing_labels_when_ignore_index_is_nan() -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)
    loss = bce.binary_cross_entropy_with_logits(x, y, ignore_index=float("nan"), reduction="sum")
    expected = F.binary_cross_entropy_with_logits(x[[0, 2]], y[[0, 2]], reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert bce.binary_cross_entropy_with_logits(x, y, reduction="sum").isnan()  # without it NaN propagates


@pytest.mark.parametrize("module", [bce.BCELoss, bce.BCEWithLogitsLoss])
def test_modules_store_and_apply_the_options(module) -> None:
    criterion = module(label_smoothing=0.2, ignore_index=-1.0)
    assert criterion.label_smoothing == 0.2 and criterion.ignore_index == -1.0
    assert "label_smoothing=0.2" in repr(criterion) and "ignore_index=-1.0" in repr(criterion)
    x = torch.rand(5, dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    functional = bce.binary_cross_entropy if module is bce.BCELoss else bce.binary_cross_entropy_with_logits
    torch.testing.assert_close(criterion(x, y), functional(x, y, label_smoothing=0.2, ignore_index=-1.0))


def test_options_compile_without_graph_breaks() -> None:
    def step(x, y):
        return bce.binary_cross_entropy_with_logits(x, y, label_smoothing=0.1, ignore_index=-1.0)

    x = torch.randn(6, requires_grad=True)
    y = torch.tensor([1.0, 0.0, -1.0, 1.0, 0.5, -1.0])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    (expected_grad,) = torch.autograd.grad(step(x, y), x)
    torch.testing.assert_close(loss, step(x, y))
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("logits", [False, True])
def test_gradcheck_with_options(logits) -> None:
    x = torch.rand(4, 3, dtype=torch.float64) * 0.8 + 0.1
    if logits:
        x = x * 8 - 4
    x.requires_grad_()
    y = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    ignored = y.detach().clone()
    ignored[0] = -1.0
    weight = torch.rand(3, dtype=torch.float64) + 0.1
    function = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy

    def smoothed(x, y):
        return function(x, y, weight, label_smoothing=0.3)

    def smoothed_and_ignoring(x):  # the target stays fixed: nudging an ignored -1 would un-ignore it
        return function(x, ignored, weight, label_smoothing=0.3, ignore_index=-1.0)

    assert torch.autograd.gradcheck(smoothed, (x, y))
    assert torch.autograd.gradgradcheck(smoothed, (x, y))
    assert torch.autograd.gradcheck(smoothed_and_ignoring, (x,))
    assert torch.autograd.gradgradcheck(smoothed_and_ignoring, (x,))
