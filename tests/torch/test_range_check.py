"""The probability loss's [0, 1] check on the Triton route (``bcekit.torch._range_check``).

On a GPU the kernel counts bad programs on the device and the error surfaces at a later call, once a copy
of the counters has landed. Here the Triton branch runs on CPU tensors (``_kernel._TRITON_ON_CPU``, Triton's
interpreter) and the CUDA events are stand-ins whose completion the tests decide, so each rule of when the
error surfaces is checked: not before the copy has landed, at the first call after it, once per bad call,
an input error before a target error, at ``check_errors``, at the call in synchronous mode, nothing copied
during CUDA graph capture and the replays' counts reported after it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

import bcekit.torch as bce  # noqa: E402
from bcekit import _semantics  # noqa: E402
from bcekit.torch import _kernel, _range_check, _triton  # noqa: E402

if not _triton._interpreting():  # pragma: no cover - a GPU machine runs tests/torch/test_triton.py compiled
    pytest.skip("these tests drive the CPU stand-in of the CUDA events", allow_module_level=True)

INPUT_ERROR = str(_semantics.input_range_error())
TARGET_ERROR = str(_semantics.target_range_error())
CPU = torch.device("cpu")


class _Event:
    """A CUDA event stand-in: ``query()`` answers what the test says; ``record()`` makes it pending."""

    def __init__(self, board: _Board) -> None:
        self.board = board
        self.recorded = 0

    def record(self) -> None:
        self.recorded = self.board.time

    def query(self) -> bool:
        return self.recorded <= self.board.done


class _Board:
    """The stand-in GPU's clock: events recorded at ``time`` have completed once ``done`` reaches it."""

    def __init__(self) -> None:
        self.time = 0
        self.done = 0

    def tick(self) -> None:
        self.time += 1

    def finish(self) -> None:
        self.done = self.time


@pytest.fixture
def gpu(monkeypatch) -> _Board:
    """A fresh device state for the CPU whose events complete only when the test finishes them."""
    monkeypatch.setattr(_kernel, "_TRITON_ON_CPU", True)
    monkeypatch.setattr(_range_check, "_devices", {})
    monkeypatch.setattr(_range_check, "_sync", False)
    board = _Board()
    state = _range_check._Device(CPU)
    state.events = [_Event(board) for _ in range(_range_check.SLOTS)]
    original_copy = state.copy

    def copy() -> None:
        board.tick()
        original_copy()

    state.copy = copy
    _range_check._devices[CPU] = state
    return board


def _loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return bce.binary_cross_entropy(x, y)


def _good() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((300,), 0.25), torch.full((300,), 0.5)


def _bad_input() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _good()
    x[-1] = 1.5
    return x, y


def _bad_target() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _good()
    y[0] = -0.5
    return x, y


def test_the_error_waits_for_the_copy_and_surfaces_once(gpu: _Board) -> None:
    _loss(*_bad_input())  # the GPU has not finished: nothing to report yet
    _loss(*_good())
    gpu.finish()
    with pytest.raises(RuntimeError, match=INPUT_ERROR):
        _loss(*_good())  # the first call after the copy landed
    _loss(*_good())  # reported once
    gpu.finish()
    _loss(*_good())
    bce.check_errors()


def test_a_later_logits_loss_or_backward_reports_it(gpu: _Board) -> None:
    x, y = _bad_target()
    leaf = x.clone().requires_grad_(True)
    loss = _loss(leaf, y)
    gpu.finish()
    with pytest.raises(RuntimeError, match=TARGET_ERROR):
        loss.backward()
    _loss(*_bad_input())
    gpu.finish()
    with pytest.raises(RuntimeError, match=INPUT_ERROR):
        bce.binary_cross_entropy_with_logits(torch.zeros(8), torch.zeros(8))


def test_an_input_error_is_reported_before_a_target_error_of_the_same_call(gpu: _Board) -> None:
    x, _ = _bad_input()
    _, y = _bad_target()
    _loss(x, y)
    gpu.finish()
    with pytest.raises(RuntimeError, match=INPUT_ERROR):
        _loss(*_good())
    _loss(*_good())  # the call's target error is not reported on top
    _loss(*_bad_target())  # a later bad call is
    gpu.finish()
    with pytest.raises(RuntimeError, match=TARGET_ERROR):
        _loss(*_good())


def test_a_newer_finished_copy_supersedes_older_pending_ones(gpu: _Board) -> None:
    for _ in range(_range_check.SLOTS + 2):  # the host runs ahead: every slot reused, none finished
        _loss(*_good())
    _loss(*_bad_input())
    gpu.finish()
    with pytest.raises(RuntimeError, match=INPUT_ERROR):
        _loss(*_good())
    assert not any(_range_check._devices[CPU].pending[slot] for slot in range(_range_check.SLOTS))


def test_check_errors_waits(gpu: _Board) -> None:
    _loss(*_bad_target())
    with pytest.raises(RuntimeError, match=TARGET_ERROR):
        bce.check_errors()
    bce.check_errors()  # once
    gpu.finish()
    _loss(*_good())  # the landed copy shows what check_errors already reported
    bce.check_errors(CPU)
    bce.check_errors("cuda:3")  # a device bcekit never ran on: nothing to report


def test_synchronous_mode_raises_at_the_call(gpu: _Board) -> None:
    bce.set_sync_checks(True)
    assert _triton.describe()["range_check"] == "sync"
    with pytest.raises(RuntimeError, match=INPUT_ERROR):
        _loss(*_bad_input())
    _loss(*_good())
    bce.set_sync_checks(False)
    assert _triton.describe()["range_check"] == "deferred"


def test_during_capture_nothing_is_copied_and_replays_are_reported_after(gpu: _Board, monkeypatch) -> None:
    _loss(*_good())  # the warm-up step that makes the counters
    gpu.finish()
    _range_check.poll(CPU)  # its copy has landed and shows nothing
    assert not any(_range_check._devices[CPU].pending)
    monkeypatch.setattr(_range_check, "_capturing", lambda device: True)
    _loss(*_bad_input())  # as a captured (or replayed) step: counted, not copied
    gpu.finish()
    _loss(*_good())
    assert not any(_range_check._devices[CPU].pending)
    monkeypatch.setattr(_range_check, "_capturing", lambda device: False)
    _loss(*_good())  # the first call outside the graph copies the counters
    gpu.finish()
    with pytest.raises(RuntimeError, match=INPUT_ERROR):
        _loss(*_good())


def test_the_first_call_on_a_device_must_not_be_captured(gpu: _Board, monkeypatch) -> None:
    monkeypatch.setattr(_range_check, "_devices", {})
    monkeypatch.setattr(_range_check, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="outside CUDA graph capture"):
        _loss(*_good())


@pytest.mark.parametrize("value", ["2", "yes", "-1"])
def test_a_malformed_environment_variable_says_what_it_accepts(monkeypatch, value: str) -> None:
    monkeypatch.setenv("BCEKIT_SYNC_CHECKS", value)
    with pytest.raises(ValueError, match="BCEKIT_SYNC_CHECKS=.*must be 0 .* or 1"):
        _range_check._sync_from_environment()
    for accepted, expected in (("0", False), ("1", True), ("", False)):
        monkeypatch.setenv("BCEKIT_SYNC_CHECKS", accepted)
        assert _range_check._sync_from_environment() is expected


def test_the_logits_loss_is_never_checked(gpu: _Board) -> None:
    x, y = _bad_input()
    bce.binary_cross_entropy_with_logits(x, y * 7.0)
    gpu.finish()
    _loss(*_good())
    bce.check_errors()
