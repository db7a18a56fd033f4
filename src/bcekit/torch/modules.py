r"""``nn.Module`` forms of the losses: thin classes that hold their configuration and call a functional.

As in torch, ``weight`` and ``pos_weight`` are registered buffers (same ``state_dict`` keys, moved by
``.to()`` and ``.double()``), ``reduction`` is a plain attribute, and the deprecated ``size_average`` /
``reduce`` pair is mapped to ``reduction`` once, at construction, with torch's warning.
"""

from __future__ import annotations

from torch import Tensor, nn

from bcekit import _semantics
from bcekit.torch import functional

__all__ = ["BCELoss", "BCEWithLogitsLoss"]


class _Loss(nn.Module):
    reduction: str

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean"):
        super().__init__()
        if size_average is not None or reduce is not None:
            self.reduction = _semantics.legacy_reduction(size_average, reduce)
        else:
            self.reduction = reduction


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
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


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
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )
