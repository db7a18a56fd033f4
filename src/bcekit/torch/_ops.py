"""The ``bcekit::`` operators: registered with ``torch.library`` so ``torch.compile`` sees them whole.

Each op takes tensors already checked by :mod:`bcekit.torch.functional` (shapes, dtypes, option values;
under ``torch.jit.script``, by the same checks as operators, :mod:`bcekit.torch._scripted`) and owns only
what needs the data: the [0, 1] check of the probability loss and the arithmetic.

Where the arithmetic runs:

* CPU tensors of one dtype whose weights broadcast in a form the C++ kernels read in place
  (:func:`kernel_ready`): the kernels, through :mod:`bcekit._native`, with ``torch.get_num_threads()``
  threads. When the input needs a gradient and the loss is reduced, the functionals call the ``*_fused``
  ops instead: their one pass returns the loss **and** the input gradient, which autograd keeps, so the
  backward only multiplies it by ``grad_output`` (or hands it over as is when that is 1). Other backwards
  (``'none'``, target gradients) are one backward-only kernel pass.
* Everything else (CUDA, mixed dtypes, the focal loss, other broadcasts): the shared pipeline of
  :mod:`bcekit._math` composed of torch operations in the compute precision (float32 for half types,
  float64 otherwise); float64 results of CPU tensors are evaluated in ``long double`` by
  :mod:`bcekit._numpy_core`.

Double backward (``create_graph=True``) and traced backwards (``torch.compile``) use the composed
derivative formulas, which are differentiable torch operations. A fake implementation gives
``torch.compile`` and the meta device each output's shape and dtype.

(No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the type hints, and
torch releases before PEP 604 support need ``Optional[...]``.)
"""

import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from bcekit import _math, _native, _numpy_core, _semantics
from bcekit._math import LossSpec
from bcekit._semantics import MEAN, NONE, SUM
from bcekit.torch import _buffers, _triton

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "compute_dtype",
    "composed_loss",
    "elementwise_gradients",
    "check_probabilities",
    "kernel_ready",
    "binary_cross_entropy_fused",
    "binary_cross_entropy_with_logits_fused",
    "eager_kernel_loss",
    "eager_plain_loss",
    "exporting",
]


class _TorchOps:
    """The elementwise namespace :mod:`bcekit._math` computes with."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    abs = staticmethod(torch.abs)
    isinf = staticmethod(torch.isinf)
    isfinite = staticmethod(torch.isfinite)
    isnan = staticmethod(torch.isnan)
    where = staticmethod(torch.where)
    clamp_min = staticmethod(torch.clamp_min)
    clamp_max = staticmethod(torch.clamp_max)
    sum = staticmethod(torch.sum)

    @staticmethod
    def log1p(a: Tensor) -> Tensor:
        # log1p(a) rounds to a once |a| < 2**-54 (the next term, a**2 / 2, is below half an ulp); saying
        # so sidesteps torch's vectorised float64 log1p, which is ~1 ulp off on subnormal arguments.
        return torch.where(a.abs() < 2.0**-54, a, torch.log1p(a))

    @staticmethod
    def size(a: Tensor) -> int:
        return a.numel()


_OPS = _TorchOps()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for operands of these floating dtypes (rule: ``compute_precision``)."""
    bits = max(dtype.itemsize * 8 for dtype in dtypes)
    return torch.float32 if _semantics.compute_precision(bits) == 32 else torch.float64


def _cast(tensor: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if tensor is None else tensor.to(dtype)


def _use_extended(result_dtype: torch.dtype, *tensors: Optional[Tensor]) -> bool:
    """float64 results of CPU tensors are evaluated in long double (see :mod:`bcekit._numpy_core`)."""
    return (
        result_dtype == torch.float64
        and _numpy_core.EXTENDED is not None
        and all(t is None or t.device.type == "cpu" for t in tensors)
    )


def _as_numpy(tensor: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if tensor is None else tensor.detach().resolve_conj().resolve_neg().numpy()


def _loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    result_dtype: torch.dtype,
) -> Tensor:
    if _use_extended(result_dtype, input, target, weight, pos_weight):
        arrays = (_as_numpy(t) for t in (input, target, weight, pos_weight))
        value = _numpy_core.loss(spec, *arrays, compute=_numpy_core.EXTENDED).astype(np.float64)
        return torch.from_numpy(np.array(value, copy=True))
    return composed_loss(spec, input, target, weight, pos_weight, result_dtype)


def composed_loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    result_dtype: torch.dtype,
) -> Tensor:
    """The loss composed of torch operations only (no NumPy, no data-dependent Python): what the
    torch.func transforms can batch and differentiate (:mod:`bcekit.torch._transforms`), and what an ONNX
    export writes."""
    dtype = compute_dtype(input.dtype, target.dtype)
    values, kept = _math.elementwise_loss(
        _OPS,
        spec,
        input.to(dtype),
        target.to(dtype),
        _cast(weight, dtype),
        _cast(pos_weight, dtype),
        compensated=result_dtype == torch.float64,
    )
    return _math.reduce(_OPS, values, kept, spec.reduction).to(result_dtype)


def elementwise_gradients(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    need_input: bool,
    need_target: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """Per-element derivatives in input and target, and what they are multiplied by for the reduction
    (1/count for ``'mean'``, else 1), all in the compute dtype and composed of differentiable torch ops."""
    dtype = compute_dtype(input.dtype, target.dtype)
    x, y = input.to(dtype), target.to(dtype)
    grad_input, grad_target = _math.elementwise_grads(
        _OPS, spec, x, y, _cast(weight, dtype), _cast(pos_weight, dtype), need_input, need_target
    )
    reduction_scale = torch.ones((), dtype=dtype, device=x.device)
    if spec.reduction == MEAN:
        kept = _math.kept_mask(_OPS, y, spec.ignore_index)
        # an all-ignored mean is NaN, but its gradient is zero, not NaN: it must not poison a training step
        reduction_scale = reduction_scale / (max(x.numel(), 1) if kept is None else kept.sum().clamp_min(1))
    return grad_input, grad_target, reduction_scale


def _gradients(spec: LossSpec, ctx, grad_output: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Input and target gradients, composed of differentiable torch operations (so double backward works)."""
    input, target, weight, pos_weight = ctx.saved_tensors[:4]
    grad_input, grad_target, reduction_scale = elementwise_gradients(
        spec, input, target, weight, pos_weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    )
    scale = grad_output.to(reduction_scale.dtype) * reduction_scale
    if grad_input is not None:
        grad_input = (grad_input * scale).to(input.dtype)
    if grad_target is not None:
        grad_target = (grad_target * scale).to(target.dtype)
    return grad_input, grad_target


# --------------------------------------------------------------------------------------------------------
# The C++ kernels
# --------------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def _shape(tensor: Optional[Tensor]):
    return None if tensor is None else tuple(tensor.shape)


def kernel_ready(spec: LossSpec, *tensors: Optional[Tensor]) -> bool:
    """Whether kernels serve this call: plain tensors (input, target, weight, pos_weight) of one dtype on
    one device, target shaped like input, weights in an in-place broadcast form (:mod:`bcekit._native`).
    CPU tensors take the C++ kernels, CUDA tensors the Triton ones (:mod:`bcekit.torch._triton`)."""
    input, target, weight, pos_weight = tensors
    if input.shape != target.shape or spec.kind not in ("bce", "logits"):
        return False
    device = input.device
    names = []
    for t in tensors:
        if t is not None:
            if t.device != device or type(t) not in (Tensor, torch.nn.Parameter):
                return False
            names.append(_KERNEL_DTYPES.get(t.dtype, "?"))
    if device.type == "cpu":
        return _native.AVAILABLE and _native.eligible(
            spec.kind, names, tuple(input.shape), _shape(weight), _shape(pos_weight)
        )
    if device.type != "cuda" or not _gpu_kernels_available():
        return False
    return (
        len(set(names)) == 1
        and names[0] != "?"
        and all(
            t is None or _native.broadcast_form(tuple(t.shape), tuple(input.shape)) is not None
            for t in (weight, pos_weight)
        )
    )


_warned_no_triton = False

#: Tests only: send CPU tensors through the Triton branch of _kernel_pass (under TRITON_INTERPRET=1), so
#: the code path of CUDA tensors runs on machines without a GPU.
_TRITON_ON_CPU = False


def _on_triton(tensor: Tensor) -> bool:
    """Whether a kernel call on this tensor runs the Triton kernels (CUDA; CPU tensors in the tests that
    set _TRITON_ON_CPU) rather than the C++ ones. On that route nothing reads device data on the host."""
    return tensor.device.type == "cuda" or _TRITON_ON_CPU


def _scalar_view(grad_output: Tensor) -> Tensor:
    """A per-element grad_output that is one value expanded (``loss.sum().backward()`` of a ``'none'``
    loss gives one): that value as a one-element view, so the kernel reads one number, not n."""
    if grad_output.numel() > 1 and not any(grad_output.stride()):
        return grad_output.as_strided((1,), (1,))
    return grad_output


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
            stacklevel=3,
        )
    return False


def _form(tensor: Optional[Tensor], input: Tensor):
    return None if tensor is None else _native.broadcast_form(tuple(tensor.shape), tuple(input.shape))


def _plain(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A contiguous tensor (the kernels read its data pointer; autograd history does not matter)."""
    return None if tensor is None else tensor.contiguous()


def _concrete(*tensors: Optional[Tensor]) -> bool:
    """Real CPU data (not a tensor being traced by torch.compile / AOTAutograd), so kernels can run."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) is Tensor for t in tensors)


def _output(x: Tensor) -> Tensor:
    """An output shaped like ``x``: on the CPU from the pool of reused storages when large (see
    :mod:`bcekit.torch._buffers`); CUDA tensors have torch's caching allocator already."""
    if x.device.type != "cpu":
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return _buffers.empty_like(x)


def _kernel_pass(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    *,
    reduction: int,
    grad_input: bool = False,
    grad_target: bool = False,
    grad_output: Optional[Tensor] = None,
    grad_scale: float = 1.0,
    loss_dtype: Optional[torch.dtype] = None,
    rewrite: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One kernel pass: ``(loss, grad_input, grad_target)``, each None unless asked for. The loss is 0-d
    unless ``reduction`` is NONE; a reduced one is returned in ``loss_dtype`` (default: the input's).
    Gradients of a mean include the 1/count factor.

    ``rewrite`` (Triton route, a one-element grad_output, no mean over kept elements): the input gradient
    the forward pass stored for grad_output 1, rewritten in place, and only where grad_output is not 1
    (decided on the device)."""
    x, y, w, p = (_plain(t) for t in (input, target, weight, pos_weight))
    per_element = _output(x) if reduction == NONE else None
    gi = rewrite if rewrite is not None else _output(x) if grad_input else None
    gt = _output(x) if grad_target else None
    mean_unknown = reduction == MEAN and spec.ignore_index is not None  # count known after the pass
    if reduction == MEAN and not mean_unknown and x.numel():
        grad_scale = grad_scale / x.numel()
    triton = _on_triton(x)
    if grad_output is not None:
        grad_output = (_scalar_view(grad_output) if triton else grad_output).to(x.dtype).contiguous()
    if triton:  # the loss and the count stay on the device
        value, kept = _triton.run(
            spec.kind,
            x,
            y,
            w,
            _form(w, x),
            p,
            _form(p, x),
            reduction=reduction,
            loss=per_element,
            grad_input=gi,
            grad_target=gt,
            grad_output=grad_output,
            grad_scale=grad_scale,
            label_smoothing=spec.label_smoothing,
            ignore_index=spec.ignore_index,
            loss_dtype=loss_dtype,
            skip_if_one=rewrite is not None,
        )
        count = kept.clamp_min(1) if isinstance(kept, Tensor) else max(kept, 1)
    else:
        if grad_output is not None and grad_output.numel() == 1 and x.numel() != 1:
            grad_scale, grad_output = grad_scale * float(grad_output), None  # a reduced loss's grad_output
        value, kept = _native.run(
            spec.kind,
            x,
            y,
            w,
            _shape(w),
            p,
            _shape(p),
            input_shape=tuple(x.shape),
            reduction=reduction,
            loss=per_element,
            grad_input=gi,
            grad_target=gt,
            grad_output=grad_output,
            grad_scale=grad_scale,
            label_smoothing=spec.label_smoothing,
            ignore_index=spec.ignore_index,
            threads=torch.get_num_threads(),
        )
        value, count = torch.scalar_tensor(value, dtype=loss_dtype or x.dtype), max(kept, 1)
    if mean_unknown:  # the mean's denominator, known only after the pass (all ignored: grads are 0)
        for grad in (gi, gt):
            if grad is not None:
                grad.div_(count)
    return (per_element if per_element is not None else value), gi, gt


def _kernel_gradients(spec: LossSpec, ctx, grad_output: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The backward as one backward-only kernel pass (reduced: a scalar grad_output; 'none': per element)."""
    input, target, weight, pos_weight = ctx.saved_tensors[:4]
    per_element = spec.reduction == NONE
    _, gi, gt = _kernel_pass(
        spec,
        input,
        target,
        weight,
        pos_weight,
        reduction=spec.reduction,
        grad_input=ctx.needs_input_grad[0],
        grad_target=ctx.needs_input_grad[1],
        grad_output=grad_output.expand(input.shape) if per_element else grad_output,
    )
    return gi, gt


def _backward(spec: LossSpec, ctx, grad_output: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Kernel backward where it can run (real data, first order), else the composed formulas."""
    tensors = ctx.saved_tensors[:4]
    if (
        ctx.kernel
        and not torch.is_grad_enabled()
        and _concrete(grad_output, *tensors)
        and grad_output.dtype == tensors[0].dtype
    ):
        return _kernel_gradients(spec, ctx, grad_output)
    return _gradients(spec, ctx, grad_output)


def exporting() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is running: ONNX has no ``bcekit::`` operators, so
    the functionals then write the loss in standard ones (:func:`composed_loss`). An export traces (the
    TorchScript-based exporter) or compiles (``torch.export``): eager calls skip the query, which costs
    about a microsecond."""
    return (torch.compiler.is_compiling() or torch._C._is_tracing()) and torch.onnx.is_in_onnx_export()


def _output_shape(input: Tensor, reduction: int):
    return input.shape if reduction == NONE else ()


def check_probabilities(input: Tensor, target: Tensor, ignore_index: Optional[float]) -> None:
    # NaN fails both comparisons, so it is reported as out of range, as torch does.
    if not bool(((input >= 0) & (input <= 1)).all()):
        raise _semantics.input_range_error()
    if not bool(_math.valid_targets(_OPS, target, ignore_index).all()):
        raise _semantics.target_range_error()


# --------------------------------------------------------------------------------------------------------
# Probability loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::binary_cross_entropy", mutates_args=())
def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    reduction: int,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> Tensor:
    spec = LossSpec("bce", reduction, label_smoothing, ignore_index)
    if kernel_ready(spec, input, target, weight, None):
        return _kernel_pass(spec, input, target, weight, None, reduction=reduction)[0]  # checks [0, 1] too
    check_probabilities(input, target, ignore_index)
    return _loss(spec, input, target, weight, None, input.dtype)


@binary_cross_entropy.register_fake
def _(input, target, weight, reduction, label_smoothing, ignore_index):
    return input.new_empty(_output_shape(input, reduction))


def _bce_setup_context(ctx, inputs, output) -> None:
    input, target, weight, reduction, label_smoothing, ignore_index = inputs
    ctx.save_for_backward(input, target, weight, None)
    ctx.spec = LossSpec("bce", reduction, label_smoothing, ignore_index)
    ctx.kernel = kernel_ready(ctx.spec, input, target, weight, None)


def _bce_backward(ctx, grad_output: Tensor):
    return (*_backward(ctx.spec, ctx, grad_output), None, None, None, None)


binary_cross_entropy.register_autograd(_bce_backward, setup_context=_bce_setup_context)


# --------------------------------------------------------------------------------------------------------
# Logits loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::binary_cross_entropy_with_logits", mutates_args=())
def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: int,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> Tensor:
    spec = LossSpec("logits", reduction, label_smoothing, ignore_index)
    if kernel_ready(spec, input, target, weight, pos_weight):
        return _kernel_pass(spec, input, target, weight, pos_weight, reduction=reduction)[0]
    return _loss(spec, input, target, weight, pos_weight, target.dtype)


@binary_cross_entropy_with_logits.register_fake
def _(input, target, weight, pos_weight, reduction, label_smoothing, ignore_index):
    return target.new_empty(_output_shape(input, reduction))


def _logits_setup_context(ctx, inputs, output) -> None:
    input, target, weight, pos_weight, reduction, label_smoothing, ignore_index = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.spec = LossSpec("logits", reduction, label_smoothing, ignore_index)
    ctx.kernel = kernel_ready(ctx.spec, input, target, weight, pos_weight)


def _logits_backward(ctx, grad_output: Tensor):
    return (*_backward(ctx.spec, ctx, grad_output), None, None, None, None, None)


binary_cross_entropy_with_logits.register_autograd(_logits_backward, setup_context=_logits_setup_context)


# --------------------------------------------------------------------------------------------------------
# Sigmoid focal loss
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::sigmoid_focal_loss", mutates_args=())
def sigmoid_focal_loss(input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: int) -> Tensor:
    spec = LossSpec("focal", reduction, alpha=alpha, gamma=gamma)
    return _loss(spec, input, target, None, None, target.dtype)


@sigmoid_focal_loss.register_fake
def _(input, target, alpha, gamma, reduction):
    return target.new_empty(_output_shape(input, reduction))


def _focal_setup_context(ctx, inputs, output) -> None:
    input, target, alpha, gamma, reduction = inputs
    ctx.save_for_backward(input, target, None, None)
    ctx.spec = LossSpec("focal", reduction, alpha=alpha, gamma=gamma)
    ctx.kernel = False


def _focal_backward(ctx, grad_output: Tensor):
    return (*_gradients(ctx.spec, ctx, grad_output), None, None, None)


sigmoid_focal_loss.register_autograd(_focal_backward, setup_context=_focal_setup_context)


# --------------------------------------------------------------------------------------------------------
# Fused ops: the loss and the input gradient from one kernel pass (reduced losses of an input that
# needs a gradient; CPU tensors that pass kernel_ready only)
# --------------------------------------------------------------------------------------------------------


def _is_one(grad_output: Tensor) -> bool:
    """grad_output is exactly 1 (so the stored gradient is the answer): asked of CPU tensors only (on a
    GPU the question is answered on the device, see :func:`_fused_backward_on_device`)."""
    if not _concrete(grad_output) or grad_output.numel() != 1 or grad_output.device.type != "cpu":
        return False
    return grad_output.item() == 1.0


def _fused_setup_context(ctx, spec: LossSpec, tensors, output) -> None:
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # no zero-filled input-sized "gradient" for the gradient output, which nothing differentiates
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, grad)  # a registered op must save its tensors (torch.compile traces it)
    ctx.spec = spec
    ctx.kernel = True
    ctx.stored = _SAVED


#: ``ctx.stored`` of the registered fused ops: the stored gradient is ``ctx.saved_tensors[4]``.
_SAVED = object()


def _take_stored(ctx, saved) -> Optional[Tensor]:
    """The gradient the forward pass stored, handed over once: the first backward owns it (so autograd can
    make it ``.grad`` without a copy, and scaling it in place is safe); a later backward of a retained graph
    gets None and recomputes, so that nothing done to the first one's result reaches the second."""
    stored = ctx.stored
    ctx.stored = None
    return saved[4] if stored is _SAVED else stored


def _fused_backward(ctx, grad_output: Tensor, _grad_of_grad: Optional[Tensor]):
    """The stored gradient times grad_output; target gradients (and double backward) as the plain ops.

    The eager Functions below keep the stored gradient as ``ctx.stored`` rather than saving it, so that
    no version check ties the first backward's result to a second backward."""
    saved = ctx.saved_tensors  # unpacking saved tensors costs microseconds: once
    input, target, weight, pos_weight = saved[:4]
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_output is None:  # the loss took no part in what is being differentiated
        return None, None
    if torch.is_grad_enabled() or not _concrete(grad_output, *saved[:4]):
        return _gradients(ctx.spec, ctx, grad_output)  # differentiable (double backward) and traceable
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
    _, recomputed, grad_target = _kernel_pass(
        ctx.spec,
        input,
        target,
        weight,
        pos_weight,
        reduction=ctx.spec.reduction,
        grad_input=recompute_input,
        grad_target=need_target,
        grad_output=grad_output,
    )
    return (recomputed if recompute_input else grad_input), grad_target


def _fused_backward_on_device(
    ctx, grad_output: Tensor, inputs, grad: Optional[Tensor]
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """:func:`_fused_backward` on the Triton route, without reading grad_output on the host: the stored
    gradient (first backward) is rewritten in place by a kernel that does nothing when grad_output is
    exactly 1 (``loss.backward()``) and otherwise scales it (float32, float64) or recomputes it from the
    inputs (half types, where scaling the rounded gradient would round twice). Without a stored gradient
    (a later backward of a retained graph), and for half types' means over kept elements (whose in-place
    recomputation would need the forward's count), a backward pass computes a fresh one."""
    input, target, weight, pos_weight = inputs
    spec = ctx.spec
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    half = input.dtype in (torch.float16, torch.bfloat16)
    mean_over_kept = spec.reduction == MEAN and spec.ignore_index is not None
    in_place = need_input and grad is not None and not (half and mean_over_kept)
    if in_place and half:
        _kernel_pass(spec, *inputs, reduction=spec.reduction, grad_output=grad_output, rewrite=grad)
    elif in_place:
        _triton.scale_unless_one(grad, grad_output.to(grad.dtype).reshape(1))
    if not (need_target or (need_input and not in_place)):
        return (grad if in_place else None), None
    _, recomputed, grad_target = _kernel_pass(
        spec,
        input,
        target,
        weight,
        pos_weight,
        reduction=spec.reduction,
        grad_input=need_input and not in_place,
        grad_target=need_target,
        grad_output=grad_output,
    )
    return (grad if in_place else recomputed), grad_target


@torch.library.custom_op("bcekit::binary_cross_entropy_fused", mutates_args=())
def binary_cross_entropy_fused(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    reduction: int,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> tuple[Tensor, Tensor]:
    """``(loss, d loss / d input)`` of a reduced probability loss, from one kernel pass."""
    spec = LossSpec("bce", reduction, label_smoothing, ignore_index)
    loss, grad, _ = _kernel_pass(spec, input, target, weight, None, reduction=reduction, grad_input=True)
    return loss, grad


@binary_cross_entropy_fused.register_fake
def _(input, target, weight, reduction, label_smoothing, ignore_index):
    return input.new_empty(()), torch.empty_like(input, memory_format=torch.contiguous_format)


def _bce_fused_setup_context(ctx, inputs, output) -> None:
    input, target, weight, reduction, label_smoothing, ignore_index = inputs
    spec = LossSpec("bce", reduction, label_smoothing, ignore_index)
    _fused_setup_context(ctx, spec, (input, target, weight, None), output)


def _bce_fused_backward(ctx, grad_output: Tensor, grad_of_grad: Optional[Tensor]):
    return (*_fused_backward(ctx, grad_output, grad_of_grad), None, None, None, None)


binary_cross_entropy_fused.register_autograd(_bce_fused_backward, setup_context=_bce_fused_setup_context)


@torch.library.custom_op("bcekit::binary_cross_entropy_with_logits_fused", mutates_args=())
def binary_cross_entropy_with_logits_fused(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: int,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> tuple[Tensor, Tensor]:
    """``(loss, d loss / d input)`` of a reduced logits loss, from one kernel pass."""
    spec = LossSpec("logits", reduction, label_smoothing, ignore_index)
    loss, grad, _ = _kernel_pass(
        spec, input, target, weight, pos_weight, reduction=reduction, grad_input=True
    )
    return loss, grad


@binary_cross_entropy_with_logits_fused.register_fake
def _(input, target, weight, pos_weight, reduction, label_smoothing, ignore_index):
    return target.new_empty(()), torch.empty_like(input, memory_format=torch.contiguous_format)


def _logits_fused_setup_context(ctx, inputs, output) -> None:
    input, target, weight, pos_weight, reduction, label_smoothing, ignore_index = inputs
    spec = LossSpec("logits", reduction, label_smoothing, ignore_index)
    _fused_setup_context(ctx, spec, (input, target, weight, pos_weight), output)


def _logits_fused_backward(ctx, grad_output: Tensor, grad_of_grad: Optional[Tensor]):
    return (*_fused_backward(ctx, grad_output, grad_of_grad), None, None, None, None, None)


binary_cross_entropy_with_logits_fused.register_autograd(
    _logits_fused_backward, setup_context=_logits_fused_setup_context
)


# --------------------------------------------------------------------------------------------------------
# Eager calls: the same kernels without torch.library's dispatch (which costs more than a small loss)
# --------------------------------------------------------------------------------------------------------


class _EagerKernelLoss(torch.autograd.Function):
    """What the ops above do, for eager calls on CPU tensors that pass :func:`kernel_ready`: the fused
    pass when the input needs a gradient and the loss is reduced, else a forward pass and a backward-only
    pass. torch.compile keeps using the registered ops, which it can trace."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, spec: LossSpec, fuse: bool):
        loss, grad, _ = _kernel_pass(
            spec, input, target, weight, pos_weight, reduction=spec.reduction, grad_input=fuse
        )
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.spec, ctx.kernel, ctx.fused, ctx.stored = spec, True, fuse, grad
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.fused:
            gradients = _fused_backward(ctx, grad_output, None)
        else:
            gradients = _backward(ctx.spec, ctx, grad_output)
        return (*gradients, None, None, None, None)


def eager_kernel_loss(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
) -> Tensor:
    """The loss through the kernels for an eager call (the caller checked :func:`kernel_ready`)."""
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        fuse = input.requires_grad and spec.reduction != NONE
        return _EagerKernelLoss.apply(input, target, weight, pos_weight, spec, fuse)
    return _kernel_pass(spec, input, target, weight, pos_weight, reduction=spec.reduction)[0]


# --------------------------------------------------------------------------------------------------------
# The common eager call, with as little Python as possible: its cost is per call, and at small sizes the
# kernel is the smaller part of it
# --------------------------------------------------------------------------------------------------------

try:  # the device argument is torch >= 2.4's; the CPU-only function is deprecated there
    torch.is_autocast_enabled("cpu")

    def _autocast_cpu() -> bool:
        return torch.is_autocast_enabled("cpu")
except TypeError:
    _autocast_cpu = torch.is_autocast_cpu_enabled

_PLAIN_DTYPES = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}
if _native.AVAILABLE and "float64" in _native._DTYPES:
    _PLAIN_DTYPES[torch.float64] = 1
_PLAIN_REDUCTIONS = {"mean": MEAN, "sum": SUM, "none": NONE}
_PLAIN_KINDS = {"bce": 0, "logits": 1}
_PLAIN_SPECS = {(kind, enum): LossSpec(kind, enum) for kind in _PLAIN_KINDS for enum in (NONE, MEAN, SUM)}


def _plain_pass(spec: LossSpec, input: Tensor, target: Tensor, dtype: int, grad: bool):
    """One kernel pass for :func:`eager_plain_loss`: ``(loss, grad_input or None)``."""
    n = input.numel()
    loss_out = _output(input) if spec.reduction == NONE else None
    grad_out = _output(input) if grad else None
    value = _native.run_plain(
        _PLAIN_KINDS[spec.kind],
        dtype,
        n,
        input.data_ptr(),
        target.data_ptr(),
        0 if loss_out is None else loss_out.data_ptr(),
        0 if grad_out is None else grad_out.data_ptr(),
        spec.reduction,
        1.0 / n if spec.reduction == MEAN else 1.0,
        torch.get_num_threads(),
    )
    if loss_out is not None:
        return loss_out, grad_out
    return torch.scalar_tensor(value, dtype=input.dtype), grad_out


class _PlainFusedLoss(torch.autograd.Function):
    """:class:`_EagerKernelLoss`'s fused pass for :func:`eager_plain_loss` (same backward)."""

    @staticmethod
    def forward(ctx, input, target, spec: LossSpec, dtype: int):
        loss, grad = _plain_pass(spec, input, target, dtype, True)
        ctx.save_for_backward(input, target, None, None)  # the layout _fused_backward reads
        ctx.spec, ctx.kernel, ctx.spec_dtype, ctx.stored = spec, True, input.dtype, grad
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        # the usual case inline (loss.backward() on this loss: grad_output is a plain 1), else the general
        # fused backward; the answer is the same
        if (
            grad_output is not None
            and ctx.stored is not None
            and type(grad_output) is Tensor
            and grad_output.dtype is ctx.spec_dtype
            and grad_output.is_cpu
            and grad_output.numel() == 1
            and not torch.is_grad_enabled()
            and grad_output.item() == 1.0
        ):
            grad, ctx.stored = ctx.stored, None
            return grad, None, None, None
        return (*_fused_backward(ctx, grad_output, None), None, None)


# Function.apply's Python wrapper unwraps functorch tensors and binds default arguments: nothing this
# call needs (no transform is active, there are no defaults), and ~2 us of a ~60 us step. Its C++ base
# does the work.
_apply_plain_fused = super(torch.autograd.Function, _PlainFusedLoss).apply


def eager_plain_loss(kind: str, input: Tensor, target: Tensor, reduction: str) -> Optional[Tensor]:
    """The loss of the most common eager call, or None when the call is not one (the functionals then
    take their general path, whose checks and errors apply). The caller has checked that there are no
    weights, no legacy or keyword options and that both arguments are plain tensors; here: a reduction
    named as torch names them, one kernel dtype, equal shapes, contiguous non-empty CPU data, no
    autocast, torch.compile, ``torch.jit.trace``, torch.func transform or forward-mode tangent, and no
    target gradient. The results are those of the general path's kernel pass."""
    enum = _PLAIN_REDUCTIONS.get(reduction) if type(reduction) is str else None
    dtype = _PLAIN_DTYPES.get(input.dtype)
    if (
        enum is None
        or dtype is None
        or target.dtype is not input.dtype
        or not input.is_cpu
        or not target.is_cpu
        or input.shape != target.shape
        or not input.is_contiguous()
        or not target.is_contiguous()
        or input.numel() == 0
        or torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or _autocast_cpu()
        or torch._C._functorch.is_functorch_wrapped_tensor(input)
        or torch._C._functorch.is_functorch_wrapped_tensor(target)
        or torch.autograd.forward_ad._current_level >= 0
        or _TRITON_ON_CPU
    ):
        return None
    spec = _PLAIN_SPECS[kind, enum]
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        if target.requires_grad or enum == NONE:
            return None
        return _apply_plain_fused(input, target, spec, dtype)
    return _plain_pass(spec, input, target, dtype, False)[0]
