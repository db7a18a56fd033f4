"""The kernel path: a call's plan (:func:`plan_for`), its pass (``kernel_pass``) and the eager route.

A plan (:class:`bcekit._native.Plan`) is decided once per call from what the decision depends on, and
everything here trusts it. CPU tensors run the C++ kernels through :mod:`bcekit._native`, with
``torch.get_num_threads()`` threads; CUDA tensors the Triton ones (:mod:`bcekit.torch._triton`), with
nothing read back to the host.

When the input needs a gradient and the loss is reduced, the forward's pass also writes the input
gradient ("fused"), which the backward hands over when ``grad_output`` is 1 (``loss.backward()``) and
otherwise scales (float32, float64) or recomputes (half types, where scaling the rounded gradient would
round twice). Other backwards (``'none'``, target gradients) are one backward-only pass. Double backward
(``create_graph=True``) and traced backwards use the composed formulas (:mod:`bcekit.torch._composed`).

Eager calls take ``_EagerLoss``, an ``autograd.Function`` called without ``torch.library``'s
dispatch (which costs more than a small loss); ``torch.compile`` and ``torch.jit.trace`` record the
registered operators of :mod:`bcekit.torch._ops`, which run the same passes.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from bcekit import _native
from bcekit._math import LossSpec
from bcekit._native import Plan
from bcekit._semantics import NONE
from bcekit.torch import _buffers, _composed, _triton

__all__ = ["plan_for", "kernel_pass", "eager_loss", "backward", "fused_backward"]

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)

#: Tests only: send CPU tensors through the Triton branch of kernel_pass (under TRITON_INTERPRET=1), so
#: the code path of CUDA tensors runs on machines without a GPU.
_TRITON_ON_CPU = False
_warned_no_triton = False


def _shape(tensor: Tensor | None):
    return None if tensor is None else tuple(tensor.shape)


def plan_for(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
) -> Plan | None:
    """The kernels' plan for these tensors, or None when they do not serve the call: plain tensors of one
    dtype on one CPU or CUDA device (CUDA: with Triton installed), target shaped like input, and what
    :func:`bcekit._native.plan` asks of the loss, the dtype and the weights' shapes."""
    if input.shape != target.shape or type(input) not in _PLAIN_TYPES:
        return None
    device, dtype = input.device, input.dtype
    for t in (target, weight, pos_weight):
        if t is not None and (t.dtype != dtype or t.device != device or type(t) not in _PLAIN_TYPES):
            return None
    if device.type == "cuda":
        if not _gpu_kernels_available():
            return None
    elif device.type != "cpu":
        return None
    # torch.compile traces the decision (it is Python on shapes and dtypes), not the cache in front of it
    plan = _native.plan.__wrapped__ if torch.compiler.is_compiling() else _native.plan
    return plan(
        spec.kind,
        _DTYPE_NAMES.get(dtype),
        tuple(input.shape),
        _shape(weight),
        _shape(pos_weight),
        spec.reduction,
        spec.label_smoothing,
        spec.ignore_index,
        device.type == "cuda" or _TRITON_ON_CPU,
    )


def _gpu_kernels_available() -> bool:
    """Triton present; otherwise say once that CUDA tensors take the (slower) composed path."""
    global _warned_no_triton
    if _triton.AVAILABLE:
        return True
    if not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn(
            "bcekit: Triton is not installed, so CUDA tensors use the composed torch operations instead "
            "of bcekit's one-pass GPU kernels; `pip install bcekit[gpu]` installs it.",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def _on_triton(tensor: Tensor) -> bool:
    """Whether a kernel call on this tensor runs the Triton kernels (CUDA; CPU tensors in the tests that
    set _TRITON_ON_CPU) rather than the C++ ones. On that route nothing reads device data on the host."""
    return _TRITON_ON_CPU or tensor.is_cuda


def _scalar_view(grad_output: Tensor) -> Tensor:
    """A per-element grad_output that is one value expanded (``loss.sum().backward()`` of a ``'none'``
    loss gives one): that value as a one-element view, so the kernel reads one number, not n."""
    if grad_output.numel() > 1 and not any(grad_output.stride()):
        return grad_output.as_strided((1,), (1,))
    return grad_output


def _contiguous(tensor: Tensor | None) -> Tensor | None:
    """A contiguous tensor (the kernels read its data pointer; autograd history does not matter)."""
    return None if tensor is None else tensor.contiguous()


def _output(x: Tensor) -> Tensor:
    """An output shaped like ``x``: on the CPU from the pool of reused storages when large (see
    :mod:`bcekit.torch._buffers`); CUDA tensors have torch's caching allocator already."""
    if not x.is_cpu:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return _buffers.empty_like(x)


def kernel_pass(
    plan: Plan,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    *,
    grad_input: bool = False,
    grad_target: bool = False,
    grad_output: Tensor | None = None,
    grad_scale: float = 1.0,
    loss_dtype: torch.dtype | None = None,
    rewrite: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One pass of ``plan``: ``(loss, grad_input, grad_target)``, each None unless asked for. The loss is
    the per-element losses for a plan without a reduction, else 0-d, in ``loss_dtype`` (default: the
    input's); no loss from a backward pass (``grad_output`` given). Gradients are multiplied by
    ``grad_scale`` and include a mean's 1/count.

    ``rewrite`` (Triton route, a one-element grad_output, no mean over kept elements): the input gradient
    the forward pass stored for grad_output 1, rewritten in place, and only where grad_output is not 1
    (decided on the device)."""
    if not (_TRITON_ON_CPU or input.is_cuda):
        return _pass_on_cpu(
            plan,
            input,
            target,
            weight,
            pos_weight,
            grad_input,
            grad_target,
            grad_output,
            grad_scale,
            loss_dtype,
        )
    x, y, w, p = _contiguous(input), _contiguous(target), _contiguous(weight), _contiguous(pos_weight)
    per_element = _output(x) if grad_output is None and plan.reduction == NONE else None
    gi = rewrite if rewrite is not None else _output(x) if grad_input else None
    gt = _output(x) if grad_target else None
    if grad_output is not None:
        grad_output = _scalar_view(grad_output).to(x.dtype).contiguous()
    value, kept = _triton.run(  # the loss and the count stay on the device
        plan,
        x,
        y,
        w,
        p,
        loss=per_element,
        grad_input=gi,
        grad_target=gt,
        grad_output=grad_output,
        grad_scale=grad_scale * plan.grad_scale,
        loss_dtype=loss_dtype,
        skip_if_one=rewrite is not None,
    )
    if plan.mean_over_kept:  # the mean's denominator, known only after the pass (all ignored: grads are 0)
        count = kept.clamp_min(1) if isinstance(kept, Tensor) else max(kept, 1)
        for grad in (gi, gt):
            if grad is not None:
                grad.div_(count)
    return (per_element if per_element is not None else value), gi, gt


def _pass_on_cpu(
    plan: Plan,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    grad_input: bool,
    grad_target: bool,
    grad_output: Tensor | None,
    grad_scale: float,
    loss_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`kernel_pass` on the C++ kernels. Its forward pass is every eager training step's, and at
    small sizes this Python is a good part of the step: written out, without helpers."""
    x, y = input.contiguous(), target.contiguous()
    w = None if weight is None else weight.contiguous()
    p = None if pos_weight is None else pos_weight.contiguous()
    per_element = _buffers.empty_like(x) if grad_output is None and plan.reduction == NONE else None
    gi = _buffers.empty_like(x) if grad_input else None
    gt = _buffers.empty_like(x) if grad_target else None
    grad_scale = grad_scale * plan.grad_scale
    if grad_output is not None:
        if grad_output.numel() == 1 and plan.n != 1:  # a reduced loss's grad_output: one number
            grad_scale, grad_output = grad_scale * float(grad_output), None
        else:
            grad_output = grad_output.to(x.dtype).contiguous()
    value, kept = _native.run_planned(
        plan,
        x.data_ptr(),
        y.data_ptr(),
        0 if w is None else w.data_ptr(),
        0 if p is None else p.data_ptr(),
        0 if grad_output is None else grad_output.data_ptr(),
        0 if per_element is None else per_element.data_ptr(),
        0 if gi is None else gi.data_ptr(),
        0 if gt is None else gt.data_ptr(),
        grad_scale,
        torch.get_num_threads(),
    )
    if plan.mean_over_kept:  # the mean's denominator, known only after the pass (all ignored: grads are 0)
        for grad in (gi, gt):
            if grad is not None:
                grad.div_(max(kept, 1))
    if per_element is not None:
        return per_element, gi, gt
    return torch.scalar_tensor(value, dtype=loss_dtype or x.dtype), gi, gt


# --------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------


def _concrete(*tensors: Tensor | None) -> bool:
    """Real data (not a tensor being traced by torch.compile / AOTAutograd), so kernels can run."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) is Tensor for t in tensors)


def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """A backward without a stored gradient: one backward-only kernel pass where it can run (real data,
    first order, ``ctx.plan`` set), else the composed formulas."""
    tensors = ctx.saved_tensors[:4]
    if (
        ctx.plan is not None
        and not torch.is_grad_enabled()
        and _concrete(grad_output, *tensors)
        and grad_output.dtype == tensors[0].dtype
    ):
        per_element = ctx.plan.reduction == NONE
        _, gi, gt = kernel_pass(
            ctx.plan,
            *tensors,
            grad_input=ctx.needs_input_grad[0],
            grad_target=ctx.needs_input_grad[1],
            grad_output=grad_output.expand(tensors[0].shape) if per_element else grad_output,
        )
        return gi, gt
    return _composed.gradients(ctx.spec, ctx, grad_output)


def _is_one(grad_output: Tensor) -> bool:
    """grad_output is exactly 1 (so the stored gradient is the answer): asked of CPU tensors only (on a
    GPU the question is answered on the device, see :func:`_fused_backward_on_device`)."""
    if not _concrete(grad_output) or grad_output.numel() != 1 or grad_output.device.type != "cpu":
        return False
    return grad_output.item() == 1.0


#: ``ctx.stored`` of the registered fused ops: the stored gradient is ``ctx.saved_tensors[4]``.
SAVED = object()


def _take_stored(ctx, saved) -> Tensor | None:
    """The gradient the forward pass stored, handed over once: the first backward owns it (so autograd can
    make it ``.grad`` without a copy, and scaling it in place is safe); a later backward of a retained graph
    gets None and recomputes, so that nothing done to the first one's result reaches the second."""
    stored = ctx.stored
    ctx.stored = None
    return saved[4] if stored is SAVED else stored


def fused_backward(ctx, grad_output: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The backward of a fused forward: the stored gradient times grad_output; target gradients (and
    double backward) as :func:`backward`. ``ctx``: ``saved_tensors`` (input, target, weight, pos_weight
    and, for the registered ops, the stored gradient), ``spec``, ``plan`` and ``stored``.

    The eager Function keeps the stored gradient as ``ctx.stored`` rather than saving it, so that no
    version check ties the first backward's result to a second backward."""
    saved = ctx.saved_tensors  # unpacking saved tensors costs microseconds: once
    input, target, weight, pos_weight = saved[:4]
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_output is None:  # the loss took no part in what is being differentiated
        return None, None
    if torch.is_grad_enabled() or not _concrete(grad_output, *saved[:4]):
        return _composed.gradients(ctx.spec, ctx, grad_output)  # differentiable and traceable
    grad = _take_stored(ctx, saved)
    if _on_triton(input):
        return _fused_backward_on_device(ctx, grad_output, (input, target, weight, pos_weight), grad)
    grad_input = None
    if need_input and grad is not None and _is_one(grad_output):
        grad_input = grad
    elif need_input and grad is not None and grad.dtype in (torch.float32, torch.float64):
        grad_input = grad * grad_output.to(grad.dtype)
    # half types: scaling the rounded gradient would round twice, so the backward kernel recomputes it
    recompute_input = need_input and grad_input is None
    if not (recompute_input or need_target):
        return grad_input, None
    _, recomputed, grad_target = kernel_pass(
        ctx.plan,
        input,
        target,
        weight,
        pos_weight,
        grad_input=recompute_input,
        grad_target=need_target,
        grad_output=grad_output,
    )
    return (recomputed if recompute_input else grad_input), grad_target


def _fused_backward_on_device(
    ctx, grad_output: Tensor, inputs, grad: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`fused_backward` on the Triton route, without reading grad_output on the host: the stored
    gradient (first backward) is rewritten in place by a kernel that does nothing when grad_output is
    exactly 1 (``loss.backward()``) and otherwise scales it (float32, float64) or recomputes it from the
    inputs (half types, where scaling the rounded gradient would round twice). Without a stored gradient
    (a later backward of a retained graph), and for half types' means over kept elements (whose in-place
    recomputation would need the forward's count), a backward pass computes a fresh one."""
    input, target, weight, pos_weight = inputs
    plan = ctx.plan
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    half = input.dtype in (torch.float16, torch.bfloat16)
    in_place = need_input and grad is not None and not (half and plan.mean_over_kept)
    if in_place and half:
        kernel_pass(plan, *inputs, grad_output=grad_output, rewrite=grad)
    elif in_place:
        _triton.scale_unless_one(grad, grad_output.to(grad.dtype).reshape(1))
    if not (need_target or (need_input and not in_place)):
        return (grad if in_place else None), None
    _, recomputed, grad_target = kernel_pass(
        plan,
        input,
        target,
        weight,
        pos_weight,
        grad_input=need_input and not in_place,
        grad_target=need_target,
        grad_output=grad_output,
    )
    return (grad if in_place else recomputed), grad_target


# --------------------------------------------------------------------------------------------------------
# The eager route
# --------------------------------------------------------------------------------------------------------


class _EagerLoss(torch.autograd.Function):
    """An eager call's kernel pass, with autograd: fused when the input needs a gradient and the loss is
    reduced, else a forward pass and a backward-only pass."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, plan: Plan, spec: LossSpec, fuse: bool):
        loss, grad, _ = kernel_pass(plan, input, target, weight, pos_weight, grad_input=fuse)
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.plan, ctx.spec, ctx.fused, ctx.stored, ctx.dtype = plan, spec, fuse, grad, input.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        # the usual case inline (loss.backward() on this loss: grad_output is a plain 1, and the stored
        # gradient is the answer), else the general backwards; the answer is the same. (Not on the Triton
        # route, which never reads grad_output on the host.)
        if (
            ctx.stored is not None
            and not _TRITON_ON_CPU
            and grad_output is not None
            and type(grad_output) is Tensor
            and grad_output.dtype is ctx.dtype
            and grad_output.is_cpu
            and grad_output.numel() == 1
            and not ctx.needs_input_grad[1]
            and not torch.is_grad_enabled()
            and grad_output.item() == 1.0
        ):
            grad, ctx.stored = ctx.stored, None
            return grad, None, None, None, None, None, None
        gradients = fused_backward(ctx, grad_output) if ctx.fused else backward(ctx, grad_output)
        return (*gradients, None, None, None, None, None)


# Function.apply's Python wrapper unwraps functorch tensors and binds default arguments: nothing an eager
# call needs (no transform is active, there are no defaults), and ~2 us of a small step. Its C++ base does
# the work.
_apply_eager = super(torch.autograd.Function, _EagerLoss).apply


def eager_loss(
    plan: Plan,
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
) -> Tensor:
    """The loss of an eager call through the kernels (``plan`` from :func:`plan_for` for these tensors;
    no torch.func transform active)."""
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        fuse = input.requires_grad and plan.reduction != NONE
        return _apply_eager(input, target, weight, pos_weight, plan, spec, fuse)
    return kernel_pass(plan, input, target, weight, pos_weight)[0]
