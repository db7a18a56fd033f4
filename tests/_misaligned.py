"""Kernel passes over operands at misaligned addresses, against the same passes on aligned copies.

Only NumPy and ``bcekit._native._core`` are imported, so that tests/test_unaligned.py can run this in a
subprocess with ``BCEKIT_ISA=baseline`` cheaply (``python tests/_misaligned.py`` prints the mismatches as
JSON). Every operand (input, target, weight, pos_weight, grad_output) and every output (loss, grad_input,
grad_target) lies at ``offset`` bytes past a 64-byte boundary; offset 0 is the aligned reference. The
outputs are compared bitwise, and so are the returned (value, kept, flags); the bytes around each output
must be left as they were.
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np

from bcekit._native import _core

ROWS, INNER = 61, 17  # n = 1037: two fast-path blocks of 512, one group of 8, a tail of 5
N = ROWS * INNER
F32, F64, F16, BF16 = 0, 1, 2, 3
ITEMSIZE = {F32: 4, F64: 8, F16: 2, BF16: 2}
NAMES = {F32: "float32", F64: "float64", F16: "float16", BF16: "bfloat16"}
ABSENT, SCALAR, PER_CLASS, PER_ROW, FULL = 0, 1, 2, 3, 4
SIZES = {SCALAR: 1, PER_CLASS: INNER, PER_ROW: ROWS, FULL: N}
WEIGHTS = {  # (weight form, pos_weight form)
    "unweighted": (ABSENT, ABSENT),
    "full/per_class": (FULL, PER_CLASS),
    "per_class/per_row": (PER_CLASS, PER_ROW),
    "per_row/full": (PER_ROW, FULL),
    "scalar/scalar": (SCALAR, SCALAR),
}
# (reduction, outputs, grad_output, options): the fast path's passes (a reduced loss and/or the input
# gradient, with and without options) and the exact path's (per-element losses, target gradients)
PASSES = {
    "sum+grad": (2, ("grad_input",), False, {}),
    "mean": (1, (), False, {}),
    "none": (0, ("loss",), False, {}),
    "grad_output": (0, ("grad_input",), True, {}),
    "grad_output+target": (0, ("grad_input", "grad_target"), True, {}),
    "options": (1, ("grad_input",), False, {"label_smoothing": 0.1, "ignore_index": 0.0}),
}
GUARD = 16  # bytes checked on either side of each output
FILL = 0xA5


def _storage(values: np.ndarray, dtype: int) -> np.ndarray:
    """``values`` (float64) in storage ``dtype``, as raw bytes."""
    if dtype == BF16:  # round to nearest even on the float32 bits (the values here are finite)
        bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    return values.astype({F32: np.float32, F64: np.float64, F16: np.float16}[dtype]).view(np.uint8)


class _Buffer:
    """Bytes at ``offset`` past a 64-byte boundary, with GUARD bytes of FILL on either side."""

    def __init__(self, nbytes: int, offset: int, content: np.ndarray | None = None) -> None:
        self.raw = np.full(nbytes + 2 * GUARD + 128, FILL, dtype=np.uint8)
        self.start = (-self.raw.ctypes.data) % 64 + GUARD + offset
        if self.start < GUARD:
            self.start += 64
        self.nbytes = nbytes
        if content is not None:
            self.data[:] = content

    @property
    def data(self) -> np.ndarray:
        return self.raw[self.start : self.start + self.nbytes]

    @property
    def pointer(self) -> int:
        return int(self.data.ctypes.data)

    def guards_intact(self) -> bool:
        before = self.raw[self.start - GUARD : self.start]
        after = self.raw[self.start + self.nbytes : self.start + self.nbytes + GUARD]
        return bool(np.all(before == FILL) and np.all(after == FILL))


def _operands(logits: bool) -> dict[str, np.ndarray]:
    """float64 values of every operand, with what steers blocks off the fast path: a logit beyond 700 in
    the second block; for probabilities hard targets in the first block, an x of 0 and of 1 in the second."""
    rng = np.random.default_rng(7)
    if logits:
        x = rng.normal(0.0, 4.0, N)
        x[700] = 800.0
    else:
        x = rng.uniform(0.02, 0.98, N)
        x[600], x[601] = 0.0, 1.0
    y = rng.random(N)
    y[::5] = np.round(y[::5])
    if not logits:
        y[:512] = np.round(y[:512])
        y[600], y[601] = 0.0, 1.0  # finite losses at the clamp's ends
    return {
        "input": x,
        "target": y,
        "weight": rng.uniform(0.25, 2.0, N),
        "pos_weight": rng.uniform(0.25, 2.0, N),
        "grad_output": rng.uniform(-2.0, 2.0, N),
    }


def _run(kind: int, dtype: int, weights: str, name: str, offset: int, values: dict) -> tuple[tuple, dict]:
    reduction, outputs, with_grad_output, options = PASSES[name]
    w_mode, p_mode = WEIGHTS[weights]
    if kind == 0:
        p_mode = ABSENT  # the probability loss has no pos_weight
    size = ITEMSIZE[dtype]
    inputs = {
        key: _Buffer(
            (N if key in ("input", "target", "grad_output") else SIZES.get(mode, 0)) * size,
            offset,
            _storage(values[key][: (N if mode is None else SIZES.get(mode, 0))], dtype),
        )
        for key, mode in (
            ("input", None),
            ("target", None),
            ("weight", w_mode),
            ("pos_weight", p_mode),
            ("grad_output", None),
        )
    }
    outs = {key: _Buffer(N * size, offset) for key in outputs}

    def pointer(key: str, present: bool = True) -> int:
        return inputs[key].pointer if present else 0

    result = _core.run_raw(
        kind,
        dtype,
        N,
        pointer("input"),
        pointer("target"),
        pointer("weight", w_mode != ABSENT),
        w_mode,
        INNER,
        pointer("pos_weight", p_mode != ABSENT),
        p_mode,
        INNER,
        pointer("grad_output", with_grad_output),
        0.5,
        outs["loss"].pointer if "loss" in outs else 0,
        outs["grad_input"].pointer if "grad_input" in outs else 0,
        outs["grad_target"].pointer if "grad_target" in outs else 0,
        reduction,
        options.get("label_smoothing", 0.0),
        options.get("ignore_index"),
        1,
    )
    for key, buffer in outs.items():
        if not buffer.guards_intact():
            raise AssertionError(f"{key} written outside its {N} elements")
    value, kept, flags = result
    return (struct.pack("<d", value), kept, flags), {key: buffer.data.copy() for key, buffer in outs.items()}


def mismatches(dtypes=(F32, F64, F16, BF16)) -> list[str]:
    """Every (dtype, loss, weights, pass, offset) whose results differ from the aligned pass's."""
    found = []
    for dtype in dtypes:
        size = ITEMSIZE[dtype]
        offsets = sorted({1, size // 2, size + 1} - {0, size})  # odd, and half the element size
        for kind in (0, 1):
            values = _operands(kind == 1)
            for weights in WEIGHTS:
                if kind == 0 and weights == "per_row/full":
                    continue  # the same weight forms as "full/per_class" without pos_weight
                for name in PASSES:
                    expected = _run(kind, dtype, weights, name, 0, values)
                    for offset in offsets:
                        got = _run(kind, dtype, weights, name, offset, values)
                        where = f"{NAMES[dtype]} {('bce', 'logits')[kind]} {weights} {name} offset {offset}"
                        if got[0] != expected[0]:
                            found.append(f"{where}: returned {got[0]}, aligned {expected[0]}")
                        for key, data in expected[1].items():
                            if not np.array_equal(got[1][key], data):
                                found.append(f"{where}: {key} differs")
    return found


if __name__ == "__main__":
    json.dump({"isa": _core.ISA, "mismatches": mismatches()}, sys.stdout)
