"""``torch.compile(fullgraph=True)`` over a pairwise covering array of the losses' arguments.

The full product of the factors below (loss, functional or module form, weight and pos_weight shapes,
reduction, legacy arguments, label smoothing, ignore_index, shape mode) holds 9 120 calls that can be made,
each a compilation of one to several seconds; a pairwise covering array, generated here deterministically
(:func:`covering_array`), holds every value of every factor and each of the 362 pairs of values that a call
can combine in 30 rows. Each row is

* traced by ``torch._dynamo.explain``: one graph, no graph break;
* compiled with ``fullgraph=True`` (``aot_eager``, which traces the backward too; inductor, the default
  backend, in the few rows :func:`_inductor_rows` picks) and run on one batch size (``static``), on two with
  ``dynamic=True`` (``dynamic``) or on two with ``dynamic=False`` (``resize``);
* compared with torch's eager loss: the value, the input gradient and the target gradient. torch has no
  ``label_smoothing`` or ``ignore_index``: there the reference is torch's loss (``reduction='none'``) on the
  transformed target ``y (1 - s) + s / 2``, with the ignored elements masked out of the loss and of the
  gradients (``torch.where``) and ``'mean'`` divided by the kept count;
* for two batch sizes, its compilations (Dynamo's graphs, ``counters["stats"]["unique_graphs"]``) counted
  and held to at most those of the reference compiled with the same ``dynamic`` setting.

The focal loss has a covering array of its own (it takes no weights), checked against torchvision's formula
written in torch ops; the fused linear loss has hand-listed cases (dense and sparse COO targets) against
``F.binary_cross_entropy_with_logits(F.linear(x, W, b), target.to_dense())``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import bcekit.torch as bce
from _focal import torchvision_focal

#: The rows of a problem and its rows after a resize; the label count
ROWS, RESIZED_ROWS, LABELS = 8, 12, 5
#: Weight shapes that depend on the batch size: a module's buffer of that shape serves one size only
BATCH_SHAPED = ("row", "full")

# --- the covering array -----------------------------------------------------------------------------------

#: Each factor's values, as names (NaN would not compare equal to itself in the pair bookkeeping)
FACTORS: dict[str, tuple[str, ...]] = {
    "loss": ("logits", "probabilities"),
    "form": ("functional", "module"),
    # 0-d, (C,), (N, 1), (N, C), (1, C)
    "weight": ("none", "scalar", "class", "row", "full", "row_vector"),
    "pos_weight": ("none", "class", "scalar", "full"),  # (C,), 0-d, (N, C)
    "reduction": ("mean", "sum", "none"),
    # the legacy arguments override ``reduction`` (passed beside them); 'elementwise_mean' replaces it
    "legacy": ("none", "size_average=False", "reduce=False", "elementwise_mean"),
    "label_smoothing": ("0", "0.2"),
    "ignore_index": ("none", "-1", "nan"),
    "mode": ("static", "dynamic", "resize"),
}


def allowed(row: dict[str, str]) -> bool:
    """Whether a (partial) row is a call that can be made; absent factors take a value that allows all."""
    if row.get("loss") == "probabilities" and row.get("pos_weight", "none") != "none":
        return False  # the probability loss has no pos_weight
    if row.get("legacy") == "elementwise_mean" and row.get("reduction", "mean") != "mean":
        return False  # it is the reduction argument itself
    return not (
        row.get("form") == "module"
        and row.get("mode", "static") != "static"
        and (row.get("weight") in BATCH_SHAPED or row.get("pos_weight") in BATCH_SHAPED)
    )


Pair = tuple[tuple[str, str], tuple[str, str]]


def _pairs(factors: dict[str, tuple[str, ...]], row: dict[str, str]) -> set[Pair]:
    names = [name for name in factors if name in row]
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}


def allowed_pairs(factors: dict[str, tuple[str, ...]], rule: Callable[[dict[str, str]], bool]) -> list[Pair]:
    return [
        ((a, va), (b, vb))
        for a, b in itertools.combinations(factors, 2)
        for va in factors[a]
        for vb in factors[b]
        if rule({a: va, b: vb})
    ]


def covering_array(
    factors: dict[str, tuple[str, ...]], rule: Callable[[dict[str, str]], bool]
) -> list[dict[str, str]]:
    """Rows holding every allowed pair of factor values at least once (greedy, deterministic): each row
    starts from the first pair not yet covered and gives every other factor, in order, the allowed value
    that covers the most new pairs with the values already chosen (the first such value on a tie)."""
    order = allowed_pairs(factors, rule)
    uncovered = set(order)
    rows = []
    while uncovered:
        (a, va), (b, vb) = next(pair for pair in order if pair in uncovered)
        row = {a: va, b: vb}
        for name in factors:
            if name in row:
                continue
            candidates = [value for value in factors[name] if rule({**row, name: value})]
            assert candidates, (row, name)
            row[name] = max(candidates, key=lambda v: len(_pairs(factors, {**row, name: v}) & uncovered))
        rows.append({name: row[name] for name in factors})
        uncovered -= _pairs(factors, row)
    return rows


@dataclass(frozen=True)
class Case:
    loss: str
    form: str
    weight: str
    pos_weight: str
    reduction: str
    legacy: str
    label_smoothing: str
    ignore_index: str
    mode: str
    backend: str = "aot_eager"

    @property
    def name(self) -> str:
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    @property
    def smoothing(self) -> float:
        return float(self.label_smoothing)

    @property
    def ignore(self) -> float | None:
        return None if self.ignore_index == "none" else float(self.ignore_index)

    @property
    def reduction_arguments(self) -> dict[str, object]:
        if self.legacy == "elementwise_mean":
            return {"reduction": "elementwise_mean"}
        legacy = {
            "none": {},
            "size_average=False": {"size_average": False},
            "reduce=False": {"reduce": False},
        }
        return {**legacy[self.legacy], "reduction": self.reduction}

    @property
    def effective_reduction(self) -> str:
        """torch's own mapping of the legacy arguments (the reference, not bcekit's)."""
        arguments = self.reduction_arguments
        if "size_average" in arguments or "reduce" in arguments:
            return torch.nn._reduction.legacy_get_string(
                arguments.get("size_average"), arguments.get("reduce"), emit_warning=False
            )
        return "mean" if self.reduction_arguments["reduction"] == "elementwise_mean" else self.reduction


def _inductor_rows(rows: list[dict[str, str]]) -> set[int]:
    """The rows compiled by inductor (each costs several seconds here): per loss the first static row with a
    weight, and the first dynamic logits row (symbolic shapes in generated code)."""
    picked = set()
    for loss in FACTORS["loss"]:
        static = (r["loss"] == loss and r["mode"] == "static" and r["weight"] != "none" for r in rows)
        picked.add(next(i for i, hit in enumerate(static) if hit))
    picked.add(next(i for i, r in enumerate(rows) if r["loss"] == "logits" and r["mode"] == "dynamic"))
    return picked


ROWS_OF_THE_MATRIX = covering_array(FACTORS, allowed)
_INDUCTOR = _inductor_rows(ROWS_OF_THE_MATRIX)
CASES = [
    Case(**row, backend="inductor" if i in _INDUCTOR else "aot_eager")
    for i, row in enumerate(ROWS_OF_THE_MATRIX)
]


def test_the_matrix_covers_every_value_and_every_allowed_pair() -> None:
    rows = [{f.name: getattr(case, f.name) for f in fields(Case) if f.name in FACTORS} for case in CASES]
    covered = set().union(*(_pairs(FACTORS, row) for row in rows))
    assert not set(allowed_pairs(FACTORS, allowed)) - covered
    assert all(allowed(row) for row in rows)
    for name, values in FACTORS.items():
        assert {row[name] for row in rows} == set(values), name
    assert {case.backend for case in CASES} == {"aot_eager", "inductor"}
    assert len(CASES) <= 40, "the compile budget of this file"


# --- problems and references ------------------------------------------------------------------------------


@dataclass
class Problem:
    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor | None
    pos_weight: torch.Tensor | None

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh copies of the input and the target, both requiring gradients."""
        return self.x.detach().clone().requires_grad_(), self.y.detach().clone().requires_grad_()


def _shaped(form: str, rows: int, generator: torch.Generator, low: float) -> torch.Tensor | None:
    shapes = {
        "scalar": (),
        "class": (LABELS,),
        "row": (rows, 1),
        "full": (rows, LABELS),
        "row_vector": (1, LABELS),
    }
    if form == "none":
        return None
    return torch.rand(shapes[form], generator=generator) * 2 + low


def _problem(case: Case, rows: int) -> Problem:
    """Inputs and targets (hard and soft, some equal to ``ignore_index``) seeded by the case and the size;
    the weights that do not depend on the size are the same for every size (a module holds them)."""
    generator = torch.Generator().manual_seed(sum(map(ord, case.name)) + rows)
    if case.loss == "logits":
        x = torch.randn(rows, LABELS, generator=generator) * 3
    else:
        x = torch.rand(rows, LABELS, generator=generator) * 0.9 + 0.05  # the loss is smooth there
    u = torch.rand(rows, LABELS, generator=generator)
    y = torch.where(u < 0.3, 0.0, torch.where(u < 0.6, 1.0, torch.rand(rows, LABELS, generator=generator)))
    if case.ignore is not None:
        y[torch.rand(rows, LABELS, generator=generator) < 0.25] = case.ignore
        y[0, 0] = case.ignore
    weights = []
    for form, low in ((case.weight, 0.1), (case.pos_weight, 0.25)):
        seed = rows if form in BATCH_SHAPED else 0
        weights.append(_shaped(form, rows, torch.Generator().manual_seed(seed + len(weights)), low))
    return Problem(x, y, *weights)


def _torch_loss(
    case: Case, reduction: str, x: torch.Tensor, y: torch.Tensor, weight, pos_weight
) -> torch.Tensor:
    """torch's loss; with label smoothing or ignore_index, torch's per-element loss on the smoothed target,
    the ignored elements masked out, reduced (``reduction``: :attr:`Case.effective_reduction`, resolved
    outside the compiled region) over the kept ones."""
    torch_fn = F.binary_cross_entropy_with_logits if case.loss == "logits" else F.binary_cross_entropy
    extra = {"pos_weight": pos_weight} if case.loss == "logits" else {}
    if case.ignore is None and case.smoothing == 0.0:
        return torch_fn(x, y, weight, **case.reduction_arguments, **extra)
    if case.ignore is None:
        kept = torch.ones_like(y, dtype=torch.bool)
    else:
        kept = ~torch.isnan(y) if math.isnan(case.ignore) else y != case.ignore
    target = torch.where(kept, y, 0.0) * (1 - case.smoothing) + case.smoothing / 2
    per_element = torch.where(kept, torch_fn(x, target, weight, reduction="none", **extra), 0.0)
    if reduction == "none":
        return per_element
    return per_element.sum() / kept.sum() if reduction == "mean" else per_element.sum()


def _bcekit_callable(case: Case, first: Problem) -> Callable[..., torch.Tensor]:
    """bcekit's loss as the case calls it: a function of (x, y, weight, pos_weight), or a module of (x, y)
    holding the first problem's weights."""
    options = {"label_smoothing": case.smoothing, "ignore_index": case.ignore}
    if case.form == "module":
        if case.loss == "logits":
            return bce.BCEWithLogitsLoss(
                first.weight, pos_weight=first.pos_weight, **case.reduction_arguments, **options
            )
        return bce.BCELoss(first.weight, **case.reduction_arguments, **options)
    if case.loss == "logits":
        return lambda x, y, w, p: bce.binary_cross_entropy_with_logits(
            x, y, w, pos_weight=p, **case.reduction_arguments, **options
        )
    return lambda x, y, w, p: bce.binary_cross_entropy(x, y, w, **case.reduction_arguments, **options)


def _torch_callable(case: Case, first: Problem) -> Callable[..., torch.Tensor]:
    """The reference with the same calling convention as :func:`_bcekit_callable`."""
    reduction = case.effective_reduction
    if case.form == "module":
        return lambda x, y: _torch_loss(case, reduction, x, y, first.weight, first.pos_weight)
    return lambda x, y, w, p: _torch_loss(case, reduction, x, y, w, p)


def _arguments(case_form: str, problem: Problem, x: torch.Tensor, y: torch.Tensor) -> tuple:
    return (x, y) if case_form == "module" else (x, y, problem.weight, problem.pos_weight)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _assert_one_graph(fn: Callable[..., torch.Tensor], *arguments) -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*arguments)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _assert_same_loss_and_gradients(
    compiled: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    arguments: Callable[[torch.Tensor, torch.Tensor], tuple],
    leaves: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    seed: int,
) -> None:
    """The compiled loss, its input gradient and its target gradient equal the reference's, backpropagating
    a random ``grad_output`` (so that each element's gradient is seen)."""
    (x, y), (x_ref, y_ref) = leaves(), leaves()
    loss, expected = compiled(*arguments(x, y)), reference(*arguments(x_ref, y_ref))
    torch.testing.assert_close(loss, expected)
    grad_output = torch.rand(expected.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    ours = torch.autograd.grad(loss, (x, y), grad_output)
    theirs = torch.autograd.grad(expected, (x_ref, y_ref), grad_output)
    torch.testing.assert_close(ours[0], theirs[0], msg=lambda m: f"input gradient: {m}")
    torch.testing.assert_close(ours[1], theirs[1], msg=lambda m: f"target gradient: {m}")


def _check_compiled(case_form: str, mode: str, backend: str, ours, theirs, problems: list[Problem]) -> None:
    """One graph without breaks; torch's values and gradients on every problem; no more compilations than
    the reference compiled the same way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warnings for the legacy arguments
        first = problems[0]
        _assert_one_graph(ours, *_arguments(case_form, first, *first.leaves()))
        dynamic = mode == "dynamic"
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(ours, fullgraph=True, backend=backend, dynamic=dynamic)
        for index, problem in enumerate(problems):
            _assert_same_loss_and_gradients(
                compiled,
                theirs,
                lambda x, y, problem=problem: _arguments(case_form, problem, x, y),
                problem.leaves,
                seed=index,
            )
        graphs = _graphs()
        reference_arguments = [_arguments(case_form, p, *p.leaves()) for p in problems]
        _assert_no_more_graphs_than_torch(graphs, theirs, dynamic, reference_arguments)


def _assert_no_more_graphs_than_torch(
    graphs: int, reference: Callable[..., torch.Tensor], dynamic: bool, argument_sets: list[tuple]
) -> None:
    """One graph for one batch size; for several, no more than the reference compiled with the same
    ``dynamic`` setting (by the eager backend: the guards, hence the recompilations, do not depend on it)."""
    if len(argument_sets) == 1:
        assert graphs == 1
        return
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(reference, fullgraph=True, backend="eager", dynamic=dynamic)
    for arguments in argument_sets:
        compiled(*arguments)
    assert 1 <= graphs <= _graphs(), f"bcekit compiled {graphs} graphs, torch {_graphs()}"


def _sizes(mode: str) -> tuple[int, ...]:
    return (ROWS,) if mode == "static" else (ROWS, RESIZED_ROWS)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_compiled_loss_matches_torch(case: Case) -> None:
    problems = [_problem(case, rows) for rows in _sizes(case.mode)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a module built with legacy arguments warns, as torch's does
        ours = _bcekit_callable(case, problems[0])
    _check_compiled(case.form, case.mode, case.backend, ours, _torch_callable(case, problems[0]), problems)


# --- the focal loss ---------------------------------------------------------------------------------------

FOCAL_FACTORS: dict[str, tuple[str, ...]] = {
    "form": ("functional", "module"),
    "reduction": ("mean", "sum", "none"),
    "alpha_gamma": ("0.25,2", "-1,0", "0.6,1.5"),  # torchvision's default; plain BCE; a fractional gamma
    "mode": ("static", "dynamic", "resize"),
}
FOCAL_ROWS = covering_array(FOCAL_FACTORS, lambda row: True)


def _focal_problem(row: dict[str, str], rows: int) -> Problem:
    generator = torch.Generator().manual_seed(sum(map(ord, str(row))) + rows)
    x = torch.randn(rows, LABELS, generator=generator) * 3
    u = torch.rand(rows, LABELS, generator=generator)
    y = torch.where(u < 0.4, 0.0, torch.where(u < 0.8, 1.0, torch.rand(rows, LABELS, generator=generator)))
    return Problem(x, y, None, None)


@pytest.mark.parametrize(
    "row", FOCAL_ROWS, ids=lambda row: "-".join(f"{name}={value}" for name, value in row.items())
)
def test_compiled_focal_loss_matches_torchvisions_formula(row: dict[str, str]) -> None:
    alpha, gamma = map(float, row["alpha_gamma"].split(","))
    reduction = row["reduction"]

    def functional(x, y, *weights):
        return bce.sigmoid_focal_loss(x, y, alpha, gamma, reduction)

    ours = bce.SigmoidFocalLoss(alpha, gamma, reduction) if row["form"] == "module" else functional

    def theirs(x, y, *weights):
        return torchvision_focal(x, y, alpha, gamma, reduction)

    backend = "inductor" if row == next(r for r in FOCAL_ROWS if r["mode"] == "dynamic") else "aot_eager"
    problems = [_focal_problem(row, rows) for rows in _sizes(row["mode"])]
    _check_compiled(row["form"], row["mode"], backend, ours, theirs, problems)


def test_the_focal_matrix_covers_every_pair() -> None:
    covered = set().union(*(_pairs(FOCAL_FACTORS, row) for row in FOCAL_ROWS))
    assert set(allowed_pairs(FOCAL_FACTORS, lambda row: True)) <= covered


# --- the fused linear loss --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCase:
    target: str  # "dense" or "coo"
    bias: bool
    pos_weight: str  # "none", "class" (C,), "one" (1,), "scalar" 0-d
    reduction: str
    form: str
    mode: str
    backend: str = "aot_eager"

    @property
    def name(self) -> str:
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


#: Hand-listed: every value of each factor, both target layouts with each reduction, form and mode
LINEAR_CASES = (
    LinearCase("dense", True, "class", "mean", "functional", "static"),
    LinearCase("dense", False, "none", "sum", "module", "dynamic"),
    LinearCase("dense", True, "one", "sum", "functional", "resize", "inductor"),
    LinearCase("coo", True, "scalar", "sum", "functional", "dynamic"),
    LinearCase("coo", False, "class", "mean", "module", "static"),
    LinearCase("coo", True, "none", "mean", "functional", "resize"),
)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda case: case.name)
def test_fused_linear_loss_compiles_whole(case: LinearCase) -> None:
    """The fused linear loss under fullgraph: one graph, and torch's unfused loss on the dense target, with
    its input, weight and bias gradients, for each batch size; no more compilations than torch's. A sparse
    target is refused under fullgraph as torch's own loss is, and gives torch's values without it."""
    features = 4
    generator = torch.Generator().manual_seed(sum(map(ord, case.name)))
    weight = torch.randn(LABELS, features, generator=generator).requires_grad_()
    bias = torch.randn(LABELS, generator=generator).requires_grad_() if case.bias else None
    shape = {"none": None, "class": (LABELS,), "one": (1,), "scalar": ()}[case.pos_weight]
    pos_weight = None if shape is None else torch.rand(shape, generator=generator) * 2 + 0.25
    head = bce.LinearBCEWithLogitsLoss(
        features, LABELS, case.bias, pos_weight=pos_weight, reduction=case.reduction
    )
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)

    def functional(x, y, weight, bias=None):
        return bce.linear_binary_cross_entropy_with_logits(
            x, weight, y, bias, pos_weight=pos_weight, reduction=case.reduction
        )

    ours = head if case.form == "module" else functional
    parameters = (
        list(head.parameters()) if case.form == "module" else [t for t in (weight, bias) if t is not None]
    )

    def arguments(x, y):
        return (x, y) if case.form == "module" else (x, y, *parameters)

    def reference(x, dense):
        logits = F.linear(x, parameters[0], parameters[1] if case.bias else None)
        return F.binary_cross_entropy_with_logits(
            logits, dense, pos_weight=pos_weight, reduction=case.reduction
        )

    problems = []
    for rows in _sizes(case.mode):
        x = torch.randn(rows, features, generator=generator)
        dense = (torch.rand(rows, LABELS, generator=generator) < 0.3).float()
        dense[0] = torch.rand(LABELS, generator=generator)  # soft targets too
        problems.append((x, dense.to_sparse_coo() if case.target == "coo" else dense, dense))
    x, y, _ = problems[0]
    fullgraph = case.target == "dense"
    if not fullgraph:
        # Dynamo wraps no sparse tensor, not even for torch's own unfused loss (y.to_dense() inside):
        # under fullgraph both are refused alike; without it both run eagerly, and must agree
        def theirs_sparse(x, y, *_):
            return reference(x, y.to_dense())

        for fn in (ours, theirs_sparse):
            torch._dynamo.reset()
            with pytest.raises(torch._dynamo.exc.Unsupported, match="sparse"):
                torch.compile(fn, fullgraph=True, backend=case.backend)(*arguments(x, y))
    else:
        _assert_one_graph(ours, *arguments(x.clone().requires_grad_(), y))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(ours, fullgraph=fullgraph, backend=case.backend, dynamic=case.mode == "dynamic")
    for x, y, dense in problems:
        ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss, expected = compiled(*arguments(ours_x, y)), reference(theirs_x, dense)
        torch.testing.assert_close(loss, expected)
        mine = torch.autograd.grad(loss * 1.5, (ours_x, *parameters))
        theirs = torch.autograd.grad(expected * 1.5, (theirs_x, *parameters))
        for name, a, b in zip(("input", "weight", "bias"), mine, theirs, strict=False):
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name} gradient: {m}")
    if fullgraph:
        graphs = _graphs()
        reference_arguments = [(x, dense) for x, _, dense in problems]
        _assert_no_more_graphs_than_torch(graphs, reference, case.mode == "dynamic", reference_arguments)
