"""torch.func transforms and forward-mode AD over the losses, against torch's own results.

For the two torch losses the reference is ``torch.nn.functional`` under the same transform. The extras
(label smoothing, ignore_index, focal) have no torch counterpart: their reference is the explicit
float64 composition of the same definition (Keras's smoothing, a masked mean, torchvision's focal formula).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import bcekit.torch as bce

REDUCTIONS = ["none", "mean", "sum"]
WEIGHTINGS = ["plain", "weight", "weight+pos_weight"]


def _data(logits: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64) * 2
    if not logits:
        x = torch.sigmoid(x)
    y = torch.rand(4, 3, generator=generator, dtype=torch.float64)
    weight = torch.rand(3, generator=generator, dtype=torch.float64) + 0.5
    pos_weight = torch.rand(3, generator=generator, dtype=torch.float64) + 0.5
    return x, y, weight, pos_weight


def _pair(logits: bool, weighting: str, reduction: str):
    """(ours, torch's) as functions of (input, target), with the weights closed over."""
    _, _, weight, pos_weight = _data(logits)
    w = weight if weighting != "plain" else None
    if logits:
        p = pos_weight if weighting == "weight+pos_weight" else None
        return (
            lambda x, y: bce.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p),
            lambda x, y: F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p),
        )
    return (
        lambda x, y: bce.binary_cross_entropy(x, y, w, reduction=reduction),
        lambda x, y: F.binary_cross_entropy(x, y, w, reduction=reduction),
    )


def _assert_tree_close(mine, theirs, rtol: float = 1e-10) -> None:
    mine, theirs = (m if isinstance(m, tuple) else (m,) for m in (mine, theirs))
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        if isinstance(a, tuple):
            _assert_tree_close(a, b, rtol)
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)


def _cases(reductions: list[str]):
    """(logits, weighting, reduction) combinations; the probability loss has no pos_weight."""
    cases = [
        (logits, weighting, reduction)
        for logits, weighting, reduction in itertools.product([False, True], WEIGHTINGS, reductions)
        if logits or weighting != "weight+pos_weight"
    ]
    ids = [f"{'logits' if lg else 'probabilities'}-{w}-{r}" for lg, w, r in cases]
    return pytest.mark.parametrize(("logits", "weighting", "reduction"), cases, ids=ids)


ALL_REDUCTIONS = _cases(REDUCTIONS)
SCALAR_REDUCTIONS = _cases(["mean", "sum"])  # grad and hessian need a scalar loss


@ALL_REDUCTIONS
def test_vmap(logits, weighting, reduction) -> None:
    ours, theirs = _pair(logits, weighting, reduction)
    x, y, _, _ = _data(logits)
    _assert_tree_close(vmap(ours)(x, y), vmap(theirs)(x, y))
    _assert_tree_close(vmap(ours, in_dims=(0, None))(x, y[0]), vmap(theirs, in_dims=(0, None))(x, y[0]))


@SCALAR_REDUCTIONS
def test_grad_and_per_sample_grads(logits, weighting, reduction) -> None:
    ours, theirs = _pair(logits, weighting, reduction)
    x, y, _, _ = _data(logits)
    _assert_tree_close(grad(ours, argnums=(0, 1))(x, y), grad(theirs, argnums=(0, 1))(x, y))
    _assert_tree_close(vmap(grad(ours))(x, y), vmap(grad(theirs))(x, y))  # per-sample gradients


@ALL_REDUCTIONS
def test_jvp_jacrev_jacfwd(logits, weighting, reduction) -> None:
    ours, theirs = _pair(logits, weighting, reduction)
    x, y, _, _ = _data(logits)
    tangents = (torch.randn_like(x), torch.randn_like(y))
    _assert_tree_close(jvp(ours, (x, y), tangents), jvp(theirs, (x, y), tangents))
    _assert_tree_close(jacrev(ours, argnums=(0, 1))(x, y), jacrev(theirs, argnums=(0, 1))(x, y))
    _assert_tree_close(jacfwd(ours, argnums=(0, 1))(x, y), jacfwd(theirs, argnums=(0, 1))(x, y))


@SCALAR_REDUCTIONS
def test_hessian(logits, weighting, reduction) -> None:
    ours, theirs = _pair(logits, weighting, reduction)
    x, y, _, _ = _data(logits)
    # torch's double-backward formula for the probability loss puts its 1e-12 inside the square,
    # (x + eps)^2 (1 - x + eps)^2; ours differentiates its backward exactly: 1e-10 apart at x ~ 0.01
    _assert_tree_close(hessian(ours, argnums=(0, 1))(x, y), hessian(theirs, argnums=(0, 1))(x, y), rtol=1e-8)


@ALL_REDUCTIONS
def test_forward_ad_gradcheck_and_forward_over_reverse(logits, weighting, reduction) -> None:
    ours, _ = _pair(logits, weighting, reduction)
    x, y, _, _ = _data(logits)
    x.requires_grad_(), y.requires_grad_()
    assert torch.autograd.gradcheck(ours, (x, y), check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(ours, (x, y), check_fwd_over_rev=True, check_rev_over_rev=True)


def test_forward_ad_dual_tensors_match_torch() -> None:
    import torch.autograd.forward_ad as fwAD

    x, y, weight, pos_weight = _data(logits=True)
    tangent = torch.randn_like(x)
    results = []
    for function in (bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits):
        with fwAD.dual_level():
            loss = function(fwAD.make_dual(x, tangent), y, weight, pos_weight=pos_weight)
            results.append(fwAD.unpack_dual(loss))
    torch.testing.assert_close(results[0].primal, results[1].primal)
    torch.testing.assert_close(results[0].tangent, results[1].tangent)


def test_probability_check_still_runs_for_dual_tensors() -> None:
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.tensor([0.5, 1.5]), torch.ones(2))
        with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
            bce.binary_cross_entropy(dual, torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------------------
# The extras under transforms, against explicit float64 compositions of their definitions
# --------------------------------------------------------------------------------------------------------


def _torchvision_focal(x, y, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    return ((alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma).sum()


def _options_reference(x, y, smoothing=0.1, ignore=-1.0):
    kept = y != ignore
    smoothed = torch.where(kept, y, 0.0) * (1 - smoothing) + smoothing / 2
    per_element = torch.where(kept, F.binary_cross_entropy_with_logits(x, smoothed, reduction="none"), 0.0)
    return per_element.sum() / kept.sum()


EXTRAS = {
    "focal": (lambda x, y: bce.sigmoid_focal_loss(x, y, reduction="sum"), _torchvision_focal),
    "smoothing+ignore": (
        lambda x, y: bce.binary_cross_entropy_with_logits(x, y, label_smoothing=0.1, ignore_index=-1.0),
        _options_reference,
    ),
}


@pytest.mark.parametrize("name", EXTRAS)
def test_extras_under_every_transform(name) -> None:
    ours, reference = EXTRAS[name]
    x, y, _, _ = _data(logits=True, seed=1)
    if name == "smoothing+ignore":
        y[0, 1] = y[2, 2] = -1.0
    tangent = torch.randn_like(x)
    _assert_tree_close(vmap(grad(ours))(x, y), vmap(grad(reference))(x, y))
    _assert_tree_close(
        jvp(lambda a: ours(a, y), (x,), (tangent,)), jvp(lambda a: reference(a, y), (x,), (tangent,))
    )
    _assert_tree_close(jacfwd(ours)(x, y), jacfwd(reference)(x, y))
    _assert_tree_close(hessian(ours)(x, y), hessian(reference)(x, y))


# --------------------------------------------------------------------------------------------------------
# The common case keeps the registered operators (and so torch.compile and future fast kernels)
# --------------------------------------------------------------------------------------------------------


def test_only_transforms_leave_the_registered_operators(monkeypatch) -> None:
    """Plain autograd keeps the kernels (eager CPU calls through their autograd.Function, torch.compile
    through the bcekit:: operators); only transforms and forward-mode AD take the composed one."""
    from bcekit.torch import _transforms

    calls = []
    original = _transforms.loss

    def recording(*args, **kwargs):
        calls.append(args[0].kind)
        return original(*args, **kwargs)

    monkeypatch.setattr(_transforms, "loss", recording)
    x, y, _, _ = _data(logits=True)
    x.requires_grad_()
    loss = bce.binary_cross_entropy_with_logits(x, y)
    loss.backward()
    assert type(loss.grad_fn).__name__ == "_EagerLossBackward"  # the kernels' eager route
    weighted = bce.binary_cross_entropy_with_logits(x, y, pos_weight=torch.ones((), dtype=x.dtype))
    weighted.backward()
    assert type(weighted.grad_fn).__name__ == "_EagerLossBackward"
    assert calls == []
    vmap(bce.binary_cross_entropy_with_logits)(x.detach(), y)
    jvp(lambda a: bce.binary_cross_entropy(a, y), (torch.sigmoid(x.detach()),), (torch.ones_like(x),))
    grad(lambda a: bce.sigmoid_focal_loss(a, y, reduction="sum"))(x.detach())
    assert calls == ["logits", "bce", "focal"]
