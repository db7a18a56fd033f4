"""The framework-free rules, checked against torch's own implementation of each."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import _reduction as torch_reduction

from bcekit import _semantics

small_shapes = st.lists(st.integers(0, 4), max_size=4).map(tuple)


def _outcome(function, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = function(*args)
        except Exception as error:  # noqa: BLE001 - compared, not swallowed
            result = (type(error), str(error))
    return result, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_truth_table_and_warning_match_torch(size_average, reduce) -> None:
    assert _outcome(_semantics.legacy_reduction, size_average, reduce) == _outcome(
        torch_reduction.legacy_get_string, size_average, reduce
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "elementwise_mean", "foo", "Mean", ""])
def test_reduction_enum_matches_torch(reduction) -> None:
    assert _outcome(_semantics.reduction_enum, reduction) == _outcome(torch_reduction.get_enum, reduction)


def test_resolve_reduction_legacy_overrides_reduction() -> None:
    with pytest.warns(UserWarning):
        assert _semantics.resolve_reduction(None, False, "sum") == _semantics.NONE
    assert _semantics.resolve_reduction(None, None, "sum") == _semantics.SUM


@settings(max_examples=300, deadline=None)
@given(a=small_shapes, b=small_shapes)
def test_infer_size_matches_tensor_iterator(a, b) -> None:
    def torch_infer(a, b):
        return tuple((torch.empty(a) + torch.empty(b)).shape)

    assert _outcome(_semantics._infer_size, a, b) == _outcome(torch_infer, a, b)


@settings(max_examples=300, deadline=None)
@given(a=small_shapes, b=small_shapes)
def test_broadcast_shapes_matches_torch(a, b) -> None:
    def ours(a, b):
        return _semantics._broadcast_shapes((a, b), lambda s: str(torch.Size(s)))

    def theirs(a, b):
        return tuple(torch.broadcast_shapes(torch.Size(a), torch.Size(b)))

    assert _outcome(ours, a, b) == _outcome(theirs, a, b)


def test_compute_precision() -> None:
    assert _semantics.compute_precision(16) == 32
    assert _semantics.compute_precision(32) == 64
    assert _semantics.compute_precision(64) == 64
