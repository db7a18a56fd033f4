"""Operands at misaligned addresses: the kernels read (and write) them as they do aligned ones.

A NumPy view at an odd byte offset of a byte buffer (``flags.aligned`` False) or a tensor over such a
buffer (``torch.frombuffer`` at an odd offset) is C-contiguous, so the kernels read it in place. Every
dtype, both losses, each weight form, each reduction and the gradients are run on misaligned views and
on aligned copies of the same values, through bcekit.numpy, bcekit.torch and (for misaligned outputs,
which the public functions never hand the kernels: they allocate their outputs) the raw kernel entry
point, on the dispatched build and on the baseline build. The results must be bitwise equal. Under
tools/sanitize.sh, UBSan checks every load and store on the way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _misaligned
import bcekit.numpy as bnp
import bcekit.torch as bce
from bcekit import _native

SHAPE = (_misaligned.ROWS, _misaligned.INNER)
TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
REDUCTIONS = ("none", "mean", "sum")
# weight and pos_weight shapes: full, per class (C,), per row (N, 1), one value
WEIGHT_SHAPES = {
    "unweighted": (None, None),
    "full/per_class": (SHAPE, SHAPE[-1:]),
    "per_class/per_row": (SHAPE[-1:], (SHAPE[0], 1)),
    "scalar/full": ((1,), SHAPE),
}


def _values(logits: bool) -> dict[str, np.ndarray]:
    values = _misaligned._operands(logits)
    return {key: value.reshape(SHAPE) for key, value in values.items()}


def _weight(values: np.ndarray, shape) -> np.ndarray | None:
    return None if shape is None else values.reshape(-1)[: int(np.prod(shape))].reshape(shape)


def _misaligned_array(array: np.ndarray, offset: int = 1) -> np.ndarray:
    """``array``'s values in a C-contiguous view ``offset`` bytes past an aligned address."""
    raw = np.zeros(array.nbytes + 64 + offset, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    view = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    view[...] = array
    assert not view.flags.aligned and view.flags.c_contiguous
    return view


def _misaligned_tensor(tensor: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """``tensor``'s values in a contiguous tensor over a byte buffer, ``offset`` bytes past alignment."""
    nbytes = tensor.numel() * tensor.element_size()
    raw = np.zeros(nbytes + 64 + offset, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    view = torch.frombuffer(raw, dtype=tensor.dtype, offset=start, count=tensor.numel()).view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % tensor.element_size() != 0 and view.is_contiguous()
    return view


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernel passes (so a fallback to the composed path cannot pass the tests unnoticed)."""
    calls = [0]
    for name in ("run_planned", "run_arrays"):
        original = getattr(_native, name)

        def counting(*args, _original=original, **kwargs):
            calls[0] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_native, name, counting)
    return calls


def _same_bits(got, expected, what: str) -> None:
    if isinstance(got, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, what
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        got, expected = got.detach().contiguous().view(ints), expected.detach().contiguous().view(ints)
        assert torch.equal(got, expected), what
        return
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    assert got.tobytes() == expected.tobytes(), what


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_numpy_misaligned_views_give_the_aligned_results(kernel_calls, logits: bool, dtype: str) -> None:
    values = {key: value.astype(dtype) for key, value in _values(logits).items()}
    for weights, (w_shape, p_shape) in WEIGHT_SHAPES.items():
        if not logits and weights == "scalar/full":
            p_shape = None
        aligned = {
            "x": values["input"],
            "y": values["target"],
            "w": _weight(values["weight"], w_shape),
            "p": _weight(values["pos_weight"], p_shape) if logits else None,
        }
        misaligned = {key: None if a is None else _misaligned_array(a) for key, a in aligned.items()}
        for reduction in REDUCTIONS:
            for options in ({}, {"label_smoothing": 0.1, "ignore_index": 0.0}):
                what = f"{weights} {reduction} {options}"
                calls = kernel_calls[0]
                results = []
                for a in (aligned, misaligned):
                    if logits:
                        loss = bnp.binary_cross_entropy_with_logits(
                            a["x"], a["y"], a["w"], reduction=reduction, pos_weight=a["p"], **options
                        )
                        both = bnp.binary_cross_entropy_with_logits_and_grad(
                            a["x"], a["y"], a["w"], reduction, pos_weight=a["p"], **options
                        )
                    else:
                        loss = bnp.binary_cross_entropy(
                            a["x"], a["y"], a["w"], reduction=reduction, **options
                        )
                        both = bnp.binary_cross_entropy_and_grad(a["x"], a["y"], a["w"], reduction, **options)
                    results.append((loss, *both))
                assert kernel_calls[0] == calls + 4, what
                for got, expected, name in zip(
                    results[1], results[0], ("loss", "loss_and_grad", "grad"), strict=True
                ):
                    _same_bits(got, expected, f"{what}: {name}")


def _torch_results(logits: bool, a: dict, reduction: str, grad_output: torch.Tensor | None) -> list:
    """The loss without autograd, then the loss and the gradients in input and target of a backward
    with ``grad_output`` (per element for 'none', else one value)."""
    f = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
    extra = {"pos_weight": a["p"]} if logits else {}
    with torch.no_grad():
        plain = f(a["x"], a["y"], a["w"], reduction=reduction, **extra)
    x = a["x"].requires_grad_(True)
    y = a["y"].requires_grad_(True)
    loss = f(x, y, a["w"], reduction=reduction, **extra)
    loss.backward(grad_output)
    results = [plain, loss.detach(), x.grad, y.grad]
    x.grad = y.grad = None
    x.requires_grad_(False)
    y.requires_grad_(False)
    return results


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
def test_torch_misaligned_tensors_give_the_aligned_results(kernel_calls, logits: bool, dtype: str) -> None:
    torch_dtype = TORCH_DTYPES[dtype]
    values = {key: torch.from_numpy(value).to(torch_dtype) for key, value in _values(logits).items()}
    for weights, (w_shape, p_shape) in WEIGHT_SHAPES.items():
        if not logits and weights == "scalar/full":
            p_shape = None

        def weight(key, shape):
            return None if shape is None else values[key].reshape(-1)[: int(np.prod(shape))].reshape(shape)

        aligned = {
            "x": values["input"].clone(),
            "y": values["target"].clone(),
            "w": weight("weight", w_shape),
            "p": weight("pos_weight", p_shape) if logits else None,
        }
        misaligned = {key: None if t is None else _misaligned_tensor(t) for key, t in aligned.items()}
        for reduction in REDUCTIONS:
            what = f"{weights} {reduction}"
            grad_output = (
                values["grad_output"] if reduction == "none" else torch.tensor(0.75, dtype=torch_dtype)
            )
            calls = kernel_calls[0]
            expected = _torch_results(logits, aligned, reduction, grad_output)
            got = _torch_results(logits, misaligned, reduction, _misaligned_tensor(grad_output))
            assert kernel_calls[0] >= calls + 4, what  # forward and backward passes, both layouts
            for g, e, name in zip(
                got, expected, ("loss", "loss (autograd)", "grad input", "grad target"), strict=True
            ):
                _same_bits(g, e, f"{what}: {name}")


def test_raw_kernels_read_and_write_misaligned_operands() -> None:
    """Every dtype, misaligned outputs included, on the dispatched build (tests/_misaligned.py)."""
    assert _misaligned.mismatches() == []


def test_baseline_build_reads_and_writes_misaligned_operands() -> None:
    """The same on the baseline build, which has its own half-type loads (no F16C)."""
    env = {**os.environ, "BCEKIT_ISA": "baseline"}
    script = Path(__file__).with_name("_misaligned.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # a sanitizer's report, under tools/sanitize.sh
    report = json.loads(result.stdout)
    assert report["isa"] == "baseline"
    assert report["mismatches"] == []
