"""The fast path of the C++ kernel (``src/cpp/fast_kernel.h``): reduced losses and input gradients.

* each element's contribution to a reduced loss within 2 ulp (float32) of the exact loss, for every
  formulation the fast path has: the unweighted logits sum (log1p(e) as a product of 1 / (1 + e)), the
  same product per run of one weight, per class of a per-class weight and per class of the positives of a
  per-class pos_weight, the weighted one (f + f^2 R(f), R in float lanes) and the probability loss (float
  logarithms);
* the product's renormalisation over many blocks and chunks;
* logits blocks within 18 of 0 (every factor in the product) and beyond (tiny losses added directly);
  probability blocks without x = 0 or 1 (no clamp) and with them: the same bits either way;
* the fast path's gradients against the exact path's (a block that holds a NaN takes the exact path);
* streaming stores for large float32 gradients give the same bits as ordinary stores;
* every mode of the fast path (plain, unweighted with options, weighted) against torch in float64;
* blocks whose targets are all 0 or 1 (the probability loss as a product of x or 1 - x): per element,
  over many chunks, and mixed with soft blocks and blocks the clamp at -100 sends elsewhere; with a
  weight, one product per run of one weight or per class.

A single element's contribution is isolated by padding it with elements whose loss is zero (or, for the
logits loss, below 1e-300): ``_native.run`` returns the kernel's reduced sum in double, unrounded to the
element's dtype, so its distance to the exact loss is the element's own error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcekit.numpy as bnp
import bcekit.torch as bce
from _reference import MP, bce_exact, logits_exact, ulp
from bcekit import _native

pytestmark = pytest.mark.skipif(not _native.AVAILABLE, reason="the C++ kernels are not built")

SUM, MEAN = 2, 1
GROUP = 8  # the fast path works on groups of 8; a tail of fewer takes the exact path


def _isolated_sums(kind: str, x: np.ndarray, y: np.ndarray, pad_x: float, pad_y: float, **weights) -> list:
    """The reduced sum of each (x[i], y[i]) alone, padded to a group of 8 with zero-loss elements, all
    in one call per element (so every element runs through the fast path's vector code)."""
    sums = []
    for i in range(x.size):
        xs = np.full(GROUP, pad_x, np.float32)
        ys = np.full(GROUP, pad_y, np.float32)
        xs[i % GROUP], ys[i % GROUP] = x[i], y[i]
        extra = {}
        if "pos_weight" in weights:
            p = np.ones(GROUP, np.float32)
            p[i % GROUP] = weights["pos_weight"][i]
            extra = {"pos_weight": p, "pos_weight_shape": (GROUP,)}
        if "weight" in weights:
            w = np.zeros(GROUP, np.float32)  # the padding weighs nothing
            w[i % GROUP] = weights["weight"][i]
            extra.update(weight=w, weight_shape=(GROUP,))
        value, _ = _native.run(kind, xs, ys, input_shape=(GROUP,), reduction=SUM, **extra)
        sums.append(value)
    return sums


def _error_in_float32_ulps(value: float, exact) -> float:
    if exact == 0:
        return 0.0 if value == 0 else math.inf
    return float(abs(MP.mpf(value) - exact) / ulp(exact, np.float32))


def _assert_probability_sums_within_two_ulps(x: np.ndarray, y: np.ndarray) -> None:
    """Each element's contribution to the probability loss's sum, padded with x = 0, y = 0 (loss 0; with
    hard targets the group's targets stay all 0 or 1), within 2 ulp of its exact loss."""
    sums = _isolated_sums("bce", x, y, pad_x=0.0, pad_y=0.0)
    errors = [
        _error_in_float32_ulps(s, bce_exact(float(a), float(b))) for s, a, b in zip(sums, x, y, strict=True)
    ]
    assert max(errors) <= 2.0, (max(errors), x[int(np.argmax(errors))], y[int(np.argmax(errors))])


def _logits_points(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(
        [
            rng.normal(0.0, 3.0, 300),
            rng.uniform(-100.0, 100.0, 200),
            -np.geomspace(1e-8, 90.0, 60),
            np.geomspace(1e-8, 90.0, 60),
            [0.0, -0.0, math.log(2), -math.log(2), 18.02, -18.02, 18.03, -18.03, 700.0, -700.0],
        ]
    ).astype(np.float32)
    y = rng.random(x.size).astype(np.float32)
    y[::3] = np.round(y[::3])
    return x, y


def test_unweighted_logits_sum_is_within_two_ulps_per_element() -> None:
    """The plain logits sum (log1p(e) summed as -log of a product, e < 2^-27 added directly)."""
    x, y = _logits_points(np.random.default_rng(50))
    sums = _isolated_sums("logits", x, y, pad_x=-700.0, pad_y=0.0)
    errors = [
        _error_in_float32_ulps(s, logits_exact(float(a), float(b)))
        for s, a, b in zip(sums, x, y, strict=True)
    ]
    assert max(errors) <= 2.0, (max(errors), x[int(np.argmax(errors))], y[int(np.argmax(errors))])


def test_weighted_logits_sum_is_within_two_ulps_per_element() -> None:
    """With pos_weight the fast path weighs each element's log1p(e) = f + f^2 R(f), R in float lanes."""
    rng = np.random.default_rng(51)
    x, y = _logits_points(rng)
    p = rng.uniform(0.25, 4.0, x.size).astype(np.float32)
    sums = _isolated_sums("logits", x, y, pad_x=-700.0, pad_y=0.0, pos_weight=p)
    errors = [
        _error_in_float32_ulps(s, logits_exact(float(a), float(b), float(c)))
        for s, a, b, c in zip(sums, x, y, p, strict=True)
    ]
    assert max(errors) <= 2.0, max(errors)


def _ignore_padded_sums(x: np.ndarray, y: np.ndarray, pad_x: float, rows: int = 1, **options) -> list:
    """The reduced logits sum of each (x[i], y[i]) alone: padded with ignored elements (target -1, the
    ignore_index; any logit), which add exactly nothing, also to the product of 1 / (1 + e). With
    ``pad_x`` within 18 every block stays bounded (no test e < 2^-27); beyond 18 it takes the general
    form. ``rows`` > 1: the element sits in the first of ``rows`` rows of 64 (a PER_ROW weight's runs)."""
    size = 64 * rows if rows > 1 else GROUP
    shape = (rows, 64) if rows > 1 else (GROUP,)
    sums = []
    for i in range(x.size):
        xs = np.full(size, pad_x, np.float32)
        ys = np.full(size, -1.0, np.float32)
        xs[i % GROUP], ys[i % GROUP] = x[i], y[i]
        extra = dict(options)
        if "weight" in options:
            w = np.asarray(options["weight"], np.float32)
            extra.update(weight=w, weight_shape=w.shape)
        value, _ = _native.run("logits", xs, ys, input_shape=shape, reduction=SUM, ignore_index=-1.0, **extra)
        sums.append(value)
    return sums


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1e-6])
@pytest.mark.parametrize("pad_x", [0.0, 30.0], ids=["bounded", "general"])
def test_unweighted_logits_sum_with_options_is_within_two_ulps_per_element(
    smoothing: float, pad_x: float
) -> None:
    """With ignore_index and label smoothing (no weights) the sum is the product's too: c |x| formed
    directly (1 - y exact for the smoothed double y), log1p(e) as -log of the product of 1 / (1 + e);
    blocks within 18 of 0 put every factor in the product."""
    rng = np.random.default_rng(62)
    x, y = _logits_points(rng)
    if pad_x == 0.0:  # the bounded form: every |x| <= 18
        x = np.clip(x, -18.0, 18.0)
    sums = _ignore_padded_sums(x, y, pad_x, label_smoothing=smoothing)
    errors = [
        _error_in_float32_ulps(s, logits_exact(float(a), float(b), smoothing=smoothing))
        for s, a, b in zip(sums, x, y, strict=True)
    ]
    assert max(errors) <= 2.0, (max(errors), x[int(np.argmax(errors))], y[int(np.argmax(errors))])


@pytest.mark.parametrize("form", ["scalar", "per-row"])
@pytest.mark.parametrize("pad_x", [0.0, 30.0], ids=["bounded", "general"])
def test_run_weighted_logits_sum_is_within_two_ulps_per_element(form: str, pad_x: float) -> None:
    """A weight that is one value over a run (a scalar; a per-row weight with rows of at least 64, a
    multiple of 8) and no pos_weight: the run's sum is w (sum of c |x| - log of the product of 1 / (1 +
    e)), one logarithm per run (LogProduct.log_combined)."""
    rng = np.random.default_rng(63)
    x, y = _logits_points(rng)
    if pad_x == 0.0:
        x = np.clip(x, -18.0, 18.0)
    w = np.float32(1.7)
    weight = np.array(w, np.float32) if form == "scalar" else np.array([[w], [0.25]], np.float32)
    sums = _ignore_padded_sums(x, y, pad_x, rows=1 if form == "scalar" else 2, weight=weight)
    errors = [
        _error_in_float32_ulps(s, logits_exact(float(a), float(b), weight=float(w)))
        for s, a, b in zip(sums, x, y, strict=True)
    ]
    assert max(errors) <= 2.0, (max(errors), x[int(np.argmax(errors))], y[int(np.argmax(errors))])


@pytest.mark.parametrize("columns", [64, 136, 1024, 8192 + 64])
def test_run_weighted_logits_over_many_rows_and_chunks(columns: int) -> None:
    """Per-row weights over rows shorter and longer than a block and than a chunk (a run then spans
    chunks: each chunk sums its part of it): the sum matches the float64 terms summed exactly, and the
    gradient is the weighted one (torch in float64)."""
    rng = np.random.default_rng(64)
    rows = max(2, 3 * 8192 // columns)
    x = rng.normal(0.0, 4.0, (rows, columns)).astype(np.float32)
    x[0, :3] = (25.0, -25.0, 0.5)  # some blocks beyond 18
    y = (rng.random(x.shape) < 0.5).astype(np.float32)
    w = rng.uniform(0.25, 4.0, (rows, 1)).astype(np.float32)
    grad = np.empty_like(x)
    value, _ = _native.run("logits", x, y, w, w.shape, input_shape=x.shape, reduction=SUM, grad_input=grad)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    terms = w.astype(np.float64) * (y64 * np.logaddexp(0.0, -x64) + (1.0 - y64) * np.logaddexp(0.0, x64))
    exact = math.fsum(terms.reshape(-1).tolist())
    assert abs(value - exact) <= 2.0**-40 * exact
    xt = torch.from_numpy(x).double().requires_grad_()
    F.binary_cross_entropy_with_logits(
        xt, torch.from_numpy(y).double(), torch.from_numpy(w).double(), reduction="sum"
    ).backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2.0**-23, atol=1e-30)


def _class_isolated_sums(x: np.ndarray, y: np.ndarray, pad_x: float, values: np.ndarray, **options) -> list:
    """The reduced logits sum of each (x[i], y[i]) alone in a row of 16 classes (the others ignored:
    target -1, the ignore_index), and the class's value of ``values`` (the weight or pos_weight per class,
    passed as ``options``' "weight" or "pos_weight")."""
    sums = []
    for i in range(x.size):
        xs = np.full(16, pad_x, np.float32)
        ys = np.full(16, -1.0, np.float32)
        column = (3 * i) % 16
        xs[column], ys[column] = x[i], y[i]
        value, _ = _native.run(
            "logits", xs, ys, input_shape=(1, 16), reduction=SUM, ignore_index=-1.0, **options
        )
        sums.append((value, float(values[column])))
    return sums


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("pad_x", [0.0, 30.0], ids=["bounded", "general"])
def test_class_weighted_logits_sum_is_within_two_ulps_per_element(smoothing: float, pad_x: float) -> None:
    """A per-class weight (16 to 2048 classes, a multiple of 8) and no pos_weight: each class's log1p(e)
    terms are summed as -log of the product of 1 / (1 + e), its logarithm times the class's weight
    (ClassProducts, one per chunk). Each element sits in one of 16 classes, the others ignored."""
    rng = np.random.default_rng(65)
    x, y = _logits_points(rng)
    if pad_x == 0.0:
        x = np.clip(x, -18.0, 18.0)
    weight = rng.uniform(0.25, 4.0, 16).astype(np.float32)
    sums = _class_isolated_sums(
        x, y, pad_x, weight, weight=weight, weight_shape=(16,), label_smoothing=smoothing
    )
    errors = [
        _error_in_float32_ulps(s, logits_exact(float(a), float(b), smoothing=smoothing, weight=w))
        for (s, w), a, b in zip(sums, x, y, strict=True)
    ]
    assert max(errors) <= 2.0, (max(errors), x[int(np.argmax(errors))], y[int(np.argmax(errors))])


@pytest.mark.parametrize("columns", [16, 24, 136, 1024, 2048, 2056])
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1, "ignore_index": -1.0}], ids=["plain", "options"]
)
def test_class_weighted_logits_over_many_rows_and_chunks(columns: int, options: dict) -> None:
    """Per-class weights over rows shorter and longer than a block (a chunk holds 4 to 512 rows; 2056
    classes take the per-element form): the sum matches the float64 terms summed exactly, also where a
    block beyond 18 is redone (its factors must enter the class products once), and the gradient is the
    weighted one (torch in float64)."""
    rng = np.random.default_rng(66)
    rows = max(3, 3 * 8192 // columns)
    x = rng.normal(0.0, 4.0, (rows, columns)).astype(np.float32)
    x[0, :3] = (25.0, -25.0, 0.5)  # some blocks beyond 18
    y = (rng.random(x.shape) < 0.5).astype(np.float32)
    if "ignore_index" in options:
        y[rng.random(x.shape) < 0.1] = -1.0
    w = rng.uniform(0.25, 4.0, columns).astype(np.float32)
    grad = np.empty_like(x)
    value, kept = _native.run(
        "logits", x, y, w, w.shape, input_shape=x.shape, reduction=SUM, grad_input=grad, **options
    )
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    keep = y64 != -1.0
    y64 = np.where(keep, y64, 0.0)
    if "label_smoothing" in options:
        y64 = y64 * (1 - options["label_smoothing"]) + options["label_smoothing"] / 2
    terms = w.astype(np.float64) * (y64 * np.logaddexp(0.0, -x64) + (1.0 - y64) * np.logaddexp(0.0, x64))
    exact = math.fsum(terms[keep].tolist())
    assert kept == keep.sum()
    # products: roundings of 2^-53 per factor; per element (f + f^2 R(f), R in float): within 2^-26
    assert abs(value - exact) <= (2.0**-40 if columns <= 2048 else 2.0**-26) * exact
    xt = torch.from_numpy(x).double().requires_grad_()
    per = F.binary_cross_entropy_with_logits(
        xt, torch.from_numpy(y64), torch.from_numpy(w).double(), reduction="none"
    )
    (per * torch.from_numpy(keep)).sum().backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2.0**-23, atol=1e-30)


@pytest.mark.parametrize("pad_x", [0.0, 30.0], ids=["bounded", "general"])
def test_class_pos_weighted_logits_sum_is_within_two_ulps_per_element(pad_x: float) -> None:
    """A per-class pos_weight of at least 1/2, 0/1 targets, no smoothing: log1p(e) in the chunk's product
    and, for y = 1, in the class's, whose logarithm is weighed by p - 1 (ClassProducts). Each element sits
    in one of 16 classes, the others ignored; a pos_weight below 1/2 takes the per-element form."""
    rng = np.random.default_rng(67)
    x, y = _logits_points(rng)
    y = np.round(y)
    if pad_x == 0.0:
        x = np.clip(x, -18.0, 18.0)
    pos_weight = rng.uniform(0.5, 4.0, 16).astype(np.float32)
    pos_weight[5] = 0.5
    sums = _class_isolated_sums(x, y, pad_x, pos_weight, pos_weight=pos_weight, pos_weight_shape=(16,))
    errors = [
        _error_in_float32_ulps(s, logits_exact(float(a), float(b), p))
        for (s, p), a, b in zip(sums, x, y, strict=True)
    ]
    assert max(errors) <= 2.0, (max(errors), x[int(np.argmax(errors))], y[int(np.argmax(errors))])


@pytest.mark.parametrize("columns", [16, 24, 136, 1024, 2048, 2056])
@pytest.mark.parametrize("variant", ["plain", "ignore", "scalar-weight", "soft-block", "small-p"])
def test_class_pos_weighted_logits_over_many_rows_and_chunks(columns: int, variant: str) -> None:
    """A per-class pos_weight over rows shorter and longer than a block (2056 classes take the per-element
    form), also with ignored targets, a scalar weight (applied to the chunk's sum), a block of soft targets
    (it and the rest of its chunk take the per-element form) and a pos_weight below 1/2 (the whole pass
    does): the sum matches the float64 terms summed exactly, also where a block beyond 18 is redone, and
    the gradient is torch's in float64."""
    rng = np.random.default_rng(68)
    rows = max(3, 3 * 8192 // columns)
    x = rng.normal(0.0, 4.0, (rows, columns)).astype(np.float32)
    x[0, :3] = (25.0, -25.0, 0.5)  # some blocks beyond 18
    y = (rng.random(x.shape) < 0.3).astype(np.float32)
    options: dict = {}
    if variant == "ignore":
        y[rng.random(x.shape) < 0.1] = -1.0
        options["ignore_index"] = -1.0
    flat = y.reshape(-1)
    if variant == "soft-block":
        flat[8192 + 700 : 8192 + 760] = rng.random(60).astype(np.float32)
    p = rng.uniform(0.5, 4.0, columns).astype(np.float32)
    if variant == "small-p":
        p[-1] = 0.25
    weight = np.array(1.7, np.float32) if variant == "scalar-weight" else None
    grad = np.empty_like(x)
    value, kept = _native.run(
        "logits",
        x,
        y,
        weight,
        None if weight is None else weight.shape,
        p,
        p.shape,
        input_shape=x.shape,
        reduction=SUM,
        grad_input=grad,
        **options,
    )
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    keep = y64 != -1.0
    y64 = np.where(keep, y64, 0.0)
    w64 = 1.0 if weight is None else float(weight)
    p64 = p.astype(np.float64)
    terms = w64 * (p64 * y64 * np.logaddexp(0.0, -x64) + (1.0 - y64) * np.logaddexp(0.0, x64))
    exact = math.fsum(terms[keep].tolist())
    assert kept == keep.sum()
    # products: roundings of 2^-53 per factor; per element (f + f^2 R(f), R in float): within 2^-26
    product = columns <= 2048 and variant not in ("small-p", "soft-block")
    assert abs(value - exact) <= (2.0**-40 if product else 2.0**-26) * exact
    xt = torch.from_numpy(x).double().requires_grad_()
    per = F.binary_cross_entropy_with_logits(
        xt,
        torch.from_numpy(y64),
        None if weight is None else torch.tensor(w64, dtype=torch.float64),
        reduction="none",
        pos_weight=torch.from_numpy(p64),
    )
    (per * torch.from_numpy(keep)).sum().backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2.0**-23, atol=1e-30)


@pytest.mark.parametrize("kind", ["logits", "bce"])
@pytest.mark.parametrize("n", [8192 + 17, 3 * 8192 + 100])
def test_scalar_weight_over_a_partial_last_chunk(kind: str, n: int) -> None:
    """A scalar weight's run is its whole chunk, the last one too, which starts at a multiple of 8192
    but is shorter: every element counts once (sum and gradient, torch in float64)."""
    rng = np.random.default_rng(72)
    x = rng.normal(0.0, 3.0, n).astype(np.float32)
    if kind == "bce":
        x = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    w = np.array(1.7, np.float32)
    grad = np.full_like(x, np.nan)
    value, _ = _native.run(kind, x, y, w, (), input_shape=(n,), reduction=SUM, grad_input=grad)
    xt = torch.from_numpy(x).double().requires_grad_()
    loss = F.binary_cross_entropy_with_logits if kind == "logits" else F.binary_cross_entropy
    expected = loss(
        xt, torch.from_numpy(y).double(), torch.tensor(float(w), dtype=torch.float64), reduction="sum"
    )
    expected.backward()
    assert abs(value - expected.item()) <= 2.0**-26 * expected.item()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2.0**-23, atol=1e-30)


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize(
    ("kind", "form"),
    [
        ("logits", "weight (C,)"),
        ("logits", "weight (N, 1)"),
        ("logits", "weight ()"),
        ("logits", "pos_weight (C,)"),
    ]
    + [("bce", "weight (C,)"), ("bce", "weight (N, 1)"), ("bce", "weight ()")],
)
def test_non_finite_weights_give_the_per_element_result(kind: str, form: str, value: float) -> None:
    """The product forms weigh a run's or a class's sum at once; a weight that is infinite or NaN must
    give what each element weighed alone gives (torch's result): an infinite weight times a zero term is
    NaN (the probability loss at x = y), times positive terms infinite. The chunk takes the per-element
    form."""
    rng = np.random.default_rng(73)
    rows, columns = 64, 64
    x = rng.normal(0.0, 2.0, (rows, columns)).astype(np.float32)
    if kind == "bce":
        x = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    y = (rng.random(x.shape) < 0.5).astype(np.float32)
    if kind == "bce":
        x[0, 3], y[0, 3] = 1.0, 1.0  # a zero term where the non-finite weight applies
    name, shape = form.split(" ", 1)
    size = {"(C,)": (columns,), "(N, 1)": (rows, 1), "()": ()}[shape]
    w = rng.uniform(0.5, 2.0, size).astype(np.float32)
    w.reshape(-1)[0 if shape != "(C,)" else 3] = value
    xt, yt, wt = (torch.from_numpy(t) for t in (x, y, w))
    if kind == "logits":
        got = bce.binary_cross_entropy_with_logits(xt, yt, reduction="sum", **{name: wt})
        expected = F.binary_cross_entropy_with_logits(
            xt.double(), yt.double(), reduction="sum", **{name: wt.double()}
        )
    else:
        got = bce.binary_cross_entropy(xt, yt, wt, reduction="sum")
        expected = F.binary_cross_entropy(
            xt.double(), yt.double(), wt.double().expand(rows, columns), reduction="sum"
        )
    torch.testing.assert_close(got.double(), expected, rtol=4 * 2.0**-24, atol=0, equal_nan=True)


def test_probability_sum_is_within_two_ulps_per_element() -> None:
    """log x and log(1 - x) in float lanes, combined in double."""
    rng = np.random.default_rng(52)
    x = np.concatenate(
        [
            rng.random(300),
            np.geomspace(2.0**-126, 1e-3, 100),
            1.0 - np.geomspace(2.0**-24, 0.5, 100),
            rng.uniform(0.28, 0.52, 100),  # 1 - x rounds in float below 1/2
            [0.0, 1.0, 2.0**-126, 0.29289322, 0.5, 1.0 - 2.0**-24],
        ]
    ).astype(np.float32)
    y = rng.random(x.size).astype(np.float32)
    y[::3] = np.round(y[::3])
    _assert_probability_sums_within_two_ulps(x, y)


@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_plain_probability_gradient_is_within_three_and_a_half_ulps(targets: str) -> None:
    """Without weights or options the probability loss's gradient (x - y) / max(x (1 - x), 1e-12) is
    formed in float lanes, as torch forms it: x - y is exact where it cancels, so the result stays within
    3.5 ulp of the exact quotient (four roundings: 1 - x, the product, the quotient, the scale),
    cancellation or not."""
    rng = np.random.default_rng(57)
    x = np.concatenate(
        [rng.random(4000), np.geomspace(2.0**-126, 1e-3, 500), 1.0 - np.geomspace(2.0**-24, 0.5, 500)]
    ).astype(np.float32)
    y = rng.random(x.size).astype(np.float32)
    y[::4] = np.round(y[::4])
    y[1::4] = np.nextafter(x[1::4], np.float32(rng.random() < 0.5))  # x - y cancels to one ulp
    y = np.clip(y, 0.0, 1.0)
    if targets == "hard":  # every block's targets 0 or 1: the hard-target block
        y = np.round(y)
        y[(x == 1 - y)] = 1 - y[(x == 1 - y)]  # no clamp at -100: no block leaves that path
    n = x.size // GROUP * GROUP  # whole groups: the fast path
    x, y = x[:n], y[:n]
    grad = np.empty_like(x)
    _native.run("bce", x, y, input_shape=(n,), reduction=SUM, grad_input=grad)
    worst = 0.0
    for g, a, b in zip(grad.tolist(), x.tolist(), y.tolist(), strict=True):
        xm, ym = MP.mpf(a), MP.mpf(b)
        exact = (xm - ym) / max(xm * (1 - xm), MP.mpf(float(np.float32(1e-12))))
        worst = max(worst, _error_in_float32_ulps(g, exact))
    assert worst <= 3.5, worst


def _hard_points(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(
        [
            rng.random(200),
            np.geomspace(2.0**-126, 1e-3, 120),  # where y = 0: below 2^-27 the loss is added, not a factor
            1.0 - np.geomspace(2.0**-24, 0.5, 120),
            rng.uniform(0.28, 0.52, 60),
            [2.0**-126, 2.0**-27, np.nextafter(2.0**-27, 0), np.nextafter(2.0**-27, 1), 1.0 - 2.0**-24, 0.5],
            [0.0, 1.0],  # loss 0 where x = y; the clamp at -100 where x = 1 - y
        ]
    ).astype(np.float32)
    y = np.resize(np.array([0.0, 1.0], np.float32), x.size)
    return np.concatenate([x, x]), np.concatenate([y, 1.0 - y])  # each x with both targets


def test_hard_target_probability_sum_is_within_two_ulps_per_element() -> None:
    """Targets of 0 and 1 only: the sum is -log of the product of x (y = 1) and 1 - x (y = 0); each
    element's contribution within 2 ulp of its exact loss, the clamp at -100 included."""
    x, y = _hard_points(np.random.default_rng(58))
    _assert_probability_sums_within_two_ulps(x, y)


@pytest.mark.parametrize("spread", ["uniform", "confident"])
def test_hard_target_product_over_many_chunks_matches_the_exact_sum(spread: str) -> None:
    """The product of x and 1 - x is renormalised after every group and folded per block and chunk:
    over ~40 chunks the sum keeps (nearly) double precision, also when most factors are tiny (confident
    wrong predictions) or most losses are below 2^-27 (confident right ones, added directly)."""
    n = 40 * 8192 + 16  # a tail too
    rng = np.random.default_rng(59)
    y = (rng.random(n) < 0.5).astype(np.float32)
    if spread == "uniform":
        x = rng.random(n).astype(np.float32)
    else:
        logit = rng.uniform(5.0, 85.0, n) * np.where(rng.random(n) < 0.5, 1.0, -1.0)
        x = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        x = np.where(x < 2.0**-126, np.float32(0.0), x)  # a subnormal would take the exact path
        x[(x == 0) & (y == 1)] = 2.0**-126  # keep the clamp out: every block stays on the hard path
        x[(x == 1) & (y == 0)] = np.nextafter(np.float32(1), np.float32(0))
    value, _ = _native.run("bce", x, y, input_shape=(n,), reduction=SUM)
    x64, ones = x.astype(np.float64), y == 1
    terms = np.empty(n)
    terms[ones] = np.log(x64[ones])  # each term within a few 2^-53 of exact
    terms[~ones] = np.log1p(-x64[~ones])
    exact = -math.fsum(terms.tolist())
    assert abs(value - exact) <= 2.0**-40 * exact


@pytest.mark.parametrize("form", ["scalar", "per-row", "per-class"])
def test_weighted_hard_target_probability_sum_is_within_two_ulps_per_element(form: str) -> None:
    """A weight, no options, targets 0 and 1: the sum is -w log of a product of x and 1 - x, one product
    per run of one weight (a scalar; rows of 64) or per class (16 classes); each element's contribution
    within 2 ulp of its exact loss, alone in a block whose other elements have loss 0 (x = y)."""
    x, y = _hard_points(np.random.default_rng(69))
    rng = np.random.default_rng(70)
    size, shape = (64, (1, 64)) if form == "per-row" else (16, (1, 16))
    sums = []
    for i in range(x.size):
        xs = np.zeros(size, np.float32)
        ys = np.zeros(size, np.float32)
        column = (3 * i) % size
        xs[column], ys[column] = x[i], y[i]
        if form == "per-class":
            weight = rng.uniform(0.25, 4.0, size).astype(np.float32)
            w = float(weight[column])
        else:
            weight = np.full((1, 1) if form == "per-row" else (), rng.uniform(0.25, 4.0), np.float32)
            w = float(weight.reshape(-1)[0])
        value, _ = _native.run("bce", xs, ys, weight, weight.shape, input_shape=shape, reduction=SUM)
        sums.append((value, w))
    errors = [
        _error_in_float32_ulps(s, bce_exact(float(a), float(b), weight=w))
        for (s, w), a, b in zip(sums, x, y, strict=True)
    ]
    assert max(errors) <= 2.0, (max(errors), x[int(np.argmax(errors))], y[int(np.argmax(errors))])


@pytest.mark.parametrize("columns", [16, 64, 136, 1024, 2048])
@pytest.mark.parametrize("form", ["per-row", "per-class"])
@pytest.mark.parametrize("variant", ["plain", "confident", "soft-block", "clamped"])
def test_weighted_hard_target_probabilities_over_many_rows_and_chunks(
    columns: int, form: str, variant: str
) -> None:
    """Per-row and per-class weights over rows shorter and longer than a block: the sum matches the
    float64 terms summed exactly, also where most factors are tiny (a class's product is renormalised
    before it could underflow), where a block has soft targets or a clamped term (it and the rest of its
    chunk take the per-element form); the gradient is torch's in float64."""
    rng = np.random.default_rng(71)
    rows = max(3, 3 * 8192 // columns)
    y = (rng.random((rows, columns)) < 0.5).astype(np.float32)
    if variant == "confident":  # mostly confident and wrong: factors near 2^-126
        logit = rng.uniform(5.0, 85.0, y.shape) * np.where(y == 1, -1.0, 1.0)
        x = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        x = np.maximum(x, np.float32(2.0**-126))
        x[(x == 1) & (y == 0)] = np.nextafter(np.float32(1), np.float32(0))
    else:
        x = rng.random(y.shape).astype(np.float32)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    if variant == "soft-block":
        flat_y[8192 + 700 : 8192 + 760] = rng.random(60).astype(np.float32)
    if variant == "clamped":
        flat_x[8192 + 700], flat_y[8192 + 700] = 0.0, 1.0
    w = rng.uniform(0.25, 4.0, (rows, 1) if form == "per-row" else columns).astype(np.float32)
    grad = np.empty_like(x)
    value, _ = _native.run("bce", x, y, w, w.shape, input_shape=x.shape, reduction=SUM, grad_input=grad)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(divide="ignore"):
        log_x, log_1mx = np.maximum(np.log(x64), -100.0), np.maximum(np.log1p(-x64), -100.0)
    terms = -w.astype(np.float64) * (y64 * log_x + (1.0 - y64) * log_1mx)
    exact = math.fsum(terms.reshape(-1).tolist())
    # rows of fewer than 64 (and the variants' chunks) take the per-element form: float logarithms
    product = variant in ("plain", "confident") and (form == "per-class" or columns >= 64)
    assert abs(value - exact) <= (2.0**-40 if product else 2.0**-26) * exact
    xt = torch.from_numpy(x).double().requires_grad_()
    F.binary_cross_entropy(
        xt, torch.from_numpy(y64), torch.from_numpy(w).double().expand_as(xt), reduction="sum"
    ).backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2.0**-23, atol=1e-30)


def test_hard_target_blocks_mixed_with_soft_and_clamped_ones() -> None:
    """Blocks of 512 with hard targets take the product, a block with one soft target the logarithms,
    and a hard block holding x = 1 with y = 0 (clamped at -100) goes back to the logarithms: the loss
    and gradient match torch in float64 whatever path each block took."""
    rng = np.random.default_rng(60)
    n = 6 * 512 + 5
    x = rng.random(n).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    y[512 + 100] = 0.25  # block 1: soft
    x[3 * 512 + 9], y[3 * 512 + 9] = 1.0, 0.0  # block 3: the clamp
    x[4 * 512 + 1], y[4 * 512 + 1] = 0.0, 1.0  # block 4: the clamp
    grad = np.empty_like(x)
    value, _ = _native.run("bce", x, y, input_shape=(n,), reduction=SUM, grad_input=grad)
    xt = torch.from_numpy(x).double().requires_grad_()
    expected = F.binary_cross_entropy(xt, torch.from_numpy(y).double(), reduction="sum")
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-6)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=3.5 * 2.0**-23, atol=0)


def _bce_sum(x: np.ndarray, y: np.ndarray) -> float:
    value, _ = _native.run("bce", x, y, input_shape=(x.size,), reduction=SUM)
    return value


def _bce_fsum(x: np.ndarray, y: np.ndarray) -> float:
    """The probability loss's sum from float64 terms (torch's formula, the clamp at -100), summed exactly."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(divide="ignore"):
        log_x, log_1mx = np.maximum(np.log(x64), -100.0), np.maximum(np.log1p(-x64), -100.0)
    return math.fsum((-(y64 * log_x + (1.0 - y64) * log_1mx)).tolist())


@pytest.mark.parametrize("edge_values", [(0.0,), (1.0,), (0.0, 1.0)], ids=["zeros", "ones", "both"])
def test_soft_probability_blocks_with_and_without_zeros_and_ones(edge_values: tuple) -> None:
    """A soft block with no x equal to 0 or 1 takes the logarithms without the clamp at -100; one that
    has such an x takes them with it, and so does the block after it. Each block's sum is added to the
    total on its own, so a block must give the same bits whichever form it took: alone (the form without
    the clamp) and after a block with zeros and ones (the form with it)."""
    rng = np.random.default_rng(61)
    edges = rng.random(512).astype(np.float32)
    for i, value in enumerate(edge_values):
        edges[i::7] = value
    interior = rng.random(512).astype(np.float32)
    interior[interior == 0.0] = 0.5
    y_edges, y_interior = (rng.random(512).astype(np.float32) for _ in range(2))
    alone = _bce_sum(interior, y_interior)
    first = _bce_sum(edges, y_edges)
    both = _bce_sum(np.concatenate([edges, interior]), np.concatenate([y_edges, y_interior]))
    assert both == first + alone
    for x, y, value in ((edges, y_edges, first), (interior, y_interior, alone)):
        exact = _bce_fsum(x, y)  # every term nonnegative: 2 ulp per element is 2^-22 of the sum
        assert abs(value - exact) <= 2.0**-22 * exact


@pytest.mark.parametrize("spread", ["moderate", "large"])
def test_product_over_many_chunks_matches_the_exact_sum(spread: str) -> None:
    """The running product of 1 / (1 + e) is renormalised per block and folded per chunk: over ~40
    chunks the sum keeps (nearly) double precision."""
    n = 40 * 8192 + 16  # a tail too
    rng = np.random.default_rng(53)
    x = (rng.normal(0.0, 2.0, n) if spread == "moderate" else rng.uniform(-40.0, 40.0, n)).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    value, _ = _native.run("logits", x, y, input_shape=(n,), reduction=SUM)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    # float64 terms (each within a few 2^-53 of exact: no cancellation), summed exactly
    exact = math.fsum((y64 * np.logaddexp(0.0, -x64) + (1.0 - y64) * np.logaddexp(0.0, x64)).tolist())
    assert abs(value - exact) <= 2.0**-40 * exact


def _logits_sum(x: np.ndarray, y: np.ndarray) -> float:
    value, _ = _native.run("logits", x, y, input_shape=(x.size,), reduction=SUM)
    return value


def _logits_fsum(x: np.ndarray, y: np.ndarray) -> float:
    """The logits loss's sum from float64 terms (each within a few 2^-53 of exact), summed exactly."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return math.fsum((y64 * np.logaddexp(0.0, -x64) + (1.0 - y64) * np.logaddexp(0.0, x64)).tolist())


def test_logit_blocks_within_and_beyond_18_alternate() -> None:
    """A block whose logits all lie within 18 of 0 puts every 1 / (1 + e) into the product (e >= 2^-27);
    a block with a larger one adds e below 2^-27 directly, and the next block tries the bounded form
    again. Blocks of each kind alternate, with targets that make every loss small (x > 0 with y = 1, x <
    0 with y = 0), so the sum is no larger than the roundings it must stay clear of: each element's term
    is within 2^-52 of exact (r and the product rounded once each; per element, relative to the loss
    itself, the isolated tests above check it)."""
    rng = np.random.default_rng(55)
    block = 512
    bounded = rng.uniform(15.0, 18.0, (4, block))  # losses 1.5e-8 to 3e-7
    beyond = rng.uniform(18.0, 30.0, (4, block))  # losses down to 1e-13
    beyond[1, 100] = 700.0  # one at the limit of the fast path
    x = np.stack([bounded, beyond], axis=1).reshape(-1)
    x[rng.random(x.size) < 0.5] *= -1
    x = x.astype(np.float32)
    y = (x > 0).astype(np.float32)
    exact = _logits_fsum(x, y)
    assert abs(_logits_sum(x, y) - exact) <= x.size * 2.0**-52 + 2.0**-50 * exact


def test_bounded_logit_blocks_give_the_bits_of_the_general_form() -> None:
    """After a block with some |x| > 18 the next block takes the general form (with the test e < 2^-27);
    alone it takes the bounded one. A leading block of zero-loss elements (x = -700, y = 0: losses
    below 1e-300, product factors of exactly 1) leaves the sum's bits alone, so both must agree."""
    rng = np.random.default_rng(56)
    x = np.clip(rng.normal(0.0, 6.0, 4096), -18.0, 18.0).astype(np.float32)
    y = rng.random(x.size).astype(np.float32)
    y[::3] = np.round(y[::3])
    lead = np.full(512, -700.0, np.float32)
    alone = _logits_sum(x, y)
    after = _logits_sum(np.concatenate([lead, x]), np.concatenate([np.zeros(512, np.float32), y]))
    assert after == alone
    assert abs(alone - _logits_fsum(x, y)) <= 2.0**-40 * alone


def test_fast_gradients_equal_the_exact_paths() -> None:
    """A NaN sends its block of 512 to the exact path: the other elements of that block must get what
    the fast path gives them elsewhere, to within an ulp (the two paths form the same double formula,
    rounded once; only the exact path's order of operations differs)."""
    rng = np.random.default_rng(54)
    n = 3 * 512
    x = rng.normal(0.0, 3.0, n).astype(np.float32)
    y = rng.random(n).astype(np.float32)
    _, plain = bnp.binary_cross_entropy_with_logits_and_grad(x, y, reduction="sum")
    spoiled = x.copy()
    spoiled[512 + 7] = np.nan  # the middle block
    _, grad = bnp.binary_cross_entropy_with_logits_and_grad(spoiled, y, reduction="sum")
    others = np.arange(n) != 512 + 7
    np.testing.assert_allclose(grad[others], plain[others], rtol=2.0**-23, atol=0)
    assert np.isnan(grad[512 + 7])


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
@pytest.mark.parametrize("offset", [0, 4], ids=["aligned", "16-byte-offset"])
def test_streaming_stores_give_the_same_gradient(logits: bool, offset: int) -> None:
    """Float32 gradients of 16 MiB and more are written with non-temporal stores where 32-byte aligned
    (a buffer of the cache is; 4 floats further on it is not, and takes ordinary stores): the same bits
    as the ordinary stores a smaller call of the same elements uses."""
    n = (1 << 22) + 40  # 16 MiB of float32, and a tail
    rng = np.random.default_rng(55)
    x = rng.normal(0.0, 2.0, n).astype(np.float32)
    if not logits:
        x = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    y = rng.random(n).astype(np.float32)
    kind = "logits" if logits else "bce"
    buffer = _native.empty((n + 4,), "float32", torch=False)
    assert buffer.ctypes.data % 64 == 0
    big = buffer[offset : offset + n]
    _native.run(kind, x, y, input_shape=(n,), reduction=MEAN, grad_input=big, grad_scale=1.0)
    for start in (0, 8192 * 37 + 512, n - 8192 - 40):
        part = np.empty(8192 + 40, np.float32)  # small: ordinary stores
        stop = start + part.size
        xs, ys = x[start:stop], y[start:stop]
        _native.run(kind, xs, ys, input_shape=(part.size,), reduction=SUM, grad_input=part)
        np.testing.assert_array_equal(big[start:stop], part)


# the fast path's three modes (plain; unweighted with options; weighted) for both losses
_MODES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "ignore": {"ignore_index": -1.0},
    "weight": {"weight": True},
    "pos_weight": {"pos_weight": True},  # the logits loss only
}
_MODE_CASES = [(True, mode) for mode in _MODES] + [(False, mode) for mode in _MODES if mode != "pos_weight"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("logits", "mode"), _MODE_CASES)
def test_every_mode_against_torch_in_float64(logits: bool, mode: str, reduction: str) -> None:
    options = _MODES[mode]
    rows, columns = 700, 13  # several blocks and chunks, columns not a multiple of 8
    rng = np.random.default_rng(56)
    x = rng.normal(0.0, 3.0, (rows, columns))
    if not logits:
        x = 1.0 / (1.0 + np.exp(-x))
    y = rng.random((rows, columns))
    kwargs = {}
    if "ignore_index" in options:
        y[rng.random(y.shape) < 0.2] = -1.0
        kwargs["ignore_index"] = -1.0
    if "label_smoothing" in options:
        kwargs["label_smoothing"] = options["label_smoothing"]
    w = rng.uniform(0.5, 2.0, (columns,)) if "weight" in options else None
    p = rng.uniform(0.5, 2.0, (rows, 1)) if "pos_weight" in options else None
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    yt = torch.tensor(y, dtype=torch.float32)
    wt = None if w is None else torch.tensor(w, dtype=torch.float32)
    pt = None if p is None else torch.tensor(p, dtype=torch.float32)
    if logits:
        loss = bce.binary_cross_entropy_with_logits(xt, yt, wt, reduction=reduction, pos_weight=pt, **kwargs)
    else:
        loss = bce.binary_cross_entropy(xt, yt, wt, reduction=reduction, **kwargs)
    loss.backward()
    # the reference: torch in float64 on the same float32 values, options applied by hand
    x64 = xt.detach().double().requires_grad_()
    y64 = yt.double()
    keep = torch.ones_like(y64, dtype=torch.bool)
    if "ignore_index" in kwargs:
        keep = y64 != -1.0
        y64 = torch.where(keep, y64, torch.zeros_like(y64))
    if "label_smoothing" in kwargs:
        s = kwargs["label_smoothing"]
        y64 = y64 * (1 - s) + s / 2
    w64 = None if wt is None else wt.double().expand_as(x64)
    p64 = None if pt is None else pt.double().expand_as(x64)
    if logits:
        per = F.binary_cross_entropy_with_logits(x64, y64, w64, reduction="none", pos_weight=p64)
    else:
        per = F.binary_cross_entropy(x64, y64, w64, reduction="none")
    per = torch.where(keep, per, torch.zeros_like(per))
    expected = per.sum() / (keep.sum() if reduction == "mean" else 1)
    expected.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=4 * 2.0**-24, atol=0)
    # gradients: rounded once from double (one ulp apart at most), but within 3.5 ulp for the probability
    # loss without options (see test_plain_probability_gradient_is_within_three_and_a_half_ulps)
    grad_rtol = 7 * 2.0**-24 if (not logits and mode == "plain") else 2 * 2.0**-24
    torch.testing.assert_close(xt.grad.double(), x64.grad, rtol=grad_rtol, atol=1e-30)
