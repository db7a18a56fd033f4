r"""Drop-in replacements for ``torch.nn.functional.binary_cross_entropy`` and ``..._with_logits``.

Same signatures, same semantics, same errors as torch 2.x eager, with these differences (all fixes):

* infinite logits give the exact loss (0 or +inf) and finite gradients, where torch gives NaN;
* every per-element loss is within 2 ulp of the exact value (torch's logits loss cancels for ``x << 0``);
* the probability loss works under ``torch.autocast`` on CUDA too, computing in float32.

Argument checks come from :mod:`bcekit._semantics`; the arithmetic runs in the ``bcekit::`` operators
(:mod:`bcekit.torch._ops`), so ``torch.compile(fullgraph=True)`` traces through these functions. Eager
calls that the kernels serve skip the operator dispatch and run the kernels' plan through an
``autograd.Function`` (:mod:`bcekit.torch._kernel`: same passes, less per-call overhead); the common
ones, plain CPU tensors, reach it by ``_eager_call``, which remembers the outcome of the checks and
the plan for each combination of shapes, dtypes and options it has seen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from bcekit import _semantics
from bcekit._math import LossSpec
from bcekit._semantics import ArraySpec
from bcekit.torch import _composed, _kernel, _ops, _transforms
from bcekit.torch._linear import linear_binary_cross_entropy_with_logits, linear_topk

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "linear_binary_cross_entropy_with_logits",
    "linear_topk",
]

_DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float16: ("f", "Half"),
    torch.bfloat16: ("f", "BFloat16"),
    torch.float32: ("f", "Float"),
    torch.float64: ("f", "Double"),
    torch.uint8: ("i", "Byte"),
    torch.int8: ("i", "Char"),
    torch.int16: ("i", "Short"),
    torch.int32: ("i", "Int"),
    torch.int64: ("i", "Long"),
    torch.bool: ("b", "Bool"),
    torch.complex64: ("c", "ComplexFloat"),
    torch.complex128: ("c", "ComplexDouble"),
}


def _spec(tensor: Tensor) -> ArraySpec:
    kind, name = _DTYPES.get(tensor.dtype, ("?", str(tensor.dtype)))
    return ArraySpec(tuple(tensor.shape), kind, name, tensor.dtype.itemsize * 8)


def _format_shape(shape: tuple[int, ...]) -> str:
    return str(torch.Size(shape))


#: Where each tensor argument stands in the functionals' signatures (torch's order), for the error text.
_POSITIONS = {"input": 1, "target": 2, "weight": 3, "pos_weight": 7}
_OPTIONAL = {"weight", "pos_weight"}


def _require_tensors(function: str, **arguments: Any) -> None:
    """A ``TypeError`` naming the first argument that is not a tensor (``None`` only where it is optional),
    where torch would fail later with an ``AttributeError``."""
    for name, value in arguments.items():
        if not isinstance(value, Tensor) and not (value is None and name in _OPTIONAL):
            raise TypeError(
                f"{function}(): argument '{name}' (position {_POSITIONS[name]}) must be Tensor, "
                f"not {type(value).__name__}"
            )


def _recording() -> bool:
    """Whether the call is being recorded as a graph (``torch.compile``, ``torch.jit.trace``): it must then
    run the registered ``bcekit::`` operators, which the recorder sees, not the kernels' eager path, which
    it does not (a trace would hold the example's loss as a constant)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_devices(*tensors: Tensor | None) -> None:
    """torch's error for meta tensors mixed with tensors that hold data (the composed path would otherwise
    return a tensor of uninitialised memory). Other mixes are left to the operators, which refuse them as
    torch does, 0-d CPU tensors beside CUDA ones allowed."""
    present = [t for t in tensors if t is not None]
    if any(t.is_meta for t in present) and not all(t.is_meta for t in present):
        expected = next(t.device for t in present if not t.is_meta)
        raise RuntimeError(f"Tensor on device meta is not on the expected device {expected}!")


@torch.compiler.assume_constant_result
def _resolve_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> int:
    """:func:`bcekit._semantics.resolve_reduction`, with its deprecation warnings. It depends on Python
    values only, so under ``torch.compile`` it runs once while tracing (where Dynamo cannot follow
    ``warnings.warn``) and its result is a constant of the graph, as torch's own functionals have it."""
    return _semantics.resolve_reduction(size_average, reduce, reduction)


@torch.compiler.assume_constant_result
def _reduction_enum(reduction: str) -> int:
    """:func:`bcekit._semantics.reduction_enum`, a constant of the graph as :func:`_resolve_reduction` is."""
    return _semantics.reduction_enum(reduction)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # a torch that takes no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def _autocast_to_float32(input: Tensor, *others: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, both losses run in float32 (torch's policy for BCE with logits, which we extend to
    the probability loss that torch refuses to autocast on CUDA): autocast's rule casts the half-precision
    tensors on the autocast device and leaves float64 ones as they are."""
    device = input.device.type
    tensors = (input, *others)
    if not _autocast_enabled(device):
        return tensors
    return tuple(
        t.float() if t is not None and t.dtype in _HALF_TYPES and t.device.type == device else t
        for t in tensors
    )


_HALF_TYPES = (torch.float16, torch.bfloat16)


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _check_no_weight_grad(function: str, grad_enabled: bool, **weights: Tensor | None) -> None:
    if not grad_enabled:
        return
    for name, weight in weights.items():
        if weight is not None and weight.requires_grad:
            raise _semantics.weight_requires_grad_error(function, name)


def check_probability_arguments(
    input: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float, grad_enabled: bool
) -> None:
    """The probability loss's checks of tensors and options (after the reduction's and autocast's): the
    functional's, and the scripted modules' (:mod:`bcekit.torch._scripted`)."""
    _semantics.check_binary_cross_entropy(
        _spec(input), _spec(target), None if weight is None else _spec(weight), _format_shape
    )
    _check_no_weight_grad("binary_cross_entropy", grad_enabled, weight=weight)
    _semantics.check_label_smoothing(label_smoothing)


def check_logits_arguments(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: float,
    grad_enabled: bool,
) -> None:
    """The logits loss's checks of tensors and options, as :func:`check_probability_arguments`."""
    _semantics.check_binary_cross_entropy_with_logits(
        _spec(input),
        _spec(target),
        None if weight is None else _spec(weight),
        None if pos_weight is None else _spec(pos_weight),
        _format_shape,
    )
    _check_no_weight_grad(
        "binary_cross_entropy_with_logits", grad_enabled, weight=weight, pos_weight=pos_weight
    )
    _semantics.check_label_smoothing(label_smoothing)


def check_focal_arguments(input: Tensor, target: Tensor, alpha: float, gamma: float) -> None:
    """The focal loss's checks of its parameters and tensors (after the reduction's and autocast's)."""
    _semantics.check_focal_parameters(alpha, gamma)
    _semantics.check_binary_cross_entropy_with_logits(_spec(input), _spec(target), None, None, _format_shape)


try:  # the device argument is torch >= 2.4's; the CPU-only function is deprecated there
    torch.is_autocast_enabled("cpu")

    def _autocast_cpu() -> bool:
        return torch.is_autocast_enabled("cpu")
except TypeError:
    _autocast_cpu = torch.is_autocast_cpu_enabled

_NUMBERS = (float, int)
_REDUCTIONS = frozenset(("mean", "sum", "none"))  # the legacy "elementwise_mean" warns: the general path
#: What :func:`_eager_call` found for each call it has seen: ``(spec, plan)``, or None where the kernels
#: do not serve the call. Bounded: a program that keeps changing shapes starts it afresh now and then.
_EAGER_CALLS: dict = {}
_EAGER_CALLS_LIMIT = 4096


def _eager_call(
    kind: str,
    input: Any,
    target: Any,
    weight: Any,
    pos_weight: Any,
    reduction: Any,
    label_smoothing: Any,
    ignore_index: Any,
) -> Tensor | None:
    """The loss of an eager call on plain CPU tensors through the kernels, or None when the call is not
    one (the general path then runs, and its checks and errors apply): no legacy arguments, no autocast,
    torch.compile, ``torch.jit.trace``, ``__torch_function__`` mode, torch.func transform or forward-mode
    AD, weights that do not require a gradient.

    What the general path decides before its kernel pass (the checks' outcome, the spec, the plan) depends
    only on the key below: the first call with a key runs those checks (:func:`_checked_spec`, raising
    their errors) and remembers the plan, and later calls with that key go straight to the kernels."""
    if (
        type(input) is not Tensor
        or type(target) is not Tensor
        or type(reduction) is not str
        or reduction not in _REDUCTIONS
        or type(label_smoothing) not in _NUMBERS
        or not (ignore_index is None or type(ignore_index) in _NUMBERS)
        or not input.is_cpu
        or not target.is_cpu
        or torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or _autocast_cpu()
        or torch._C._functorch.maybe_current_level() is not None
        or torch.autograd.forward_ad._current_level >= 0
        or _kernel._TRITON_ON_CPU
    ):
        return None
    weight_key = pos_weight_key = None
    if weight is not None:
        if type(weight) is not Tensor or not weight.is_cpu or weight.requires_grad:
            return None
        weight_key = (weight.dtype, weight.shape)
    if pos_weight is not None:
        if type(pos_weight) is not Tensor or not pos_weight.is_cpu or pos_weight.requires_grad:
            return None
        pos_weight_key = (pos_weight.dtype, pos_weight.shape)
    key = (
        kind,
        input.dtype,
        target.dtype,
        input.shape,
        target.shape,
        weight_key,
        pos_weight_key,
        reduction,
        label_smoothing,
        ignore_index,
    )
    found = _EAGER_CALLS.get(key, False)
    if found is False:
        enum = _semantics.resolve_reduction(None, None, reduction)
        spec = _checked_spec(kind, input, target, weight, pos_weight, enum, label_smoothing, ignore_index)
        plan = _kernel.plan_for(spec, input, target, weight, pos_weight)
        found = None if plan is None else (spec, plan)
        if len(_EAGER_CALLS) >= _EAGER_CALLS_LIMIT:
            _EAGER_CALLS.clear()
        _EAGER_CALLS[key] = found
    if found is None:
        return None
    return _kernel.eager_loss(found[1], found[0], input, target, weight, pos_weight)


def _checked_spec(
    kind: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: int,
    label_smoothing: float,
    ignore_index: float | None,
) -> LossSpec:
    """The checks of a call's tensors and options (after the reduction's and autocast's), and its spec."""
    grad_enabled = torch.is_grad_enabled()
    if kind == "bce":
        check_probability_arguments(input, target, weight, label_smoothing, grad_enabled)
    else:
        check_logits_arguments(input, target, weight, pos_weight, label_smoothing, grad_enabled)
    return LossSpec(kind, reduction, float(label_smoothing), _optional_float(ignore_index))


def _checked_loss(spec: LossSpec, input, target, weight, pos_weight) -> Tensor:
    """The loss of a checked call: where it goes (ONNX export, a torch.func transform, the kernels'
    eager route, the registered operators) decided here, once."""
    kind = spec.kind
    result_dtype = input.dtype if kind == "bce" else target.dtype
    if _ops.exporting():  # ONNX has no bcekit:: operators: the composed loss, in standard ones
        return _composed.composed_loss(spec, input, target, weight, pos_weight, result_dtype)
    if _transforms.active(input, target, weight, pos_weight):
        if kind == "bce" and not _transforms.wrapped(input, target):
            _composed.check_probabilities(input, target, spec.ignore_index)
        return _transforms.loss(spec, input, target, weight, pos_weight, result_dtype)
    options = (spec.reduction, spec.label_smoothing, spec.ignore_index)
    plan = _kernel.plan_for(spec, input, target, weight, pos_weight)
    if plan is not None:
        if not _recording():
            return _kernel.eager_loss(plan, spec, input, target, weight, pos_weight)
        if spec.reduction != _semantics.NONE and input.requires_grad and torch.is_grad_enabled():
            if kind == "bce":
                return _ops.binary_cross_entropy_fused(input, target, weight, *options)[0]
            return _ops.binary_cross_entropy_with_logits_fused(input, target, weight, pos_weight, *options)[0]
    if kind == "bce":
        return _ops.binary_cross_entropy(input, target, weight, *options)
    return _ops.binary_cross_entropy_with_logits(input, target, weight, pos_weight, *options)


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
) -> Tensor:
    r"""Binary cross-entropy between probabilities and targets, as ``torch.nn.functional``'s.

    .. math::
        \ell_n = -w_n \left[ y_n \max(\log x_n, -100) + (1 - y_n) \max(\log(1 - x_n), -100) \right]

    reduced by ``'mean'`` (sum over the element count, not over the weights), ``'sum'`` or ``'none'``.

    Args:
        input: probabilities in [0, 1], shape ``(*)``.
        target: same shape and dtype as ``input``, values in [0, 1] (soft targets allowed).
        weight: rescaling weight broadcastable to ``input``'s shape. Not differentiable.
        size_average, reduce: deprecated; either one, when given, overrides ``reduction``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        label_smoothing: ``s`` in [0, 1] (keyword-only); targets become ``y (1 - s) + s / 2``, Keras's
            definition: hard labels 0 and 1 become ``s / 2`` and ``1 - s / 2``.
        ignore_index: (keyword-only) elements whose target equals it add no loss and get zero gradients,
            and ``'mean'`` divides by the number of elements kept; NaN matches NaN targets. Their targets
            are not range-checked. All ignored: ``'mean'`` is NaN (with zero gradients), ``'sum'`` is 0.

    Returns:
        A 0-d tensor, or ``input``'s shape for ``'none'``; ``input``'s dtype. Differentiable in ``input``
        (torch's ``(x - y) / max(x (1 - x), 1e-12)``) and ``target`` (``-logit(x)``), twice.

    >>> import torch
    >>> from bcekit.torch import binary_cross_entropy
    >>> x = torch.tensor([0.9, 0.2, 1.0]); y = torch.tensor([1.0, 0.0, 0.0])
    >>> binary_cross_entropy(x, y, reduction="none")  # log(0) is clamped: the last costs 100
    tensor([  0.1054,   0.2231, 100.0000])
    """
    if size_average is None and reduce is None:
        loss = _eager_call("bce", input, target, weight, None, reduction, label_smoothing, ignore_index)
        if loss is not None:
            return loss
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            binary_cross_entropy,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
        )
    _require_tensors("binary_cross_entropy", input=input, target=target, weight=weight)
    _check_devices(input, target, weight)
    enum = _resolve_reduction(size_average, reduce, reduction)
    input, target, weight = _autocast_to_float32(input, target, weight)
    spec = _checked_spec("bce", input, target, weight, None, enum, label_smoothing, ignore_index)
    return _checked_loss(spec, input, target, weight, None)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
) -> Tensor:
    r"""Binary cross-entropy on logits (sigmoid + BCE in one exact step), as ``torch.nn.functional``'s.

    .. math::
        \ell_n = w_n \left[ p\, y_n \log(1 + e^{-x_n}) + (1 - y_n) \log(1 + e^{x_n}) \right]

    with ``p = pos_weight`` broadcast against ``input`` (a ``(C,)`` tensor weighs the classes along the
    last dimension). Each term is computed as a softplus, so the loss keeps every digit where it is tiny;
    infinite logits give 0 when their sign agrees with the target and +inf otherwise, with finite gradients.

    Args:
        input: logits, shape ``(*)``.
        target: same shape as ``input``, values in [0, 1]. Its dtype is the result's.
        weight: rescaling weight broadcastable to ``input``'s shape. Not differentiable.
        size_average, reduce: deprecated; either one, when given, overrides ``reduction``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        pos_weight: weight of positive examples, broadcastable to ``input``'s shape. Not differentiable.
        label_smoothing, ignore_index: keyword-only, as in :func:`binary_cross_entropy`.

    >>> import torch
    >>> from bcekit.torch import binary_cross_entropy_with_logits
    >>> x = torch.tensor([float("inf"), -float("inf"), -30.0]); y = torch.tensor([1.0, 0.0, 0.0])
    >>> binary_cross_entropy_with_logits(x, y, reduction="none")  # torch: [nan, nan, 0.]
    tensor([0.0000e+00, 0.0000e+00, 9.3576e-14])
    """
    if size_average is None and reduce is None:
        loss = _eager_call(
            "logits", input, target, weight, pos_weight, reduction, label_smoothing, ignore_index
        )
        if loss is not None:
            return loss
    if has_torch_function_variadic(input, target, weight, pos_weight):
        return handle_torch_function(
            binary_cross_entropy_with_logits,
            (input, target, weight, pos_weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            pos_weight=pos_weight,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
        )
    _require_tensors(
        "binary_cross_entropy_with_logits", input=input, target=target, weight=weight, pos_weight=pos_weight
    )
    _check_devices(input, target, weight, pos_weight)
    enum = _resolve_reduction(size_average, reduce, reduction)
    input, target, weight, pos_weight = _autocast_to_float32(input, target, weight, pos_weight)
    spec = _checked_spec("logits", input, target, weight, pos_weight, enum, label_smoothing, ignore_index)
    return _checked_loss(spec, input, target, weight, pos_weight)


def sigmoid_focal_loss(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    r"""Sigmoid focal loss (Lin et al., 2017), torchvision's ``sigmoid_focal_loss``, computed in log space.

    .. math::
        \ell = \alpha_t\, \mathrm{BCEWithLogits}(x, y)\, (1 - p_t)^\gamma,\quad
        1 - p_t = \sigma(x)(1 - y) + \sigma(-x)\,y,\quad \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    Down-weights easy examples (``p_t`` near 1) so that training concentrates on hard ones: the usual
    choice for dense detection and heavily imbalanced multi-label problems. ``alpha < 0`` disables the
    class weighting; soft targets are allowed. torchvision's formula overflows or turns NaN for large
    logits (and for ``gamma < 1`` in the gradient); here every factor is formed in log space, so logits up
    to ``|1e4|`` and any ``gamma >= 0`` give finite losses and gradients.

    Args:
        input: logits, any shape.
        target: same shape, values in [0, 1]; its dtype is the result's (as for the logits loss).
        alpha: weight of the positive class in [0, 1], or negative for no weighting.
        gamma: focusing exponent ``>= 0``; 0 gives the alpha-weighted BCE.
        reduction: ``'none'`` (torchvision's default) | ``'mean'`` | ``'sum'``.

    >>> import torch
    >>> from bcekit.torch import sigmoid_focal_loss
    >>> sigmoid_focal_loss(torch.tensor([3.0, -3.0]), torch.tensor([1.0, 1.0]))  # easy, then hard
    tensor([2.7321e-05, 6.9157e-01])
    """
    if has_torch_function_variadic(input, target):
        return handle_torch_function(
            sigmoid_focal_loss, (input, target), input, target, alpha=alpha, gamma=gamma, reduction=reduction
        )
    _require_tensors("sigmoid_focal_loss", input=input, target=target)
    _check_devices(input, target)
    enum = _reduction_enum(reduction)
    input, target = _autocast_to_float32(input, target)
    check_focal_arguments(input, target, alpha, gamma)
    if _ops.exporting():  # ONNX has no bcekit:: operators: the composed loss, in standard ones
        spec = LossSpec("focal", enum, alpha=float(alpha), gamma=float(gamma))
        return _composed.composed_loss(spec, input, target, None, None, target.dtype)
    if _transforms.active(input, target):
        spec = LossSpec("focal", enum, alpha=float(alpha), gamma=float(gamma))
        return _transforms.loss(spec, input, target, None, None, target.dtype)
    return _ops.sigmoid_focal_loss(input, target, float(alpha), float(gamma), enum)
