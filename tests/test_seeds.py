"""The examples of the four seed documents, and every docstring example of the package (doctests)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcekit.numpy
import bcekit.torch
import bcekit.torch.functional
import bcekit.torch.modules
from bcekit.torch import BCELoss, BCEWithLogitsLoss


@pytest.mark.parametrize(
    "module",
    [bcekit.numpy, bcekit.torch, bcekit.torch.functional, bcekit.torch.modules],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_pytorch_bceloss_docs_example() -> None:
    torch.manual_seed(0)
    m = torch.nn.Sigmoid()
    loss = BCELoss()
    input = torch.randn(3, requires_grad=True)
    target = torch.empty(3).random_(2)
    output = loss(m(input), target)
    output.backward()
    reference_input = input.detach().clone().requires_grad_()
    reference = torch.nn.BCELoss()(m(reference_input), target)
    reference.backward()
    torch.testing.assert_close(output, reference)
    torch.testing.assert_close(input.grad, reference_input.grad)


def test_r_torch_nn_bce_loss_example_with_soft_targets() -> None:
    torch.manual_seed(1)
    m = torch.nn.Sigmoid()
    input = torch.randn(3, requires_grad=True)
    target = torch.rand(3)  # R's example uses soft targets: torch_rand(3)
    output = BCELoss()(m(input), target)
    output.backward()
    p = torch.sigmoid(input.detach()).double()
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(output.double(), expected, rtol=1e-6, atol=0)


def test_r_torch_pos_weight_example_prints_0_201413() -> None:
    target = torch.ones(10, 64, dtype=torch.float32)  # 64 classes, batch size = 10
    output = torch.full((10, 64), 1.5)  # a prediction (logit)
    pos_weight = torch.ones(64)  # all weights are equal to 1
    criterion = BCEWithLogitsLoss(pos_weight=pos_weight)
    loss = criterion(output, target)
    assert f"{loss.item():.6f}" == "0.201413"
    assert loss.item() == pytest.approx(-np.log(1 / (1 + np.exp(-1.5))), rel=1e-7)


def test_r_torch_bce_with_logits_first_example() -> None:
    torch.manual_seed(2)
    input = torch.randn(3, requires_grad=True)
    target = torch.empty(3).random_(1, 2)  # R's random_(1, 2): all ones
    output = BCEWithLogitsLoss()(input, target)
    output.backward()
    torch.testing.assert_close(output, F.binary_cross_entropy_with_logits(input, target))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_note_identity_for_hard_labels(backend) -> None:
    """The note's three equal forms, for hard labels:
    BCEWithLogits(o) = BCE(sigmoid(o)) = -where(y == 1, p, 1 - p).log().mean()."""
    torch.manual_seed(3)
    outputs = torch.randn(64, 5, dtype=torch.float64) * 3
    labels = torch.randint(0, 2, (64, 5)).double()
    p = torch.sigmoid(outputs)
    fastai_style = -torch.where(labels == 1, p, 1 - p).log().mean()
    if backend == "torch":
        with_logits = bcekit.torch.binary_cross_entropy_with_logits(outputs, labels)
        on_probabilities = bcekit.torch.binary_cross_entropy(p, labels)
    else:
        with_logits = torch.from_numpy(
            np.asarray(bcekit.numpy.binary_cross_entropy_with_logits(outputs.numpy(), labels.numpy()))
        )
        on_probabilities = torch.from_numpy(
            np.asarray(bcekit.numpy.binary_cross_entropy(p.numpy(), labels.numpy()))
        )
    torch.testing.assert_close(with_logits, fastai_style, rtol=1e-12, atol=0)
    torch.testing.assert_close(on_probabilities, fastai_style, rtol=1e-12, atol=0)
