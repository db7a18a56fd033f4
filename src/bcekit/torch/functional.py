r"""Drop-in replacements for ``torch.nn.functional.binary_cross_entropy`` and ``..._with_logits``.

Same signatures, same semantics, same errors as torch 2.x eager, with these differences (all fixes):

* infinite logits give the exact loss (0 or +inf) and finite gradients, where torch gives NaN;
* every per-element loss is within 2 ulp of the exact value (torch's logits loss cancels for ``x << 0``);
* the probability loss works under ``torch.autocast`` on CUDA too, computing in float32.

Argument checks come from :mod:`bcekit._semantics`; the arithmetic runs in the ``bcekit::`` operators
(:mod:`bcekit.torch._ops`), so ``torch.compile(fullgraph=True)`` traces through these functions. Eager
calls on CPU tensors that the C++ kernels serve skip the operator dispatch and call the kernels through
an ``autograd.Function`` (same passes, less per-call overhead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from bcekit import _semantics
from bcekit._math import LossSpec
from bcekit._semantics import ArraySpec
from bcekit.torch import _ops, _transforms
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


def _fuse(input: Tensor, reduction: int) -> bool:
    """A reduced loss whose input needs a gradient: compute that gradient in the forward's kernel pass."""
    return reduction != _semantics.NONE and input.requires_grad and torch.is_grad_enabled()


def _plain_call(
    input: Any,
    target: Any,
    weight: Any,
    pos_weight: Any,
    size_average: Any,
    reduce: Any,
    label_smoothing: Any,
    ignore_index: Any,
) -> bool:
    """No weights, legacy arguments or options, and plain tensors: the call :func:`_ops.eager_plain_loss`
    may take (it checks the rest, and declines what it cannot serve)."""
    return (
        weight is None
        and pos_weight is None
        and size_average is None
        and reduce is None
        and label_smoothing == 0.0
        and ignore_index is None
        and type(input) is Tensor
        and type(target) is Tensor
    )


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
    if _plain_call(input, target, weight, None, size_average, reduce, label_smoothing, ignore_index):
        loss = _ops.eager_plain_loss("bce", input, target, reduction)
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
    check_probability_arguments(input, target, weight, label_smoothing, torch.is_grad_enabled())
    smoothing, ignore = float(label_smoothing), _optional_float(ignore_index)
    if _ops.exporting():  # ONNX has no bcekit:: operators: the composed loss, in standard ones
        spec = LossSpec("bce", enum, smoothing, ignore)
        return _ops.composed_loss(spec, input, target, weight, None, input.dtype)
    if _transforms.active(input, target, weight):
        if not _transforms.wrapped(input, target):
            _ops.check_probabilities(input, target, ignore)
        spec = LossSpec("bce", enum, smoothing, ignore)
        return _transforms.loss(spec, input, target, weight, None, input.dtype)
    spec = LossSpec("bce", enum, smoothing, ignore)
    if _ops.kernel_ready(spec, input, target, weight, None):
        if not _recording():
            return _ops.eager_kernel_loss(spec, input, target, weight, None)
        if _fuse(input, enum):
            return _ops.binary_cross_entropy_fused(input, target, weight, enum, smoothing, ignore)[0]
    return _ops.binary_cross_entropy(input, target, weight, enum, smoothing, ignore)


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
    if _plain_call(input, target, weight, pos_weight, size_average, reduce, label_smoothing, ignore_index):
        loss = _ops.eager_plain_loss("logits", input, target, reduction)
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
    check_logits_arguments(input, target, weight, pos_weight, label_smoothing, torch.is_grad_enabled())
    smoothing, ignore = float(label_smoothing), _optional_float(ignore_index)
    if _ops.exporting():  # ONNX has no bcekit:: operators: the composed loss, in standard ones
        spec = LossSpec("logits", enum, smoothing, ignore)
        return _ops.composed_loss(spec, input, target, weight, pos_weight, target.dtype)
    if _transforms.active(input, target, weight, pos_weight):
        spec = LossSpec("logits", enum, smoothing, ignore)
        return _transforms.loss(spec, input, target, weight, pos_weight, target.dtype)
    spec = LossSpec("logits", enum, smoothing, ignore)
    if _ops.kernel_ready(spec, input, target, weight, pos_weight):
        if not _recording():
            return _ops.eager_kernel_loss(spec, input, target, weight, pos_weight)
        if _fuse(input, enum):
            loss, _ = _ops.binary_cross_entropy_with_logits_fused(
                input, target, weight, pos_weight, enum, smoothing, ignore
            )
            return loss
    return _ops.binary_cross_entropy_with_logits(input, target, weight, pos_weight, enum, smoothing, ignore)


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
        return _ops.composed_loss(spec, input, target, None, None, target.dtype)
    if _transforms.active(input, target):
        spec = LossSpec("focal", enum, alpha=float(alpha), gamma=float(gamma))
        return _transforms.loss(spec, input, target, None, None, target.dtype)
    return _ops.sigmoid_focal_loss(input, target, float(alpha), float(gamma), enum)
