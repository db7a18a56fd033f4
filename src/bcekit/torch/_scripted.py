"""The loss modules' ``forward`` under ``torch.jit.script``.

TorchScript compiles a scripted model's ``forward`` and what it calls, which cannot be the functionals
(Python objects, ``__torch_function__``, autocast shims). Under scripting the modules call these
functions instead, written in the TorchScript subset. Each runs two registered operators, which a
scripted (or saved and reloaded) model calls through torch's dispatcher:

* ``bcekit::check_*``: the functionals' own argument checks (:mod:`bcekit.torch.functional`, which asks
  :mod:`bcekit._semantics`), so a scripted model refuses what the eager one refuses, with the same error,
  and the reduction string resolved to torch's enum;
* the loss operators of :mod:`bcekit.torch._ops` (the ones ``torch.compile`` records), which own the
  arithmetic, the [0, 1] check of probabilities and the backward.

Under ``torch.autocast`` both cast their floating tensors to float32 first, as the functionals do
(``torch.library.register_autocast``; torch releases without it run them in the tensors' dtypes).

(No ``from __future__ import annotations``: ``torch.library.custom_op`` and TorchScript read the hints.)
"""

from typing import Optional

import torch
from torch import Tensor

from bcekit import _semantics
from bcekit.torch import _linear, _ops, functional

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "linear_binary_cross_entropy_with_logits",
]


@torch.library.custom_op("bcekit::check_binary_cross_entropy", mutates_args=())
def _check_binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    reduction: str,
    label_smoothing: float,
    grad_enabled: bool,
) -> int:
    functional._check_devices(input, target, weight)
    enum = _semantics.reduction_enum(reduction)
    functional.check_probability_arguments(input, target, weight, label_smoothing, grad_enabled)
    return enum


@torch.library.custom_op("bcekit::check_binary_cross_entropy_with_logits", mutates_args=())
def _check_binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: str,
    label_smoothing: float,
    grad_enabled: bool,
) -> int:
    functional._check_devices(input, target, weight, pos_weight)
    enum = _semantics.reduction_enum(reduction)
    functional.check_logits_arguments(input, target, weight, pos_weight, label_smoothing, grad_enabled)
    return enum


@torch.library.custom_op("bcekit::check_sigmoid_focal_loss", mutates_args=())
def _check_sigmoid_focal_loss(
    input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str
) -> int:
    functional._check_devices(input, target)
    enum = _semantics.reduction_enum(reduction)
    functional.check_focal_arguments(input, target, alpha, gamma)
    return enum


@torch.library.custom_op("bcekit::check_linear_binary_cross_entropy_with_logits", mutates_args=())
def _check_linear_binary_cross_entropy_with_logits(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: str,
    chunk_size: Optional[int],
    grad_enabled: bool,
) -> tuple[int, int, int, int]:
    """``(reduction enum, labels per chunk, rows N, labels C)``, after the functional's checks."""
    enum = _semantics.reduction_enum(reduction)
    _, rows, labels = _linear.check_arguments(input, weight, target, bias, pos_weight, enum, grad_enabled)
    return enum, _linear._chunk(chunk_size, rows, labels, input), rows, labels


def _register_autocast() -> None:
    if not hasattr(torch.library, "register_autocast"):  # torch < 2.5
        return
    operators = (
        _check_binary_cross_entropy,
        _check_binary_cross_entropy_with_logits,
        _check_sigmoid_focal_loss,
        _ops.binary_cross_entropy,
        _ops.binary_cross_entropy_with_logits,
        _ops.sigmoid_focal_loss,
    )
    for operator in operators:
        for device in ("cpu", "cuda"):
            torch.library.register_autocast(operator, device, torch.float32)


_register_autocast()


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    reduction: str,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> Tensor:
    """:func:`bcekit.torch.binary_cross_entropy` in the TorchScript subset (its modules' configuration)."""
    enum = torch.ops.bcekit.check_binary_cross_entropy(
        input, target, weight, reduction, label_smoothing, torch.is_grad_enabled()
    )
    return torch.ops.bcekit.binary_cross_entropy(input, target, weight, enum, label_smoothing, ignore_index)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: str,
    label_smoothing: float,
    ignore_index: Optional[float],
) -> Tensor:
    """:func:`bcekit.torch.binary_cross_entropy_with_logits` in the TorchScript subset."""
    enum = torch.ops.bcekit.check_binary_cross_entropy_with_logits(
        input, target, weight, pos_weight, reduction, label_smoothing, torch.is_grad_enabled()
    )
    return torch.ops.bcekit.binary_cross_entropy_with_logits(
        input, target, weight, pos_weight, enum, label_smoothing, ignore_index
    )


def sigmoid_focal_loss(input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    """:func:`bcekit.torch.sigmoid_focal_loss` in the TorchScript subset."""
    enum = torch.ops.bcekit.check_sigmoid_focal_loss(input, target, alpha, gamma, reduction)
    return torch.ops.bcekit.sigmoid_focal_loss(input, target, alpha, gamma, enum)


def linear_binary_cross_entropy_with_logits(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: str,
    chunk_size: Optional[int],
) -> Tensor:
    """:func:`bcekit.torch.linear_binary_cross_entropy_with_logits` in the TorchScript subset: the same
    fused pass (the op ``torch.compile`` records). A sparse target is densified first (the op takes dense
    tensors); autocast is not applied."""
    if target.is_sparse or target.is_sparse_csr:
        target = target.to_dense()
    enum, chunk, rows, labels = torch.ops.bcekit.check_linear_binary_cross_entropy_with_logits(
        input, weight, target, bias, pos_weight, reduction, chunk_size, torch.is_grad_enabled()
    )
    x = input.reshape(rows, input.shape[-1])
    grad = torch.is_grad_enabled()
    outputs = torch.ops.bcekit.linear_binary_cross_entropy_with_logits(
        x,
        weight,
        bias,
        target.reshape(rows, labels),
        pos_weight,
        enum,
        chunk,
        False,
        grad and x.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return outputs[0]
