"""The fused linear + BCE-with-logits loss (``bcekit.torch._linear``), ``linear_topk`` and
``LinearBCEWithLogitsLoss``.

The reference is the unfused torch path, ``F.binary_cross_entropy_with_logits(F.linear(input, weight, bias),
target.to_dense(), pos_weight=pos_weight, reduction=reduction)``, and its autograd gradients. Checked here:

* values and input/weight/bias gradients against it for dense, COO (duplicates included) and CSR targets,
  every ``pos_weight`` form, both reductions, chunk sizes that do not divide C, ``(*, D)`` inputs, tiny and
  empty shapes, float64 (to ~1e-12), float32, bfloat16, and every kernel branch (C++, Triton, composed);
* ``grad_output`` scaling, retained graphs, subsets of ``requires_grad`` and no gradient work without them;
* that no ``(N, C)`` tensor is ever created (a ``TorchDispatchMode`` records every op's new tensors, with
  positive controls showing that it would see the unfused logits or a densified target);
* the errors; ``linear_topk``/``LinearBCEWithLogitsLoss.topk`` against ``torch.topk``; the module.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import bcekit.torch as bce
from bcekit.torch import _kernel, _linear

NAME = "linear_binary_cross_entropy_with_logits"
LAYOUTS = ["dense", "coo", "coo_duplicates", "csr"]
POS_WEIGHTS = [None, "per_label", "one", "scalar"]
F64_RTOL = 1e-12

# CSR tensors warn that their support is in beta
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")


# ----------------------------------------------------------------------------------------------- helpers


def _data(
    rows: tuple[int, ...],
    features: int,
    labels: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
    pos_weight: str | None = None,
    density: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(input, weight, bias, dense target, pos_weight)``: logits of a few units, soft targets with exact 0s
    and 1s, a row and a label with no non-zero target (where there are at least two of them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, features, generator=g, dtype=torch.float64)
    w = 2 * torch.randn(labels, features, generator=g, dtype=torch.float64) / math.sqrt(max(features, 1))
    b = torch.randn(labels, generator=g, dtype=torch.float64) if bias else None
    y = torch.rand(*rows, labels, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(y.shape, generator=g, dtype=torch.float64) < 0.3, torch.ones_like(y), y)
    y = torch.where(torch.rand(y.shape, generator=g, dtype=torch.float64) < density, y, torch.zeros_like(y))
    flat = y.reshape(-1, labels) if y.numel() else y.reshape(0, labels)
    if flat.shape[0] > 1:
        flat[1] = 0.0  # a row without entries
    if labels > 1:
        flat[:, labels // 2] = 0.0  # a label without entries
    p = {
        None: None,
        "per_label": torch.rand(labels, generator=g, dtype=torch.float64) * 3 + 0.25,
        "one": torch.rand(1, generator=g, dtype=torch.float64) * 3 + 0.25,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }[pos_weight]
    cast = [None if t is None else t.to(dtype) for t in (x, w, b, y, p)]
    return tuple(cast)  # type: ignore[return-value]


def _as_layout(dense: Tensor, layout: str, seed: int = 0) -> Tensor:
    """The ``(N, C)`` target in ``layout``; ``coo_duplicates`` splits every stored value in two entries at
    the same index, in a shuffled, uncoalesced order (``to_dense`` adds them up)."""
    if layout == "dense":
        return dense
    if layout == "csr":
        return dense.to_sparse_csr()
    coo = dense.to_sparse_coo().coalesce()
    if layout == "coo":
        return coo
    g = torch.Generator().manual_seed(seed)
    indices, values = coo.indices(), coo.values()
    part = values * torch.rand(values.shape, generator=g, dtype=torch.float64).to(values.dtype)
    indices = torch.cat((indices, indices), dim=1)
    values = torch.cat((part, values - part))
    order = torch.randperm(values.numel(), generator=g)
    target = torch.sparse_coo_tensor(indices[:, order], values[order], dense.shape, check_invariants=True)
    assert not target.is_coalesced() or values.numel() == 0
    return target


def _leaves(*tensors: Tensor | None, dtype: torch.dtype | None = None) -> list[Tensor | None]:
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _reference(x, w, b, target, p, reduction="mean", dtype=None) -> tuple[Tensor, list[Tensor | None]]:
    """The unfused torch loss and its gradients for input, weight, bias (in ``dtype``, default their own)."""
    xl, wl, bl = _leaves(x, w, b, dtype=dtype)
    dense = target.to_dense() if target.layout != torch.strided else target
    dense = dense.to(dtype or dense.dtype)
    pp = None if p is None else p.to(dtype or p.dtype)
    logits = F.linear(xl, wl, bl)
    if target.layout != torch.strided:
        logits = logits.reshape(dense.shape)  # input (*, D), sparse target (N, C)
    loss = F.binary_cross_entropy_with_logits(logits, dense, pos_weight=pp, reduction=reduction)
    wanted = [t for t in (xl, wl, bl) if t is not None]
    grads = iter(torch.autograd.grad(loss, wanted))
    return loss.detach(), [None if t is None else next(grads) for t in (xl, wl, bl)]


def _fused(x, w, b, target, p, reduction="mean", chunk=None) -> tuple[Tensor, list[Tensor | None]]:
    """The fused loss and the gradients ``.backward()`` leaves in input, weight, bias."""
    xl, wl, bl = _leaves(x, w, b)
    loss = bce.linear_binary_cross_entropy_with_logits(
        xl, wl, target, bl, pos_weight=p, reduction=reduction, chunk_size=chunk
    )
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in (xl, wl, bl)]


def _assert_close(
    got: Tensor | None, want: Tensor | None, rtol: float, what: str, check_dtype: bool = True
) -> None:
    """``max |got - want| <= rtol * max |want|`` (relative to the largest entry), same shape (and dtype)."""
    if want is None:
        assert got is None, what
        return
    assert got is not None, f"{what}: no gradient"
    assert (got.dtype == want.dtype or not check_dtype) and got.shape == want.shape, (
        f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    )
    if want.numel() == 0:
        return
    g, r = got.double(), want.double()
    assert torch.equal(g.isnan(), r.isnan()), f"{what}: NaN pattern differs: {got} vs {want}"
    finite = ~r.isnan()
    if not finite.any():
        return
    scale = r[finite].abs().max().item()
    error = (g[finite] - r[finite]).abs().max().item()
    assert error <= rtol * scale + 1e-300, f"{what}: max error {error:.3e} > {rtol:.1e} * {scale:.3e}"


def _assert_matches(got, want, rtol_loss: float, rtol_grad: float, check_dtype: bool = True) -> None:
    """Loss and gradients; ``want`` may be the float64 reference of a lower-precision ``got``."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    _assert_close(loss, ref_loss, rtol_loss, "loss", check_dtype)
    for name, g, r in zip(("input", "weight", "bias"), grads, ref_grads, strict=True):
        _assert_close(g, r, rtol_grad, f"grad {name}", check_dtype)


def _check_float64(x, w, b, target, p, reduction, chunk) -> None:
    _assert_matches(
        _fused(x, w, b, target, p, reduction, chunk),
        _reference(x, w, b, target, p, reduction),
        F64_RTOL,
        F64_RTOL,
    )


# ------------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("pos_weight", POS_WEIGHTS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_matches_the_unfused_path(layout, bias, pos_weight, reduction) -> None:
    x, w, b, y, p = _data((9,), 5, 23, seed=1, bias=bias, pos_weight=pos_weight)
    _check_float64(x, w, b, _as_layout(y, layout), p, reduction, chunk=7)


@pytest.mark.parametrize("layout", ["coo", "coo_duplicates", "csr"])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0], ids=["empty", "sparse", "full"])
@pytest.mark.parametrize("pos_weight", [None, "per_label"])
def test_sparse_targets_of_any_density(layout, density, pos_weight) -> None:
    """An all-empty sparse target (no stored entry at all), a few entries, every entry stored."""
    x, w, b, y, p = _data((8,), 4, 19, seed=2, pos_weight=pos_weight, density=density)
    target = _as_layout(y, layout)
    if density == 0.0:
        assert target.to_dense().count_nonzero() == 0
    _check_float64(x, w, b, target, p, "mean", chunk=6)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_target_with_no_stored_entries(layout) -> None:
    x, w, b, _, p = _data((5,), 3, 11, seed=3, pos_weight="per_label")
    empty = torch.sparse_coo_tensor(
        torch.zeros((2, 0), dtype=torch.int64), torch.zeros(0), (5, 11), check_invariants=True
    )
    empty = empty.double() if layout == "coo" else empty.double().to_sparse_csr()
    assert empty._nnz() == 0
    for reduction in ("mean", "sum"):
        _check_float64(x, w, b, empty, p, reduction, chunk=4)


def test_explicitly_stored_zeros_and_ones() -> None:
    """Stored entries whose value is 0 (explicit zeros) or exactly 1, and unsorted COO indices."""
    x, w, b, _, p = _data((4,), 3, 6, seed=4, pos_weight="per_label")
    indices = torch.tensor([[3, 0, 2, 0, 1], [5, 4, 0, 1, 1]])
    values = torch.tensor([0.0, 1.0, 0.0, 0.25, 1.0], dtype=torch.float64)
    target = torch.sparse_coo_tensor(indices, values, (4, 6), check_invariants=True)
    for t in (target, target.coalesce().to_sparse_csr()):
        _check_float64(x, w, b, t, p, "sum", chunk=4)


@pytest.mark.parametrize("layout", ["dense", "coo_duplicates", "csr"])
@pytest.mark.parametrize("chunk", [1, 7, "C-1", "C", "C+9", None])
def test_chunk_sizes(layout, chunk) -> None:
    labels = 17
    chunk = {"C-1": labels - 1, "C": labels, "C+9": labels + 9}.get(chunk, chunk)
    x, w, b, y, p = _data((6,), 4, labels, seed=5, pos_weight="per_label")
    _check_float64(x, w, b, _as_layout(y, layout), p, "mean", chunk)


@pytest.mark.parametrize("pos_weight", [None, "per_label"])
def test_input_with_several_leading_dimensions(pos_weight) -> None:
    """input (*, D) with a dense (*, C) target, or with a sparse (N, C) target (N = the rows of input)."""
    x, w, b, y, p = _data((2, 3, 4), 5, 13, seed=6, pos_weight=pos_weight)
    assert x.shape == (2, 3, 4, 5) and y.shape == (2, 3, 4, 13)
    for chunk in (3, None):
        _check_float64(x, w, b, y, p, "mean", chunk)
        for layout in ("coo", "coo_duplicates", "csr"):
            _check_float64(x, w, b, _as_layout(y.reshape(24, 13), layout), p, "sum", chunk)


@pytest.mark.parametrize(
    ("rows", "features", "labels"),
    [((1,), 4, 9), ((7,), 4, 1), ((1,), 1, 1), ((3,), 1, 5), ((), 3, 6)],
    ids=["N=1", "C=1", "N=C=D=1", "D=1", "1-D input"],
)
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_tiny_shapes(rows, features, labels, chunk) -> None:
    x, w, b, y, p = _data(rows, features, labels, seed=7, pos_weight="per_label", density=0.6)
    layouts = ["dense", "coo", "csr"] if len(rows) == 1 else ["dense"]
    for layout in layouts:
        for reduction in ("mean", "sum"):
            _check_float64(x, w, b, _as_layout(y, layout), p, reduction, chunk)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
@pytest.mark.parametrize(("rows", "labels"), [(0, 5), (4, 0), (0, 0)], ids=["N=0", "C=0", "N=C=0"])
def test_empty_shapes_like_torch(layout, rows, labels) -> None:
    """mean over no element is NaN, sum is 0, gradients are zeros, as in the unfused path."""
    x, w, b, y, p = _data((rows,), 3, labels, seed=8, pos_weight="per_label")
    for reduction in ("mean", "sum"):
        _check_float64(x, w, b, _as_layout(y, layout), p, reduction, chunk=2)


@pytest.mark.parametrize("layout", ["dense", "coo_duplicates", "csr"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float32(layout, reduction) -> None:
    x, w, b, y, p = _data((9,), 16, 41, seed=9, dtype=torch.float32, pos_weight="per_label")
    target = _as_layout(y, layout)
    got = _fused(x, w, b, target, p, reduction, chunk=10)
    # the same float32 numbers through the unfused path, in float64 and in float32
    ref64 = _reference(x, w, b, target, p, reduction, dtype=torch.float64)
    _assert_matches(got, ref64, 1e-5, 1e-5, check_dtype=False)
    ref32 = _reference(x, w, b, target, p, reduction)
    _assert_matches(got, ref32, 1e-5, 1e-5)
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", range(3))
def test_bfloat16(layout, reduction, seed) -> None:
    x, w, b, y, p = _data((6,), 5, 23, seed=seed, dtype=torch.bfloat16, pos_weight="per_label")
    target = _as_layout(y, layout)
    got = _fused(x, w, b, target, p, reduction, chunk=7)
    assert got[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in got[1])
    _assert_matches(got, _reference(x, w, b, target, p, reduction), 2e-2, 4e-2)
    ref32 = _reference(x, w, b, target, p, reduction, dtype=torch.float32)
    got32 = (got[0].float(), [g.float() for g in got[1]])
    _assert_matches(got32, ref32, 2e-2, 3e-2)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:]
)
@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_the_loss_has_the_input_dtype(dtype, layout) -> None:
    x, w, b, y, p = _data((4,), 3, 5, dtype=dtype, pos_weight="per_label")
    for target_dtype in (dtype, torch.float64, torch.float32):
        target = _as_layout(y.to(target_dtype), layout)
        for weights in (p, p.to(target_dtype)):
            loss = bce.linear_binary_cross_entropy_with_logits(x, w, target, b, pos_weight=weights)
            assert loss.dtype == dtype and loss.shape == ()


@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_target_and_pos_weight_in_another_dtype(layout) -> None:
    """A float32 target or pos_weight with float64 input: the float64 unfused loss of their exact values."""
    x, w, b, y, p = _data((7,), 4, 12, seed=10, pos_weight="per_label")
    y32, p32 = y.float(), p.float()
    got = _fused(x, w, b, _as_layout(y32, layout), p32, "mean", chunk=5)
    _assert_matches(got, _reference(x, w, b, y32.double(), p32.double()), F64_RTOL, F64_RTOL)


@pytest.mark.parametrize("branch", ["cpu_kernels", "triton", "composed"])
@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_every_kernel_branch(monkeypatch, branch, layout, dtype) -> None:
    """The C++ kernels (CPU tensors), the Triton branch CUDA tensors take (run on CPU tensors by Triton's
    interpreter) and the composed fallback (CUDA without Triton) give the unfused loss and gradients."""
    calls = []
    if branch == "triton":
        pytest.importorskip("triton")
        from bcekit.torch import _triton

        original_run = _triton.run
        monkeypatch.setattr(_triton, "run", lambda *a, **k: calls.append(1) or original_run(*a, **k))
        monkeypatch.setattr(_kernel, "_TRITON_ON_CPU", True)
    elif branch == "composed":
        monkeypatch.setattr(_kernel, "plan_for", lambda *a: calls.append(1) and None)
    x, w, b, y, p = _data((7,), 3, 11, seed=11, dtype=dtype, pos_weight="per_label")
    target = _as_layout(y, layout)
    got = _fused(x, w, b, target, p, "mean", chunk=4)
    assert calls or branch == "cpu_kernels", "the branch was not taken"
    rtol = F64_RTOL if dtype == torch.float64 else 1e-5
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    _assert_matches(got, _reference(x, w, b, target, p, "mean", dtype=torch.float64), rtol, rtol, False)


_LAYOUT_NAMES = st.sampled_from(["dense", "coo", "coo_duplicates", "csr"])


@settings(max_examples=30, deadline=None)
@given(
    layout=_LAYOUT_NAMES,
    rows=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    features=st.integers(1, 6),
    labels=st.integers(1, 20),
    chunk=st.one_of(st.none(), st.integers(1, 24)),
    bias=st.booleans(),
    pos_weight=st.sampled_from(POS_WEIGHTS),
    reduction=st.sampled_from(["mean", "sum"]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_float64(layout, rows, features, labels, chunk, bias, pos_weight, reduction, density, seed):
    if layout != "dense":
        rows = [math.prod(rows)]  # a sparse target is (N, C)
    x, w, b, y, p = _data(
        tuple(rows), features, labels, seed=seed, bias=bias, pos_weight=pos_weight, density=density
    )
    _check_float64(x, w, b, _as_layout(y, layout, seed), p, reduction, chunk)


# ------------------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
@pytest.mark.parametrize("factor", [3.5, -0.25, 0.0])
def test_grad_output_scales_the_gradients(layout, factor) -> None:
    x, w, b, y, p = _data((6,), 4, 13, seed=12, pos_weight="per_label")
    target = _as_layout(y, layout)
    xl, wl, bl = _leaves(x, w, b)
    loss = bce.linear_binary_cross_entropy_with_logits(xl, wl, target, bl, pos_weight=p, chunk_size=5)
    (loss * factor).backward()
    ref_loss, ref_grads = _reference(x, w, b, target, p)
    _assert_close(loss.detach(), ref_loss, F64_RTOL, "loss")
    for name, leaf, ref in zip(("input", "weight", "bias"), (xl, wl, bl), ref_grads, strict=True):
        _assert_close(leaf.grad, ref * factor, F64_RTOL, f"grad {name}")


def test_grad_output_scaling_in_float32_and_bfloat16() -> None:
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-2)):
        x, w, b, y, p = _data((6,), 4, 13, seed=13, dtype=dtype, pos_weight="per_label")
        xl, wl, bl = _leaves(x, w, b)
        loss = bce.linear_binary_cross_entropy_with_logits(xl, wl, y, bl, pos_weight=p, chunk_size=5)
        (loss * 3.5).backward()
        _, ref_grads = _reference(x, w, b, y, p, dtype=torch.float64)
        for leaf, ref in zip((xl, wl, bl), ref_grads, strict=True):
            assert leaf.grad.dtype == dtype
            _assert_close(leaf.grad.double(), 3.5 * ref, rtol, str(dtype))


def test_the_loss_feeds_a_larger_graph() -> None:
    """A non-leaf input (the output of another layer), the loss used twice and added to another term."""
    x, w, b, y, p = _data((5,), 4, 9, seed=14, pos_weight="one")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 4, generator=g, dtype=torch.float64)

    def run(loss_fn):
        h, wl, bl = _leaves(hidden, w, b)
        features = torch.tanh(x @ h)
        loss = loss_fn(features, wl, bl)
        (2 * loss + loss + features.square().sum()).backward()
        return loss.detach(), [h.grad, wl.grad, bl.grad]

    got = run(
        lambda f, wl, bl: bce.linear_binary_cross_entropy_with_logits(
            f, wl, y, bl, pos_weight=p, chunk_size=4
        )
    )
    want = run(lambda f, wl, bl: F.binary_cross_entropy_with_logits(F.linear(f, wl, bl), y, pos_weight=p))
    _assert_matches(got, want, F64_RTOL, 1e-11)


@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_retain_graph_twice(layout) -> None:
    x, w, b, y, p = _data((6,), 4, 13, seed=15, pos_weight="per_label")
    target = _as_layout(y, layout)
    xl, wl, bl = _leaves(x, w, b)
    loss = bce.linear_binary_cross_entropy_with_logits(xl, wl, target, bl, pos_weight=p, chunk_size=5)
    loss.backward(retain_graph=True)
    loss.backward()
    _, ref_grads = _reference(x, w, b, target, p)
    for name, leaf, ref in zip(("input", "weight", "bias"), (xl, wl, bl), ref_grads, strict=True):
        _assert_close(leaf.grad, 2 * ref, F64_RTOL, f"grad {name}")


def test_retained_graph_survives_in_place_updates_of_grad() -> None:
    """A retained graph can be differentiated any number of times, and ``.grad`` updated in place between
    the calls (``zero_grad(set_to_none=False)``, an optimizer step), as with the unfused path: the
    gradients the node hands out must not be the ones it keeps for the next backward."""
    x, w, b, y, p = _data((6,), 4, 13, seed=16, pos_weight="per_label")
    _, ref_grads = _reference(x, w, b, y, p)
    xl, wl, bl = _leaves(x, w, b)
    loss = bce.linear_binary_cross_entropy_with_logits(xl, wl, y, bl, pos_weight=p, chunk_size=5)
    for _ in range(3):
        loss.backward(retain_graph=True)
    for name, leaf, ref in zip(("input", "weight", "bias"), (xl, wl, bl), ref_grads, strict=True):
        _assert_close(leaf.grad, 3 * ref, F64_RTOL, f"grad {name} after 3 backward calls")
    for leaf in (xl, wl, bl):
        leaf.grad.zero_()
    loss.backward()
    for name, leaf, ref in zip(("input", "weight", "bias"), (xl, wl, bl), ref_grads, strict=True):
        _assert_close(leaf.grad, ref, F64_RTOL, f"grad {name} after zero_()")


@pytest.mark.parametrize(
    "wanted",
    [("input",), ("weight",), ("bias",), ("input", "weight"), ("weight", "bias"), ("input", "bias")],
    ids="+".join,
)
@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_gradients_only_where_asked(wanted, layout) -> None:
    x, w, b, y, p = _data((6,), 4, 13, seed=17, pos_weight="per_label")
    target = _as_layout(y, layout)
    leaves = {
        name: t.detach().clone().requires_grad_(name in wanted)
        for name, t in zip(("input", "weight", "bias"), (x, w, b), strict=True)
    }
    loss = bce.linear_binary_cross_entropy_with_logits(
        leaves["input"], leaves["weight"], target, leaves["bias"], pos_weight=p, chunk_size=5
    )
    loss.backward()
    ref_loss, ref_grads = _reference(x, w, b, target, p)
    _assert_close(loss.detach(), ref_loss, F64_RTOL, "loss")
    for (name, leaf), ref in zip(leaves.items(), ref_grads, strict=True):
        if name in wanted:
            _assert_close(leaf.grad, ref, F64_RTOL, f"grad {name}")
        else:
            assert leaf.grad is None, name


def test_bias_without_gradient_and_no_bias() -> None:
    x, w, b, y, p = _data((6,), 4, 13, seed=18, pos_weight="per_label")
    xl, wl = _leaves(x, w)
    loss = bce.linear_binary_cross_entropy_with_logits(xl, wl, y, b, pos_weight=p, chunk_size=5)
    loss.backward()
    ref_loss, (gx, gw, _) = _reference(x, w, b, y, p)
    _assert_close(loss.detach(), ref_loss, F64_RTOL, "loss")
    _assert_close(xl.grad, gx, F64_RTOL, "grad input")
    _assert_close(wl.grad, gw, F64_RTOL, "grad weight")
    assert not b.requires_grad and b.grad is None


# ----------------------------------------------------------------- in-place edits after the forward pass

_EDITABLE = ("input", "weight", "bias", "target", "pos_weight")


def _unfused(x, w, y, b=None, *, pos_weight=None):
    return F.binary_cross_entropy_with_logits(F.linear(x, w, b), y.to_dense(), pos_weight=pos_weight)


def _fused_chunked(x, w, y, b=None, *, pos_weight=None):
    return bce.linear_binary_cross_entropy_with_logits(x, w, y, b, pos_weight=pos_weight, chunk_size=5)


def _edit_and_backward(loss_fn, wanted, edit, layout="dense", retain=False):
    """Leaves requiring grad as in ``wanted``; the loss; ``edit`` (a name of ``_EDITABLE``) doubled in place
    under no_grad; ``backward`` (twice with ``retain``). ``(error or None, {name: grad})``."""
    x, w, b, y, p = _data((6,), 4, 13, seed=30, pos_weight="per_label")
    tensors = {"input": x, "weight": w, "bias": b, "target": _as_layout(y, layout), "pos_weight": p}
    tensors = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in tensors.items()}
    loss = loss_fn(
        tensors["input"],
        tensors["weight"],
        tensors["target"],
        tensors["bias"],
        pos_weight=tensors["pos_weight"],
    )
    try:
        if retain:
            loss.backward(retain_graph=True)
        with torch.no_grad():
            tensors[edit].mul_(2)
        loss.backward()
    except RuntimeError as error:
        return error, {}
    return None, {k: tensors[k].grad for k in wanted}


def _assert_edit_like_torch(wanted, edit, layout="dense", retain=False) -> None:
    theirs, their_grads = _edit_and_backward(_unfused, wanted, edit, layout, retain)
    ours, our_grads = _edit_and_backward(_fused_chunked, wanted, edit, layout, retain)
    assert (ours is None) == (theirs is None), f"torch: {theirs!r}; bcekit: {ours!r}"
    if theirs is not None:
        assert type(ours) is type(theirs), f"torch: {theirs!r}; bcekit: {ours!r}"
        assert "modified by an inplace operation" in str(ours), ours
        assert f"{edit} " in str(ours), f"the message does not name {edit}: {ours}"
        return
    for name in wanted:
        _assert_close(our_grads[name], their_grads[name], F64_RTOL, f"grad {name}")


@pytest.mark.parametrize(
    "wanted",
    [("input", "weight", "bias"), ("weight", "bias"), ("input",)],
    ids="+".join,
)
@pytest.mark.parametrize("edit", _EDITABLE)
def test_in_place_edit_before_backward_is_an_error_where_torch_raises(wanted, edit) -> None:
    """Where torch's unfused loss saved the edited tensor (the input for the weight's gradient, the weight
    for the input's, the target and pos_weight always; never the bias) its backward raises, and so must
    the fused one, naming the tensor; elsewhere both give the gradients of the values before the edit."""
    _assert_edit_like_torch(wanted, edit)


@pytest.mark.parametrize("edit", _EDITABLE)
def test_in_place_edit_between_backwards_of_a_retained_graph_like_torch(edit) -> None:
    _assert_edit_like_torch(("input", "weight", "bias"), edit, retain=True)


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("retain", [False, True], ids=["once", "retained"])
def test_in_place_edit_of_a_sparse_target_like_torch(layout, retain) -> None:
    """torch's unfused loss saves the densified copy, so editing the sparse target changes nothing."""
    _assert_edit_like_torch(("input", "weight", "bias"), "target", layout, retain)


# ------------------------------------------------------------------------------------------- autocast


def _autocast_run(loss_fn, dtype, wanted, bias):
    """The loss and gradients of float32 leaves (``wanted`` require grad) under CPU autocast to ``dtype``."""
    x, w, b, y, p = _data((9,), 6, 21, seed=31, dtype=torch.float32, bias=bias, pos_weight="per_label")
    leaves = {
        name: None if t is None else t.detach().clone().requires_grad_(name in wanted)
        for name, t in (("input", x), ("weight", w), ("bias", b))
    }
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(leaves["input"], leaves["weight"], y, leaves["bias"], pos_weight=p)
    loss.backward()
    return loss.detach(), {name: leaves[name].grad for name in wanted if leaves[name] is not None}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("wanted", [("weight",), ("input",), ("input", "weight", "bias")], ids="+".join)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_cpu_autocast_like_torch(dtype, wanted, bias) -> None:
    """As torch's unfused loss under autocast: the linear map in ``dtype`` (operands and logits rounded to
    it), the BCE in float32, a float32 loss; gradients reach the float32 leaves in float32, with the values
    of ``dtype`` computations. Each side rounds the operands (unit roundoff u = eps / 2) and the logits and
    matmul results once more; on the same rounded operands each is within ~2u of the exact answer, so the
    two differ by at most ~4u = 2 eps of the largest entry: checked against torch, and against the float64
    unfused loss of the rounded operands (torch's answer is checked to meet the same bound)."""
    got_loss, got = _autocast_run(_fused_chunked, dtype, wanted, bias)
    want_loss, want = _autocast_run(_unfused, dtype, wanted, bias)
    rtol = 2 * torch.finfo(dtype).eps
    assert got_loss.dtype == want_loss.dtype == torch.float32
    _assert_close(got_loss, want_loss, rtol, "loss")
    assert got.keys() == want.keys()
    for name in want:
        _assert_close(got[name], want[name], rtol, f"grad {name}")
        representable = [torch.equal(g, g.to(dtype).to(g.dtype)) for g in (got[name], want[name])]
        assert representable[0] == representable[1], f"grad {name}: {dtype} values: {representable}"
    # the float64 reference, on the operands rounded to dtype
    x, w, b, y, p = _data((9,), 6, 21, seed=31, dtype=torch.float32, bias=bias, pos_weight="per_label")
    rounded = [None if t is None else t.to(dtype).double() for t in (x, w, b)]
    exact_loss, exact = _reference(*rounded, y.double(), p.double())
    for loss, grads in ((got_loss, got), (want_loss, want)):
        _assert_close(loss.double(), exact_loss, rtol, "loss vs float64", check_dtype=False)
        for name, g in zip(("input", "weight", "bias"), exact, strict=True):
            if name in grads:
                _assert_close(grads[name].double(), g, rtol, f"grad {name} vs float64", check_dtype=False)


class _Ops(TorchDispatchMode):
    """Records every aten op that runs, and the elements of each tensor an op creates: its strided outputs
    that share no storage with its inputs (views, in-place and ``out=`` results are not new), and the stored
    values of its sparse outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.created: list[tuple[str, torch.layout, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.names.append(name)
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            if t.layout == torch.strided:
                if t.numel() and _storage(t) in inputs:
                    continue
                self.created.append((name, t.layout, tuple(t.shape), t.numel()))
            else:
                self.created.append((name, t.layout, tuple(t.shape), t._nnz()))
        return out

    def largest(self) -> tuple[str, torch.layout, tuple[int, ...], int]:
        return max(self.created, key=lambda entry: entry[-1])

    def matmuls(self) -> int:
        names = ("mm", "addmm", "matmul", "bmm", "baddbmm", "addmv", "mv", "linear")
        return sum(name in names for name in self.names)


def _storage(t: Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.layout == torch.strided else None


_MEMORY = {"rows": 64, "features": 8, "labels": 2048, "chunk": 64}


def _memory_case(layout: str, target_dtype: torch.dtype):
    n, d, c = _MEMORY["rows"], _MEMORY["features"], _MEMORY["labels"]
    x, w, b, y, p = _data((n,), d, c, seed=19, dtype=torch.float32, pos_weight="per_label", density=0.002)
    target = _as_layout(y.to(target_dtype), layout)
    return x, w, b, target, p


def _run_recorded(x, w, b, target, p, chunk) -> _Ops:
    xl, wl, bl = _leaves(x, w, b)
    with _Ops() as ops:
        loss = bce.linear_binary_cross_entropy_with_logits(
            xl, wl, target, bl, pos_weight=p, reduction="sum", chunk_size=chunk
        )
        loss.backward()
    assert xl.grad is not None and wl.grad is not None and bl.grad is not None
    return ops


@pytest.mark.parametrize(
    ("layout", "target_dtype"),
    [("dense", torch.float32), ("dense", torch.float64), ("coo", torch.float32), ("csr", torch.float64)],
)
def test_never_creates_an_n_by_c_tensor(monkeypatch, layout, target_dtype) -> None:
    """Forward and backward create nothing of N C elements (chunk N = 64 x 64 elements, N C = 64 x 2048):
    no logits, no sigmoid or gradient of them, no dense copy of the target. The dense target is the
    caller's own tensor (read in chunks, converted chunk by chunk when its dtype differs)."""
    n, c, chunk = _MEMORY["rows"], _MEMORY["labels"], _MEMORY["chunk"]
    x, w, b, target, p = _memory_case(layout, target_dtype)
    ops = _run_recorded(x, w, b, target, p, chunk)
    assert ops.created and ops.largest()[-1] < n * c, f"created {ops.largest()}"
    assert not [e for e in ops.created if e[1] == torch.strided and e[-1] >= n * c]
    assert not [e for e in ops.names if e in ("to_dense", "_to_dense", "sparse_mask")]
    # chunk_size=None takes default_chunk_size's answer (here forced to a chunk below C)
    monkeypatch.setattr(_linear, "default_chunk_size", lambda *args: chunk)
    ops = _run_recorded(x, w, b, target, p, None)
    assert ops.largest()[-1] < n * c, f"created {ops.largest()}"


@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_the_allocation_detector_sees_full_logits_and_densified_targets(monkeypatch, layout) -> None:
    """Positive controls of the previous test's detector: a single chunk of all C labels (the unfused
    logits), chunk_size=None with a default of C, the unfused path itself and a densified sparse target."""
    n, c = _MEMORY["rows"], _MEMORY["labels"]
    x, w, b, target, p = _memory_case(layout, torch.float32)
    assert _run_recorded(x, w, b, target, p, c).largest()[-1] >= n * c
    monkeypatch.setattr(_linear, "default_chunk_size", lambda *args: c)
    assert _run_recorded(x, w, b, target, p, None).largest()[-1] >= n * c
    with _Ops() as ops:
        F.binary_cross_entropy_with_logits(F.linear(x, w, b), target.to_dense(), pos_weight=p)
    assert ops.largest()[-1] >= n * c
    if layout != "dense":
        with _Ops() as ops:
            target.to_dense()
        assert [e for e in ops.created if e[1] == torch.strided and e[-1] >= n * c]


def test_default_chunk_size_keeps_one_buffer_within_budget() -> None:
    """One (rows, chunk) buffer of the accumulation dtype within the device's budget (``_CHUNK_BYTES``);
    chunks are multiples of 64 labels, at least 64 (or all labels when fewer), at most all labels."""
    cpu, cuda = _linear._CHUNK_BYTES["cpu"], _linear._CHUNK_BYTES["cuda"]
    assert cpu <= cuda
    cases = [
        (4096, 10**6, torch.float32, "cpu", 4, cpu),
        (4096, 10**6, torch.float64, "cpu", 8, cpu),
        (4096, 10**6, torch.bfloat16, "cpu", 4, cpu),
        (4096, 10**6, torch.float32, "cuda", 4, cuda),
        (300, 10**7, torch.float16, "cuda", 4, cuda),
        (10**6, 10**5, torch.float32, "cpu", 4, cpu),
        (8, 100, torch.float32, "cpu", 4, cpu),
        (8, 10, torch.float32, "cpu", 4, cpu),
        (0, 5, torch.float64, "cpu", 8, cpu),
        (5, 0, torch.float64, "cpu", 8, cpu),
    ]
    for rows, labels, dtype, device, itemsize, budget in cases:
        chunk = _linear.default_chunk_size(rows, labels, dtype, torch.device(device))
        case = (rows, labels, dtype, device, chunk)
        assert chunk >= 1, case
        if labels == 0:
            continue
        assert chunk <= labels, case
        if chunk < labels:
            assert chunk % 64 == 0, case
            assert chunk == 64 or rows * chunk * itemsize <= budget, case
            assert rows * (chunk + 64) * itemsize > budget, case  # the largest such multiple of 64
        else:
            assert labels <= 64 or rows * labels * itemsize <= budget, case


@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_no_gradient_work_when_nothing_requires_grad(layout) -> None:
    """One matmul per chunk (the logits), none for gradients, when no argument requires grad."""
    x, w, b, y, p = _data((6,), 4, 10, seed=20, pos_weight="per_label")
    target = _as_layout(y, layout)
    with _Ops() as ops:
        loss = bce.linear_binary_cross_entropy_with_logits(x, w, target, b, pos_weight=p, chunk_size=4)
    assert not loss.requires_grad
    assert ops.matmuls() == 3  # ceil(10 / 4) chunks
    _assert_close(loss, _reference(x, w, b, target, p)[0], F64_RTOL, "loss")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_work_with_grad_disabled(mode) -> None:
    """Under torch.no_grad() / torch.inference_mode() (an evaluation loop), parameters that require grad
    must not make the forward compute input, weight and bias gradients that no backward can use."""
    x, w, b, y, p = _data((6,), 4, 10, seed=21, pos_weight="per_label")

    def run(*tensors):
        context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with context, _Ops() as ops:
            loss = bce.linear_binary_cross_entropy_with_logits(*tensors, pos_weight=p, chunk_size=4)
        assert not loss.requires_grad
        _assert_close(loss, _reference(x, w, b, y, p)[0], F64_RTOL, "loss")
        return ops

    xl, wl, bl = _leaves(x, w, b)
    with_grad = run(xl, wl, y, bl)
    without = run(x, w, y, b)
    assert with_grad.matmuls() == without.matmuls(), (
        f"{with_grad.matmuls()} matmuls where {without.matmuls()} compute the loss: gradients were computed"
    )
    largest = max(e[-1] for e in without.created)
    assert max(e[-1] for e in with_grad.created) == largest


def test_fewer_matmuls_for_fewer_gradients() -> None:
    x, w, b, y, p = _data((6,), 4, 10, seed=22)

    def matmuls(*names: str) -> int:
        leaves = {
            name: t.detach().clone().requires_grad_(name in names)
            for name, t in zip(("input", "weight", "bias"), (x, w, b), strict=True)
        }
        with _Ops() as ops:
            loss = bce.linear_binary_cross_entropy_with_logits(
                leaves["input"], leaves["weight"], y, leaves["bias"], chunk_size=4
            )
            if loss.requires_grad:
                loss.backward()
        return ops.matmuls()

    every = matmuls("input", "weight", "bias")
    assert matmuls() == 3  # ceil(10 / 4) chunks: the logits only
    assert matmuls() < matmuls("input") < every
    assert matmuls() < matmuls("weight") < every
    assert matmuls("bias") < every


# --------------------------------------------------------------------------------------------- errors


def _valid(**changes):
    x, w, b, y, p = _data((4,), 3, 6, pos_weight="per_label")
    args = {"input": x, "weight": w, "target": y, "bias": b, "pos_weight": p}
    args.update(changes)
    return args


def _call(**changes):
    args = _valid(**changes)
    options = {k: args.pop(k) for k in list(args) if k not in ("input", "weight", "target", "bias")}
    return bce.linear_binary_cross_entropy_with_logits(
        args["input"], args["weight"], args["target"], args["bias"], **options
    )


def test_valid_arguments_do_not_raise() -> None:
    assert torch.isfinite(_call())


def test_reduction_none_says_what_to_use_instead() -> None:
    with pytest.raises(ValueError, match="reduction='none'") as info:
        _call(reduction="none")
    message = str(info.value)
    assert "'mean' or 'sum'" in message and "binary_cross_entropy_with_logits(F.linear" in message
    with pytest.raises(ValueError, match="reduction"):
        _call(reduction="none", target=_valid()["target"].to_sparse())


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", "elementwise_sum"])
def test_invalid_reduction(reduction) -> None:
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        _call(reduction=reduction)


def test_elementwise_mean_is_mean_with_torch_warning() -> None:
    with pytest.warns(UserWarning, match="elementwise_mean"):
        loss = _call(reduction="elementwise_mean")
    torch.testing.assert_close(loss, _call(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"input": torch.randn(4, 5, dtype=torch.float64)}, "features"),
        ({"input": torch.tensor(1.0, dtype=torch.float64)}, "input of shape"),
        ({"weight": torch.randn(6, dtype=torch.float64)}, "weight of shape"),
        ({"weight": torch.randn(1, 6, 3, dtype=torch.float64)}, "weight of shape"),
        ({"target": torch.rand(4, 7, dtype=torch.float64)}, "target of shape"),
        ({"target": torch.rand(6, 4, dtype=torch.float64)}, "target of shape"),
        ({"target": torch.rand(4, 6, 1, dtype=torch.float64)}, "target of shape"),
        ({"target": torch.rand(4, 7, dtype=torch.float64), "layout": "coo"}, "sparse target"),
        ({"target": torch.rand(4, 7, dtype=torch.float64), "layout": "csr"}, "sparse target"),
        ({"bias": torch.randn(7, dtype=torch.float64)}, "bias must have shape"),
        ({"bias": torch.randn(1, 6, dtype=torch.float64)}, "bias must have shape"),
        ({"bias": torch.tensor(1.0, dtype=torch.float64)}, "bias must have shape"),
        ({"pos_weight": torch.rand(2, dtype=torch.float64)}, "pos_weight must have shape"),
        ({"pos_weight": torch.rand(7, dtype=torch.float64)}, "pos_weight must have shape"),
        ({"pos_weight": torch.rand(4, 6, dtype=torch.float64)}, "pos_weight must have shape"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{getattr(t, 'shape', t)}" for k, t in v.items()),
)
def test_shape_errors(changes, match) -> None:
    changes = dict(changes)
    if "layout" in changes:
        changes["target"] = _as_layout(changes["target"], changes.pop("layout"))
    with pytest.raises(ValueError, match=match) as info:
        _call(**changes)
    assert NAME in str(info.value)


def test_sparse_target_must_be_n_by_c_for_a_3d_input() -> None:
    x, w, b, y, _ = _data((2, 3), 4, 5)
    with pytest.raises(ValueError, match=r"sparse target of shape \(2, 3, 5\)"):
        bce.linear_binary_cross_entropy_with_logits(x, w, y.to_sparse(), b)
    with pytest.raises(ValueError, match="sparse target"):
        bce.linear_binary_cross_entropy_with_logits(x, w, y.reshape(6, 5)[:5].to_sparse(), b)


@pytest.mark.parametrize(
    "changes",
    [
        {"input": torch.randn(4, 3)},
        {"weight": torch.randn(6, 3)},
        {"bias": torch.randn(6)},
        {"input": torch.randn(4, 3, dtype=torch.bfloat16)},
        {
            "input": torch.ones(4, 3, dtype=torch.int64),
            "weight": torch.ones(6, 3, dtype=torch.int64),
            "bias": None,
        },
        {"target": torch.ones(4, 6, dtype=torch.int64)},
        {"target": torch.ones(4, 6, dtype=torch.bool)},
        {"target": torch.ones(4, 6, dtype=torch.int64).to_sparse()},
    ],
    ids=[
        "input32",
        "weight32",
        "bias32",
        "input_bf16",
        "int_input",
        "long_target",
        "bool_target",
        "long_coo",
    ],
)
def test_dtype_errors(changes) -> None:
    with pytest.raises(TypeError, match=NAME):
        _call(**changes)


def test_target_and_pos_weight_requiring_grad() -> None:
    target = _valid()["target"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="target"):
        _call(target=target)
    pos_weight = _valid()["pos_weight"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="pos_weight"):
        _call(pos_weight=pos_weight)


@pytest.mark.parametrize("chunk", [0, -1, -64])
def test_chunk_size_must_be_positive(chunk) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        _call(chunk_size=chunk)


@pytest.mark.parametrize("layout", ["bsr", "csc", "bsc"])
def test_other_sparse_layouts_are_refused(layout) -> None:
    y = _valid()["target"]
    target = {
        "bsr": lambda: y.to_sparse_bsr((2, 2)),
        "csc": y.to_sparse_csc,
        "bsc": lambda: y.to_sparse_bsc((2, 2)),
    }[layout]()
    with pytest.raises(ValueError, match="COO or CSR"):
        _call(target=target)


def test_hybrid_coo_target_is_refused_clearly() -> None:
    """A COO tensor with a dense dimension (sparse rows of dense label vectors) has shape (N, C) but not
    one stored entry per (row, label): it must be refused with the function's own message, not an
    unpacking error from deep inside."""
    hybrid = _valid()["target"].to_sparse(1)
    assert hybrid.sparse_dim() == 1 and hybrid.dense_dim() == 1
    with pytest.raises(ValueError, match=NAME):
        _call(target=hybrid)


@pytest.mark.parametrize(
    "changes",
    [
        {"input": [[1.0, 2.0, 3.0]] * 4},
        {"weight": 1.0},
        {"target": [[0.0] * 6] * 4},
        {"target": None},
    ],
    ids=["input_list", "weight_float", "target_list", "target_none"],
)
def test_non_tensor_arguments(changes) -> None:
    with pytest.raises(TypeError, match=NAME):
        _call(**changes)


@pytest.mark.parametrize(
    "changes",
    [{"bias": [0.0] * 6}, {"pos_weight": 2.0}, {"pos_weight": [1.0] * 6}],
    ids=["bias", "pw", "pw_l"],
)
def test_non_tensor_bias_and_pos_weight(changes) -> None:
    """As torch (``F.linear``'s bias, ``F.binary_cross_entropy_with_logits``'s pos_weight): a TypeError."""
    with pytest.raises(TypeError):
        _call(**changes)


# ---------------------------------------------------------------------------------------------- topk


def _topk_data(features: int, labels: int = 23, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, features, generator=g, dtype=torch.float64)
    w = torch.randn(labels, features, generator=g, dtype=torch.float64)
    b = torch.randn(labels, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


def _check_topk(values, indices, x, w, b, k, exact: bool) -> None:
    """``torch.topk`` of the full logits. Without a bias and with D = 1 each logit is one product, so a
    chunk's logits are bitwise those of the full matmul and everything is exact. Otherwise the BLAS may
    round a row-slice of the weight differently from the whole (~1 ulp; with a bias, some CPUs' BLAS fuse
    the product and the bias into one FMA for one shape and not for another), so values are compared to
    a few ulp and indices wherever the reference's gaps exceed that."""
    logits = F.linear(x, w, b)
    want_values, want_indices = logits.topk(k)
    assert values.shape == indices.shape == (*x.shape[:-1], k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert not values.requires_grad
    if exact:
        assert torch.equal(values, want_values)
        assert torch.equal(indices, want_indices)
        return
    tol = 1e-13 * logits.abs().max().item()
    torch.testing.assert_close(values, want_values, rtol=0, atol=tol)
    assert torch.all(values[..., :-1] >= values[..., 1:])
    # every returned index holds the value returned for it
    torch.testing.assert_close(logits.gather(-1, indices), values, rtol=0, atol=tol)
    # and is the reference's index where the reference's values are separated by more than rounding
    sorted_all = logits.sort(descending=True).values
    gaps = torch.cat(
        (sorted_all[..., :-1] - sorted_all[..., 1:], torch.full_like(sorted_all[..., :1], math.inf)), dim=-1
    )
    before = torch.cat((torch.full_like(gaps[..., :1], math.inf), gaps[..., :-1]), dim=-1)
    distinct = (torch.minimum(gaps, before) > 4 * tol)[..., :k]
    assert distinct.float().mean() > 0.9  # random float64 data: ties are absent
    assert torch.equal(indices[distinct], want_indices[distinct])


@pytest.mark.parametrize("chunk", [1, 3, 7, 22, 23, 40, None])
@pytest.mark.parametrize("k", [1, 4, 9, 23])
@pytest.mark.parametrize("features", [1, 6])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_topk_is_topk_of_the_full_logits(chunk, k, features, bias) -> None:
    x, w, b = _topk_data(features, bias=bias, seed=k)
    values, indices = bce.linear_topk(x, w, k, b, chunk_size=chunk)
    _check_topk(values, indices, x, w, b, k, exact=features == 1 and b is None)


def test_linear_topk_of_2d_and_1d_input_and_parameters_with_grad() -> None:
    x, w, b = _topk_data(5, labels=11, seed=3)
    w.requires_grad_()
    for inp in (x.reshape(6, 5), x[0, 0]):
        values, indices = bce.linear_topk(inp, w, 3, b, chunk_size=4)
        _check_topk(values, indices, inp, w.detach(), b, 3, exact=False)


@pytest.mark.parametrize("k", [0, -1, 24, 100])
def test_linear_topk_k_out_of_range(k) -> None:
    x, w, b = _topk_data(3)
    with pytest.raises(ValueError, match="k must be in"):
        bce.linear_topk(x, w, k, b, chunk_size=5)


def test_module_topk_is_linear_topk() -> None:
    torch.manual_seed(0)
    head = bce.LinearBCEWithLogitsLoss(1, 23, chunk_size=5, dtype=torch.float64)
    x = torch.randn(4, 1, dtype=torch.float64)
    for k in (1, 7, 23):
        values, indices = head.topk(x, k)
        _check_topk(values, indices, x, head.weight.detach(), head.bias.detach(), k, exact=False)
        with pytest.raises(ValueError):
            head.topk(x, 24)


# --------------------------------------------------------------------------------------------- module


@pytest.mark.parametrize("bias", [True, False])
def test_module_initialises_like_nn_linear(bias) -> None:
    torch.manual_seed(42)
    linear = nn.Linear(7, 13, bias=bias)
    torch.manual_seed(42)
    head = bce.LinearBCEWithLogitsLoss(7, 13, bias=bias)
    assert torch.equal(head.weight, linear.weight)
    if bias:
        assert torch.equal(head.bias, linear.bias)
    else:
        assert head.bias is None
    assert dict(head.named_parameters()).keys() == dict(linear.named_parameters()).keys()
    assert head.state_dict().keys() == linear.state_dict().keys()
    head.load_state_dict(linear.state_dict())
    # reset_parameters draws the same values as nn.Linear.reset_parameters
    torch.manual_seed(7)
    linear.reset_parameters()
    torch.manual_seed(7)
    head.reset_parameters()
    assert torch.equal(head.weight, linear.weight)
    assert not bias or torch.equal(head.bias, linear.bias)


def test_module_factory_kwargs() -> None:
    head = bce.LinearBCEWithLogitsLoss(3, 4, dtype=torch.float64, device="cpu")
    assert head.weight.dtype == head.bias.dtype == torch.float64
    assert head.weight.shape == (4, 3) and head.bias.shape == (4,)
    assert head.weight.device.type == "cpu"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_module_forward_is_the_functional(bias, layout, reduction) -> None:
    x, _, _, y, p = _data((5,), 4, 9, seed=23, pos_weight="per_label")
    head = bce.LinearBCEWithLogitsLoss(
        4, 9, bias=bias, pos_weight=p, reduction=reduction, chunk_size=4, dtype=torch.float64
    )
    target = _as_layout(y, layout)
    xl = x.clone().requires_grad_()
    loss = head(xl, target)
    loss.backward()
    functional = bce.linear_binary_cross_entropy_with_logits(
        x,
        head.weight.detach(),
        target,
        None if head.bias is None else head.bias.detach(),
        pos_weight=p,
        reduction=reduction,
        chunk_size=4,
    )
    torch.testing.assert_close(loss.detach(), functional, rtol=0, atol=0)
    ref_loss, ref_grads = _reference(x, head.weight, head.bias, target, p, reduction)
    got_grads = [xl.grad, head.weight.grad, None if head.bias is None else head.bias.grad]
    _assert_matches((loss.detach(), got_grads), (ref_loss, ref_grads), F64_RTOL, F64_RTOL)


def test_module_pos_weight_buffer() -> None:
    p = torch.rand(5) + 0.5
    head = bce.LinearBCEWithLogitsLoss(3, 5, pos_weight=p)
    assert "pos_weight" in dict(head.named_buffers())
    assert torch.equal(head.state_dict()["pos_weight"], p)
    assert set(head.state_dict()) == {"weight", "bias", "pos_weight"}
    head = head.double()
    assert head.weight.dtype == head.bias.dtype == head.pos_weight.dtype == torch.float64
    torch.testing.assert_close(head.pos_weight, p.double(), rtol=0, atol=0)
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.rand(2, 5, dtype=torch.float64)
    assert head(x, y).dtype == torch.float64
    fresh = bce.LinearBCEWithLogitsLoss(3, 5, pos_weight=torch.ones(5, dtype=torch.float64)).double()
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh.pos_weight, head.pos_weight) and torch.equal(fresh.weight, head.weight)
    no_pw = bce.LinearBCEWithLogitsLoss(3, 5)
    assert no_pw.pos_weight is None and set(no_pw.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((3, 5), {}, "in_features=3, out_features=5, bias=True, reduction='mean'"),
        (
            (8, 2),
            {"reduction": "sum", "chunk_size": 4},
            "in_features=8, out_features=2, bias=True, reduction='sum'",
        ),
        ((8, 2), {"bias": False}, "in_features=8, out_features=2, bias=False, reduction='mean'"),
    ],
)
def test_module_extra_repr(args, kwargs, expected) -> None:
    assert repr(bce.LinearBCEWithLogitsLoss(*args, **kwargs)) == f"LinearBCEWithLogitsLoss({expected})"


def test_module_construction_errors() -> None:
    with pytest.raises(ValueError, match="reduction='none'"):
        bce.LinearBCEWithLogitsLoss(3, 5, reduction="none")
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        bce.LinearBCEWithLogitsLoss(3, 5, reduction="avg")
    with pytest.raises(ValueError, match="pos_weight must have shape"):
        bce.LinearBCEWithLogitsLoss(3, 5, pos_weight=torch.ones(4))
    for pos_weight in (torch.ones(5), torch.ones(1), torch.tensor(2.0), None):
        bce.LinearBCEWithLogitsLoss(3, 5, pos_weight=pos_weight)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_of_the_module_computes_the_loss_of_new_inputs(grad) -> None:
    """A trace taken on one batch gives, on another, the unfused torch loss of that batch: not the first
    batch's number recorded as a constant (evaluation under no_grad included)."""
    torch.manual_seed(5)
    head = bce.LinearBCEWithLogitsLoss(8, 50)
    (x1, y1), (x2, y2) = [(torch.randn(4, 8), torch.rand(4, 50)) for _ in range(2)]
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(head, (x1, y1))
        loss = traced(x2, y2)
    expected = F.binary_cross_entropy_with_logits(F.linear(x2, head.weight, head.bias), y2)
    torch.testing.assert_close(loss, expected)
