"""``python -m benchmarks.cpu --matrix``: the option matrix, run on a tiny shape with a tiny budget.

Its times mean nothing here. What is checked is that every row is measured and recorded, and that each
row's torch side computes the same loss and gradient as bcekit: the torch compositions for the options
torch lacks (label smoothing, ignore_index) are written by hand, and a wrong one would make the matrix
compare bcekit against a different loss. torch.compile is left out of the timed run (its first compile
takes tens of seconds on a 2-core machine); what it compiles is the torch eager function checked here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; it runs from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import cpu  # noqa: E402

SHAPE = (8, 4)
CASES = cpu.matrix_cases(*SHAPE)


def _loss_and_grad(function: cpu.Loss, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    loss = function(leaf, y)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("case", CASES, ids=[f"{c.loss}: {c.option}" for c in CASES])
def test_torch_side_computes_bcekits_loss(case: cpu.MatrixCase) -> None:
    assert case.x.shape == SHAPE and case.x.dtype == torch.float32
    assert set(case.y.unique().tolist()) <= {0.0, 1.0}
    ours, theirs = _loss_and_grad(case.bcekit, case.x, case.y), _loss_and_grad(case.eager, case.x, case.y)
    torch.testing.assert_close(ours, theirs)


def test_ignore_composition_ignores() -> None:
    """The matrix's targets hold no -1, where dividing by the mask's count and by the element count agree;
    with a third of them ignored, only the right composition still matches bcekit."""
    (case,) = [c for c in CASES if c.option.startswith("ignore_index")]
    y = case.y.clone()
    y.view(-1)[::3] = cpu.IGNORE
    ours, theirs = _loss_and_grad(case.bcekit, case.x, y), _loss_and_grad(case.eager, case.x, y)
    torch.testing.assert_close(ours, theirs)
    assert (theirs[1].view(-1)[::3] == 0).all()


def test_matrix_records_every_row() -> None:
    contenders = ("bcekit", "torch eager")
    rows = cpu.measure_matrix([SHAPE], budget=0.001, min_repeats=3, max_repeats=5, contenders=contenders)
    assert [(r["loss"], r["option"]) for r in rows] == list(cpu.MATRIX_ROWS)
    for row in rows:
        assert (row["shape"], row["n"], row["c"]) == ("8x4", *SHAPE)
        assert set(row["us"]) == set(contenders)
        for times in row["us"].values():
            assert 3 <= times["runs"] <= 5
            assert 0 < times["min"] <= times["median"]
        ratio = row["us"]["torch eager"]["min"] / row["us"]["bcekit"]["min"]
        assert row["eager_over_bcekit"]["min"] == pytest.approx(ratio)
        assert row["compile_over_bcekit"] is None
        if row["option"] == "plain":
            assert row["option_cost"] == {"min": 1.0, "median": 1.0}


def test_parse_shapes() -> None:
    assert cpu.parse_shapes(cpu.MATRIX_SHAPES) == [(64, 16), (256, 128), (1024, 1024)]
    assert cpu.parse_shapes("8x4") == [SHAPE]
