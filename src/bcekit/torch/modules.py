r"""``nn.Module`` forms of the losses: thin classes that hold their configuration and call a functional.

As in torch, ``weight`` and ``pos_weight`` are registered buffers (same ``state_dict`` keys, moved by
``.to()`` and ``.double()``), ``reduction`` is a plain attribute, and the deprecated ``size_average`` /
``reduce`` pair is mapped to ``reduction`` once, at construction, with torch's warning.

``torch.jit.script`` compiles their ``forward``: under scripting it calls :mod:`bcekit.torch._scripted`
(the same checks and operators, in the TorchScript subset) instead of the functionals. TorchScript reads
the attributes' annotations as objects, not strings (no ``from __future__ import annotations``).
"""

import math

import torch
from torch import Tensor, nn

from bcekit import _semantics
from bcekit.torch import _scripted, functional

__all__ = ["BCELoss", "BCEWithLogitsLoss", "SigmoidFocalLoss", "LinearBCEWithLogitsLoss"]


class _Loss(nn.modules.loss._Loss):
    """Configuration shared by the BCE modules: the reduction (legacy pair mapped once, here) and the
    keyword-only target options, validated at construction. A ``torch.nn.modules.loss._Loss``, as torch's
    loss modules are, for the frameworks that look for one."""

    reduction: str

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        ignore_index: float | None = None,
    ):
        if size_average is not None or reduce is not None:
            reduction = _semantics.legacy_reduction(size_average, reduce)
        super().__init__(reduction=reduction)
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
        if torch.jit.is_scripting():
            return _scripted.binary_cross_entropy(
                input,
                target,
                self.weight,
                self.reduction,
                float(self.label_smoothing),
                None if self.ignore_index is None else float(self.ignore_index),
            )
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
        if torch.jit.is_scripting():
            return _scripted.binary_cross_entropy_with_logits(
                input,
                target,
                self.weight,
                self.pos_weight,
                self.reduction,
                float(self.label_smoothing),
                None if self.ignore_index is None else float(self.ignore_index),
            )
        return functional.binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )


class SigmoidFocalLoss(nn.modules.loss._Loss):
    r"""Sigmoid focal loss as a module; see :func:`bcekit.torch.sigmoid_focal_loss`.

    .. math::
        \ell = \alpha_t\, \mathrm{BCEWithLogits}(x, y)\, (1 - p_t)^\gamma

    >>> import torch
    >>> from bcekit.torch import SigmoidFocalLoss
    >>> SigmoidFocalLoss(alpha=-1, gamma=0, reduction="mean")(torch.zeros(4), torch.ones(4))  # plain BCE
    tensor(0.6931)
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__(reduction=reduction)
        _semantics.check_focal_parameters(alpha, gamma)
        self.alpha, self.gamma = alpha, gamma

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            alpha, gamma = float(self.alpha), float(self.gamma)
            return _scripted.sigmoid_focal_loss(input, target, alpha, gamma, self.reduction)
        return functional.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class LinearBCEWithLogitsLoss(nn.Module):
    r"""``nn.Linear(in_features, out_features)`` followed by ``BCEWithLogitsLoss``, fused: the
    ``(N, out_features)`` logits are never built. See
    :func:`bcekit.torch.linear_binary_cross_entropy_with_logits`.

    .. math::
        \ell = \operatorname{BCEWithLogits}(z, Y), \qquad z = X W^\top + b

    The module owns the classifier's ``weight`` ``(out_features, in_features)`` and ``bias``
    ``(out_features,)``, initialised as ``nn.Linear`` initialises them (the same values for the same random
    state); ``pos_weight`` is a buffer. ``forward(input, target)`` returns the loss; :meth:`topk` gives the
    best-scoring labels for inference over label spaces too large for a full logits matrix.

    >>> import torch
    >>> from bcekit.torch import LinearBCEWithLogitsLoss
    >>> head = LinearBCEWithLogitsLoss(64, 100_000)
    >>> hidden = torch.randn(32, 64, requires_grad=True)
    >>> where = torch.tensor([[0, 1, 31], [5, 99_999, 7]])  # (row, label) of each positive
    >>> labels = torch.sparse_coo_tensor(where, torch.ones(3), (32, 100_000), check_invariants=True)
    >>> head(hidden, labels).backward()  # gradients for hidden, head.weight and head.bias
    >>> scores, indices = head.topk(hidden.detach(), k=5)  # (32, 5) each
    """

    pos_weight: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        pos_weight: Tensor | None = None,
        reduction: str = "mean",
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.reduction, self.chunk_size = reduction, chunk_size
        _semantics.check_linear_binary_cross_entropy(
            (1, in_features),
            (out_features, in_features),
            (1, out_features),
            None,
            None if pos_weight is None else tuple(pos_weight.shape),
            _semantics.reduction_enum(reduction),
            False,
        )
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("pos_weight", pos_weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation: Kaiming-uniform weight, bias uniform in +-1/sqrt(in_features)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return _scripted.linear_binary_cross_entropy_with_logits(
                input, self.weight, target, self.bias, self.pos_weight, self.reduction, self.chunk_size
            )
        return functional.linear_binary_cross_entropy_with_logits(
            input,
            self.weight,
            target,
            self.bias,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
        )

    def topk(self, input: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` highest logits per row and their labels, ``(values, indices)``, as ``torch.topk`` of the
        full logits gives them, computed chunk by chunk."""
        return functional.linear_topk(input, self.weight, k, self.bias, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, reduction={self.reduction!r}"
        )
