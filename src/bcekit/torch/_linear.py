r"""Fused linear + BCE-with-logits over chunks of labels: the ``(N, C)`` logits are never built.

With ``Z = X W^T + b`` (``X``: ``(N, D)``, ``W``: ``(C, D)``) and the logits loss

.. math::
    \ell(z, y) = p\, y \log(1 + e^{-z}) + (1 - y) \log(1 + e^{z}), \qquad
    g = \partial \ell / \partial z = (1 - y)\, \sigma(z) - p\, y\, \sigma(-z),

the loss is :math:`s \sum_{n,c} \ell(Z_{nc}, Y_{nc})` (``s = 1/(NC)`` for the mean, 1 for the sum) and its
gradients are :math:`\nabla_X = s\, G W`, :math:`\nabla_W = s\, G^T X`, :math:`\nabla_b = s\, G^T 1`. Each
chunk of ``k`` labels (rows ``c0:c1`` of ``W``) gives ``Z_c`` (``(N, k)``), whose loss and ``G_c`` come from
one pass of bcekit's kernels (C++ on the CPU, Triton on CUDA); then ``\nabla_X \mathrel{+}= G_c W_c`` and
``\nabla_W[c0:c1] = G_c^T X``. Only chunk-sized buffers exist besides the gradients themselves, which the
forward computes and the backward scales by ``grad_output`` (as Liger-Kernel's fused losses do).

Sparse targets. :math:`\ell` is affine in ``y``: :math:`\ell(z, y) = \ell(z, 0) + y\,(p\,\log(1 + e^{-z}) -
\log(1 + e^{z}))`. So a chunk is first scored against ``y = 0`` (a reused chunk-sized buffer of zeros), and
the stored entries ``(n, c, y)`` of the target (sorted by label once) then add their correction
``\ell(z, y) - \ell(z, 0)`` and overwrite their ``G_c`` entries with ``g``, both from the library's composed
formulas in float64 on the ``Z_c`` entries they pick. The target is never densified.

Label sharding. With a ``process_group``, ``W``, ``b``, ``pos_weight`` and the target's columns are this
rank's contiguous shard of the labels; the label count, the loss and ``\nabla_X`` are all-reduced (sums), so
every rank returns the unsharded loss and ``\nabla_X``, and its own shard of ``\nabla_W``, ``\nabla_b``.

Routes. Eager calls go through an autograd Function (``_LinearBCE``); under ``torch.compile`` the pass
is the registered op ``bcekit::linear_binary_cross_entropy_with_logits`` (the loss and the stored
gradients), which Dynamo keeps whole. Sparse targets and label sharding always run eagerly: Dynamo traces
neither sparse tensors nor collectives.

(No ``from __future__ import annotations``: ``torch.library.custom_op`` reads the op's type hints, which
torch releases before PEP 604 support need as ``Optional[...]``.)
"""

import weakref
from typing import Any, List, NamedTuple, Optional  # noqa: UP035 (typing spellings for op hints)

import torch
import torch.nn.functional as F
from torch import Tensor

from bcekit import _semantics
from bcekit._math import LossSpec
from bcekit._semantics import MEAN, NONE, SUM
from bcekit.torch import _composed, _kernel, _ops

__all__ = [
    "linear_binary_cross_entropy_with_logits",
    "linear_topk",
    "default_chunk_size",
    "linear_binary_cross_entropy_with_logits_fused",
]

# Bytes of one (N, chunk) buffer; a pass holds about three (logits, their gradient, the target chunk).
# On the CPU 8 MiB keeps the matmuls efficient (at N = 2048 float32, 1024 labels a chunk: as fast as 8192)
# and the step's memory at a few percent of the unfused path's.
_CHUNK_BYTES = {"cpu": 1 << 23, "cuda": 1 << 28}
_SUM_SPEC = LossSpec("logits", SUM, 0.0, None)
_NONE_SPEC = LossSpec("logits", NONE, 0.0, None)
NAME = _semantics.LINEAR_FUNCTION
#: The dtypes autocast casts (float64 stays as it is)
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_chunk_size(rows: int, labels: int, dtype: torch.dtype, device: torch.device) -> int:
    """Labels per chunk when ``chunk_size=None``: one ``(rows, chunk)`` buffer of the accumulation dtype
    within 8 MiB on the CPU (a few percent of the unfused path's memory) or 256 MiB on a GPU (large
    matmuls)."""
    itemsize = torch.finfo(_accumulation_dtype(dtype)).bits // 8
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cuda"])
    return _semantics.linear_chunk_size(rows, labels, itemsize, budget)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SparseTarget:
    """A sparse target's stored entries ``(row, label, value)``, sorted by label, cut by chunk."""

    def __init__(self, target: Tensor, chunk: int) -> None:
        coo = target.to_sparse_coo() if target.layout != torch.sparse_coo else target
        coo = coo.coalesce()  # duplicates add up, as to_dense() would
        rows, labels = coo.indices()
        values = coo.values()
        order = torch.argsort(labels, stable=True)
        self.rows, self.labels, self.values = rows[order], labels[order], values[order]
        edges = torch.arange(0, target.shape[1] + chunk, chunk, device=labels.device)
        self.edges = torch.searchsorted(self.labels, edges.clamp_max(target.shape[1])).tolist()

    def chunk(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        start, stop = self.edges[index], self.edges[index + 1]
        return self.rows[start:stop], self.labels[start:stop], self.values[start:stop]


def _chunk_pass(
    logits: Tensor,
    target: Tensor | None,
    pos_weight: Tensor | None,
    scale: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(sum of the chunk's losses in float64, scale * d loss / d logits)`` in one kernel pass."""
    y = target if target.dtype == logits.dtype else target.to(logits.dtype)
    p = None if pos_weight is None else pos_weight.to(logits.dtype)
    plan = _kernel.plan_for(_SUM_SPEC, logits, y, None, p)
    if plan is not None:
        loss, grad, _ = _kernel.kernel_pass(
            plan,
            logits,
            y,
            None,
            p,
            grad_input=want_grad,
            grad_scale=scale,
            loss_dtype=torch.float64,
        )
        return loss, grad
    # composed fallback (e.g. CUDA without Triton): the library's formulas, in its compute dtype (float32
    # in float64, as the kernels do: a sparse target's corrections cancel the base term to the last digit)
    loss = _composed.composed_loss(_SUM_SPEC, logits, y, None, p, torch.float64)
    grad = None
    if want_grad:
        grad_logits, _, _ = _composed.elementwise_gradients(_SUM_SPEC, logits, y, None, p, True, False)
        grad = (grad_logits * scale).to(logits.dtype)
    return loss, grad


def _sparse_correction(
    logits: Tensor,
    grad: Tensor | None,
    rows: Tensor,
    labels: Tensor,
    values: Tensor,
    pos_weight: Tensor | None,
    scale: float,
) -> Tensor:
    """The loss the stored entries add to a chunk scored against y = 0; their exact gradients go into
    ``grad`` (already holding ``scale * sigma(z)`` there)."""
    if rows.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=logits.device)
    z, y = logits[rows, labels].double(), values.double()
    p = None if pos_weight is None else pos_weight.double()[labels]
    with_target = _composed.composed_loss(_NONE_SPEC, z, y, None, p, torch.float64)
    base = _composed.composed_loss(_NONE_SPEC, z, torch.zeros_like(y), None, p, torch.float64)
    if grad is not None:
        exact, _, _ = _composed.elementwise_gradients(_NONE_SPEC, z, y, None, p, True, False)
        grad[rows, labels] = (exact * scale).to(grad.dtype)
    return (with_target - base).sum()


class _Plan(NamedTuple):
    """How a call runs, decided once by :func:`linear_binary_cross_entropy_with_logits`."""

    reduction: int
    chunk: int
    process_group: Any = None
    #: Under autocast (the operands already cast to its dtype): the logits in that dtype and the BCE, its
    #: logit gradients and the loss in float32, as torch's autocast runs ``F.linear`` and the BCE.
    autocast: bool = False


def _autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype autocast runs ``F.linear`` of ``tensor`` in, or None where autocast leaves it alone."""
    device = tensor.device.type
    if tensor.dtype not in _AUTOCAST_DTYPES or not _autocast_on(device):
        return None
    return torch.get_autocast_dtype(device)


def _autocast_on(device: str) -> bool:
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _fused_pass(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    pos_weight: Tensor | None,
    plan: _Plan,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The 0-d loss (float32 with ``plan.autocast``, else in ``x``'s dtype) and the gradients asked for in
    ``needs`` (input, weight, bias), chunk by chunk."""
    if plan.autocast:  # the operands are cast already; gradients written out= must keep their dtype
        with torch.autocast(x.device.type, enabled=False):
            return _chunked_pass(x, weight, bias, target, pos_weight, plan, needs)
    return _chunked_pass(x, weight, bias, target, pos_weight, plan, needs)


def _chunked_pass(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    pos_weight: Tensor | None,
    plan: _Plan,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    rows, labels = x.shape[0], weight.shape[0]
    reduction, chunk, process_group = plan.reduction, plan.chunk, plan.process_group
    accumulate = _accumulation_dtype(x.dtype)
    total_labels = labels
    if process_group is not None:
        import torch.distributed as dist

        count = torch.tensor([labels], dtype=torch.int64, device=x.device)
        dist.all_reduce(count, group=process_group)
        total_labels = int(count.item())
    scale = 1.0 / (rows * total_labels) if reduction == MEAN and rows * total_labels else 1.0
    need_input, need_weight, need_bias = needs
    want_grad = any(needs)
    grad_input = torch.zeros(x.shape, dtype=accumulate, device=x.device) if need_input else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = torch.empty_like(bias) if need_bias and bias is not None else None
    sparse = _SparseTarget(target, chunk) if target.layout != torch.strided else None
    zeros = None
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    p_full = None if pos_weight is None else pos_weight.expand(labels)
    for index, start in enumerate(range(0, labels, chunk)):
        stop = min(labels, start + chunk)
        w = weight[start:stop]
        logits = F.linear(x, w, None if bias is None else bias[start:stop])
        if plan.autocast:
            logits = logits.float()
        p = None if p_full is None else p_full[start:stop]
        if sparse is None:
            y = target[:, start:stop]
        else:
            if zeros is None or zeros.shape != logits.shape:
                zeros = torch.zeros_like(logits)
            y = zeros
        loss, grad = _chunk_pass(logits, y, p, scale, want_grad)
        total += loss
        if sparse is not None:
            chunk_rows, chunk_labels, values = sparse.chunk(index)
            total += _sparse_correction(logits, grad, chunk_rows, chunk_labels - start, values, p, scale)
        del logits
        if grad is None:
            continue
        if plan.autocast:  # the float32 logit gradient, rounded as the backward of autocast's cast does
            grad = grad.to(x.dtype)
        if grad_input is not None:
            grad_input += grad @ w
        if grad_weight is not None:
            torch.mm(grad.t(), x, out=grad_weight[start:stop])
        if grad_bias is not None:
            grad_bias[start:stop] = grad.sum(0, dtype=accumulate)
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(total, group=process_group)
        if grad_input is not None:
            dist.all_reduce(grad_input, group=process_group)
    if reduction == MEAN:  # the mean of nothing is NaN
        total = total * scale if rows * total_labels else torch.full_like(total, float("nan"))
    if grad_input is not None:
        grad_input = grad_input.to(x.dtype)
    return total.to(torch.float32 if plan.autocast else x.dtype), grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------------------
# Eager calls: an autograd Function (less dispatch per call than a registered op)
# --------------------------------------------------------------------------------------------------------

#: The names of the tensors a :class:`_LinearBCE` node saves, in order.
_SAVED_NAMES = ("input", "weight", "target", "pos_weight")

# Whether the running backward retains the graph (retain_graph=True); a torch without the query is taken
# to retain it, which costs a copy of the gradients per backward and changes no result.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


class _LinearBCE(torch.autograd.Function):
    """The fused pass as an autograd node: gradients computed in the forward, scaled in the backward.

    The node saves what torch's unfused loss saves (the input for the weight's gradient, the weight for
    the input's, a dense target and ``pos_weight`` for the logits'; not the bias, whose gradient needs no
    values, nor a sparse target, which ``to_dense()`` copies), so an in-place edit of one of them between the
    forward and a backward raises autograd's error, as it does there; an edit of another leaves the
    gradients of the values the forward saw, as the unfused loss's saved logits do. The backward does not
    recompute: a backward through a retained graph returns scaled copies of the stored gradients, the
    last one takes ownership of them (scaled in place unless ``grad_output`` is 1), so autograd can make
    them the leaves' ``.grad`` without a copy and no in-place update of ``.grad`` reaches a stored one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, pos_weight, *plan):
        # apply() takes the plan's fields one by one: under torch.jit.trace the chunk size is a traced
        # value, which the tracer follows only as an argument of its own
        plan = _Plan(*plan)
        wants = ctx.needs_input_grad
        needs = (wants[0], wants[1], bias is not None and wants[2])
        with torch.no_grad():
            loss, *grads = _fused_pass(x, weight, bias, target, pos_weight, plan, needs)
        ctx.grads = grads
        dense = target if target.layout == torch.strided else None
        saved = (x if needs[1] else None, weight if needs[0] else None, dense, pos_weight)
        ctx.save_for_backward(*saved)
        # to name a tensor edited in place (a saved input keeps its Python object alive)
        ctx.watched = tuple(
            (name, weakref.ref(t), t._version)
            for name, t in zip(_SAVED_NAMES, saved, strict=True)
            if t is not None
        )
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if grad_output is None:
            return (None,) * 9
        _check_saved(ctx)
        grads = ctx.grads
        if _keep_graph():
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        else:
            ctx.grads = None
            if not _kernel._is_one(grad_output):  # on a GPU, scaled without asking (no host synchronisation)
                grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        return (*grads, None, None, None, None, None, None)


def _check_saved(ctx) -> None:
    """Autograd's check of the saved tensors' versions; its error names the tensor edited in place."""
    try:
        ctx.saved_tensors  # noqa: B018 (reading them is the check)
    except RuntimeError as error:
        changed = [
            name for name, ref, version in ctx.watched if (t := ref()) is not None and t._version != version
        ]
        if ctx.grads is None or not changed:  # the graph was freed (a second backward), or not an edit
            raise
        raise RuntimeError(
            f"{NAME}: {' and '.join(changed)} modified by an inplace operation after the forward pass, which "
            f"computed the gradients from the values before: {error}"
        ) from None


def _eager_loss(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, pos_weight: Tensor | None, plan: _Plan
) -> Tensor:
    # Evaluation does no gradient work at all; a torch.jit.trace goes through the Function even then, as
    # the tracer records it as one call, where the chunks' kernel passes would be recorded as a constant.
    if not torch.is_grad_enabled() and not torch.jit.is_tracing():
        return _fused_pass(x, weight, bias, target, pos_weight, plan, (False,) * 3)[0]
    return _LinearBCE.apply(x, weight, bias, target, pos_weight, *plan)


_EAGER_ONLY = (
    f"bcekit: {NAME} with a sparse target or a process_group runs eagerly: torch.compile traces neither "
    "sparse tensors nor the label sharding's all-reduces. Call it outside the compiled region, or compile "
    "without fullgraph=True (a graph break)"
)
# Those calls are never traced: called from a frame Dynamo gave up on (a sparse argument), each function
# below would otherwise be compiled on its own, in pieces.
try:
    _eager_only_loss = torch.compiler.disable(_eager_loss, reason=_EAGER_ONLY)
except TypeError:  # torch before 2.7 takes no reason
    _eager_only_loss = torch.compiler.disable(_eager_loss)


# --------------------------------------------------------------------------------------------------------
# Compiled calls: the fused pass as a registered op, which torch.compile keeps whole
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bcekit::linear_binary_cross_entropy_with_logits", mutates_args=())
def linear_binary_cross_entropy_with_logits_fused(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    target: Tensor,
    pos_weight: Optional[Tensor],  # noqa: UP045
    reduction: int,
    chunk_size: int,
    autocast: bool,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_input, grad_weight, grad_bias)`` of a dense target from one fused pass (see
    :func:`_fused_pass`); a gradient not asked for is an empty ``(0,)`` tensor."""
    plan = _Plan(reduction, chunk_size, None, autocast)
    loss, *grads = _fused_pass(
        input, weight, bias, target, pos_weight, plan, (need_input, need_weight, need_bias)
    )
    return loss, *(input.new_empty(0) if g is None else g for g in grads)


@linear_binary_cross_entropy_with_logits_fused.register_fake
def _(
    input,
    weight,
    bias,
    target,
    pos_weight,
    reduction,
    chunk_size,
    autocast,
    need_input,
    need_weight,
    need_bias,
):
    empty = input.new_empty
    return (
        empty((), dtype=torch.float32 if autocast else input.dtype),
        empty(input.shape) if need_input else empty(0),
        empty(weight.shape) if need_weight else empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else empty(0),
    )


@torch.library.custom_op("bcekit::linear_scaled_gradient", mutates_args=())
def _scaled_gradient(gradient: Tensor, grad_output: Tensor, kept: List[Tensor]) -> Tensor:  # noqa: UP006
    """``gradient * grad_output``. ``kept`` are the tensors torch's compiled unfused loss keeps for it;
    unused here, but as the op's inputs they are inputs of a compiled backward too, which then keeps them
    and checks their versions: an in-place edit between the forward and the backward raises autograd's
    error under ``torch.compile`` as it does for the unfused loss."""
    return gradient * grad_output.to(gradient.dtype)


@_scaled_gradient.register_fake
def _(gradient, grad_output, kept):
    return torch.empty_like(gradient)


def _fused_op_setup_context(ctx, inputs, output) -> None:
    _, *grads = output
    x, weight = inputs[:2]
    need_input, need_weight, _ = ctx.needs = inputs[-3:]
    # what torch's unfused loss, compiled, keeps for its backward (the matmuls' operands; its BCE's
    # backward reads activations instead of the target), for autograd's check of in-place edits
    kept = [x if need_weight else None, weight if need_input else None]
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grads, *(t for t in kept if t is not None))


def _fused_op_backward(ctx, grad_output: Tensor | None, *_):
    grads = [None] * 3
    saved = ctx.saved_tensors  # raises autograd's error if a kept tensor was edited in place
    if grad_output is not None:
        kept = list(saved[3:])
        grads = [
            _scaled_gradient(g, grad_output, kept) if need else None
            for g, need in zip(saved[:3], ctx.needs, strict=True)
        ]
    return (*grads, *(None,) * 8)


linear_binary_cross_entropy_with_logits_fused.register_autograd(
    _fused_op_backward, setup_context=_fused_op_setup_context
)


def _compiled_loss(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, pos_weight: Tensor | None, plan: _Plan
) -> Tensor:
    grad = torch.is_grad_enabled()
    loss, *_ = linear_binary_cross_entropy_with_logits_fused(
        x,
        weight,
        bias,
        target,
        pos_weight,
        reduction=plan.reduction,
        chunk_size=plan.chunk,
        autocast=plan.autocast,
        need_input=grad and x.requires_grad,
        need_weight=grad and weight.requires_grad,
        need_bias=grad and bias is not None and bias.requires_grad,
    )
    return loss


def linear_binary_cross_entropy_with_logits(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    process_group: Any = None,
) -> Tensor:
    r"""``binary_cross_entropy_with_logits(F.linear(input, weight, bias), target, pos_weight=pos_weight)``
    without ever building the ``(N, C)`` logits, their sigmoid, their gradient or a dense target.

    .. math::
        \text{loss} = s \sum_{n=1}^{N} \sum_{c=1}^{C} p_c\, y_{nc} \log(1 + e^{-z_{nc}})
            + (1 - y_{nc}) \log(1 + e^{z_{nc}}), \qquad z = x W^T + b,

    with ``s = 1 / (N C)`` for ``'mean'`` and 1 for ``'sum'``. The labels are processed ``chunk_size`` at a
    time: each chunk's logits, loss and logit gradient (one kernel pass), then its share of the input,
    weight and bias gradients, which the forward accumulates and the backward only scales. For extreme
    multi-label classification: at N = 4096 and C = 10^6 the unfused path holds 16 GB per float32 copy.

    Args:
        input: ``(*, D)`` features; the leading dimensions are the N rows.
        weight: ``(C, D)`` classifier weight (this rank's label shard with ``process_group``).
        target: ``(*, C)`` dense targets in [0, 1], or a sparse COO/CSR ``(N, C)`` tensor whose stored
            entries are the non-zero targets (never densified).
        bias: ``(C,)`` or None.
        pos_weight: weight of positive targets, ``(C,)`` (per label), ``(1,)`` or 0-d. Not differentiable.
        reduction: ``'mean'`` (over all N C elements) or ``'sum'``; ``'none'`` raises a ValueError.
        chunk_size: labels per chunk; None picks one from N and the dtype (see
            :func:`~bcekit.torch._linear.default_chunk_size`).
        process_group: a ``torch.distributed`` group over which the labels are sharded (contiguous shards
            of ``weight``, ``bias``, ``pos_weight`` and the target's columns, one per rank). Every rank gets
            the unsharded loss and input gradient and its own shard's weight and bias gradients. The input
            must be the same on every rank.

    Returns:
        The 0-d loss in ``input``'s dtype. float32 and float64 are computed in their own precision (the
        loss summed in float64); float16/bfloat16 matmuls accumulate in float32 (torch's CPU and CUDA
        matmuls do) and the input gradient is accumulated over chunks in float32. Under autocast, as
        torch's autocast runs the unfused loss: ``input``, ``weight`` and ``bias`` are cast to the
        autocast dtype for the matmuls, the BCE and its logit gradients are float32 and so is the loss.

    Gradients flow to ``input``, ``weight`` and ``bias``; not to ``target`` or ``pos_weight`` (an error
    if they require one) and not twice (the backward is not differentiable). An in-place edit between the
    forward and the backward raises autograd's error wherever the unfused loss's would (edits of the
    tensors it saves: ``input`` when ``weight`` requires grad, ``weight`` when ``input`` does, a dense
    ``target``, ``pos_weight``; compiled, only the first two, as for torch's unfused loss compiled).

    Under ``torch.compile`` the call is one op in the graph (``fullgraph=True`` holds); a sparse target
    (which Dynamo refuses as an argument, as it refuses torch's own ``to_dense()``) or a ``process_group``
    is a graph break, an error under ``fullgraph=True``.

    >>> import torch
    >>> from bcekit.torch import linear_binary_cross_entropy_with_logits
    >>> x, w = torch.randn(8, 16, dtype=torch.float64), torch.randn(1000, 16, dtype=torch.float64)
    >>> y = torch.rand(8, 1000, dtype=torch.float64)
    >>> fused = linear_binary_cross_entropy_with_logits(x, w, y, chunk_size=300)
    >>> unfused = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T, y)
    >>> bool(torch.isclose(fused, unfused, rtol=1e-12, atol=0))
    True
    """
    arguments = (
        ("input", input),
        ("weight", weight),
        ("target", target),
        ("bias", bias),
        ("pos_weight", pos_weight),
    )
    for name, value in arguments:
        if (
            value is not None
            and not isinstance(value, Tensor)
            or value is None
            and name in ("input", "weight", "target")
        ):
            raise TypeError(f"{NAME}: {name} must be a Tensor, got {type(value).__name__}")
    enum = _semantics.reduction_enum(reduction)
    sparse, rows, labels = check_arguments(
        input, weight, target, bias, pos_weight, enum, torch.is_grad_enabled()
    )
    chunk = _chunk(chunk_size, rows, labels, input)
    x = input.reshape(rows, input.shape[-1])
    y = target if sparse else target.reshape(rows, labels)
    cast = _autocast_dtype(x)
    if cast is not None:  # as F.linear under autocast: differentiable casts, the node saves their results
        x, weight = x.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    plan = _Plan(enum, chunk, process_group, cast is not None)
    if _ops.exporting():  # ONNX has no bcekit operators: the unfused loss, in standard ones
        logits = F.linear(x, weight, bias)
        dense = (y.to_dense() if sparse else y).to(logits.dtype)
        spec = LossSpec("logits", enum, 0.0, None)
        return _composed.composed_loss(spec, logits, dense, None, pos_weight, logits.dtype)
    if sparse or process_group is not None:
        return _eager_only_loss(x, weight, bias, y, pos_weight, plan)
    if torch.compiler.is_compiling():
        return _compiled_loss(x, weight, bias, y, pos_weight, plan)
    return _eager_loss(x, weight, bias, y, pos_weight, plan)


def check_arguments(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    pos_weight: Tensor | None,
    reduction: int,
    grad_enabled: bool,
) -> tuple[bool, int, int]:
    """The checks of the tensors (layouts, shapes, dtypes, what requires grad): the functional's and the
    scripted module's (:mod:`bcekit.torch._scripted`). Returns (sparse target, rows N, labels C)."""
    sparse = target.layout != torch.strided
    if sparse and target.layout not in (torch.sparse_coo, torch.sparse_csr):
        raise ValueError(f"{NAME}: sparse targets must be COO or CSR, got {target.layout}")
    if sparse and target.dense_dim() != 0:
        raise ValueError(
            f"{NAME}: a sparse target must store single values (dense_dim() == 0), got dense_dim() "
            f"{target.dense_dim()}; use target.to_sparse() on the (N, C) tensor"
        )
    rows, _, labels = _semantics.check_linear_binary_cross_entropy(
        tuple(input.shape),
        tuple(weight.shape),
        tuple(target.shape),
        None if bias is None else tuple(bias.shape),
        None if pos_weight is None else tuple(pos_weight.shape),
        reduction,
        sparse,
    )
    if (
        not input.is_floating_point()
        or input.dtype != weight.dtype
        or (bias is not None and bias.dtype != input.dtype)
    ):
        kinds = ", ".join(str(t.dtype) for t in (input, weight, bias) if t is not None)
        raise TypeError(f"{NAME}: input, weight and bias must share one floating dtype, got {kinds}")
    if not target.dtype.is_floating_point:
        raise TypeError(f"{NAME}: target must be floating, got {target.dtype}")
    if grad_enabled:
        if target.requires_grad:
            raise RuntimeError(
                f"{NAME}: the loss is not differentiated with respect to target; pass target.detach()"
            )
        if pos_weight is not None and pos_weight.requires_grad:
            raise _semantics.weight_requires_grad_error(NAME, "pos_weight")
    return sparse, rows, labels


def _chunk(chunk_size: int | None, rows: int, labels: int, input: Tensor) -> int:
    if chunk_size is None:
        return default_chunk_size(rows, labels, input.dtype, input.device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{NAME}: chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def linear_topk(
    input: Tensor,
    weight: Tensor,
    k: int,
    bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` highest logits of ``F.linear(input, weight, bias)`` per row and their label indices, chunk
    by chunk (the ``(N, C)`` logits are never built): ``(values, indices)``, each ``(*, k)``, sorted in
    decreasing order, as ``torch.topk(logits, k)`` gives (ties may pick other labels). Not differentiable.
    """
    labels = weight.shape[0]
    if not 1 <= k <= labels:
        raise ValueError(f"k must be in [1, {labels}] (the number of labels), got {k}")
    rows = input[..., 0].numel()
    chunk = _chunk(chunk_size, rows, labels, input)
    x = input.reshape(rows, input.shape[-1])
    best_values = best_indices = None
    with torch.no_grad():
        for start in range(0, labels, chunk):
            stop = min(labels, start + chunk)
            logits = F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])
            values, indices = logits.topk(min(k, stop - start), dim=1)
            indices += start
            if best_values is not None:
                values = torch.cat((best_values, values), dim=1)
                indices = torch.cat((best_indices, indices), dim=1)
                values, order = values.topk(k if values.shape[1] >= k else values.shape[1], dim=1)
                indices = indices.gather(1, order)
            best_values, best_indices = values, indices
    assert best_values is not None and best_indices is not None
    shape = (*input.shape[:-1], k)
    return best_values.reshape(shape), best_indices.reshape(shape)
