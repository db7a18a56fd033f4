"""Convergence tests: training with bcekit's losses follows the same trajectory as with torch.nn's.

In the style of Liger-Kernel's convergence tests: one small model, one seed, synthetic data generated here;
two deep copies of the model are trained step for step, one with the ``torch.nn`` loss, one with the
``bcekit.torch`` drop-in constructed with the same arguments, and the loss curves and final parameters
must agree to float32 round-off. The optimizer is SGD with momentum, whose update is proportional to the
gradient, so a gradient off by a small factor changes the trajectory (Adam would normalise a uniform
scaling away); ``test_a_wrong_gradient_is_detected`` checks that a 2% error in the gradient does fail the
comparison, and every case checks that the loss really went down.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import bcekit.torch as bce

STEPS = 50
LR = 0.1
MOMENTUM = 0.9
# float32 round-off: bcekit computes float32 losses in float64 and rounds once, torch in float32; the two
# trajectories differ by a few ulp. A 2% gradient error moves the losses by ~1e-3 relative.
RTOL, ATOL = 1e-5, 1e-6


@dataclass
class Case:
    """A training problem and the two criteria to compare on it."""

    inputs: Tensor
    targets: Tensor
    model: nn.Module
    reference: nn.Module
    candidate: nn.Module
    floor: float = 0.0  # the smallest loss any model could reach (> 0 for soft targets)


def _mlp(n_in: int, n_out: int, probabilities: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(n_in, 16), nn.Tanh(), nn.Linear(16, n_out)]
    if probabilities:
        layers.append(nn.Sigmoid())
    if n_out == 1:
        layers.append(nn.Flatten(0))  # (N, 1) -> (N,)
    return nn.Sequential(*layers)


def _binary_data(generator: torch.Generator, n: int = 128, d: int = 8) -> tuple[Tensor, Tensor]:
    """Inputs and imbalanced hard labels (about a quarter positive) from a noisy linear teacher."""
    inputs = torch.randn(n, d, generator=generator)
    teacher = torch.randn(d, generator=generator)
    scores = inputs @ teacher + 0.5 * torch.randn(n, generator=generator)
    targets = (scores > scores.quantile(0.75)).float()
    return inputs, targets


def logits_case() -> Case:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = _binary_data(generator)
    pos_weight = (targets.numel() - targets.sum()) / targets.sum()  # 0-d, #negatives / #positives
    torch.manual_seed(0)
    return Case(
        inputs,
        targets,
        _mlp(inputs.shape[1], 1, probabilities=False),
        nn.BCEWithLogitsLoss(pos_weight=pos_weight),
        bce.BCEWithLogitsLoss(pos_weight=pos_weight),
    )


def probabilities_case() -> Case:
    generator = torch.Generator().manual_seed(2)
    inputs, targets = _binary_data(generator)
    weight = 0.5 + torch.rand(targets.shape, generator=generator)  # one weight per sample
    torch.manual_seed(0)
    return Case(
        inputs,
        targets,
        _mlp(inputs.shape[1], 1, probabilities=True),
        nn.BCELoss(weight=weight),
        bce.BCELoss(weight=weight),
    )


def multilabel_case() -> Case:
    """Soft 2-D targets, a per-class weight and a per-class pos_weight, both broadcast over the batch."""
    generator = torch.Generator().manual_seed(3)
    n, d, classes = 128, 10, 5
    inputs = torch.randn(n, d, generator=generator)
    teacher = torch.randn(d, classes, generator=generator)
    bias = torch.linspace(-2.0, 1.0, classes)  # classes from rare to common
    targets = torch.sigmoid(2.0 * (inputs @ teacher / d**0.5 + bias))
    weight = torch.linspace(0.5, 2.0, classes)
    pos_weight = (1.0 - targets).mean(0) / targets.mean(0)
    reference = nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight)
    # Each element's loss is smallest where sigmoid(x) = p y / (p y + 1 - y), i.e. x = log(p y / (1 - y)).
    floor = reference(torch.log(pos_weight * targets / (1.0 - targets)), targets).item()
    torch.manual_seed(0)
    return Case(
        inputs,
        targets,
        _mlp(d, classes, probabilities=False),
        reference,
        bce.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight),
        floor,
    )


CASES: dict[str, Callable[[], Case]] = {
    "logits-pos_weight": logits_case,
    "probabilities-weight": probabilities_case,
    "multilabel-soft-weight-pos_weight": multilabel_case,
}


def train(model: nn.Module, criterion: nn.Module, inputs: Tensor, targets: Tensor) -> list[float]:
    """Full-batch SGD with momentum for STEPS steps; returns the loss before each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses: list[float] = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_both(
    case: Case, candidate: nn.Module | None = None
) -> tuple[list[float], list[float], nn.Module, nn.Module]:
    reference_model = case.model
    candidate_model = copy.deepcopy(case.model)
    reference_losses = train(reference_model, case.reference, case.inputs, case.targets)
    candidate_losses = train(
        candidate_model, case.candidate if candidate is None else candidate, case.inputs, case.targets
    )
    return reference_losses, candidate_losses, reference_model, candidate_model


def assert_same_trajectory(
    reference_losses: list[float],
    candidate_losses: list[float],
    reference_model: nn.Module,
    candidate_model: nn.Module,
) -> None:
    torch.testing.assert_close(
        torch.tensor(candidate_losses), torch.tensor(reference_losses), rtol=RTOL, atol=ATOL
    )
    for (name, expected), (_, actual) in zip(
        reference_model.named_parameters(), candidate_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_training_matches_torch(name: str) -> None:
    case = CASES[name]()
    initial = copy.deepcopy(case.model.state_dict())
    reference_losses, candidate_losses, reference_model, candidate_model = run_both(case)

    assert_same_trajectory(reference_losses, candidate_losses, reference_model, candidate_model)
    # Both copies started from the same weights and both actually moved away from them.
    for key, value in initial.items():
        assert not torch.equal(candidate_model.state_dict()[key], value), key
    # The training worked: the excess loss over the floor at least halved, with no blow-up at the end.
    excess = [loss - case.floor for loss in candidate_losses]
    assert excess[-1] < 0.5 * excess[0], (case.floor, candidate_losses)
    assert candidate_losses[-1] <= min(candidate_losses[-10:]) * (1 + 1e-3), candidate_losses


class _ScaledGradient(nn.Module):
    """A criterion whose value is ``inner``'s but whose gradient with respect to the input is scaled."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner = inner
        self.factor = factor

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.requires_grad:
            input.register_hook(lambda grad: grad * self.factor)
        return self.inner(input, target)


@pytest.mark.parametrize("name", list(CASES))
def test_a_wrong_gradient_is_detected(name: str) -> None:
    """The tolerances are tight enough: a criterion with a 2% gradient error does not pass."""
    case = CASES[name]()
    wrong = _ScaledGradient(case.candidate, 1.02)
    with pytest.raises(AssertionError):
        assert_same_trajectory(*run_both(case, candidate=wrong))
