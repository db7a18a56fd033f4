"""The losses under torch.func transforms and forward-mode AD: one ``autograd.Function`` with a jvp.

The ``bcekit::`` custom ops serve plain autograd and ``torch.compile``; they are opaque, so ``vmap`` cannot
batch them and forward-mode AD has no formula for them. When a call sees functorch-wrapped tensors
(``torch.func.vmap``, ``grad``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``) or dual tensors
(``torch.autograd.forward_ad``), the functionals route it here instead:

* forward: the same pipeline (:mod:`bcekit._math`) composed of torch operations, so ``vmap`` batches it
  (``generate_vmap_rule``);
* backward: the same derivative formulas as the custom ops (torch's), differentiable again;
* jvp: those formulas contracted with the tangents of input and target, reduced like the loss.

The probability loss's [0, 1] check needs the values as Python booleans, which functorch-wrapped tensors
cannot give; it runs for dual tensors (forward AD) and is skipped under ``torch.func`` transforms.
float64 is computed with the double-double combination here (there is no ``long double`` in torch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bcekit._math import LossSpec
from bcekit._semantics import NONE
from bcekit.torch import _composed

__all__ = ["active", "loss"]


@torch.compiler.assume_constant_result
def _in_transform() -> bool:
    """Whether a torch.func transform is active (the current functorch level). Dynamo traces neither the
    per-tensor checks of :func:`active` nor this non-tensor result; marked a constant, it is read once
    while tracing and the graph is specialised on it (Dynamo guards on the functorch stack)."""
    return torch._C._functorch.maybe_current_level() is not None


def active(*tensors: Tensor | None) -> bool:
    """Whether this call runs under a torch.func transform or carries forward-mode tangents."""
    if torch.compiler.is_compiling():
        # a plain compiled call keeps the custom ops; a transform compiled with torch.compile (say
        # torch.compile(torch.func.grad(f))) takes the composed loss (see :func:`loss`)
        return _in_transform()
    for tensor in tensors:
        if tensor is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            return True
        if torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None:
            return True
    return False


def wrapped(*tensors: Tensor | None) -> bool:
    """Whether any argument is functorch-wrapped (its values then cannot become Python booleans)."""
    if torch.compiler.is_compiling():
        return _in_transform()
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _Loss(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, pos_weight, spec: LossSpec, result_dtype: torch.dtype) -> Tensor:
        return _composed.composed_loss(spec, input, target, weight, pos_weight, result_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, target, weight, pos_weight, spec, result_dtype = inputs
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.save_for_forward(input, target, weight, pos_weight)
        ctx.spec, ctx.result_dtype = spec, result_dtype

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, target, weight, pos_weight = ctx.saved_tensors
        grad_input, grad_target, reduction_scale = _composed.elementwise_gradients(
            ctx.spec, input, target, weight, pos_weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        scale = grad_output.to(reduction_scale.dtype) * reduction_scale
        if grad_input is not None:
            grad_input = (grad_input * scale).to(input.dtype)
        if grad_target is not None:
            grad_target = (grad_target * scale).to(target.dtype)
        return grad_input, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_unused) -> Tensor:
        input, target, weight, pos_weight = ctx.saved_tensors
        need_input, need_target = input_tangent is not None, target_tangent is not None
        grad_input, grad_target, reduction_scale = _composed.elementwise_gradients(
            ctx.spec, input, target, weight, pos_weight, need_input, need_target
        )
        dtype = reduction_scale.dtype
        directional = torch.zeros((), dtype=dtype, device=input.device)
        if need_input:
            directional = directional + grad_input * input_tangent.to(dtype)
        if need_target:
            directional = directional + grad_target * target_tangent.to(dtype)
        if ctx.spec.reduction == NONE:
            return directional.expand(input.shape).to(ctx.result_dtype)
        return (directional.sum() * reduction_scale).to(ctx.result_dtype)


def loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    result_dtype: torch.dtype,
) -> Tensor:
    """The loss through the transformable ``autograd.Function`` (see the module docstring). Under
    ``torch.compile`` the composed loss itself, which the transforms differentiate and batch op by op:
    Dynamo traces no Function with a ``jvp``, nor one under ``vmap(grad)`` applied to the result of
    other operations."""
    if torch.compiler.is_compiling():
        return _composed.composed_loss(spec, input, target, weight, pos_weight, result_dtype)
    return _Loss.apply(input, target, weight, pos_weight, spec, result_dtype)
