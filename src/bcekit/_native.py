"""The bridge to the C++ kernels (``bcekit._core``), shared by the NumPy and torch backends.

Framework-free: it takes anything the kernels can read in place (NumPy arrays through the buffer protocol,
CPU torch tensors through DLPack: no copies) and knows only shapes, dtypes and the kernel's options. Which
calls may take the kernels, and how, is decided here too (:func:`plan`), so both backends agree.

What the kernels compute is :mod:`bcekit._math`'s pipeline for the probability and logits losses (label
smoothing and ``ignore_index`` included): per-element losses and gradients of float32, float16 and bfloat16
evaluated in double lanes and rounded once, float64 in x87 ``long double``. A pass that reduces the loss
and/or writes the input gradient (a training step) takes the kernels' fast path, which sums per-element
terms within 2 ulp each and forms the probability loss's gradient without options in float32, within 3.5
ulp (``src/cpp/fast_kernel.h`` says how). The focal loss, mixed dtypes and weights that broadcast in other
forms than the four below stay on the composed path.

Outputs (gradients, per-element losses) of at least :data:`CACHED_MIN_BYTES` come from a cache of buffers
kept by the C++ core: a training step frees its gradient and allocates the next one of the same size, and
a fresh allocation would have its pages faulted in by the kernel's stores one 4 KiB page at a time, which
at 2^24 float32 elements costs more than the pass. A buffer returns to the cache when the tensor or array
storage owning it is freed (views keep it alive), and serves a request of its size or up to 1/8 smaller.
Buffers of 4 MiB and more start on a 2 MiB boundary and are advised as transparent huge pages (Linux), so
a pass streaming through one misses the TLB once per 2 MiB. The cache keeps at most ``BCEKIT_CACHE_BYTES``
bytes (default 1 GiB, 0 disables it), the least recently returned going first, and releases a buffer no
request takes within ``_core.CACHE_MAX_AGE`` requests; each buffer is its own memory mapping, so
:func:`bcekit.empty_cache` gives what it holds back to the system. That cache serves NumPy outputs: torch
outputs come from a pool of storages torch allocates (so that torch can resize them), kept under the same
rules and limit (:mod:`bcekit.torch._buffers`), which registers its release with ``register_cache``.

Threads: torch tensors use ``torch.get_num_threads()``; NumPy arrays use :func:`bcekit.get_num_threads`, which
is ``BCEKIT_NUM_THREADS`` from the environment if set, else the CPUs this process may run on, and which
:func:`bcekit.set_num_threads` changes. The helper threads are kept between passes. Results do not depend on
the count: the kernels cut the data into fixed chunks and add the chunks' sums in a fixed order (a thread the
system refuses to start only leaves the pass to fewer threads).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from bcekit._semantics import MEAN, NONE, input_range_error, target_range_error

try:
    from bcekit import _core
except ImportError:  # a source tree without the built extension: the composed path serves everything
    _core = None

__all__ = [
    "AVAILABLE",
    "ISA",
    "ABSENT",
    "SCALAR",
    "PER_CLASS",
    "PER_ROW",
    "FULL",
    "broadcast_form",
    "Plan",
    "plan",
    "run_planned",
    "run_arrays",
    "eligible",
    "run",
    "score",
    "parse_csv",
    "get_num_threads",
    "set_num_threads",
    "empty",
    "empty_cache",
    "cache_limit",
    "set_cache_limit",
    "register_cache",
    "CACHED_MIN_BYTES",
]

AVAILABLE: bool = _core is not None
#: The instruction set the vector kernel was dispatched to ("avx2", "baseline"), or None without kernels.
ISA: str | None = _core.ISA if _core is not None else None

# The kernels' codes, from their one home (src/cpp/kernel_api.h) through the core module; None without it.
_FORMS = _core.BROADCAST_FORMS if _core is not None else {}
ABSENT, SCALAR, PER_CLASS, PER_ROW, FULL = (
    _FORMS.get(name) for name in ("absent", "scalar", "per_class", "per_row", "full")
)
_KINDS: dict[str, int] = dict(_core.KINDS) if _core is not None else {}
_CODES: dict[str, int] = dict(_core.DTYPES) if _core is not None else {}
#: dtype names the kernels store natively (float64 only where long double is x87's 80-bit format)
_DTYPES = {"float32", "float16", "bfloat16"} | (
    {"float64"} if _core is not None and _core.EXTENDED_FLOAT64 else set()
)
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
#: Outputs smaller than this are allocated as usual; larger ones come from the buffer cache.
CACHED_MIN_BYTES = 1 << 20


def _environment_count(name: str, minimum: int, accepts: str) -> int | None:
    """The whole number in the environment variable ``name`` (None when unset or blank); a ValueError
    naming the variable, its value and what it accepts when it is not one, or is below ``minimum``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}={raw!r}: must be {accepts}")
    return value


_CACHE_BYTES = _environment_count(
    "BCEKIT_CACHE_BYTES", 0, "a whole number of bytes the buffer cache may keep (0 turns it off)"
)
#: Most bytes each buffer cache keeps (the C++ core's, and bcekit.torch's pool): the default unless
#: BCEKIT_CACHE_BYTES says otherwise.
_cache_limit = (1 << 30) if _CACHE_BYTES is None else _CACHE_BYTES
if _core is not None:
    _core.set_cache_limit(_cache_limit)
#: The release functions of the other caches (see register_cache).
_releases: list[Callable[[int], None]] = []


def empty(shape: Sequence[int], dtype: str, torch: bool) -> Any | None:
    """An uninitialised C-contiguous output from the buffer cache (a CPU tensor if ``torch``, else a
    NumPy array), or None when it is small (or the kernels are absent): allocate it the usual way then."""
    if _core is None or math.prod(shape) * _ITEMSIZE[dtype] < CACHED_MIN_BYTES:
        return None
    return _core.empty([int(d) for d in shape], _CODES[dtype], torch)


def empty_cache() -> None:
    """Give the buffers the kernels keep for reuse back to the system (see the module docstring)."""
    if _core is not None:
        _core.empty_cache()
    for release in _releases:
        release(0)


def cache_limit() -> int:
    """Most bytes each buffer cache keeps: ``BCEKIT_CACHE_BYTES`` (default 1 GiB; 0: none)."""
    return _cache_limit


def set_cache_limit(nbytes: int) -> None:
    """Set :func:`cache_limit`; each cache releases what it holds beyond the new limit."""
    global _cache_limit
    if int(nbytes) < 0:
        raise ValueError(f"set_cache_limit: expected a whole number of bytes, got {nbytes}")
    _cache_limit = int(nbytes)
    if _core is not None:
        _core.set_cache_limit(_cache_limit)
    for release in _releases:
        release(_cache_limit)


def register_cache(release: Callable[[int], None]) -> None:
    """Make :func:`empty_cache` and :func:`set_cache_limit` reach another cache of outputs (a
    framework's own, registered by its backend): ``release(keep)`` frees what that cache holds for
    reuse beyond ``keep`` bytes, and gives the memory back to the system (``keep`` is 0 from
    :func:`empty_cache`, the new limit from :func:`set_cache_limit`)."""
    _releases.append(release)


def _default_threads() -> int:
    configured = _environment_count(
        "BCEKIT_NUM_THREADS", 1, "a positive whole number of threads for the kernels on NumPy arrays"
    )
    if configured is not None:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_threads = _default_threads()


_TORCH_DTYPES: dict[Any, str] = {}


def _torch_dtype(tensor: Any) -> str:
    dtype = tensor.dtype
    name = _TORCH_DTYPES.get(dtype)
    if name is None:
        name = _TORCH_DTYPES[dtype] = str(dtype).rpartition(".")[2]
    return name


def _form_size(mode: int, inner: int, n: int) -> int:
    if mode == SCALAR:
        return 1
    return n if mode == FULL else (inner if mode == PER_CLASS else -(-n // max(inner, 1)))


def get_num_threads() -> int:
    """Threads the kernels use for NumPy arrays (torch tensors follow ``torch.get_num_threads()``)."""
    return _threads


def set_num_threads(threads: int) -> None:
    """Set the threads the kernels use for NumPy arrays. Results are bitwise the same for any count."""
    global _threads
    if int(threads) < 1:
        raise ValueError(f"set_num_threads: expected a positive number of threads, got {threads}")
    _threads = int(threads)


def score(
    logits: bool,
    inputs: Sequence[Any],
    targets: Sequence[Any],
    weight: Any | None,
    pos_weight: Sequence[float] | None,
    label_smoothing: float,
    ignore_index: float | None,
    losses: Sequence[Any] | None,
) -> list[tuple[bytes, int, int, int, int, int]]:
    """``bcekit score``'s pass over one batch of 1-D float64 NumPy columns: an input and a target per label,
    one weight per row (or None), one pos_weight per label or one for all (or None); per-element losses are
    written to ``losses`` (one array per label) where given.

    Returns, per label: the exact sum of the kept elements' float64 losses as little-endian two's-complement
    bytes of an integer count of 2^-1074, the +inf, -inf and NaN counts, the kept count, and check flags
    (1: a prediction NaN for logits or outside [0, 1] for probabilities, 2: a kept target outside [0, 1],
    4: a weight not finite). Results are the same for any thread count and any split of the rows.
    """
    if _core is None:
        raise RuntimeError("bcekit._core is not built")
    if pos_weight is not None:
        pos_weight = [
            float(v) for v in (list(pos_weight) * len(inputs) if len(pos_weight) == 1 else pos_weight)
        ]
    return _core.score(
        _KINDS["logits" if logits else "bce"],
        list(inputs),
        list(targets),
        weight,
        pos_weight,
        float(label_smoothing),
        None if ignore_index is None else float(ignore_index),
        None if losses is None else list(losses),
        _threads,
    )


def parse_csv(data: Any, n_fields: int, slots: Sequence[int], columns: int) -> Any | None:
    """Plain numeric CSV lines (``data``: a 1-D uint8 array of whole lines of ``n_fields`` fields) as a
    ``(columns, lines)`` float64 array: field f's numbers in row ``slots[f]`` (``slots[f] < 0``: not read).
    None where a line is not plain numbers exactly as pyarrow's text-to-float64 cast reads them."""
    if _core is None:
        raise RuntimeError("bcekit._core is not built")
    return _core.parse_csv(data, int(n_fields), [int(s) for s in slots], int(columns), _threads)


def broadcast_form(weight_shape: Sequence[int], input_shape: Sequence[int]) -> tuple[int, int] | None:
    """How a weight of ``weight_shape``, broadcast to ``input_shape``, can be read in place by the kernels:
    ``(form, inner)`` with form SCALAR, PER_CLASS (``inner`` = the last dimension's size: ``(C,)``),
    PER_ROW (one value per run of ``inner`` consecutive elements: ``(N, 1)``, ``(N, 1, 1)``, ...) or FULL;
    None when it is none of these, would enlarge the input's shape, or the input is empty."""
    weight_shape, input_shape = tuple(weight_shape), tuple(input_shape)
    if math.prod(input_shape) == 0:
        return None  # an empty input reads no weight; the composed path handles its shapes
    if len(weight_shape) > len(input_shape):
        if any(d != 1 for d in weight_shape[: len(weight_shape) - len(input_shape)]):
            return None
        weight_shape = weight_shape[len(weight_shape) - len(input_shape) :]
    padded = (1,) * (len(input_shape) - len(weight_shape)) + weight_shape
    if any(w not in (1, d) for w, d in zip(padded, input_shape, strict=True)):
        return None  # not broadcastable to the input's shape without growing it
    if math.prod(padded) == 1:
        return SCALAR, 1
    if padded == input_shape:
        return FULL, 1
    if padded[:-1] == (1,) * (len(padded) - 1):
        return PER_CLASS, input_shape[-1]
    # the leading dimensions as the input's, then only ones: one value per trailing block
    split = max(i for i, w in enumerate(padded) if w != 1) + 1
    if padded[:split] == input_shape[:split]:
        return PER_ROW, math.prod(input_shape[split:])
    return None


class Plan(NamedTuple):
    """How the kernels serve one call: decided once by :func:`plan` from what the decision depends on
    (the loss, the dtype, the input's and the weights' shapes, the reduction and the options), and
    trusted by everything below it. The backends allocate the outputs and hand a plan and their data
    pointers to :func:`run_planned`."""

    loss: str  #: the loss, "bce" or "logits" (the Triton launcher's name of it)
    kind: int  #: the kernel's code of the loss (kernel_api.h ``Kind``)
    dtype: int  #: the kernel's code of the one dtype of every operand (``Dtype``)
    n: int  #: elements of the input (and of the target, the gradients and a per-element loss)
    weight_form: int  #: ``Broadcast`` code of the weight (ABSENT without one), and its ``inner``
    weight_inner: int
    weight_size: int  #: elements the weight holds in that form
    pos_weight_form: int
    pos_weight_inner: int
    pos_weight_size: int
    reduction: int  #: NONE, MEAN or SUM, the kernel's codes too
    #: what the gradients are multiplied by for the reduction: 1/n for a mean over every element, else 1
    grad_scale: float
    #: a mean whose denominator, the kept elements, is known only after the pass (``ignore_index``)
    mean_over_kept: bool
    label_smoothing: float
    ignore_index: float | None
    #: the codes above as ``_core.run_plan`` takes them, ahead of a call's pointers
    core_args: tuple


def _weight_form(
    shape: Sequence[int] | None, input_shape: tuple[int, ...], n: int
) -> tuple[int, int, int] | None:
    if shape is None:
        return ABSENT, 1, 0
    form = broadcast_form(shape, input_shape)
    if form is None:
        return None
    mode, inner = form
    return mode, inner, _form_size(mode, inner, n)


@functools.lru_cache(maxsize=1024)
def plan(
    kind: str,
    dtype: str | None,
    input_shape: tuple[int, ...],
    weight_shape: tuple[int, ...] | None,
    pos_weight_shape: tuple[int, ...] | None,
    reduction: int,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
    triton: bool = False,
) -> Plan | None:
    """The kernels' plan for a call, or None when they do not serve it: a loss they compute (the
    probability or the logits loss), every operand of the one dtype ``dtype`` (None: the operands' dtypes
    differ) that they store natively, and each weight in an in-place broadcast form
    (:func:`broadcast_form`; there is none of an empty input). ``triton``: the plan of the Triton kernels
    (CUDA tensors), which store every dtype the C++ kernels know. The arguments are hashable, and plans
    are cached on them. Without the built core there are no plans (the composed path serves every call)."""
    if _core is None or kind not in _KINDS or dtype not in (_CODES if triton else _DTYPES):
        return None
    n = math.prod(input_shape)
    weight = _weight_form(weight_shape, input_shape, n)
    pos_weight = _weight_form(pos_weight_shape, input_shape, n)
    if weight is None or pos_weight is None:
        return None
    mean_over_kept = reduction == MEAN and ignore_index is not None
    label_smoothing = float(label_smoothing)
    ignore_index = None if ignore_index is None else float(ignore_index)
    core_args = (
        _KINDS[kind],
        _CODES[dtype],
        n,
        weight[0],
        weight[1],
        pos_weight[0],
        pos_weight[1],
        int(reduction),
        label_smoothing,
        ignore_index,
    )
    return Plan(
        kind,
        _KINDS[kind],
        _CODES[dtype],
        n,
        *weight,
        *pos_weight,
        int(reduction),
        1.0 / n if reduction == MEAN and not mean_over_kept and n else 1.0,
        mean_over_kept,
        label_smoothing,
        ignore_index,
        core_args,
    )


def _raise_range_errors(flags: int) -> None:
    """torch's errors for what a pass's range checks flagged (1: an input, 2: a target outside [0, 1])."""
    if flags:
        raise input_range_error() if flags & 1 else target_range_error()


def run_planned(
    plan: Plan,
    input: int,
    target: int,
    weight: int,
    pos_weight: int,
    grad_output: int,
    loss: int,
    grad_input: int,
    grad_target: int,
    grad_scale: float,
    threads: int,
) -> tuple[float, int]:
    """One kernel pass of ``plan`` over data pointers (0 for an absent operand or output): C-contiguous
    CPU data of ``plan``'s dtype and sizes, which the caller guarantees (nothing is checked here).
    Gradients are multiplied by ``grad_scale`` (the plan's reduction factor included by the caller) and,
    when given, the per-element ``grad_output``. Returns ``(value, kept)`` as ``run`` does, and
    raises torch's range errors for the probability loss."""
    value, kept, flags = _core.run_plan(
        *plan.core_args,
        input,
        target,
        weight,
        pos_weight,
        grad_output,
        loss,
        grad_input,
        grad_target,
        grad_scale,
        threads,
    )
    _raise_range_errors(flags)
    return value, kept


def eligible(kind: str, dtypes: Sequence[str], input_shape: Sequence[int], *weight_shapes: Any) -> bool:
    """Whether the kernels serve a call of these dtypes and shapes (weights: a shape, or None when
    absent): :func:`plan` is not None."""
    weight_shape, pos_weight_shape = (tuple(weight_shapes) + (None, None))[:2]
    dtype = dtypes[0] if len(set(dtypes)) == 1 else None
    return (
        plan(kind, dtype, tuple(input_shape), _tuple(weight_shape), _tuple(pos_weight_shape), NONE)
        is not None
    )


def _tuple(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if shape is None else tuple(int(d) for d in shape)


def _pointer(tensor: Any, name: str, dtype: str, size: int) -> int:
    """The data pointer of a CPU tensor after the checks the C++ side cannot make on a raw pointer."""
    if tensor is None:
        return 0
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or _torch_dtype(tensor) != dtype:
        raise ValueError(f"bcekit kernels: '{name}' must be a contiguous CPU tensor of dtype {dtype}")
    if tensor.numel() != size:
        raise ValueError(f"bcekit kernels: '{name}' has {tensor.numel()} elements, expected {size}")
    return tensor.data_ptr()


def run(
    kind: str,
    input: Any,
    target: Any,
    weight: Any = None,
    weight_shape: Sequence[int] | None = None,
    pos_weight: Any = None,
    pos_weight_shape: Sequence[int] | None = None,
    *,
    input_shape: Sequence[int],
    reduction: int = NONE,
    loss: Any = None,
    grad_input: Any = None,
    grad_target: Any = None,
    grad_output: Any = None,
    grad_scale: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
    threads: int | None = None,
) -> tuple[float, int]:
    """One pass of the kernel over C-contiguous, same-dtype operands (outputs preallocated by the caller),
    checked here: NumPy arrays (through the buffer protocol) or CPU tensors. The NumPy backend's and the
    tests' way in; bcekit.torch's passes take :func:`run_planned`.

    Returns ``(value, kept)``: the mean or sum of the per-element losses (0.0 for ``'none'``), reduced in
    the kernel's extended precision and rounded to float64 once, and the number of kept elements.
    Gradients are multiplied by ``grad_scale`` and, if given, the per-element ``grad_output`` (the plan's
    1/n is not applied here: ``grad_scale`` is the whole factor). For the probability loss the same pass
    checks that inputs and (kept) targets lie in [0, 1], and raises torch's errors if not (outputs are
    then garbage).
    """
    assert _core is not None
    torch_tensors = hasattr(input, "data_ptr")
    dtype = _torch_dtype(input) if torch_tensors else input.dtype.name
    planned = plan(
        kind,
        dtype,
        _tuple(input_shape),
        None if weight is None else _tuple(weight_shape),
        None if pos_weight is None else _tuple(pos_weight_shape),
        int(reduction),
        float(label_smoothing),
        None if ignore_index is None else float(ignore_index),
    )
    if planned is None:
        raise ValueError("bcekit kernels: this call is not one the kernels serve (see bcekit._native.plan)")
    threads = _threads if threads is None else int(threads)
    if torch_tensors:  # raw pointers, checked here (DLPack costs ~5 us each)
        n = planned.n
        return run_planned(
            planned,
            _pointer(input, "input", dtype, n),
            _pointer(target, "target", dtype, n),
            _pointer(weight, "weight", dtype, planned.weight_size),
            _pointer(pos_weight, "pos_weight", dtype, planned.pos_weight_size),
            _pointer(grad_output, "grad_output", dtype, n),
            _pointer(loss, "loss", dtype, n),
            _pointer(grad_input, "grad_input", dtype, n),
            _pointer(grad_target, "grad_target", dtype, n),
            float(grad_scale),
            threads,
        )
    return run_arrays(
        planned,
        input,
        target,
        weight,
        pos_weight,
        loss=loss,
        grad_input=grad_input,
        grad_target=grad_target,
        grad_output=grad_output,
        grad_scale=float(grad_scale),
        threads=threads,
    )


def run_arrays(
    plan: Plan,
    input: Any,
    target: Any,
    weight: Any,
    pos_weight: Any,
    *,
    loss: Any = None,
    grad_input: Any = None,
    grad_target: Any = None,
    grad_output: Any = None,
    grad_scale: float,
    threads: int | None = None,
) -> tuple[float, int]:
    """:func:`run_planned` for NumPy arrays (read in place through the buffer protocol; the core checks
    their dtypes, sizes and contiguity)."""
    value, kept, flags = _core.run(
        plan.kind,
        input,
        target,
        weight,
        plan.weight_form,
        plan.weight_inner,
        pos_weight,
        plan.pos_weight_form,
        plan.pos_weight_inner,
        grad_output,
        grad_scale,
        loss,
        grad_input,
        grad_target,
        plan.reduction,
        plan.label_smoothing,
        plan.ignore_index,
        _threads if threads is None else threads,
    )
    _raise_range_errors(flags)
    return value, kept
