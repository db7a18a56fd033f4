"""Parity of bcekit.torch's functionals with torch.nn.functional: values, dtypes, shapes, gradients, errors.

The reference is torch itself, evaluated in float64 on the same data (torch's semantics, computed without
the rounding of low precisions); bcekit must match it to a few ulp of the tested dtype, and produce the
dtype and shape that torch produces in that dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bcekit.torch as bce
from _cases import Case, cases

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _tensor(
    array, dtype: torch.dtype, layout: str = "contiguous", requires_grad: bool = False
) -> torch.Tensor:
    """``array``'s values in ``dtype``, laid out as ``layout`` says (see ``_cases.LAYOUTS``)."""
    values = torch.tensor(array, dtype=torch.float64).to(dtype)
    if layout == "transposed":
        leaf = values.transpose(0, 1).contiguous().requires_grad_(requires_grad)
        return leaf.transpose(0, 1)
    if layout == "strided":
        leaf = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=dtype)
        leaf[..., ::2] = values
        return leaf.requires_grad_(requires_grad)[..., ::2]
    if layout == "broadcast":
        return values[:1].clone().requires_grad_(requires_grad).expand(values.shape)
    return values.requires_grad_(requires_grad)


def _tolerances(dtype: torch.dtype) -> dict[str, float]:
    eps = torch.finfo(dtype).eps
    # atol covers the float64 reference's own cancellation in torch's logits formula (~1e-14 |x|) and
    # sums of many half-precision terms.
    return {"rtol": 4 * eps, "atol": 4 * eps if dtype in (torch.float16, torch.bfloat16) else 1e-12}


def _args(case: Case, dtype: torch.dtype, grad: bool = False):
    x = _tensor(case.input, dtype, case.layout, grad)
    y = _tensor(case.target, dtype, case.layout, grad)
    w = None if case.weight is None else _tensor(case.weight, dtype)
    p = None if case.pos_weight is None else _tensor(case.pos_weight, dtype)
    return x, y, w, p


def _check_case(case: Case, logits: bool) -> None:
    dtype = DTYPES[case.dtype]
    x, y, w, p = _args(case, dtype, grad=True)
    # the reference sees the very same (rounded) numbers, in float64
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    w64, p64 = (None if t is None else t.double() for t in (w, p))
    if logits:
        ours = bce.binary_cross_entropy_with_logits(x, y, w, reduction=case.reduction, pos_weight=p)
        reference = F.binary_cross_entropy_with_logits(
            x64, y64, w64, reduction=case.reduction, pos_weight=p64
        )
        theirs = F.binary_cross_entropy_with_logits(
            x.detach(), y.detach(), w, reduction=case.reduction, pos_weight=p
        )
    else:
        ours = bce.binary_cross_entropy(x, y, w, reduction=case.reduction)
        reference = F.binary_cross_entropy(x64, y64, w64, reduction=case.reduction)
        theirs = F.binary_cross_entropy(x.detach(), y.detach(), w, reduction=case.reduction)

    assert ours.dtype == theirs.dtype
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.double(), reference.detach(), equal_nan=True, **_tolerances(dtype))

    if ours.numel() == 0 or not reference.isfinite().all():
        return
    grad_output = torch.rand_like(reference, dtype=torch.float64) + 0.5
    ours_grads = torch.autograd.grad(ours, (x, y), grad_output.to(ours.dtype))
    reference_grads = torch.autograd.grad(reference, (x64, y64), grad_output)
    for mine, expected, name in zip(ours_grads, reference_grads, ("input", "target"), strict=True):
        assert mine.dtype == dtype and mine.shape == x.shape, name
        # the target gradient is -logit(x): infinite at x = 0 and 1 (as torch's)
        assert torch.equal(mine.isinf(), expected.to(dtype).isinf()), name
        finite = expected.to(dtype).isfinite()
        torch.testing.assert_close(
            mine.double()[finite],
            expected[finite],
            **_tolerances(dtype),
            msg=lambda message, name=name: f"{name}: {message}",
        )


@settings(max_examples=300, deadline=None)
@given(cases(logits=True))
def test_logits_loss_matches_torch(case: Case) -> None:
    _check_case(case, logits=True)


@settings(max_examples=300, deadline=None)
@given(cases(logits=False))
def test_probability_loss_matches_torch(case: Case) -> None:
    _check_case(case, logits=False)


# --------------------------------------------------------------------------------------------------------
# Legacy size_average / reduce
# --------------------------------------------------------------------------------------------------------

LEGACY = [None, True, False]


def _call_recording(function, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(*args, **kwargs)
    return result, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("size_average", LEGACY)
@pytest.mark.parametrize("reduce", LEGACY)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "elementwise_mean"])
@pytest.mark.parametrize("logits", [False, True])
def test_legacy_reduction_arguments_match_torch(size_average, reduce, reduction, logits) -> None:
    x, y = torch.rand(4, 3), torch.rand(4, 3)
    ours_fn, torch_fn = (
        (bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits)
        if logits
        else (bce.binary_cross_entropy, F.binary_cross_entropy)
    )
    kwargs = {"size_average": size_average, "reduce": reduce, "reduction": reduction}
    ours, our_warnings = _call_recording(ours_fn, x, y, **kwargs)
    theirs, their_warnings = _call_recording(torch_fn, x, y, **kwargs)
    assert our_warnings == their_warnings
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)


# --------------------------------------------------------------------------------------------------------
# Errors: same exception type, same text
# --------------------------------------------------------------------------------------------------------


def _raised(function, *args, **kwargs) -> tuple[type, str] | None:
    try:
        function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(error), str(error)
    return None


def _assert_same_error(ours_fn, torch_fn, *args, **kwargs) -> None:
    theirs = _raised(torch_fn, *args, **kwargs)
    assert theirs is not None, "the case must be an error in torch"
    assert _raised(ours_fn, *args, **kwargs) == theirs


BOTH = [
    (bce.binary_cross_entropy, F.binary_cross_entropy),
    (bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
]
PROBABILITY = BOTH[:1]
LOGITS = BOTH[1:]


@pytest.mark.parametrize("functions", BOTH)
@given(
    input_shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    target_shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
)
@settings(max_examples=40, deadline=None)
def test_target_size_mismatch(functions, input_shape, target_shape) -> None:
    if input_shape == target_shape:
        target_shape = (*target_shape, 2)
    _assert_same_error(*functions, torch.rand(input_shape), torch.rand(target_shape))


@pytest.mark.parametrize("functions", BOTH)
@pytest.mark.parametrize("reduction", ["foo", "MEAN", "", "avg"])
def test_invalid_reduction(functions, reduction) -> None:
    _assert_same_error(*functions, torch.rand(3), torch.rand(3), reduction=reduction)


@pytest.mark.parametrize("functions", BOTH)
@pytest.mark.parametrize("argument", ["weight", "pos_weight"])
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    other=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
)
@settings(max_examples=60, deadline=None)
def test_weight_not_broadcastable_or_wider(functions, argument, shape, other) -> None:
    if argument == "pos_weight" and functions is BOTH[0]:
        return
    try:
        if torch.broadcast_shapes(shape, other) == torch.Size(shape):
            return  # a valid weight: nothing to compare
    except RuntimeError:
        pass
    _assert_same_error(*functions, torch.rand(shape), torch.rand(shape), **{argument: torch.rand(other)})


@pytest.mark.parametrize("functions", BOTH)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_floating_targets(functions, target_dtype) -> None:
    _assert_same_error(*functions, torch.rand(4), torch.ones(4, dtype=target_dtype))


@pytest.mark.parametrize("functions", BOTH)
@pytest.mark.parametrize("input_dtype", [torch.int64, torch.complex64])
def test_non_real_inputs(functions, input_dtype) -> None:
    _assert_same_error(*functions, torch.ones(4, dtype=input_dtype), torch.ones(4, dtype=input_dtype))


@pytest.mark.parametrize(
    ("input_dtype", "target_dtype"),
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float32, torch.int64),
    ],
)
def test_probability_loss_mixed_dtypes(input_dtype, target_dtype) -> None:
    _assert_same_error(*PROBABILITY[0], torch.rand(4, dtype=input_dtype), torch.rand(4).to(target_dtype))


@pytest.mark.parametrize(
    ("input_dtype", "target_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float16, torch.bfloat16)],
)
def test_logits_loss_mixed_dtypes_follow_torch_promotion(input_dtype, target_dtype) -> None:
    x, y = torch.randn(5, dtype=input_dtype), torch.rand(5, dtype=target_dtype)
    ours = bce.binary_cross_entropy_with_logits(x, y, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert ours.dtype == theirs.dtype
    reference = F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none")
    torch.testing.assert_close(ours.double(), reference, **_tolerances(theirs.dtype))


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["input", "target"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probabilities_outside_unit_interval(bad, which, dtype) -> None:
    x, y = torch.rand(6, dtype=dtype), torch.rand(6, dtype=dtype)
    (x if which == "input" else y)[3] = bad
    _assert_same_error(*PROBABILITY[0], x, y)


def test_input_range_is_checked_before_target_range() -> None:
    _assert_same_error(*PROBABILITY[0], torch.tensor([2.0]), torch.tensor([2.0]))


@pytest.mark.parametrize("functions", BOTH)
@pytest.mark.parametrize("argument", ["weight", "pos_weight"])
def test_weights_that_require_grad_are_refused(functions, argument) -> None:
    if argument == "pos_weight" and functions is BOTH[0]:
        return
    weight = torch.rand(3, requires_grad=True)
    _assert_same_error(*functions, torch.rand(3), torch.rand(3), **{argument: weight})
    with torch.no_grad():  # torch only refuses when it would record a graph
        functions[0](torch.rand(3), torch.rand(3), **{argument: weight})


def test_non_tensor_arguments_get_a_type_error() -> None:
    with pytest.raises(TypeError, match="argument 'target' .* must be Tensor, not list"):
        bce.binary_cross_entropy(torch.rand(2), [0.0, 1.0])


@pytest.mark.parametrize("argument", ["input", "target", "weight", "pos_weight"])
@pytest.mark.parametrize("value", [None, [0.5, 0.5]], ids=["None", "list"])
def test_a_missing_or_non_tensor_argument_is_named(argument, value) -> None:
    """torch fails on these with an AttributeError from inside; bcekit names the argument and its place in
    the signature. None is refused only where the argument is not optional."""
    arguments = {"input": torch.rand(2), "target": torch.rand(2), "weight": None, "pos_weight": None}
    arguments[argument] = value
    positions = {"input": 1, "target": 2, "weight": 3, "pos_weight": 7}
    for fn in (bce.binary_cross_entropy, bce.binary_cross_entropy_with_logits):
        given = {
            k: v for k, v in arguments.items() if not (fn is bce.binary_cross_entropy and k == "pos_weight")
        }
        if argument not in given:
            continue
        if value is None and argument in ("weight", "pos_weight"):
            fn(**given)  # optional: None is its default
            continue
        name = type(value).__name__
        place = f"argument '{argument}' \\(position {positions[argument]}\\)"
        pattern = f"{fn.__name__}\\(\\): {place} must be Tensor, not {name}"
        with pytest.raises(TypeError, match=pattern):
            fn(**given)
        if value is None:  # torch's own failure, for the record: not a TypeError naming the argument
            torch_fn = getattr(F, fn.__name__)
            with pytest.raises(AttributeError):
                torch_fn(**given)


# --------------------------------------------------------------------------------------------------------
# Where torch is wrong: infinite logits, autocast
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pos_weight", [None, 2.5])
def test_infinite_logits(dtype, pos_weight) -> None:
    inf = float("inf")
    x = torch.tensor([inf, -inf, inf, -inf, inf, -inf], dtype=dtype, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5], dtype=dtype)
    p = None if pos_weight is None else torch.tensor(pos_weight, dtype=dtype)
    loss = bce.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=p)
    expected = torch.tensor([0.0, 0.0, inf, inf, inf, inf], dtype=dtype)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert grad.isfinite().all()
    # the gradient's limit as x -> +inf is 1 - y, as x -> -inf it is -p y
    pw = 1.0 if pos_weight is None else pos_weight
    limit = torch.where(x.detach() > 0, 1 - y, -pw * y)
    torch.testing.assert_close(grad, limit)


def test_torch_itself_gives_nan_for_infinite_logits() -> None:
    """Documents the difference the README claims; fails if torch fixes it (then update the README)."""
    x, y = torch.tensor([float("inf")]), torch.tensor([1.0])
    assert F.binary_cross_entropy_with_logits(x, y).isnan().all()
    assert bce.binary_cross_entropy_with_logits(x, y) == 0


@pytest.mark.parametrize("functions", BOTH)
def test_autocast_cpu_computes_in_float32(functions) -> None:
    layer = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.rand(5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert out.dtype == torch.bfloat16
        if functions is BOTH[0]:
            out = torch.sigmoid(out)
        ours = functions[0](out, y)
        theirs = functions[1](out, y)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
