"""Label-sharded ``linear_binary_cross_entropy_with_logits`` over a real two-process gloo group.

One launch serves every test: the module-scoped fixture starts two fresh interpreters (ranks 0 and 1,
``init_process_group("gloo", init_method="file://...")`` in a temporary folder, CPU tensors, one torch
thread each). Each rank builds the same full problem from a seeded generator for every case of ``CASES``,
computes its shard of the labels with ``process_group`` (its contiguous rows of ``weight``, ``bias`` and
``pos_weight`` and its columns of the target; shards of unequal size, chunk sizes that do not divide them),
and compares, in the worker, its loss, its input gradient and its shard of the weight and bias gradients
with the unsharded single-process results of (a) bcekit's function without ``process_group`` and (b) torch's
unfused ``F.binary_cross_entropy_with_logits(F.linear(...))`` on the dense target. It writes its largest
relative errors (``max |a - b| / max |b|`` per tensor), the loss's exact bits and a digest of its input
gradient to a JSON file; the parent asserts on them, so a failure names the case, the rank and the tensor.

The workers never wait for ever: the group's collectives time out after ``_GROUP_TIMEOUT_S``, the parent
kills both processes after ``_LAUNCH_TIMEOUT_S`` and shows what they printed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _ranks

WORLD = 2
_GROUP_TIMEOUT_S = 60
_LAUNCH_TIMEOUT_S = 120


@dataclass(frozen=True)
class ShardCase:
    name: str
    shape: tuple[int, ...]  # the input's leading dimensions (the rows)
    features: int
    split: tuple[int, ...]  # labels per rank, in rank order (their sum is C)
    target: str  # "dense", "coo" or "csr"
    bias: bool
    pos_weight: str  # "none", "label" ((C,), sharded) or "scalar" ((1,), the same on every rank)
    reduction: str
    chunk: int | None
    grad_output: float = 1.0
    dtype: str = "float64"
    positives: int | None = None  # stored entries per row of a sparse target; None: a random density

    @property
    def tolerance(self) -> float:
        return 1e-12 if self.dtype == "float64" else 2e-5


CASES = (
    ShardCase("dense-c11-6/5-mean-bias-pw-chunk4", (8,), 5, (6, 5), "dense", True, "label", "mean", 4),
    ShardCase("dense-c11-6/5-sum-chunk1", (8,), 5, (6, 5), "dense", False, "none", "sum", 1),
    ShardCase(
        "dense-c11-6/5-sum-bias-pw-chunk-default", (8,), 5, (6, 5), "dense", True, "label", "sum", None
    ),
    ShardCase("dense-c11-9/2-mean-3d-input-chunk2", (2, 5), 4, (9, 2), "dense", True, "scalar", "mean", 2),
    ShardCase("coo-c11-6/5-mean-bias-pw-chunk4", (8,), 5, (6, 5), "coo", True, "label", "mean", 4),
    ShardCase("coo-c11-6/5-sum-bias-pw-chunk-default", (8,), 5, (6, 5), "coo", True, "label", "sum", None),
    ShardCase(
        "coo-c11-6/5-sum-scalar-pw-chunk3-grad2.5", (8,), 5, (6, 5), "coo", True, "scalar", "sum", 3, 2.5
    ),
    ShardCase("coo-c11-1/10-mean-pw-chunk3", (6,), 3, (1, 10), "coo", False, "label", "mean", 3),
    ShardCase("csr-c13-7/6-mean-bias-chunk5", (7,), 4, (7, 6), "csr", True, "none", "mean", 5),
    ShardCase(
        "coo-c300-160/140-mean-bias-pw-chunk64-5pos",
        (64,),
        16,
        (160, 140),
        "coo",
        True,
        "label",
        "mean",
        64,
        positives=5,
    ),
    ShardCase(
        "dense-c300-160/140-sum-bias-pw-chunk48", (64,), 16, (160, 140), "dense", True, "label", "sum", 48
    ),
    ShardCase("dense-c5-0/5-sum-bias-pw-empty-shard", (6,), 3, (0, 5), "dense", True, "label", "sum", 2),
    ShardCase("coo-c5-5/0-mean-bias-pw-empty-shard", (6,), 3, (5, 0), "coo", True, "label", "mean", 2),
    ShardCase(
        "dense-c11-6/5-mean-bias-pw-chunk4-float32",
        (8,),
        5,
        (6, 5),
        "dense",
        True,
        "label",
        "mean",
        4,
        dtype="float32",
    ),
)


# --- the worker (runs in each spawned process) ----------------------------------------------------------


def _problem(case: ShardCase) -> dict[str, torch.Tensor | None]:
    """The full (unsharded) problem, identical on every rank: the same seed gives the same tensors."""
    dtype = getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(sum(map(ord, case.name)))
    rows = 1
    for size in case.shape:
        rows *= size
    labels = sum(case.split)
    x = torch.randn(*case.shape, case.features, generator=generator, dtype=torch.float64)
    x[..., 0] *= 4  # some large logits: both tails of the softplus
    w = torch.randn(labels, case.features, generator=generator, dtype=torch.float64)
    b = torch.randn(labels, generator=generator, dtype=torch.float64) if case.bias else None
    if case.positives is not None:  # exactly `positives` targets of 1 per row
        columns = torch.rand(rows, labels, generator=generator).argsort(dim=1)[:, : case.positives]
        y = torch.zeros(rows, labels, dtype=torch.float64)
        y.scatter_(1, columns, 1.0)
    else:  # zeros (most), ones and soft targets; a sparse target also stores a few explicit zeros
        u = torch.rand(rows, labels, generator=generator, dtype=torch.float64)
        y = torch.where(
            u < 0.6, 0.0, torch.where(u < 0.8, 1.0, torch.rand(rows, labels, generator=generator))
        )
    y = y.reshape(*case.shape, labels)
    if case.pos_weight == "label":
        p = torch.rand(labels, generator=generator, dtype=torch.float64) * 3 + 0.25
    elif case.pos_weight == "scalar":
        p = torch.tensor([2.5], dtype=torch.float64)
    else:
        p = None
    cast = dict(x=x, w=w, b=b, y=y, p=p)
    return {k: None if v is None else v.to(dtype) for k, v in cast.items()}


def _sparse(dense: torch.Tensor, layout: str, explicit_zeros: bool) -> torch.Tensor:
    """``dense`` (N, k) as a COO or CSR tensor storing its non-zeros (plus, optionally, a few explicit 0s)."""
    mask = dense != 0
    if explicit_zeros:
        mask[::3, ::4] = True
    rows, columns = mask.nonzero(as_tuple=True)
    coo = torch.sparse_coo_tensor(torch.stack((rows, columns)), dense[rows, columns], dense.shape)
    return coo.coalesce() if layout == "coo" else coo.to_sparse_csr()


def _leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _relative(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item() if b.numel() else 0.0
    difference = (a - b).abs().max().item() if b.numel() else 0.0
    return difference / scale if scale > 0 else difference


def _run_case(case: ShardCase, rank: int, group) -> dict:
    from bcekit.torch import linear_binary_cross_entropy_with_logits as fused

    full = _problem(case)
    lo, hi = sum(case.split[:rank]), sum(case.split[: rank + 1])
    rows = full["x"][..., 0].numel()
    sparse = case.target != "dense"
    explicit_zeros = case.positives is None

    def target(columns: slice) -> torch.Tensor:
        y = full["y"][..., columns]  # a non-contiguous view for a dense shard
        return _sparse(y.reshape(rows, -1), case.target, explicit_zeros) if sparse else y

    def shard_pw() -> torch.Tensor | None:
        p = full["p"]
        return p[lo:hi] if case.pos_weight == "label" else p

    grad_output = torch.tensor(case.grad_output, dtype=full["x"].dtype)

    # this rank's shard, all-reduced across the group
    x, w, b = _leaves(full["x"], full["w"][lo:hi], None if full["b"] is None else full["b"][lo:hi])
    loss = fused(
        x, w, target(slice(lo, hi)), b, pos_weight=shard_pw(), reduction=case.reduction,
        chunk_size=case.chunk, process_group=group,
    )  # fmt: skip
    loss.backward(grad_output)
    sharded = {"loss": loss, "input": x.grad, "weight": w.grad, "bias": None if b is None else b.grad}

    # references: the whole problem in this process, no group
    references = {}
    xr, wr, br = _leaves(full["x"], full["w"], full["b"])
    ref = fused(
        xr, wr, target(slice(None)), br, pos_weight=full["p"], reduction=case.reduction, chunk_size=case.chunk
    )
    ref.backward(grad_output)
    references["bcekit"] = (ref, xr.grad, wr.grad, None if br is None else br.grad)
    xt, wt, bt = _leaves(full["x"], full["w"], full["b"])
    unfused = F.binary_cross_entropy_with_logits(
        F.linear(xt, wt, bt), full["y"], pos_weight=full["p"], reduction=case.reduction
    )
    unfused.backward(grad_output)
    references["torch"] = (unfused, xt.grad, wt.grad, None if bt is None else bt.grad)

    errors = {}
    for name, (r_loss, r_input, r_weight, r_bias) in references.items():
        errors[name] = {
            "loss": _relative(sharded["loss"], r_loss),
            "input": _relative(sharded["input"], r_input),
            "weight": _relative(sharded["weight"], r_weight[lo:hi]),
            "bias": _relative(sharded["bias"], None if r_bias is None else r_bias[lo:hi]),
        }
    return {
        "errors": errors,
        "loss_dtype": str(loss.dtype),
        "loss_shape": list(loss.shape),
        "loss_hex": loss.double().item().hex(),
        "input_grad_sha256": hashlib.sha256(x.grad.contiguous().numpy().tobytes()).hexdigest(),
        "shard_shapes": {k: None if v is None else list(v.shape) for k, v in sharded.items() if k != "loss"},
    }


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank: every case, its results (or the exception) written to ``out`` as JSON."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict = {"rank": rank, "cases": {}}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=_GROUP_TIMEOUT_S),
        )
        group = dist.new_group(list(range(world)))  # an explicit group, not only the default one
        for case in CASES:
            result["cases"][case.name] = _run_case(case, rank, group)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        result["error"] = traceback.format_exc()
        Path(out).write_text(json.dumps(result))
        raise
    Path(out).write_text(json.dumps(result))


# --- the parent -----------------------------------------------------------------------------------------


def _launch(folder: Path) -> list[dict]:
    """Two worker processes; their JSON results, or a test failure with their output."""
    return _ranks.launch(__file__, folder, WORLD, str(folder / "rendezvous"), _LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    if sys.platform == "win32":
        pytest.skip("the file:// rendezvous of this test is set up for POSIX paths")
    return _launch(tmp_path_factory.mktemp("linear_distributed"))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("reference", ["bcekit", "torch"])
def test_shard_matches_unsharded(ranks: list[dict], case: ShardCase, reference: str) -> None:
    """Each rank's loss, input gradient and shard of the weight/bias gradients equal the unsharded ones."""
    for rank, result in enumerate(ranks):
        errors = result["cases"][case.name]["errors"][reference]
        bad = {k: v for k, v in errors.items() if not v <= case.tolerance}
        assert not bad, f"rank {rank}, {case}: relative errors above {case.tolerance}: {bad}"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ranks_agree(ranks: list[dict], case: ShardCase) -> None:
    """The loss (its exact bits) and the input gradient are the same on every rank; shapes and dtype right."""
    results = [result["cases"][case.name] for result in ranks]
    assert len({r["loss_hex"] for r in results}) == 1, [r["loss_hex"] for r in results]
    assert len({r["input_grad_sha256"] for r in results}) == 1
    for rank, r in enumerate(results):
        assert r["loss_dtype"] == f"torch.{case.dtype}" and r["loss_shape"] == []
        labels = case.split[rank]
        assert r["shard_shapes"]["input"] == [*case.shape, case.features]
        assert r["shard_shapes"]["weight"] == [labels, case.features]
        assert r["shard_shapes"]["bias"] == ([labels] if case.bias else None)


def test_cases_cover_the_brief() -> None:
    """Uneven shards, chunks that do not divide a shard, every target layout, both reductions."""
    assert any(len(set(c.split)) > 1 for c in CASES)
    assert any(c.chunk is not None and any(s % c.chunk for s in c.split) for c in CASES)
    assert {c.target for c in CASES} == {"dense", "coo", "csr"}
    assert {c.reduction for c in CASES} == {"mean", "sum"}
