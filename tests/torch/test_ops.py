"""The torch.library operators: registration checks, gradcheck / gradgradcheck, torch.compile, meta."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import bcekit.torch as bce

OPS = torch.ops.bcekit


def _double(*shape, low=0.0, high=1.0):
    return (torch.rand(*shape, dtype=torch.float64) * (high - low) + low).requires_grad_()


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("label_smoothing", "ignore_index"), [(0.0, None), (0.2, 0.5)])
def test_opcheck(reduction, weighted, dtype, label_smoothing, ignore_index) -> None:
    # float64 runs the extended-precision path on the CPU (bcekit._numpy_core); the others run torch ops
    weight = torch.rand(3, dtype=dtype) if weighted else None
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    y = torch.rand(4, 3, dtype=dtype)
    y[0, 0] = 0.5  # an ignored element when ignore_index is 0.5
    y.requires_grad_()
    options = (label_smoothing, ignore_index)
    pos_weight = torch.rand(3, dtype=dtype) + 0.5 if weighted else None
    torch.library.opcheck(
        OPS.binary_cross_entropy_with_logits.default, (x, y, weight, pos_weight, reduction, *options)
    )
    p = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    torch.library.opcheck(OPS.binary_cross_entropy.default, (p, y, weight, reduction, *options))
    torch.library.opcheck(OPS.sigmoid_focal_loss.default, (x, y, 0.25, 2.0, reduction))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weight_shape", [None, (), (3,), (4, 1), (4, 3)])
@pytest.mark.parametrize("pos_weight_shape", [None, (), (3,), (4, 3)])
def test_logits_gradcheck_and_gradgradcheck(reduction, weight_shape, pos_weight_shape) -> None:
    x = _double(4, 3, low=-6, high=6)
    y = _double(4, 3)
    w = None if weight_shape is None else torch.rand(weight_shape, dtype=torch.float64) + 0.1
    p = None if pos_weight_shape is None else torch.rand(pos_weight_shape, dtype=torch.float64) + 0.1

    def loss(x, y):
        return bce.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p)

    assert torch.autograd.gradcheck(loss, (x, y))
    assert torch.autograd.gradgradcheck(loss, (x, y))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weight_shape", [None, (), (3,), (4, 1), (4, 3)])
def test_probability_gradcheck_and_gradgradcheck(reduction, weight_shape) -> None:
    x = _double(4, 3, low=0.05, high=0.95)  # away from 0 and 1, where the loss is smooth
    y = _double(4, 3)
    w = None if weight_shape is None else torch.rand(weight_shape, dtype=torch.float64) + 0.1

    def loss(x, y):
        return bce.binary_cross_entropy(x, y, w, reduction=reduction)

    assert torch.autograd.gradcheck(loss, (x, y))
    assert torch.autograd.gradgradcheck(loss, (x, y))


def test_double_backward_matches_torch() -> None:
    """Second derivatives agree with torch's own double-backward formulas."""
    x = _double(5, low=0.05, high=0.95)
    y = _double(5)
    for ours_fn, torch_fn, inputs in [
        (bce.binary_cross_entropy, F.binary_cross_entropy, (x, y)),
        (bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x * 8 - 4, y)),
    ]:
        hessians = []
        for fn in (ours_fn, torch_fn):
            (g,) = torch.autograd.grad(fn(*inputs, reduction="sum"), x, create_graph=True)
            hessians.append(torch.autograd.grad(g.sum(), (x, y), retain_graph=True))
        for mine, theirs in zip(*hessians, strict=True):
            torch.testing.assert_close(mine, theirs)


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)
        self.logits_loss = bce.BCEWithLogitsLoss(weight=torch.rand(3), pos_weight=torch.rand(3) + 0.5)
        self.probability_loss = bce.BCELoss(weight=torch.rand(3) + 0.5, reduction="sum")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        return self.logits_loss(logits, y) + self.probability_loss(torch.sigmoid(logits), y)


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = _Model()
    x, y = torch.randn(8, 6), torch.rand(8, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x, y)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for mine, theirs in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_torch_compile_inductor_has_no_graph_breaks() -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_Model())(torch.randn(8, 6), torch.rand(8, 3))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_meta_tensors_give_shapes_and_dtypes() -> None:
    x = torch.empty(5, 4, device="meta", dtype=torch.bfloat16)
    assert bce.binary_cross_entropy_with_logits(x, x, reduction="none").shape == (5, 4)
    out = bce.binary_cross_entropy(x, x)
    assert out.shape == () and out.dtype == torch.bfloat16 and out.device.type == "meta"


#: (bcekit's function, torch's) per loss name, for the tests that run the same call through both
FUNCTIONS = {
    "logits": (bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    "probabilities": (bce.binary_cross_entropy, F.binary_cross_entropy),
}


@pytest.mark.parametrize(
    "legacy", [{"size_average": False}, {"reduce": False}, {"reduction": "elementwise_mean"}]
)
@pytest.mark.parametrize("loss", ["logits", "probabilities"])
def test_legacy_arguments_compile_with_torchs_warning(legacy, loss) -> None:
    """The legacy reduction arguments trace under fullgraph, as torch's do: the same values as torch's
    compiled loss, and the same deprecation warning, raised while tracing."""
    torch._dynamo.reset()
    x, y = torch.rand(4, 3), torch.rand(4, 3)
    ours_fn, torch_fn = FUNCTIONS[loss]
    results, messages = [], []
    for fn in (torch_fn, ours_fn):
        with pytest.warns(UserWarning) as record:
            results.append(torch.compile(lambda x, y, fn=fn: fn(x, y, **legacy), fullgraph=True)(x, y))
        messages.append({str(w.message) for w in record if "reduction=" in str(w.message)})
    torch.testing.assert_close(results[1], results[0])
    assert messages[1] == messages[0] and messages[0]


@pytest.mark.parametrize("loss", ["logits", "probabilities"])
@pytest.mark.parametrize("transform", ["grad", "vmap(grad)"])
@pytest.mark.parametrize("layer", [False, True], ids=["loss", "layer-then-loss"])
def test_compiled_torch_func_transforms_match_torch(loss, transform, layer) -> None:
    """torch.compile(torch.func.grad(loss), fullgraph=True) and of vmap(grad(loss)) (per-sample
    gradients), of the loss alone and of a layer followed by the loss, give torch's."""
    torch._dynamo.reset()
    x, y, w = torch.randn(4, 3), torch.rand(4, 3), torch.rand(3) + 0.5
    scale = torch.linspace(-2.0, 2.0, 3)
    squash = loss == "probabilities"

    def make(fn):
        def f(x, y):
            z = x * scale + 0.5 if layer else x
            return fn(torch.sigmoid(z) if squash else z, y, weight=w)

        return f

    ours_fn, torch_fn = FUNCTIONS[loss]

    def transformed(fn):
        gradient = torch.func.grad(make(fn))
        return gradient if transform == "grad" else torch.func.vmap(gradient)

    compiled = torch.compile(transformed(ours_fn), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), transformed(torch_fn)(x, y))


@pytest.mark.parametrize(
    ("loss", "meta"),
    [("logits", name) for name in ("input", "target", "weight", "pos_weight")]
    + [("probabilities", name) for name in ("input", "target", "weight")],
)
def test_a_meta_tensor_beside_cpu_ones_is_refused_as_torch_refuses_it(loss, meta) -> None:
    ours_fn, torch_fn = FUNCTIONS[loss]
    arguments = {"input": torch.rand(4, 3), "target": torch.rand(4, 3), "weight": torch.rand(3)}
    if loss == "logits":
        arguments["pos_weight"] = torch.rand(3)
    arguments[meta] = arguments[meta].to("meta")
    for fn in (torch_fn, ours_fn):
        with pytest.raises(RuntimeError, match="is not on the expected device"):
            fn(**arguments)


def _loss_modules():
    weight, pos_weight = torch.rand(3) + 0.5, torch.rand(3) + 0.5
    return [
        pytest.param(bce.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss(), False, id="logits"),
        pytest.param(
            bce.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight),
            torch.nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight),
            False,
            id="logits-weights",
        ),
        pytest.param(bce.BCELoss(), torch.nn.BCELoss(), True, id="probabilities"),
        pytest.param(
            bce.BCELoss(weight=weight), torch.nn.BCELoss(weight=weight), True, id="probabilities-weight"
        ),
    ]


class _Holding(torch.nn.Module):
    """A model whose output is its loss module's, as a training wrapper would be."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x, y)


def _examples(probabilities: bool):
    torch.manual_seed(3)
    pairs = [(torch.randn(4, 3), torch.rand(4, 3)) for _ in range(2)]
    return [(torch.sigmoid(x) if probabilities else x, y) for x, y in pairs]


@pytest.mark.parametrize(("ours", "theirs", "probabilities"), _loss_modules())
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_records_the_loss_not_its_value(ours, theirs, probabilities, grad) -> None:
    """A trace taken on one example gives torch's loss (and input gradient) on another: the traced graph
    holds the bcekit operator, not the example's number."""
    (x1, y1), (x2, y2) = _examples(probabilities)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(_Holding(ours), (x1, y1))
    x_ours, x_theirs = x2.clone().requires_grad_(), x2.clone().requires_grad_()
    loss, expected = traced(x_ours, y2), theirs(x_theirs, y2)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)


@pytest.mark.parametrize(("ours", "theirs", "probabilities"), _loss_modules())
def test_fx_symbolic_trace_of_a_model_calling_the_loss(ours, theirs, probabilities) -> None:
    (x1, y1), (x2, y2) = _examples(probabilities)
    graph_module = torch.fx.symbolic_trace(_Holding(ours))
    targets = {node.target for node in graph_module.graph.nodes if node.op == "call_function"}
    assert targets & {bce.binary_cross_entropy, bce.binary_cross_entropy_with_logits}
    for x, y in ((x1, y1), (x2, y2)):
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss, expected = graph_module(x_ours, y), theirs(x_theirs, y)
        torch.testing.assert_close(loss, expected)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad)


def test_the_focal_loss_under_fx_and_trace() -> None:
    (x1, y1), (x2, y2) = _examples(False)
    focal = bce.SigmoidFocalLoss(reduction="mean")
    with torch.no_grad():
        traced = torch.jit.trace(_Holding(focal), (x1, y1))
    graph_module = torch.fx.symbolic_trace(_Holding(focal))
    expected = bce.sigmoid_focal_loss(x2, y2, reduction="mean")
    torch.testing.assert_close(traced(x2, y2), expected)
    torch.testing.assert_close(graph_module(x2, y2), expected)


def _onnx_cases():
    """(bcekit module, reference, probabilities): torch's modules, and for what torch lacks (target
    options, the focal loss) bcekit's own eager call of the same module."""
    cases = _loss_modules()
    for reduction in ("none", "sum"):
        ours = bce.BCEWithLogitsLoss(pos_weight=torch.rand(3) + 0.5, reduction=reduction)
        theirs = torch.nn.BCEWithLogitsLoss(pos_weight=ours.pos_weight, reduction=reduction)
        cases.append(pytest.param(ours, theirs, False, id=f"logits-{reduction}"))
    for module, probabilities in (
        (bce.BCEWithLogitsLoss(label_smoothing=0.2, ignore_index=0.0), False),
        (bce.BCELoss(label_smoothing=0.1, ignore_index=1.0), True),
        (bce.SigmoidFocalLoss(reduction="mean"), False),
    ):
        cases.append(pytest.param(module, module, probabilities, id=type(module).__name__ + "-options"))
    return cases


def _onnx_examples(probabilities: bool):
    """An example to export with, and inputs of other batch sizes to run the exported graph on (some
    targets exactly 0 or 1, which ``ignore_index`` matches)."""
    torch.manual_seed(5)
    examples = []
    for rows in (4, 7, 1):
        x, y = torch.randn(rows, 3) * 4, torch.rand(rows, 3)
        y[0, 0], y[-1, -1] = 0.0, 1.0
        examples.append((torch.sigmoid(x) if probabilities else x, y))
    return examples


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize(("ours", "reference", "probabilities"), _onnx_cases())
def test_onnx_export_writes_the_loss_in_standard_operators(ours, reference, probabilities, dynamo, tmp_path):
    """An exported model returning the loss, run by ONNX Runtime on batches of other sizes than the
    example's, gives the reference's loss: the graph holds the loss's formulas in ONNX operators, not
    the example's value (and no ``bcekit::`` operator, which ONNX would not know)."""
    onnx = pytest.importorskip("onnx")
    runtime = pytest.importorskip("onnxruntime")
    (x1, y1), *others = _onnx_examples(probabilities)
    path = str(tmp_path / "loss.onnx")
    names = {"input_names": ["x", "y"], "output_names": ["loss"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            rows = torch.export.Dim("rows")
            shapes = ({0: rows}, {0: rows})
            torch.onnx.export(_Holding(ours), (x1, y1), path, dynamo=True, dynamic_shapes=shapes, **names)
        else:
            axes = {"x": {0: "rows"}, "y": {0: "rows"}, "loss": {0: "rows"}}
            torch.onnx.export(_Holding(ours), (x1, y1), path, dynamo=False, dynamic_axes=axes, **names)
    graph = onnx.load(path).graph
    assert len(graph.node) > 1 and all(node.domain in ("", "ai.onnx") for node in graph.node)
    session = runtime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x, y in others:
        (loss,) = session.run(None, {"x": x.numpy(), "y": y.numpy()})
        torch.testing.assert_close(torch.from_numpy(loss), reference(x, y), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_of_the_fused_linear_loss_is_the_unfused_loss(dynamo, tmp_path) -> None:
    """The fused linear loss exports as the unfused one (``F.linear`` then the logits loss in standard
    operators), which ONNX Runtime runs to torch's unfused loss on batches of other sizes."""
    runtime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(6)
    head = bce.LinearBCEWithLogitsLoss(4, 30, pos_weight=torch.rand(30) + 0.5, chunk_size=7)
    path, names = str(tmp_path / "head.onnx"), {"input_names": ["x", "y"]}
    x, y = torch.randn(6, 4), torch.rand(6, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            rows = torch.export.Dim("rows")
            shapes = ({0: rows}, {0: rows})
            torch.onnx.export(head, (x, y), path, dynamo=True, dynamic_shapes=shapes, **names)
        else:
            axes = {"x": {0: "rows"}, "y": {0: "rows"}}
            torch.onnx.export(head, (x, y), path, dynamo=False, dynamic_axes=axes, **names)
    session = runtime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for rows in (9, 2):
        x, y = torch.randn(rows, 4), torch.rand(rows, 30)
        (loss,) = session.run(None, {"x": x.numpy(), "y": y.numpy()})
        expected = F.binary_cross_entropy_with_logits(
            F.linear(x, head.weight, head.bias), y, pos_weight=head.pos_weight
        )
        torch.testing.assert_close(torch.from_numpy(loss), expected.detach(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"weight": True}, {"size_average": False}, {"reduce": False}, {"reduction": "elementwise_mean"}],
)
@pytest.mark.parametrize("loss", ["logits", "probabilities"])
def test_strict_export_gives_torchs_loss_on_new_inputs(loss, options) -> None:
    """``torch.export.export(strict=True)`` of a model calling the loss (weights and the legacy arguments
    included) runs the exported program to torch's values on inputs other than the example's."""
    weight = torch.rand(3) + 0.5
    arguments = {k: (weight if k == "weight" else v) for k, v in options.items()}
    squash = loss == "probabilities"
    ours_fn, torch_fn = FUNCTIONS[loss]

    class Model(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return ours_fn(torch.sigmoid(x) if squash else x, y, **arguments)

    (x1, y1), (x2, y2) = _examples(False)
    legacy = "weight" not in options  # torch's deprecation warning, raised while tracing
    with pytest.warns(UserWarning, match="reduction=") if legacy else contextlib.nullcontext():
        program = torch.export.export(Model(), (x1, y1), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own deprecation warning for the legacy ones
        expected = torch_fn(torch.sigmoid(x2) if squash else x2, y2, **arguments)
    torch.testing.assert_close(program.module()(x2, y2), expected)
