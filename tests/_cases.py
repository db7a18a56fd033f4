"""Hypothesis strategies shared by the backend tests: shapes, dtypes, weight forms, values, strides.

A drawn :class:`Case` holds float64 NumPy data plus how to lay it out (dtype, non-contiguous or not);
each test turns it into its backend's arrays. torch, evaluated in float64 on the same data, is the
reference of the semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
REDUCTIONS = ("none", "mean", "sum")
#: contiguous; the transpose of a contiguous buffer; every other element of a wider buffer (last dim);
#: a stride-0 view repeating the first row (the case's rows are then drawn equal)
LAYOUTS = ("contiguous", "transposed", "strided", "broadcast")
#: (ignore_index, label_smoothing) pairs the kernel tests run against the composed path
OPTION_CASES = [
    (None, 0.1),
    (None, 1.0),
    (-1.0, 0.0),
    (-1.0, 0.2),
    (math.nan, 0.0),
    (math.nan, 0.05),
    (0.0, 0.0),  # ignores the zeros among the targets (the negatives of hard targets)
]


@dataclass
class Case:
    input: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None
    pos_weight: np.ndarray | None
    dtype: str
    reduction: str
    layout: str  # how input and target lie in memory: one of LAYOUTS


shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 6)),
    st.tuples(st.integers(1, 5), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
)


@st.composite
def broadcast_shape(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``shape`` without widening it: scalar, per-class (last dim), per-row
    ``(N, 1, ...)``, full, or a random mix of kept and unit dimensions (possibly with fewer dims)."""
    if not shape:
        return ()
    forms = [(), (shape[-1],), (shape[0],) + (1,) * (len(shape) - 1), shape]
    mixed = tuple(draw(st.sampled_from([d, 1])) for d in shape)
    forms.append(mixed[draw(st.integers(0, len(shape))) :])
    return draw(st.sampled_from(forms))


def _values(draw: st.DrawFn, shape: tuple[int, ...], kind: str) -> np.ndarray:
    size = int(np.prod(shape))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "logits":
        scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
        values = rng.normal(0.0, scale, size)
    elif kind == "probabilities":
        values = 1.0 / (1.0 + np.exp(-rng.normal(0.0, draw(st.sampled_from([0.5, 3.0, 20.0])), size)))
        if draw(st.booleans()):  # exact 0 and 1, where the clamp at -100 matters
            values[rng.random(size) < 0.2] = 0.0
            values[rng.random(size) < 0.2] = 1.0
    elif kind == "targets":
        hard = draw(st.booleans())
        values = rng.integers(0, 2, size).astype(np.float64) if hard else rng.random(size)
    else:  # positive weights
        values = rng.uniform(0.1, 3.0, size)
    return values.reshape(shape)


def lay_out(array: np.ndarray, layout: str) -> np.ndarray:
    """The same values (and dtype) as ``array``, laid out in memory as ``layout`` says."""
    if layout == "transposed":
        return np.ascontiguousarray(array.swapaxes(0, 1)).swapaxes(0, 1)
    if layout == "strided":
        wide = np.zeros((*array.shape[:-1], 2 * array.shape[-1]), dtype=array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    if layout == "broadcast":
        return np.broadcast_to(array[:1], array.shape)
    return array


@st.composite
def cases(draw: st.DrawFn, logits: bool, dtypes: tuple[str, ...] = FLOAT_DTYPES) -> Case:
    shape = draw(shapes)
    x = _values(draw, shape, "logits" if logits else "probabilities")
    y = _values(draw, shape, "targets")
    weight = None
    if draw(st.booleans()):
        weight = _values(draw, draw(broadcast_shape(shape)), "weights")
    pos_weight = None
    if logits and draw(st.booleans()):
        pos_weight = _values(draw, draw(broadcast_shape(shape)), "weights")
    layouts = ["contiguous"] + ["strided", "broadcast"] * bool(shape) + ["transposed"] * (len(shape) >= 2)
    layout = draw(st.sampled_from(layouts))
    if layout == "broadcast":
        x, y = np.broadcast_to(x[:1], shape).copy(), np.broadcast_to(y[:1], shape).copy()
    return Case(
        input=x,
        target=y,
        weight=weight,
        pos_weight=pos_weight,
        dtype=draw(st.sampled_from(dtypes)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        layout=layout,
    )
