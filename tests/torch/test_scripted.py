"""torch.jit.script of models holding and calling the loss modules, against the same models holding
torch's modules (scripted too, where torch scripts them) or, for what torch lacks, bcekit's eager call."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import bcekit.torch as bce


class _Model(torch.nn.Module):
    """A layer and a loss, as a scripted training model holds them."""

    def __init__(self, loss: torch.nn.Module, probabilities: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 3)
        self.loss = loss
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.layer(x)
        if self.probabilities:
            z = torch.sigmoid(z)
        return self.loss(z, y)


def _cases():
    """(bcekit module, reference module, probabilities, reference is scriptable)."""
    weight, pos_weight, rows = torch.rand(3) + 0.5, torch.rand(3) + 0.5, torch.rand(4, 1) + 0.5
    cases = []
    for reduction in ("mean", "sum", "none"):
        cases += [
            pytest.param(
                bce.BCEWithLogitsLoss(reduction=reduction),
                torch.nn.BCEWithLogitsLoss(reduction=reduction),
                False,
                True,
                id=f"logits-{reduction}",
            ),
            pytest.param(
                bce.BCELoss(weight=weight, reduction=reduction),
                torch.nn.BCELoss(weight=weight, reduction=reduction),
                True,
                True,
                id=f"probabilities-weight-{reduction}",
            ),
        ]
    cases += [
        pytest.param(
            bce.BCEWithLogitsLoss(weight=rows, pos_weight=pos_weight),
            torch.nn.BCEWithLogitsLoss(weight=rows, pos_weight=pos_weight),
            False,
            True,
            id="logits-weights",
        ),
        pytest.param(bce.BCELoss(), torch.nn.BCELoss(), True, True, id="probabilities"),
    ]
    for module, probabilities in (
        (bce.BCEWithLogitsLoss(pos_weight=pos_weight, label_smoothing=0.2, ignore_index=0), False),
        (bce.BCELoss(label_smoothing=0.1, ignore_index=1.0, reduction="sum"), True),
        (bce.SigmoidFocalLoss(alpha=-1, gamma=2), False),
        (bce.SigmoidFocalLoss(reduction="mean"), False),
    ):
        cases.append(
            pytest.param(module, module, probabilities, False, id=type(module).__name__ + "-options")
        )
    return cases


def _examples():
    torch.manual_seed(1)
    examples = []
    for rows in (4, 4):
        x, y = torch.randn(rows, 3), torch.rand(rows, 3)
        y[0, 0], y[-1, -1] = 0.0, 1.0  # what ignore_index matches
        examples.append((x, y))
    return examples


def _reference(loss: torch.nn.Module, probabilities: bool, scriptable: bool) -> torch.nn.Module:
    model = _Model(loss, probabilities)
    return torch.jit.script(model) if scriptable else model


@pytest.mark.parametrize(("ours", "theirs", "probabilities", "scriptable"), _cases())
def test_a_scripted_model_gives_torchs_loss_and_gradients(ours, theirs, probabilities, scriptable) -> None:
    scripted = torch.jit.script(_Model(ours, probabilities))
    reference = _reference(theirs, probabilities, scriptable)
    for x, y in _examples():
        for model in (scripted, reference):
            model.zero_grad()
        loss, expected = scripted(x, y), reference(x, y)
        torch.testing.assert_close(loss, expected)
        loss.sum().backward()
        expected.sum().backward()
        for ours_p, theirs_p in zip(scripted.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours_p.grad, theirs_p.grad)


@pytest.mark.filterwarnings("ignore:`torch.jit.(save|load)` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("ours", "theirs", "probabilities", "scriptable"), _cases()[:2] + _cases()[-4:-2])
def test_a_saved_scripted_model_loads_and_gives_the_same_loss(ours, theirs, probabilities, scriptable):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_Model(ours, probabilities)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    reference = _reference(theirs, probabilities, scriptable)
    for x, y in _examples():
        torch.testing.assert_close(loaded(x, y), reference(x, y))


def _error(call) -> str:
    with pytest.raises(Exception) as raised:
        call()
    return str(raised.value)


@pytest.mark.parametrize(
    ("make", "arguments"),
    [
        pytest.param(
            lambda m: m.BCELoss(), (torch.rand(4, 3), torch.rand(3, 3)), id="probabilities-target-shape"
        ),
        pytest.param(
            lambda m: m.BCELoss(), (torch.rand(4, 3) + 1, torch.rand(4, 3)), id="probabilities-range"
        ),
        pytest.param(
            lambda m: m.BCELoss(), (torch.rand(4, 3), torch.rand(4, 3).double()), id="probabilities-dtype"
        ),
        pytest.param(
            lambda m: m.BCELoss(weight=torch.rand(5)), (torch.rand(4, 3), torch.rand(4, 3)), id="weight-shape"
        ),
        pytest.param(
            lambda m: m.BCEWithLogitsLoss(), (torch.randn(4, 3), torch.rand(4, 2)), id="logits-target-shape"
        ),
        pytest.param(
            lambda m: m.BCEWithLogitsLoss(pos_weight=torch.rand(2)),
            (torch.randn(4, 3), torch.rand(4, 3)),
            id="pos-weight-shape",
        ),
        pytest.param(
            lambda m: m.BCEWithLogitsLoss(weight=torch.rand(3, requires_grad=True)),
            (torch.randn(4, 3), torch.rand(4, 3)),
            id="weight-requires-grad",
        ),
        pytest.param(
            lambda m: m.BCEWithLogitsLoss(reduction="average"),
            (torch.randn(4, 3), torch.rand(4, 3)),
            id="reduction",
        ),
    ],
)
def test_a_scripted_loss_refuses_what_torch_refuses_with_torchs_message(make, arguments) -> None:
    """The scripted module raises where torch's eager module does, with torch's message in its text
    (TorchScript wraps an operator's error in its own traceback, as it does torch's own scripted losses')."""
    expected = _error(lambda: make(torch.nn)(*arguments))
    scripted = torch.jit.script(make(bce))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert expected in _error(lambda: scripted(*arguments))


@pytest.mark.parametrize("probabilities", [False, True])
def test_a_scripted_loss_under_autocast_computes_in_float32_as_the_eager_one(probabilities) -> None:
    """Under CPU bfloat16 autocast a scripted model's loss is the eager functional's: float32, from the
    bfloat16 layer output cast up (and a float64 target left as it is, as autocast leaves float64)."""
    ours = bce.BCELoss() if probabilities else bce.BCEWithLogitsLoss(pos_weight=torch.rand(3) + 0.5)
    model = _Model(ours, probabilities)
    scripted = torch.jit.script(model)
    for target_dtype in (torch.float32, torch.float64):
        x, y = _examples()[0]
        y = y.to(target_dtype)
        if probabilities:
            y = y.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, expected = scripted(x, y), model(x, y)
        assert loss.dtype == expected.dtype
        torch.testing.assert_close(loss, expected)


def test_autocast_leaves_float64_tensors_as_torch_does() -> None:
    """torch's autocast casts half-precision tensors to the loss's float32 and leaves float64 ones: with a
    float64 input and target the logits loss stays float64, as torch's does."""
    x, y = (torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for mixed in ((x, y), (x.bfloat16(), y)):
            ours = bce.binary_cross_entropy_with_logits(*mixed)
            expected = torch.nn.functional.binary_cross_entropy_with_logits(*mixed)
            assert ours.dtype == expected.dtype
            torch.testing.assert_close(ours, expected)


def _fused_head() -> bce.LinearBCEWithLogitsLoss:
    torch.manual_seed(2)
    return bce.LinearBCEWithLogitsLoss(4, 30, pos_weight=torch.rand(30) + 0.5, chunk_size=7)


class _FusedModel(torch.nn.Module):
    """A trunk and bcekit's fused head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = _fused_head()
        self.trunk = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.trunk(x)), y)


class _UnfusedModel(torch.nn.Module):
    """The same trunk (same initial values), ``nn.Linear`` with the fused head's values, torch's loss."""

    def __init__(self) -> None:
        super().__init__()
        head = _fused_head()
        self.trunk = torch.nn.Linear(5, 4)
        self.linear = torch.nn.Linear(4, 30)
        with torch.no_grad():
            self.linear.weight.copy_(head.weight)
            self.linear.bias.copy_(head.bias)
        self.loss = torch.nn.BCEWithLogitsLoss(pos_weight=head.pos_weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.linear(torch.tanh(self.trunk(x))), y)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_a_scripted_fused_linear_loss_gives_the_unfused_torch_loss_and_gradients(layout) -> None:
    scripted, reference = torch.jit.script(_FusedModel()), torch.jit.script(_UnfusedModel())
    torch.manual_seed(3)
    for rows in (6, 9):
        x, y = torch.randn(rows, 5), (torch.rand(rows, 30) < 0.3).double().float()
        y[0] = torch.rand(30)
        target = {"dense": y, "coo": y.to_sparse_coo(), "csr": y.to_sparse_csr()}[layout]
        loss, expected = scripted(x, target), reference(x, y)
        torch.testing.assert_close(loss, expected)
        ours = torch.autograd.grad(loss, [scripted.trunk.weight, scripted.head.weight, scripted.head.bias])
        theirs = torch.autograd.grad(
            expected, [reference.trunk.weight, reference.linear.weight, reference.linear.bias]
        )
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b)


def test_a_scripted_fused_linear_loss_refuses_what_the_eager_one_refuses() -> None:
    head = bce.LinearBCEWithLogitsLoss(4, 30)
    scripted = torch.jit.script(head)
    for x, y in ((torch.randn(6, 4), torch.rand(6, 5)), (torch.randn(6, 3), torch.rand(6, 30))):
        assert _error(lambda x=x, y=y: head(x, y)) in _error(lambda x=x, y=y: scripted(x, y))
