"""The ``bcekit::`` operators: registered with ``torch.library`` so ``torch.compile`` sees them whole.

Each op takes tensors already checked by :mod:`bcekit.torch.functional` (shapes, dtypes, option values;
under ``torch.jit.script``, by the same checks as operators, :mod:`bcekit.torch._scripted`) and owns only
what needs the data: the [0, 1] check of the probability loss and the arithmetic, through the kernels
where they serve the call (:mod:`bcekit.torch._kernel`), else composed of torch operations
(:mod:`bcekit.torch._composed`). The ``*_fused`` ops return the loss **and** the input gradient of one
kernel pass, for reduced losses of an input that needs a gradient. A fake implementation gives
``torch.compile`` and the meta device each output's shape and dtype.

Every operator is generated from one table (``_OPERATORS``): the losses' arguments, and whether the op
is fused.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from bcekit._math import LossSpec
from bcekit._semantics import NONE
from bcekit.torch import _composed, _kernel

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "binary_cross_entropy_fused",
    "binary_cross_entropy_with_logits_fused",
    "exporting",
]


class _Loss(NamedTuple):
    """A loss's operator arguments (after input and target) and how they make the call's operands."""

    schema: str
    #: the op's arguments -> ((input, target, weight, pos_weight), spec)
    unpack: Callable
    #: the result's dtype: the input's (probability loss) or the target's (logits losses), as torch's
    result_is_input: bool


_OPTIONS = "int reduction, float label_smoothing, float? ignore_index"
_LOSSES = {
    "bce": _Loss(
        f"Tensor input, Tensor target, Tensor? weight, {_OPTIONS}",
        lambda x, y, w, r, s, i: ((x, y, w, None), LossSpec("bce", r, s, i)),
        True,
    ),
    "logits": _Loss(
        f"Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, {_OPTIONS}",
        lambda x, y, w, p, r, s, i: ((x, y, w, p), LossSpec("logits", r, s, i)),
        False,
    ),
    "focal": _Loss(
        "Tensor input, Tensor target, float alpha, float gamma, int reduction",
        lambda x, y, a, g, r: ((x, y, None, None), LossSpec("focal", r, alpha=a, gamma=g)),
        False,
    ),
}

#: (operator name, loss, fused)
_OPERATORS = (
    ("binary_cross_entropy", "bce", False),
    ("binary_cross_entropy_with_logits", "logits", False),
    ("sigmoid_focal_loss", "focal", False),
    ("binary_cross_entropy_fused", "bce", True),
    ("binary_cross_entropy_with_logits_fused", "logits", True),
)


def _result_like(loss: _Loss, tensors) -> Tensor:
    return tensors[0] if loss.result_is_input else tensors[1]


def _compute(loss: _Loss, args) -> Tensor:
    tensors, spec = loss.unpack(*args)
    plan = _kernel.plan_for(spec, *tensors)
    if plan is not None:
        return _kernel.kernel_pass(plan, *tensors)[0]  # checks [0, 1] in the same pass
    if spec.kind == "bce":
        _composed.check_probabilities(tensors[0], tensors[1], spec.ignore_index)
    return _composed.loss(spec, *tensors, _result_like(loss, tensors).dtype)


def _compute_fused(loss: _Loss, args) -> tuple[Tensor, Tensor]:
    tensors, spec = loss.unpack(*args)
    plan = _kernel.plan_for(spec, *tensors)  # the functionals call the fused ops only where there is one
    value, grad, _ = _kernel.kernel_pass(plan, *tensors, grad_input=True)
    return value, grad


def _fake(loss: _Loss, args) -> Tensor:
    tensors, spec = loss.unpack(*args)
    return _result_like(loss, tensors).new_empty(tensors[0].shape if spec.reduction == NONE else ())


def _fake_fused(loss: _Loss, args) -> tuple[Tensor, Tensor]:
    tensors, _ = loss.unpack(*args)
    return (
        _result_like(loss, tensors).new_empty(()),
        torch.empty_like(tensors[0], memory_format=torch.contiguous_format),
    )


def _setup_context(loss: _Loss, ctx, args, output) -> None:
    tensors, spec = loss.unpack(*args)
    ctx.save_for_backward(*tensors)
    ctx.spec, ctx.plan = spec, _kernel.plan_for(spec, *tensors)


def _setup_context_fused(loss: _Loss, ctx, args, output) -> None:
    tensors, spec = loss.unpack(*args)
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # no zero-filled input-sized "gradient" for the gradient output, which nothing differentiates
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, grad)  # a registered op must save its tensors (torch.compile traces it)
    ctx.spec, ctx.plan, ctx.stored = spec, _kernel.plan_for(spec, *tensors), _kernel.SAVED


def _register(name: str, loss: _Loss, fused: bool):
    arguments = loss.schema.count(",") + 1
    results = "(Tensor, Tensor)" if fused else "Tensor"
    compute, fake, setup = (
        (_compute_fused, _fake_fused, _setup_context_fused) if fused else (_compute, _fake, _setup_context)
    )
    grads = _kernel.fused_backward if fused else _kernel.backward
    untouched = (None,) * (arguments - 2)  # no gradients for the weights and options

    def implementation(*args):
        return compute(loss, args)

    op = torch.library.custom_op(
        f"bcekit::{name}", implementation, mutates_args=(), schema=f"({loss.schema}) -> {results}"
    )
    op.register_fake(lambda *args: fake(loss, args))

    def backward(ctx, grad_output: Tensor, *_grad_of_grad: Tensor | None):
        return (*grads(ctx, grad_output), *untouched)

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: setup(loss, ctx, inputs, output))
    return op


_registered = {name: _register(name, _LOSSES[kind], fused) for name, kind, fused in _OPERATORS}
binary_cross_entropy = _registered["binary_cross_entropy"]
binary_cross_entropy_with_logits = _registered["binary_cross_entropy_with_logits"]
sigmoid_focal_loss = _registered["sigmoid_focal_loss"]
binary_cross_entropy_fused = _registered["binary_cross_entropy_fused"]
binary_cross_entropy_with_logits_fused = _registered["binary_cross_entropy_with_logits_fused"]


def exporting() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is running: ONNX has no ``bcekit::`` operators, so
    the functionals then write the loss in standard ones (:func:`bcekit.torch._composed.composed_loss`).
    An export traces (the TorchScript-based exporter) or compiles (``torch.export``): eager calls skip the
    query, which costs about a microsecond."""
    return (torch.compiler.is_compiling() or torch._C._is_tracing()) and torch.onnx.is_in_onnx_export()
