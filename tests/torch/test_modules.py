"""The nn.Module forms: buffers, state_dict, device/dtype moves, reduction attribute, legacy mapping."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bcekit.torch as bce

PAIRS = [(bce.BCELoss, nn.BCELoss), (bce.BCEWithLogitsLoss, nn.BCEWithLogitsLoss)]


def _weights(ours_cls) -> dict[str, torch.Tensor]:
    weights = {"weight": torch.rand(3)}
    if ours_cls is bce.BCEWithLogitsLoss:
        weights["pos_weight"] = torch.rand(3) + 0.5
    return weights


@pytest.mark.parametrize(("ours_cls", "torch_cls"), PAIRS)
def test_buffers_and_state_dict_match_torch(ours_cls, torch_cls) -> None:
    weights = _weights(ours_cls)
    ours, theirs = ours_cls(**weights), torch_cls(**weights)
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    # a state_dict saved from torch's module loads into ours
    fresh = ours_cls(**{name: torch.zeros(3) for name in weights})
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, weights["weight"])
    assert list(ours.parameters()) == []


@pytest.mark.parametrize(("ours_cls", "torch_cls"), PAIRS)
def test_is_a_torch_loss_module_as_torchs_is(ours_cls, torch_cls) -> None:
    """Frameworks look for ``torch.nn.modules.loss._Loss`` to find a model's criterion."""
    assert isinstance(torch_cls(), torch.nn.modules.loss._Loss)
    assert isinstance(ours_cls(), torch.nn.modules.loss._Loss)


def test_the_focal_loss_module_is_a_torch_loss_module_too() -> None:
    focal = bce.SigmoidFocalLoss(reduction="sum")
    assert isinstance(focal, torch.nn.modules.loss._Loss) and focal.reduction == "sum"


@pytest.mark.parametrize(("ours_cls", "torch_cls"), PAIRS)
def test_without_weights_state_dict_is_empty_like_torch(ours_cls, torch_cls) -> None:
    assert ours_cls().state_dict().keys() == torch_cls().state_dict().keys() == set()


@pytest.mark.parametrize(("ours_cls", "torch_cls"), PAIRS)
def test_buffers_follow_double_and_to(ours_cls, torch_cls) -> None:
    module = ours_cls(**_weights(ours_cls)).double()
    assert all(buffer.dtype == torch.float64 for buffer in module.buffers())
    module = module.to(torch.float16)
    assert all(buffer.dtype == torch.float16 for buffer in module.buffers())
    module = module.to("meta")
    assert all(buffer.device.type == "meta" for buffer in module.buffers())


@pytest.mark.parametrize(("ours_cls", "torch_cls"), PAIRS)
@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reduction_attribute_and_legacy_warning(ours_cls, torch_cls, size_average, reduce, reduction) -> None:
    def build(cls):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = cls(size_average=size_average, reduce=reduce, reduction=reduction)
        return module, [(w.category, str(w.message)) for w in caught]

    (ours, our_warnings), (theirs, their_warnings) = build(ours_cls), build(torch_cls)
    assert ours.reduction == theirs.reduction
    assert our_warnings == their_warnings


@pytest.mark.parametrize(("ours_cls", "torch_cls"), PAIRS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_forward_matches_torch(ours_cls, torch_cls, reduction) -> None:
    weights = _weights(ours_cls)
    x = torch.rand(4, 3) if ours_cls is bce.BCELoss else torch.randn(4, 3) * 3
    y = torch.rand(4, 3)
    ours = ours_cls(reduction=reduction, **weights)(x, y)
    theirs = torch_cls(reduction=reduction, **weights)(x, y)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(("ours_cls", "torch_cls"), PAIRS)
def test_invalid_reduction_is_accepted_at_construction_and_refused_at_call(ours_cls, torch_cls) -> None:
    ours, theirs = ours_cls(reduction="bogus"), torch_cls(reduction="bogus")
    x = torch.rand(3)
    with pytest.raises(ValueError) as our_error:
        ours(x, x)
    with pytest.raises(ValueError) as their_error:
        theirs(x, x)
    assert str(our_error.value) == str(their_error.value)


def test_repr_is_torchs() -> None:
    assert repr(bce.BCELoss()) == repr(nn.BCELoss())
    assert repr(bce.BCEWithLogitsLoss()) == repr(nn.BCEWithLogitsLoss())
