"""Triton kernels for CUDA tensors: the GPU counterpart of the C++ kernels (:mod:`bcekit._native`).

One kernel, specialised at compile time, runs every pass the torch ops need: the per-element or reduced
loss, the input gradient and/or the target gradient, in one read of input, target, weight and pos_weight.
Weights are read in place in the broadcast forms of :func:`bcekit._native.broadcast_form` (scalar,
per-class ``(C,)``, per-row ``(N, 1)``, full); indices are int64, so tensors may exceed 2^31 elements.

Arithmetic: float32 is computed in float64 and half types in float32, each rounded once (the core
promise); float64 results combine the loss's two terms in double-double (TwoSum and an FMA TwoProduct),
as the composed float64 path of :mod:`bcekit._math` does. ``log1p`` is libdevice's on the GPU; under the
Triton interpreter (``TRITON_INTERPRET=1``, how CI runs these kernels on CPU tensors) it is
``log(u) * z / (u - 1)`` with ``u = 1 + z``, accurate to a few ulp of the compute type.

Reductions are deterministic: each program writes its block's partial sum and kept count, and the host
adds the partials in a fixed order (``torch.sum`` over a fixed-size tensor), never with atomics.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from bcekit._native import FULL, PER_CLASS, PER_ROW, SCALAR
from bcekit._semantics import MEAN, NONE, input_range_error, target_range_error

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # Triton 3.0
        from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    triton = None

__all__ = ["AVAILABLE", "BLOCK", "run"]

AVAILABLE: bool = triton is not None
#: Elements per program.
BLOCK = 1024

_GRAD_EPSILON = 9.999999960041972e-13  # float32(1e-12): torch's clamp of x (1 - x)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _log1p(z, USE_LIBDEVICE: tl.constexpr):
        if USE_LIBDEVICE:
            return libdevice.log1p(z)
        else:
            u = 1.0 + z
            return tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))

    @triton.jit
    def _broadcast(ptr, offsets, mask, inner, MODE: tl.constexpr, DTYPE: tl.constexpr):
        if MODE == 0:
            return tl.full(offsets.shape, 1.0, DTYPE)
        elif MODE == 1:
            return tl.full(offsets.shape, 0.0, DTYPE) + tl.load(ptr).to(DTYPE)
        elif MODE == 2:
            return tl.load(ptr + offsets % inner, mask=mask, other=1.0).to(DTYPE)
        elif MODE == 3:
            return tl.load(ptr + offsets // inner, mask=mask, other=1.0).to(DTYPE)
        else:
            return tl.load(ptr + offsets, mask=mask, other=1.0).to(DTYPE)

    @triton.jit
    def _two_sum(a, b):
        s = a + b
        bb = s - a
        return s, (a - (s - bb)) + (b - bb)

    @triton.jit
    def _dot2(c1_hi, c1_lo, v1_hi, v1_lo, c2_hi, c2_lo, v2_hi, v2_lo):
        """``c1 v1 + c2 v2`` of non-negative double-doubles, rounded once (the FMA gives TwoProduct)."""
        p1 = c1_hi * v1_hi
        e1 = tl.fma(c1_hi, v1_hi, -p1) + (c1_hi * v1_lo + c1_lo * v1_hi)
        p2 = c2_hi * v2_hi
        e2 = tl.fma(c2_hi, v2_hi, -p2) + (c2_hi * v2_lo + c2_lo * v2_hi)
        high, low = _two_sum(p1, p2)
        return high + (low + e1 + e2)

    @triton.jit
    def _scaled(c, v):
        """``c * v`` with a zero coefficient times an infinite value giving 0 (the term is absent)."""
        return tl.where((c == 0.0) & (tl.abs(v) == float("inf")), 0.0, c * v)

    @triton.jit
    def _bce_kernel(
        x_ptr,
        y_ptr,
        w_ptr,
        p_ptr,
        g_ptr,
        loss_ptr,
        gi_ptr,
        gt_ptr,
        part_ptr,
        kept_ptr,
        bad_ptr,
        n,
        w_inner,
        p_inner,
        params_ptr,  # float64 [grad_scale, label_smoothing, ignore_index]: a Python float argument would
        # reach a compiled kernel as float32
        LOGITS: tl.constexpr,
        W_MODE: tl.constexpr,
        P_MODE: tl.constexpr,
        G_MODE: tl.constexpr,
        WRITE_LOSS: tl.constexpr,
        WANT_SUM: tl.constexpr,
        WRITE_GI: tl.constexpr,
        WRITE_GT: tl.constexpr,
        HAS_IGNORE: tl.constexpr,
        IGNORE_NAN: tl.constexpr,
        SMOOTH: tl.constexpr,
        COMPUTE64: tl.constexpr,
        COMPENSATE: tl.constexpr,
        USE_LIBDEVICE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        CT: tl.constexpr = tl.float64 if COMPUTE64 else tl.float32
        pid = tl.program_id(0)
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.5).to(CT)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.5).to(CT)
        w = _broadcast(w_ptr, offsets, mask, w_inner, W_MODE, CT)
        p = _broadcast(p_ptr, offsets, mask, p_inner, P_MODE, CT)
        grad_scale = tl.load(params_ptr)
        smoothing = tl.load(params_ptr + 1)
        ignore_value = tl.load(params_ptr + 2)
        kept = mask
        if HAS_IGNORE:
            if IGNORE_NAN:
                kept = kept & (y == y)
            else:  # compared in float64, as the C++ kernels and the composed path do
                kept = kept & (y.to(tl.float64) != ignore_value)
            y = tl.where(kept, y, 0.0)
        if not LOGITS:  # the [0, 1] checks (NaN fails both comparisons)
            bad_x = mask & ((x < 0.0) | (x > 1.0) | (x != x))
            bad_y = kept & ((y < 0.0) | (y > 1.0) | (y != y))
            tl.store(bad_ptr + 2 * pid, tl.max(bad_x.to(tl.int32), axis=0))
            tl.store(bad_ptr + 2 * pid + 1, tl.max(bad_y.to(tl.int32), axis=0))
        s = smoothing.to(CT)
        if SMOOTH:
            y = y * (1.0 - s) + 0.5 * s

        if LOGITS:
            e = tl.exp(-tl.abs(x))
            tail = _log1p(e, USE_LIBDEVICE)
            x_pos = tl.where(x > 0.0, x, tl.where(x != x, x, 0.0))
            x_neg = tl.where(x < 0.0, -x, tl.where(x != x, x, 0.0))
            positive = p * y
            sp_neg = x_neg + tail
            sp_pos = x_pos + tail
            loss = _scaled(positive, sp_neg) + _scaled(1.0 - y, sp_pos)
            if COMPENSATE:
                pos_lo = tl.fma(p, y, -positive)
                one_hi, one_lo = _two_sum(tl.full(x.shape, 1.0, CT), -y)
                neg_hi, neg_lo = _two_sum(x_neg, tail)
                pos_hi, pos_lo2 = _two_sum(x_pos, tail)
                combined = _dot2(positive, pos_lo, neg_hi, neg_lo, one_hi, one_lo, pos_hi, pos_lo2)
                loss = tl.where(tl.abs(combined) < float("inf"), combined, loss)
            large = 1.0 / (1.0 + e)
            small = e / (1.0 + e)
            nonneg = x >= 0.0
            gi = (1.0 - y) * tl.where(nonneg, large, small) - positive * tl.where(nonneg, small, large)
            if P_MODE == 0:
                gt = -x
            else:
                gt = _scaled(p, sp_neg) - sp_pos
        else:
            log_x = tl.log(x)
            log_1mx = _log1p(-x, USE_LIBDEVICE)
            a = tl.minimum(-log_x, 100.0)
            b = tl.minimum(-log_1mx, 100.0)
            loss = y * a + (1.0 - y) * b
            if COMPENSATE:
                one_hi, one_lo = _two_sum(tl.full(x.shape, 1.0, CT), -y)
                zero = tl.zeros(x.shape, CT)
                combined = _dot2(y, zero, a, zero, one_hi, one_lo, b, zero)
                loss = tl.where(tl.abs(combined) < float("inf"), combined, loss)
            gi = (x - y) / tl.maximum(x * (1.0 - x), _GRAD_EPSILON)
            gt = log_1mx - log_x

        if WRITE_LOSS or WANT_SUM:
            if W_MODE != 0:
                loss = loss * w
            loss = tl.where(kept, loss, 0.0)
            if WRITE_LOSS:
                tl.store(loss_ptr + offsets, loss.to(loss_ptr.dtype.element_ty), mask=mask)
            if WANT_SUM:
                tl.store(part_ptr + pid, tl.sum(loss, axis=0))
        tl.store(kept_ptr + pid, tl.sum(kept.to(tl.int32), axis=0))
        if WRITE_GI or WRITE_GT:
            g_scale = grad_scale.to(CT)
            if G_MODE == 0:
                scale = tl.full(x.shape, 0.0, CT) + g_scale
            elif G_MODE == 1:
                scale = tl.full(x.shape, 0.0, CT) + tl.load(g_ptr).to(CT) * g_scale
            else:
                scale = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(CT) * g_scale
            if WRITE_GI:
                if W_MODE != 0:
                    gi = gi * w
                gi = tl.where(kept, gi, 0.0) * scale
                tl.store(gi_ptr + offsets, gi.to(gi_ptr.dtype.element_ty), mask=mask)
            if WRITE_GT:
                if SMOOTH:
                    gt = gt * (1.0 - s)
                if W_MODE != 0:
                    gt = gt * w
                gt = tl.where(kept, gt, 0.0) * scale
                tl.store(gt_ptr + offsets, gt.to(gt_ptr.dtype.element_ty), mask=mask)


_MODES = {None: 0, SCALAR: 1, PER_CLASS: 2, PER_ROW: 3, FULL: 4}


def run(
    kind: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_form: tuple[int, int] | None,
    pos_weight: Tensor | None,
    pos_weight_form: tuple[int, int] | None,
    *,
    reduction: int,
    loss: Tensor | None = None,
    grad_input: Tensor | None = None,
    grad_target: Tensor | None = None,
    grad_output: Tensor | None = None,
    grad_scale: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
    loss_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor]:
    """One kernel pass over contiguous tensors of one dtype (outputs preallocated by the caller).

    ``grad_output`` is a 0-d/one-element tensor (reduced losses) or one per element; gradients are
    multiplied by it and by ``grad_scale``. Returns the reduced loss as a 0-d tensor of ``loss_dtype``
    (default: the input's dtype), or None for 'none', and the number of kept elements as a 0-d int64
    tensor, both on the device: no host synchronisation, except the probability loss's range check, which
    must raise.
    """
    assert triton is not None
    n = input.numel()
    programs = max(1, triton.cdiv(n, BLOCK))
    device = input.device
    compute64 = input.dtype in (torch.float32, torch.float64)
    partials = torch.zeros(programs, dtype=torch.float64 if compute64 else torch.float32, device=device)
    kept = torch.zeros(programs, dtype=torch.int32, device=device)
    bad = torch.zeros(2 * programs, dtype=torch.int32, device=device)
    g_mode = 0 if grad_output is None else (1 if grad_output.numel() == 1 and n != 1 else 2)
    dummy = input  # never read when its mode says absent
    _bce_kernel[(programs,)](
        input,
        target,
        dummy if weight is None else weight,
        dummy if pos_weight is None else pos_weight,
        dummy if grad_output is None else grad_output,
        dummy if loss is None else loss,
        dummy if grad_input is None else grad_input,
        dummy if grad_target is None else grad_target,
        partials,
        kept,
        bad,
        n,
        1 if weight_form is None else weight_form[1],
        1 if pos_weight_form is None else pos_weight_form[1],
        torch.tensor(
            [
                float(grad_scale),
                float(label_smoothing),
                0.0 if ignore_index is None or ignore_index != ignore_index else float(ignore_index),
            ],
            dtype=torch.float64,
        ).to(device, non_blocking=True),
        LOGITS=kind == "logits",
        W_MODE=_MODES[None if weight is None else weight_form[0]],
        P_MODE=_MODES[None if pos_weight is None else pos_weight_form[0]],
        G_MODE=g_mode,
        WRITE_LOSS=loss is not None,
        WANT_SUM=reduction != NONE,
        WRITE_GI=grad_input is not None,
        WRITE_GT=grad_target is not None,
        HAS_IGNORE=ignore_index is not None,
        IGNORE_NAN=ignore_index is not None and ignore_index != ignore_index,
        SMOOTH=label_smoothing != 0.0,
        COMPUTE64=compute64,
        COMPENSATE=input.dtype == torch.float64,
        USE_LIBDEVICE=not _interpreting(),
        BLOCK=BLOCK,
    )
    if kind == "bce":
        flags = bad.view(programs, 2).amax(dim=0).tolist()  # the check must raise: one host sync
        if flags[0]:
            raise input_range_error()
        if flags[1]:
            raise target_range_error()
    count = kept.sum(dtype=torch.int64)
    if reduction == NONE:
        return None, count
    total = partials.sum(dtype=torch.float64)
    if reduction == MEAN:
        total = total / count  # 0/0 = NaN: the mean of nothing
    return total.to(loss_dtype or input.dtype), count


def launch_count(n: int) -> int:
    """Programs a pass over ``n`` elements launches (for tests)."""
    return max(1, -(-n // BLOCK))


def describe() -> dict[str, Any]:
    """What this module would use: for diagnostics."""
    return {"available": AVAILABLE, "interpreting": _interpreting(), "block": BLOCK}
