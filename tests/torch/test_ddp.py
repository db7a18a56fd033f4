"""``DistributedDataParallel`` training with bcekit's losses equals the same training with torch's.

One launch serves every test: the module-scoped fixture starts two fresh interpreters (ranks 0 and 1, gloo,
CPU, one torch thread each), as ``test_linear_distributed.py`` starts its workers. They meet through a file
(``file://`` in a temporary folder), not a TCP store: a TCP store lives in rank 0's process, and a rank 0
that exits first can abort the other rank's teardown of the group. For every configuration of ``RUNS`` each
rank builds the same float64 model from a seed, wraps it in DDP and trains it a few SGD steps on its own
shard of a seeded global batch, once with bcekit's loss and once with torch's; it writes the losses it saw
and the parameters it ends with to a JSON file, and the parent compares them. A worker that raises records
the traceback for its configuration and goes on.

The workers never wait for ever: the group's collectives time out after ``_GROUP_TIMEOUT_S``, the parent
kills both processes after ``_LAUNCH_TIMEOUT_S`` and shows what they printed.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch

import _ranks

WORLD = 2
STEPS = 4
ROWS_PER_RANK, FEATURES, HIDDEN, LABELS = 6, 5, 7, 4
_GROUP_TIMEOUT_S = 30
_LAUNCH_TIMEOUT_S = 60
#: float64 throughout: the two runs differ by rounding only (bcekit's float64 losses are the more exact)
TOLERANCE = 1e-10

#: The configurations: bcekit's loss against torch's, each with the model it trains
RUNS = ("logits-pos_weight", "probabilities-weight", "fused-linear-dense", "fused-linear-coo")


# --- the worker (runs in each spawned process) ----------------------------------------------------------


class _Classifier(torch.nn.Module):
    """A trunk and a linear head whose output goes to ``loss`` (logits, or their sigmoid)."""

    def __init__(self, loss: torch.nn.Module, squash: bool) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh())
        self.head = torch.nn.Linear(HIDDEN, LABELS)
        self.loss, self.squash = loss, squash

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.trunk(x))
        return self.loss(torch.sigmoid(logits) if self.squash else logits, y)


class _FusedClassifier(torch.nn.Module):
    """The same trunk, with bcekit's fused head (``LinearBCEWithLogitsLoss``), initialised from a
    :class:`_Classifier`'s parameters."""

    def __init__(self, unfused: _Classifier, pos_weight: torch.Tensor) -> None:
        from bcekit.torch import LinearBCEWithLogitsLoss

        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh()).double()
        self.head = LinearBCEWithLogitsLoss(HIDDEN, LABELS, pos_weight=pos_weight, dtype=torch.float64)
        self.trunk.load_state_dict(unfused.trunk.state_dict())
        with torch.no_grad():
            self.head.weight.copy_(unfused.head.weight)
            self.head.bias.copy_(unfused.head.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x), y)


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of every step's global batch (the same global batches on every rank)."""
    generator = torch.Generator().manual_seed(11)
    rows = WORLD * ROWS_PER_RANK
    x = torch.randn(STEPS, rows, FEATURES, generator=generator, dtype=torch.float64)
    u = torch.rand(STEPS, rows, LABELS, generator=generator, dtype=torch.float64)
    y = torch.where(u < 0.5, 0.0, torch.where(u < 0.8, 1.0, u))  # hard and soft targets
    shard = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return x[:, shard], y[:, shard]


def _models(run: str) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """(bcekit's model, torch's model, whether the target goes in as a sparse COO tensor), same parameters."""
    import bcekit.torch as bce

    generator = torch.Generator().manual_seed(5)
    pos_weight = torch.rand(LABELS, generator=generator, dtype=torch.float64) * 2 + 0.5
    weight = torch.rand(LABELS, generator=generator, dtype=torch.float64) + 0.5
    if run == "logits-pos_weight":
        losses, squash = (
            (bce.BCEWithLogitsLoss(pos_weight=pos_weight), torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)),
            False,
        )
    elif run == "probabilities-weight":
        losses, squash = (bce.BCELoss(weight=weight), torch.nn.BCELoss(weight=weight)), True
    else:
        losses, squash = (torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight),) * 2, False
    models = []
    for loss in losses:
        torch.manual_seed(3)  # the same initial parameters for both
        models.append(_Classifier(loss, squash).double())
    if run.startswith("fused-linear"):
        models[0] = _FusedClassifier(models[1], pos_weight)
    return models[0], models[1], run == "fused-linear-coo"


def _train(model: torch.nn.Module, rank: int, sparse: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    xs, ys = _data(rank)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        optimizer.zero_grad()
        loss = ddp(x, y.to_sparse_coo() if sparse else y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # one name per parameter: the fused head's weight and bias stand where nn.Linear's do
    return {"losses": losses, "parameters": {n: p.detach().tolist() for n, p in model.named_parameters()}}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank: every run, its results (or the exception) written to ``out`` as JSON."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict = {"rank": rank, "runs": {}}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=_GROUP_TIMEOUT_S),
        )
        for run in RUNS:
            try:
                ours, theirs, sparse = _models(run)
                initial = {n: p.detach().tolist() for n, p in theirs.named_parameters()}
                result["runs"][run] = {
                    "bcekit": _train(ours, rank, sparse),
                    "torch": _train(theirs, rank, False),
                    "initial": initial,
                }
            except Exception:
                result["runs"][run] = {"error": traceback.format_exc()}
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
    return _launch(tmp_path_factory.mktemp("ddp"))


def _run(ranks: list[dict], run: str, rank: int) -> dict:
    result = ranks[rank]["runs"][run]
    assert "error" not in result, f"rank {rank}, {run}:\n{result['error']}"
    return result


def _max_difference(a, b) -> float:
    return (torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("run", RUNS)
def test_ddp_training_with_bcekit_matches_torch(ranks: list[dict], run: str) -> None:
    """The same losses at every step and the same parameters after the last, on every rank."""
    for rank in range(WORLD):
        result = _run(ranks, run, rank)
        ours, theirs = result["bcekit"], result["torch"]
        assert _max_difference(ours["losses"], theirs["losses"]) <= TOLERANCE, (
            rank,
            ours["losses"],
            theirs["losses"],
        )
        assert ours["parameters"].keys() == theirs["parameters"].keys()
        for name, value in theirs["parameters"].items():
            difference = _max_difference(ours["parameters"][name], value)
            assert difference <= TOLERANCE, f"rank {rank}, {run}, {name}: {difference}"


@pytest.mark.parametrize("run", RUNS)
def test_ddp_keeps_the_replicas_equal_and_training_moves_them(ranks: list[dict], run: str) -> None:
    """The ranks saw different data (different losses) but hold the same parameters, away from the start."""
    results = [_run(ranks, run, rank) for rank in range(WORLD)]
    for name in results[0]["initial"]:
        assert _max_difference(results[0]["bcekit"]["parameters"][name], results[0]["initial"][name]) > 1e-3
        for result in results[1:]:
            assert result["bcekit"]["parameters"][name] == results[0]["bcekit"]["parameters"][name]
    assert results[0]["bcekit"]["losses"] != results[1]["bcekit"]["losses"]
