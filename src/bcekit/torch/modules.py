r"""``nn.Module`` forms of the losses: thin classes that hold their configuration and call a functional.

As in torch, ``weight`` and ``pos_weight`` are registered buffers (same ``state_dict`` keys, moved by
``.to()`` and ``.double()``), ``reduction`` is a plain attribute, and the deprecated ``size_average`` /
``reduce`` pair is mapped to ``reduction`` once, at construction, with torch's warning.
"""

from __future__ import annotations

from torch import Tensor, nn

from bcekit import _semantics
from bcekit.torch import functional

__all__ = ["BCELoss", "BCEWithLogitsLoss", "SigmoidFocalLoss"]


class _Loss(nn.Module):
    """Configuration shared by the BCE modules: the reduction (legacy pair mapped once, here) and the
    keyword-only target options, validated at construction."""

    reduction: str

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        ignore_index: float | None = None,
    ):
        super().__init__()
        if size_average is not None or reduce is not None:
            self.reduction = _semantics.legacy_reduction(size_average, reduce)
        else:
            self.reduction = reduction
        _semantics.check_label_smoothing(label_smoothing)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        options = []
        if self.label_smoothing:
            options.append(f"label_smoothing={self.label_smoothing}")
        if self.ignore_index is not None:
            options.append(f"ignore_index={self.ignore_index}")
        return ", ".join(options)


class BCELoss(_Loss):
    r"""Binary cross-entropy between probabilities and targets; see :func:`bcekit.torch.binary_cross_entropy`.

    .. math::
        \ell_n = -w_n \left[ y_n \max(\log x_n, -100) + (1 - y_n) \max(\log(1 - x_n), -100) \right]

    Shape: input ``(*)``, target same as input, output scalar (``(*)`` for ``reduction='none'``).

    >>> import torch
    >>> from bcekit.torch import BCELoss
    >>> m = torch.nn.Sigmoid()
    >>> loss = BCELoss()
    >>> input = torch.randn(3, requires_grad=True)
    >>> target = torch.empty(3).random_(2)
    >>> output = loss(m(input), target)
    >>> output.backward()
    """

    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        label_smoothing: float = 0.0,
        ignore_index: float | None = None,
    ) -> None:
        super().__init__(size_average, reduce, reduction, label_smoothing, ignore_index)
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.binary_cross_entropy(
            input,
            target,
            weight=self.weight,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )


class BCEWithLogitsLoss(_Loss):
    r"""Binary cross-entropy on logits; see :func:`bcekit.torch.binary_cross_entropy_with_logits`.

    .. math::
        \ell_{n,c} = w_{n,c} \left[ p_c\, y_{n,c} \log(1 + e^{-x_{n,c}})
                     + (1 - y_{n,c}) \log(1 + e^{x_{n,c}}) \right]

    ``pos_weight`` ``p_c > 1`` raises recall, ``< 1`` raises precision: with 100 positive and 300 negative
    examples of a class, ``pos_weight = 3`` makes the loss act as if there were 300 positives.

    >>> import torch
    >>> from bcekit.torch import BCEWithLogitsLoss
    >>> target = torch.ones(10, 64)  # 64 classes, batch size 10
    >>> output = torch.full((10, 64), 1.5)  # a prediction (logit)
    >>> criterion = BCEWithLogitsLoss(pos_weight=torch.ones(64))
    >>> criterion(output, target)  # -log(sigmoid(1.5))
    tensor(0.2014)
    """

    weight: Tensor | None
    pos_weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
        ignore_index: float | None = None,
    ) -> None:
        super().__init__(size_average, reduce, reduction, label_smoothing, ignore_index)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )


class SigmoidFocalLoss(nn.Module):
    r"""Sigmoid focal loss as a module; see :func:`bcekit.torch.sigmoid_focal_loss`.

    .. math::
        \ell = \alpha_t\, \mathrm{BCEWithLogits}(x, y)\, (1 - p_t)^\gamma

    >>> import torch
    >>> from bcekit.torch import SigmoidFocalLoss
    >>> SigmoidFocalLoss(alpha=-1, gamma=0, reduction="mean")(torch.zeros(4), torch.ones(4))  # plain BCE
    tensor(0.6931)
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__()
        _semantics.check_focal_parameters(alpha, gamma)
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"
