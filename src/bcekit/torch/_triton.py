r"""Triton kernels for CUDA tensors: the GPU counterpart of the C++ kernels (:mod:`bcekit._native`).

One kernel, specialised at compile time by loss, dtype, the broadcast forms of ``weight`` and
``pos_weight`` and the kind of pass, runs every pass the torch ops need, in one read of input, target,
weight and pos_weight:

* a forward pass (``G_MODE`` 0): the per-element losses and/or each program's partial sum, and, for a
  training step, the input gradient too (scaled by ``grad_scale``: the mean's 1/n);
* a backward pass (``G_MODE`` 1: one ``grad_output`` for every element, a reduced loss's; 2: one per
  element): the input and/or the target gradient.

Which outputs a pass writes, ``ignore_index`` and ``label_smoothing`` are run-time arguments (uniform
branches and selects), so a handful of compiled kernels serve every option: what changes the code is
compile-time, what only changes values is not. Weights are read in place in the broadcast forms of
:func:`bcekit._native.broadcast_form` (absent, scalar, per-class ``(C,)``, per-row ``(N, 1)``, full).

Arithmetic, the GPU contract (the CPU kernels' is :mod:`bcekit._native`'s):

* float32, bfloat16 and float16 compute in float32 only: no float64 instruction in their code. The
  logits loss is the sum of two softplus terms, ``p y softplus(-x) + (1 - y) softplus(x)`` with
  ``softplus(±x) = max(±x, 0) + log1p(exp(-|x|))`` (no cancellation for ``y`` in [0, 1] and ``p >= 0``),
  the probability loss ``y min(-log x, 100) + (1 - y) min(-log1p(-x), 100)``. exp, log and log1p are this
  module's, written in float32 arithmetic with explicit FMAs and correctly rounded divisions (exp within
  1 ulp, log within 1, log1p within 1.5, subnormals kept): Triton's interpreter evaluates such code
  exactly as the GPU does, so the accuracy the tests measure on CPU tensors is the compiled kernel's, bit
  for bit, per element. Each per-element loss is within 4 ulp of exact for targets in [0, 1] and
  non-negative weights (``tests/torch/test_triton.py`` checks it against mpmath); gradients are formed
  as torch's CUDA kernels form theirs, in float32, with correctly rounded divisions.
* float64 computes in float64 (libdevice's exp, log and log1p) and adds the loss's two terms in
  double-double (TwoSum and an FMA TwoProduct), as the composed float64 path of :mod:`bcekit._math` does.
* Floating-point contraction is off (``enable_fp_fusion=False``): the compiled kernel rounds where the
  source does, as the interpreter does.

Reductions are deterministic: each program writes its block's partial sum (and, with ``ignore_index``,
its kept count), and the host adds the partials in a fixed order (``torch.sum`` over a fixed-size tensor,
in float64), never with atomics. Indices are int32 unless a tensor has 2^31 elements or more.

No pass synchronises with the host: the probability loss's [0, 1] check counts bad programs in a device
counter that :mod:`bcekit.torch._range_check` reads without waiting, and the float parameters travel as
scalar arguments (float32 for the float32 kernels, float64 bit patterns for the float64 ones: Triton passes
a Python float as float32).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
from typing import Any

import torch
from torch import Tensor

from bcekit._native import ABSENT, FULL, PER_CLASS, PER_ROW, SCALAR, Plan
from bcekit._semantics import GRAD_EPSILON, LOG_CLAMP, MEAN, NONE
from bcekit.torch import _range_check

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # Triton 3.0
        from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    triton = None

__all__ = ["AVAILABLE", "CONFIGS", "run", "scale_unless_one", "launch_count", "describe"]

AVAILABLE: bool = triton is not None

#: Elements per program and warps per program, by input dtype: four elements per thread (a 16-byte load
#: of each float32 operand, 8 bytes of a half one, two 16-byte loads of float64), which keeps the kernels
#: under 100 registers per thread on sm_90 (``tools/compile_gpu_kernels.py`` reports them): room for three
#: programs of 256 threads per SM. Chosen from the compiled code, not yet from timings on a GPU;
#: ``python -m benchmarks.gpu --check`` times alternatives.
CONFIGS: dict[torch.dtype, tuple[int, int]] = {
    torch.float32: (1024, 8),
    torch.bfloat16: (1024, 8),
    torch.float16: (1024, 8),
    torch.float64: (512, 4),
}

#: Forward pass, backward pass with one grad_output for every element, backward pass with one per element.
FORWARD, BACKWARD_SCALAR, BACKWARD_FULL = 0, 1, 2
#: The kernels' weight modes (W_MODE, P_MODE) of a plan's broadcast forms.
_MODES = {ABSENT: 0, SCALAR: 1, PER_CLASS: 2, PER_ROW: 3, FULL: 4}
_INT32_LIMIT = 2**31


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_options() -> dict[str, Any]:
    """Compile options every launch passes: no contraction; libdevice (float64) keeping subnormal results,
    where the installed Triton knows the option (3.0 does not)."""
    options: dict[str, Any] = {"enable_fp_fusion": False}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        if "enable_reflect_ftz" in CUDAOptions.__dataclass_fields__:
            options["enable_reflect_ftz"] = False
    except (ImportError, AttributeError):  # pragma: no cover - a Triton without the NVIDIA backend
        pass
    return options


if triton is not None:
    _GRAD_EPSILON = tl.constexpr(GRAD_EPSILON)
    _LOG_LIMIT = tl.constexpr(-LOG_CLAMP)
    # float32 constants, written as the float32 values they are: log2(e); ln 2 as a float32 and the
    # float32 nearest the rest; 1/n! for exp's Taylor series; 2/n for the series of 2 atanh(s)
    _LOG2E = tl.constexpr(1.4426950216293335)
    _LN2_HI = tl.constexpr(0.6931471824645996)
    _LN2_LO = tl.constexpr(-1.9046542121259336e-09)
    _SQRT2 = tl.constexpr(1.4142135381698608)
    _SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)
    _TWO_64 = tl.constexpr(18446744073709551616.0)
    _TWO_MINUS_64 = tl.constexpr(5.421010862427522e-20)

    # ----------------------------------------------------------------------------------------------------
    # exp, log, log1p. float32: written in float32 arithmetic (+, *, fma, correctly rounded division,
    # bit operations), which Triton's interpreter evaluates exactly as a GPU does, so the accuracy the
    # tests measure on CPU tensors is the GPU's, bit for bit. float64: libdevice's on the GPU, NumPy's
    # under the interpreter.
    # ----------------------------------------------------------------------------------------------------

    @triton.jit
    def _divide(a, b):
        """``a / b`` rounded to nearest (Triton's float32 ``/`` is the approximate ``div.full``)."""
        if b.dtype == tl.float64:
            return a / b
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def _exp_f32(t):
        """``(e^t, e^t 2^64)`` for ``t <= 0``: the first within 1 ulp, subnormal results included; the
        second a normal number carrying every bit down to ``e^t = 2^-190`` (and rounded below), for
        products with a large factor that are normal where e^t is not.

        ``t = k ln 2 + r`` with ``k = round(t / ln 2)``: ``t - k ln2_hi`` is exact (t and k ln2_hi are
        multiples of 2^-24 and the difference is below 1), so r carries one rounding of ``k ln2_lo``.
        ``e^r = 1 + (r + r^2 h(r))``, h the Taylor series to r^6 (truncation below 2^-31 for
        ``|r| <= ln2 / 2``). ``e^t 2^64 = e^r 2^(k + 64)`` in one exact step (two, rounded once, where it
        is subnormal), and ``e^t`` is that times 2^-64, rounded once where subnormal. Below t = -150 both
        round to 0."""
        clamped = tl.maximum(t, -150.0)
        k = tl.floor(clamped * _LOG2E + 0.5)
        r = tl.fma(k, -_LN2_LO, tl.fma(k, -_LN2_HI, clamped))
        h = tl.fma(r, 2.4801587642286904e-05, 0.00019841270113829523)
        h = tl.fma(h, r, 0.0013888889225199819)
        h = tl.fma(h, r, 0.008333333767950535)
        h = tl.fma(h, r, 0.0416666679084301)
        h = tl.fma(h, r, 0.1666666716337204)
        h = tl.fma(h, r, 0.5)
        exp_r = 1.0 + tl.fma(r * r, h, r)
        scale = k.to(tl.int32) + 64
        subnormal = scale < -126
        scale = tl.where(subnormal, scale + 64, scale)
        scaled = exp_r * ((scale + 127) << 23).to(tl.float32, bitcast=True)
        scaled = tl.where(subnormal, scaled * _TWO_MINUS_64, scaled)
        nan = t != t
        return tl.where(nan, t, scaled * _TWO_MINUS_64), tl.where(nan, t, scaled)

    @triton.jit
    def _log1p_reduced(g):
        """``log(1 + g)`` for ``g`` in [sqrt(1/2) - 1, sqrt(2) - 1]: ``2 atanh(s)``, ``s = g / (2 + g)``,
        as ``g - s (g - R)`` with ``R = 2 s^3 / 3 + 2 s^5 / 5 + ...`` over s (``2s = g - s g``), so the
        division's rounding only reaches the correction ``s (g - R)`` (about g^2 / 2)."""
        s = _divide(g, 2.0 + g)
        z = s * s
        series = tl.fma(z, 0.1818181872367859, 0.2222222238779068)
        series = tl.fma(series, z, 0.2857142984867096)
        series = tl.fma(series, z, 0.4000000059604645)
        series = tl.fma(series, z, 0.6666666865348816)
        return tl.fma(-s, g - z * series, g)

    @triton.jit
    def _log_f32(u):
        """``log u`` for ``u >= 0`` (-inf at 0, NaN below), within 1 ulp: ``u = 2^j m`` with
        m in [sqrt(1/2), sqrt(2)) read off the bits (subnormals scaled by 2^24 first), then
        ``j ln 2 + log1p(m - 1)``, m - 1 being exact."""
        tiny = u < _SMALLEST_NORMAL
        v = tl.where(tiny, u * 16777216.0, u)
        bits = v.to(tl.int32, bitcast=True)
        j = (bits >> 23) - 127
        m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
        big = m > _SQRT2
        m = tl.where(big, m * 0.5, m)
        j = tl.where(big, j + 1, j) - tl.where(tiny, 24, 0)
        jf = j.to(tl.float32)
        result = tl.fma(jf, _LN2_HI, tl.fma(jf, _LN2_LO, _log1p_reduced(m - 1.0)))
        result = tl.where(u == 0.0, -float("inf"), result)
        result = tl.where(u == float("inf"), u, result)
        return tl.where((u < 0.0) | (u != u), float("nan"), result)

    @triton.jit
    def _log1p_f32(v):
        """``log(1 + v)`` for ``v >= -1``, within 1.5 ulp: ``log(u) + c / u``, ``u = 1 + v`` rounded and
        ``c`` its exact rounding error (``u - 1`` is exact for v > -1/2; below, ``1 + v`` is)."""
        u = 1.0 + v
        c = tl.where(v > -0.5, v - (u - 1.0), 0.0)
        return _log_f32(u) + tl.where(c == 0.0, 0.0, _divide(c, u))

    @triton.jit
    def _log1p_emulated(z):
        """``log(u) z / (u - 1)``, ``u = 1 + z``: float64 log1p to a few ulp from log alone (the
        interpreter has no libdevice)."""
        u = 1.0 + z
        return tl.where(u == 1.0, z, tl.log(u) * _divide(z, u - 1.0))

    @triton.jit
    def _exp(t, LIBDEVICE: tl.constexpr):
        """``(e^t, e^t 2^64)`` (float64: the second is the first's product, as precise)."""
        if t.dtype != tl.float64:
            return _exp_f32(t)
        else:
            if LIBDEVICE:
                value = libdevice.exp(t)
            else:
                value = tl.exp(t)
            return value, value * _TWO_64

    @triton.jit
    def _log(u, LIBDEVICE: tl.constexpr):
        if u.dtype != tl.float64:
            return _log_f32(u)
        elif LIBDEVICE:
            return libdevice.log(u)
        else:
            return tl.log(u)

    @triton.jit
    def _log1p(v, LIBDEVICE: tl.constexpr):
        if v.dtype != tl.float64:
            return _log1p_f32(v)
        elif LIBDEVICE:
            return libdevice.log1p(v)
        else:
            return _log1p_emulated(v)

    # ----------------------------------------------------------------------------------------------------
    # Exact building blocks (float64's double-double combination)
    # ----------------------------------------------------------------------------------------------------

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

    # ----------------------------------------------------------------------------------------------------
    # The losses and their derivatives, per element, in the compute dtype
    # ----------------------------------------------------------------------------------------------------

    @triton.jit
    def _logit_parts(x):
        """``(max(x, 0), max(-x, 0))``, NaN kept in both."""
        nan = x != x
        return tl.where(x > 0.0, x, tl.where(nan, x, 0.0)), tl.where(x < 0.0, -x, tl.where(nan, x, 0.0))

    @triton.jit
    def _logits_loss(x, y, p, e, e_big, LIBDEVICE: tl.constexpr, F64: tl.constexpr):
        """``p y softplus(-x) + (1 - y) softplus(x)``, each softplus ``max(±x, 0) + log1p(e)``.

        float32: gathered as ``(p y + 1 - y) log1p(e) + (x >= 0 ? (1 - y) x : p y |x|)``, a sum of two
        non-negative terms (for y in [0, 1] and p >= 0) in one FMA, fewer roundings than the two softplus
        products. Both terms are formed times 2^64 (``log1p(e) = e`` where e is subnormal, taken as
        ``e 2^64``; ``p (y 2^64)``) and the sum scaled back, so that neither a subnormal e nor a subnormal
        p y loses bits that a large factor would then multiply; where a term would overflow so scaled,
        the loss is large and formed unscaled. float64 combines the two softplus terms in double-double."""
        tail = _log1p(e, LIBDEVICE)
        positive = p * y
        negative = 1.0 - y
        if F64:
            x_pos, x_neg = _logit_parts(x)
            sp_neg = x_neg + tail
            sp_pos = x_pos + tail
            loss = _scaled(positive, sp_neg) + _scaled(negative, sp_pos)
            pos_lo = tl.fma(p, y, -positive)
            one_hi, one_lo = _two_sum(tl.full(x.shape, 1.0, x.dtype), -y)
            neg_hi, neg_lo = _two_sum(x_neg, tail)
            pos_hi, pos_lo2 = _two_sum(x_pos, tail)
            combined = _dot2(positive, pos_lo, neg_hi, neg_lo, one_hi, one_lo, pos_hi, pos_lo2)
            loss = tl.where(tl.abs(combined) < float("inf"), combined, loss)
        else:
            coefficient = tl.fma(p, y, negative)
            nonneg = x >= 0.0
            linear = tl.where(nonneg, _scaled(negative, x), _scaled(positive, -x))
            positive_big = p * (y * _TWO_64)
            linear_big = tl.where(nonneg, _scaled(negative, x) * _TWO_64, _scaled(positive_big, -x))
            tail_big = tl.where(e < _SMALLEST_NORMAL, e_big, tail * _TWO_64)
            scaled = tl.fma(coefficient, tail_big, linear_big) * _TWO_MINUS_64
            loss = tl.where(linear_big < float("inf"), scaled, tl.fma(coefficient, tail, linear))
        return loss

    @triton.jit
    def _logits_grad_input(x, y, p, e, e_big):
        """``(1 - y) sigmoid(x) - p y sigmoid(-x)``, the sigmoids ``1 / (1 + e)`` and ``e / (1 + e)``; the
        small one's term is formed as ``e 2^64 / (1 + e)`` and scaled back inside the FMA that adds the
        terms, so it keeps its bits where e is subnormal."""
        large = _divide(tl.full(e.shape, 1.0, e.dtype), 1.0 + e)
        small_big = e_big * large
        nonneg = x >= 0.0
        negative, positive = 1.0 - y, -(p * y)
        with_large = tl.where(nonneg, negative, positive) * large
        return tl.fma(tl.where(nonneg, positive, negative) * small_big, _TWO_MINUS_64, with_large)

    @triton.jit
    def _logits_grad_target(x, p, e, LIBDEVICE: tl.constexpr, P_MODE: tl.constexpr):
        """``p softplus(-x) - softplus(x)``, as ``(p - 1) log1p(e) - (x >= 0 ? x : p x)`` in one FMA;
        ``-x`` without pos_weight."""
        if P_MODE == 0:
            return -x
        else:
            tail = _log1p(e, LIBDEVICE)
            return tl.fma(p - 1.0, tail, tl.where(x >= 0.0, -x, -_scaled(p, x)))

    @triton.jit
    def _bce_loss(x, y, LIBDEVICE: tl.constexpr, F64: tl.constexpr):
        """``y min(-log x, 100) + (1 - y) min(-log1p(-x), 100)``."""
        a = tl.minimum(-_log(x, LIBDEVICE), _LOG_LIMIT)
        b = tl.minimum(-_log1p(-x, LIBDEVICE), _LOG_LIMIT)
        loss = y * a + (1.0 - y) * b
        if F64:
            one_hi, one_lo = _two_sum(tl.full(x.shape, 1.0, x.dtype), -y)
            zero = tl.zeros(x.shape, x.dtype)
            combined = _dot2(y, zero, a, zero, one_hi, one_lo, b, zero)
            loss = tl.where(tl.abs(combined) < float("inf"), combined, loss)
        return loss

    @triton.jit
    def _bce_grad_input(x, y):
        """torch's ``(x - y) / max(x (1 - x), 1e-12)``."""
        return _divide(x - y, tl.maximum(x * (1.0 - x), _GRAD_EPSILON))

    @triton.jit
    def _bce_grad_target(x, LIBDEVICE: tl.constexpr):
        """``log(1 - x) - log(x)``."""
        return _log1p(-x, LIBDEVICE) - _log(x, LIBDEVICE)

    @triton.jit
    def _broadcast(ptr, offsets, mask, inner, MODE: tl.constexpr, DTYPE: tl.constexpr):
        """A weight in its broadcast form (absent: 1), per element of the block."""
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
    def _float_parameter(value32, bits64, F64: tl.constexpr):
        """A float parameter in the compute dtype: float32 as passed, float64 from its bit pattern."""
        if F64:
            return bits64.to(tl.int64).to(tl.float64, bitcast=True)
        else:
            return tl.cast(value32, tl.float32)

    # ----------------------------------------------------------------------------------------------------
    # The kernel
    # ----------------------------------------------------------------------------------------------------

    @triton.jit(
        do_not_specialize=[
            "w_inner",
            "p_inner",
            "grad_scale_bits",
            "smoothing_bits",
            "ignore_bits",
            "ignore_nan",
            "write_loss",
            "want_sum",
            "write_gi",
            "write_gt",
            "count_kept",
            "skip_if_one",
        ]
    )
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
        grad_scale,
        smoothing,
        ignore_value,
        grad_scale_bits: tl.int64,
        smoothing_bits: tl.int64,
        ignore_bits: tl.int64,
        ignore_nan,
        write_loss,
        want_sum,
        write_gi,
        write_gt,
        count_kept,
        skip_if_one,
        LOGITS: tl.constexpr,
        W_MODE: tl.constexpr,
        P_MODE: tl.constexpr,
        G_MODE: tl.constexpr,
        F64: tl.constexpr,
        INDEX64: tl.constexpr,
        LIBDEVICE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One pass; see the module docstring. ``grad_scale``, ``smoothing`` and ``ignore_value`` are the
        float32 kernels' parameters, ``*_bits`` the float64 kernels'. With ``G_MODE`` 1, ``skip_if_one``
        makes the pass a no-op when grad_output is exactly 1 (it then rewrites, in place, a gradient
        stored for grad_output 1)."""
        CT: tl.constexpr = tl.float64 if F64 else tl.float32
        grad_scale = _float_parameter(grad_scale, grad_scale_bits, F64)
        smoothing = _float_parameter(smoothing, smoothing_bits, F64)
        ignore_value = _float_parameter(ignore_value, ignore_bits, F64)
        if G_MODE == 1:
            g_scalar = tl.load(g_ptr).to(CT)
            active = (g_scalar != 1.0) | (skip_if_one == 0)
        else:
            g_scalar = grad_scale
            active = True  # skip_if_one is for one grad_output shared by every element
        if active:
            pid = tl.program_id(0)
            if INDEX64:
                offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            else:
                offsets = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            x = tl.load(x_ptr + offsets, mask=mask, other=0.5).to(CT)
            y = tl.load(y_ptr + offsets, mask=mask, other=0.5).to(CT)
            # ignore_index: a target equal to ignore_value (NaN when there is none: equal to nothing), or
            # any NaN target when ignore_nan
            ignored = (y == ignore_value) | ((ignore_nan != 0) & (y != y))
            kept = mask & ~ignored
            y = tl.where(ignored, 0.0, y)
            if count_kept != 0:
                tl.store(kept_ptr + pid, tl.sum(kept.to(tl.int32), axis=0))
            if not LOGITS and G_MODE == 0:  # the [0, 1] check (NaN fails both), where the data is new
                bad_x = tl.max((mask & ~((x >= 0.0) & (x <= 1.0))).to(tl.int32), axis=0)
                bad_y = tl.max((kept & ~((y >= 0.0) & (y <= 1.0))).to(tl.int32), axis=0)
                if (bad_x + bad_y) > 0:  # only a bad program touches the counters
                    tl.atomic_add(bad_ptr, bad_x)
                    tl.atomic_add(bad_ptr + 1, bad_y)
            keep_share = 1.0 - smoothing
            y = y * keep_share + 0.5 * smoothing  # label smoothing (exactly y when smoothing is 0)
            w = _broadcast(w_ptr, offsets, mask, w_inner, W_MODE, CT)
            p = _broadcast(p_ptr, offsets, mask, p_inner, P_MODE, CT)
            if LOGITS:
                e, e_big = _exp(-tl.abs(x), LIBDEVICE)
            if G_MODE == 0:
                scale = grad_scale
            elif G_MODE == 1:
                scale = g_scalar * grad_scale
            else:
                scale = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(CT) * grad_scale

            if G_MODE == 0:
                if LOGITS:
                    loss = _logits_loss(x, y, p, e, e_big, LIBDEVICE, F64)
                else:
                    loss = _bce_loss(x, y, LIBDEVICE, F64)
                if W_MODE != 0:
                    loss = loss * w
                loss = tl.where(kept, loss, 0.0)
                if write_loss != 0:
                    tl.store(loss_ptr + offsets, loss.to(loss_ptr.dtype.element_ty), mask=mask)
                if want_sum != 0:
                    tl.store(part_ptr + pid, tl.sum(loss, axis=0))
            if write_gi != 0:
                if LOGITS:
                    gi = _logits_grad_input(x, y, p, e, e_big)
                else:
                    gi = _bce_grad_input(x, y)
                if W_MODE != 0:
                    gi = gi * w
                gi = tl.where(kept, gi, 0.0) * scale
                tl.store(gi_ptr + offsets, gi.to(gi_ptr.dtype.element_ty), mask=mask)
            if G_MODE != 0:
                if write_gt != 0:
                    if LOGITS:
                        gt = _logits_grad_target(x, p, e, LIBDEVICE, P_MODE)
                    else:
                        gt = _bce_grad_target(x, LIBDEVICE)
                    gt = gt * keep_share
                    if W_MODE != 0:
                        gt = gt * w
                    gt = tl.where(kept, gt, 0.0) * scale
                    tl.store(gt_ptr + offsets, gt.to(gt_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_kernel(g_ptr, s_ptr, n, INDEX64: tl.constexpr, BLOCK: tl.constexpr):
        """``g *= s`` in place, nothing read or written when ``s`` is exactly 1."""
        s = tl.load(s_ptr)
        if s != 1.0:
            pid = tl.program_id(0)
            if INDEX64:
                offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            else:
                offsets = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            g = tl.load(g_ptr + offsets, mask=mask)
            tl.store(g_ptr + offsets, g * s, mask=mask)

    _LAUNCH_OPTIONS = _launch_options()


def _launch(kernel, grid: tuple[int], *args: Any, **kwargs: Any) -> None:
    """Every launch goes through here (the compile check, ``tools/compile_gpu_kernels.py``, replaces it)."""
    kernel[grid](*args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------


def launch_count(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Programs a pass over ``n`` elements of ``dtype`` launches."""
    return max(1, -(-n // CONFIGS[dtype][0]))


@functools.lru_cache(maxsize=256)
def _as_float32(value: float) -> float:
    """The float32 nearest ``value`` (as a Python float)."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


@functools.lru_cache(maxsize=256)
def _bits(value: float) -> int:
    """``value``'s float64 bit pattern as a signed 64-bit integer."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


@functools.lru_cache(maxsize=256)
def _ignore_parameters(ignore_index: float | None) -> tuple[float, int, int]:
    """``(float32 value, float64 bits, ignore_nan)``. The C++ kernels compare a target with ignore_index
    in float64; a float32 (or half) target equals it exactly when it equals ignore_index's float32 value
    and that value is ignore_index itself, so a value that is not a float32 is passed as NaN (equal to
    nothing) to the float32 kernels. No ignore_index: NaN, equal to nothing."""
    if ignore_index is None:
        return math.nan, _bits(math.nan), 0
    if ignore_index != ignore_index:
        return math.nan, _bits(math.nan), 1
    as32 = _as_float32(ignore_index)
    return (as32 if as32 == ignore_index else math.nan), _bits(ignore_index), 0


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors'."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def run(
    plan: Plan,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    *,
    loss: Tensor | None = None,
    grad_input: Tensor | None = None,
    grad_target: Tensor | None = None,
    grad_output: Tensor | None = None,
    grad_scale: float = 1.0,
    loss_dtype: torch.dtype | None = None,
    skip_if_one: bool = False,
) -> tuple[Tensor | None, Tensor | int]:
    """One kernel pass of ``plan`` (:func:`bcekit._native.plan` with ``triton=True``: the loss, the
    weights' broadcast forms, the reduction and the options) over contiguous tensors of one dtype, the
    weights given where the plan has them (outputs preallocated by the caller).

    Without ``grad_output``, a forward pass: the per-element loss into ``loss`` and/or, unless
    ``reduction`` is NONE, the reduced loss, returned as a 0-d tensor of ``loss_dtype`` (default: the
    input's dtype); ``grad_input``, if given, gets the input gradient times ``grad_scale``. With
    ``grad_output`` (one element: a reduced loss's; else one per element), a backward pass: ``grad_input``
    and/or ``grad_target`` get the gradients times ``grad_output`` and ``grad_scale``; with a one-element
    ``grad_output``, ``skip_if_one`` leaves the outputs untouched when it is exactly 1 (decided on the
    device: a gradient stored for grad_output 1 is then rewritten in place only when it must change).

    Returns ``(reduced loss or None, kept)``: ``kept`` is the number of elements not ignored, a 0-d int64
    tensor on the device when ``ignore_index`` is given, else the int ``input.numel()``. Nothing is read
    back from the device; a probability loss's out-of-range value raises through
    :mod:`bcekit.torch._range_check`, at this call or a later one.
    """
    assert triton is not None
    kind, reduction, ignore_index = plan.loss, plan.reduction, plan.ignore_index
    device = input.device
    _range_check.poll(device)
    n = input.numel()
    block, warps = CONFIGS[input.dtype]
    programs = launch_count(n, input.dtype)
    f64 = input.dtype == torch.float64
    forward = grad_output is None
    if forward:
        g_mode = FORWARD
    else:
        g_mode = BACKWARD_SCALAR if grad_output.numel() == 1 and n != 1 else BACKWARD_FULL
    want_sum = forward and reduction != NONE
    counting = ignore_index is not None
    checking = forward and kind == "bce"
    partials = (
        torch.empty(programs, dtype=torch.float64 if f64 else torch.float32, device=device)
        if want_sum
        else None
    )
    kept = torch.empty(programs, dtype=torch.int32, device=device) if counting else None
    flags = _range_check.counters(device) if checking else None
    ignore32, ignore64, ignore_nan = _ignore_parameters(ignore_index)
    dummy = input  # never read when its flag or mode says absent
    with _on(device):
        _launch(
            _bce_kernel,
            (programs,),
            input,
            target,
            dummy if weight is None else weight,
            dummy if pos_weight is None else pos_weight,
            dummy if grad_output is None else grad_output,
            dummy if loss is None else loss,
            dummy if grad_input is None else grad_input,
            dummy if grad_target is None else grad_target,
            dummy if partials is None else partials,
            dummy if kept is None else kept,
            dummy if flags is None else flags,
            n,
            plan.weight_inner,
            plan.pos_weight_inner,
            _as_float32(grad_scale),
            _as_float32(plan.label_smoothing),
            ignore32,
            _bits(grad_scale),
            _bits(plan.label_smoothing),
            ignore64,
            ignore_nan,
            int(loss is not None),
            int(want_sum),
            int(grad_input is not None),
            int(grad_target is not None),
            int(counting),
            int(skip_if_one),
            LOGITS=kind == "logits",
            W_MODE=_MODES[plan.weight_form],
            P_MODE=_MODES[plan.pos_weight_form],
            G_MODE=g_mode,
            F64=f64,
            INDEX64=n + block > _INT32_LIMIT,
            LIBDEVICE=not _interpreting(),
            BLOCK=block,
            num_warps=warps,
            **_LAUNCH_OPTIONS,
        )
    if checking:
        _range_check.launched(device)
    total_kept: Tensor | int = n if kept is None else kept.sum(dtype=torch.int64)
    if not want_sum:
        return None, total_kept
    total = partials.sum(dtype=torch.float64)
    if reduction == MEAN:
        total = total / total_kept  # 0/0 = NaN: the mean of nothing
    return total.to(loss_dtype or input.dtype), total_kept


def scale_unless_one(grad: Tensor, scale: Tensor) -> None:
    """``grad *= scale`` in place (``scale``: one element of grad's dtype), decided on the device: nothing
    is read or written when ``scale`` is exactly 1."""
    assert triton is not None
    _range_check.poll(grad.device)
    n = grad.numel()
    block, warps = CONFIGS[grad.dtype]
    with _on(grad.device):
        _launch(
            _scale_kernel,
            (launch_count(n, grad.dtype),),
            grad,
            scale,
            n,
            INDEX64=n + block > _INT32_LIMIT,
            BLOCK=block,
            num_warps=warps,
            **_LAUNCH_OPTIONS,
        )


def describe() -> dict[str, Any]:
    """What this module would use: for diagnostics."""
    return {
        "available": AVAILABLE,
        "interpreting": _interpreting(),
        "configs": {str(dtype).rpartition(".")[2]: list(c) for dtype, c in CONFIGS.items()},
        "range_check": _range_check.mode(),
    }
