"""``linear_binary_cross_entropy_with_logits`` and ``LinearBCEWithLogitsLoss`` under ``torch.compile``.

The reference is torch's unfused loss, ``F.binary_cross_entropy_with_logits(F.linear(x, W, b), target)``,
eager and compiled with the same backend: one graph without breaks (``torch._dynamo.explain``), the same
loss and input, weight and bias gradients under ``fullgraph=True``; sparse targets and a ``process_group``,
which Dynamo cannot trace, fail as torch's loss fails (sparse) or with an error that says why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import bcekit.torch as bce
from bcekit.torch import _linear

LABELS, FEATURES, ROWS = 11, 4, 6

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")


def _problem(bias: bool = True, seed: int = 0) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(ROWS, LABELS, generator=g) < 0.3).float()
    target[0] = torch.rand(LABELS, generator=g)  # soft targets too
    return {
        "input": torch.randn(ROWS, FEATURES, generator=g),
        "weight": torch.randn(LABELS, FEATURES, generator=g),
        "bias": torch.randn(LABELS, generator=g) if bias else None,
        "target": target,
        "pos_weight": torch.rand(LABELS, generator=g) * 2 + 0.25,
    }


def _fused(x, weight, target, bias=None, pos_weight=None, reduction="mean"):
    return bce.linear_binary_cross_entropy_with_logits(
        x, weight, target, bias, pos_weight=pos_weight, reduction=reduction, chunk_size=4
    )


def _unfused(x, weight, target, bias=None, pos_weight=None, reduction="mean"):
    logits = F.linear(x, weight, bias)
    return F.binary_cross_entropy_with_logits(
        logits, target.to_dense(), pos_weight=pos_weight, reduction=reduction
    )


def _run(loss_fn, problem, reduction: str = "mean") -> tuple[Tensor, list[Tensor]]:
    """The loss of leaves copied from ``problem`` and the gradients of 1.5 times it."""
    x, weight, bias = (None if t is None else t.clone().requires_grad_() for t in _parameters(problem))
    loss = loss_fn(x, weight, problem["target"], bias, problem["pos_weight"], reduction)
    leaves = [t for t in (x, weight, bias) if t is not None]
    return loss.detach(), list(torch.autograd.grad(loss * 1.5, leaves))


def _parameters(problem):
    return problem["input"], problem["weight"], problem["bias"]


def _assert_same(got, want, what: str) -> None:
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, msg=lambda m: f"{what}: loss: {m}")
    assert len(grads) == len(want_grads)
    for name, a, b in zip(("input", "weight", "bias"), grads, want_grads, strict=False):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{what}: {name} gradient: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_one_graph_without_breaks(bias) -> None:
    problem = _problem(bias)
    x, weight, b = _parameters(problem)
    torch._dynamo.reset()
    if bias:
        explanation = torch._dynamo.explain(
            lambda x, w, t, b, p: bce.linear_binary_cross_entropy_with_logits(x, w, t, b, pos_weight=p)
        )(
            x.requires_grad_(),
            weight.requires_grad_(),
            problem["target"],
            b.requires_grad_(),
            problem["pos_weight"],
        )
    else:
        explanation = torch._dynamo.explain(
            lambda x, w, t: bce.linear_binary_cross_entropy_with_logits(x, w, t)
        )(x, weight.requires_grad_(), problem["target"])
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_matches_torch_eager_and_compiled(backend) -> None:
    """Loss and gradients as torch's unfused loss, eager and compiled with the same backend: twice (the
    second call reuses the compiled graph), then the sum without a bias."""
    torch._dynamo.reset()
    ours = torch.compile(_fused, fullgraph=True, backend=backend)
    theirs = torch.compile(_unfused, fullgraph=True, backend=backend)
    for seed, reduction, bias in ((1, "mean", True), (2, "mean", True), (3, "sum", False)):
        problem = _problem(bias, seed)
        got = _run(ours, problem, reduction)
        _assert_same(got, _run(_unfused, problem, reduction), f"{reduction}, eager torch")
        _assert_same(got, _run(theirs, problem, reduction), f"{reduction}, compiled torch")


def test_fullgraph_module_under_autocast_matches_torch() -> None:
    """The module compiled whole, under CPU bfloat16 autocast, with a weight that requires grad."""
    problem = _problem(seed=4)
    head = bce.LinearBCEWithLogitsLoss(FEATURES, LABELS, pos_weight=problem["pos_weight"], chunk_size=4)
    linear = torch.nn.Linear(FEATURES, LABELS)
    with torch.no_grad():
        for module in (head, linear):
            module.weight.copy_(problem["weight"])
            module.bias.copy_(problem["bias"])

    def reference(x, target):
        return F.binary_cross_entropy_with_logits(linear(x), target, pos_weight=problem["pos_weight"])

    torch._dynamo.reset()
    results = []
    for loss_fn, module in (
        (torch.compile(head, fullgraph=True, backend="aot_eager"), head),
        (reference, linear),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(problem["input"], problem["target"])
        results.append((loss.detach(), list(torch.autograd.grad(loss, [module.weight, module.bias]))))
    assert results[0][0].dtype == results[1][0].dtype == torch.float32
    _assert_same(*results, "autocast")


def _first_error(fn, *arguments) -> Exception:
    with pytest.raises(Exception) as info:
        fn(*arguments)
    return info.value


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_target_like_torch(layout) -> None:
    """torch.compile cannot take sparse tensors: with fullgraph=True torch's unfused loss (its to_dense()
    inside) is refused as it enters the compiled function, and so is bcekit's, with the same error; without
    fullgraph both run eagerly and agree."""
    problem = _problem(seed=5)
    sparse = problem["target"].to_sparse_coo() if layout == "coo" else problem["target"].to_sparse_csr()
    problem = {**problem, "target": sparse}
    errors = []
    for loss_fn in (_fused, _unfused):
        torch._dynamo.reset()
        errors.append(
            _first_error(_run, torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), problem)
        )
    assert (
        type(errors[0]) is type(errors[1]) and str(errors[0]).split("\n")[0] == str(errors[1]).split("\n")[0]
    )
    assert "sparse" in str(errors[0])
    torch._dynamo.reset()
    got = _run(torch.compile(_fused, backend="aot_eager"), problem)
    _assert_same(got, _run(torch.compile(_unfused, backend="aot_eager"), problem), layout)
    _assert_same(got, _run(_unfused, problem), f"{layout}, eager torch")


def test_process_group_under_fullgraph_says_why_it_cannot_compile() -> None:
    """Label sharding's all-reduces stay outside torch.compile: under fullgraph=True an error that names
    process_group (an object standing in for a group: the refusal comes before any collective)."""
    problem = _problem(seed=6)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x, w, t, group: bce.linear_binary_cross_entropy_with_logits(x, w, t, process_group=group),
        fullgraph=True,
        backend="aot_eager",
    )
    error = _first_error(
        compiled, problem["input"], problem["weight"].requires_grad_(), problem["target"], object()
    )
    assert isinstance(error, RuntimeError)
    assert _linear._EAGER_ONLY in str(error), error


@pytest.mark.parametrize("edited", ["input", "weight", "bias", "target", "pos_weight"])
@pytest.mark.parametrize("grads", [("input", "weight"), ("weight",), ("input",)], ids="+".join)
def test_compiled_in_place_edit_before_backward_raises_where_torch_compiled_does(edited, grads) -> None:
    """An in-place edit between a compiled forward and its backward: autograd's error where torch's
    unfused loss compiled the same way gives it, the gradients of the values the forward saw where not."""
    outcomes = []
    for loss_fn in (_fused, _unfused):
        torch._dynamo.reset()
        problem = {k: None if v is None else v.clone() for k, v in _problem().items()}
        for name in grads:
            problem[name].requires_grad_()
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        loss = compiled(
            problem["input"], problem["weight"], problem["target"], problem["bias"], problem["pos_weight"]
        )
        with torch.no_grad():
            problem[edited].mul_(2)
        leaves = [problem[name] for name in grads]
        try:
            outcomes.append(torch.autograd.grad(loss, leaves))
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
            outcomes.append(None)
    ours, theirs = outcomes
    assert (ours is None) == (theirs is None)
    if ours is not None:
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b)
