"""The probability loss's [0, 1] check on a GPU, raised without stalling the training step.

torch's CUDA kernel checks the range with a device-side assert: the error kills the CUDA context, and the
process must restart. bcekit's kernel instead counts the programs that saw an out-of-range input or
target in two device counters (``int32``, one pair per device; only a bad program touches them). After
each probability-loss forward pass the counters are copied to pinned host memory behind a CUDA event,
without waiting; every later bcekit call on that device (either loss, forward or backward) first asks
the events, again without waiting, and raises torch's error (``all elements of input should be between 0
and 1``, or of target) once a finished copy shows a count that grew. An input error is reported before a
target error, each bad call once.

When the error surfaces, exactly:

* at the call itself when the GPU has finished its kernel by the time the call returns (always under the
  Triton interpreter, rarely on a GPU, where the host runs ahead);
* else at the first bcekit call on that device that starts after the GPU has finished the bad call's
  kernel, typically the same step's backward or the next step's forward; the losses returned in between
  are garbage, as the per-element losses of a bad call are;
* at :func:`bcekit.torch.check_errors`, which waits for the GPU: call it where a step must be known
  good (after the last step of an epoch, before saving a checkpoint);
* at the call itself, with a host synchronisation per call, in synchronous mode:
  ``BCEKIT_SYNC_CHECKS=1`` in the environment or :func:`bcekit.torch.set_sync_checks`, for debugging.

During CUDA graph capture nothing is copied or asked (a capture must not synchronise, and a captured copy
would be replayed unread): the kernel still counts, and the next call outside the graph, or
:func:`bcekit.torch.check_errors`, reports what replays counted. The counters are made at a device's first
probability loss, which must not be inside a capture (run the step once before capturing it, as CUDA
graphs require anyway).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from bcekit._semantics import input_range_error, target_range_error

__all__ = ["counters", "launched", "poll", "check_errors", "set_sync_checks", "mode"]

#: Copies in flight per device; an older pending copy is superseded by any newer finished one (the
#: counts only grow), so the host may run this many probability losses ahead of the GPU and still see
#: each error before the next sync point.
SLOTS = 4

_ENVIRONMENT = "BCEKIT_SYNC_CHECKS"


def _sync_from_environment() -> bool:
    value = os.environ.get(_ENVIRONMENT, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(
            f"{_ENVIRONMENT}={value!r}: must be 0 (errors raise later, without waiting) or 1 (at the call)"
        )
    return value == "1"


_sync = _sync_from_environment()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Device:
    """One device's counters, their host copies and the events behind them."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.counters = torch.zeros(2, dtype=torch.int32, device=device)
        copies = torch.zeros((SLOTS, 2), dtype=torch.int32, pin_memory=cuda)
        self.slots = list(copies)
        self.host = copies.numpy()  # read without torch: it is host memory, its copy's event has fired
        self.events = [torch.cuda.Event() for _ in range(SLOTS)] if cuda else None
        self.pending = [False] * SLOTS
        self.next = 0
        self.reported = (0, 0)

    def copy(self) -> None:
        slot = self.next
        self.next = (slot + 1) % SLOTS
        self.slots[slot].copy_(self.counters, non_blocking=True)
        if self.events is not None:
            self.events[slot].record()
        self.pending[slot] = True

    def poll(self) -> None:
        """Raise for what the newest finished copy shows; older copies are superseded by it."""
        for age in range(SLOTS):
            slot = (self.next - 1 - age) % SLOTS
            if self.pending[slot] and (self.events is None or self.events[slot].query()):
                for older in range(age, SLOTS):
                    self.pending[(self.next - 1 - older) % SLOTS] = False
                self.report(int(self.host[slot, 0]), int(self.host[slot, 1]))
                return

    def report(self, bad_inputs: int, bad_targets: int) -> None:
        reported_inputs, reported_targets = self.reported
        if bad_inputs > reported_inputs or bad_targets > reported_targets:
            self.reported = (bad_inputs, bad_targets)
            raise input_range_error() if bad_inputs > reported_inputs else target_range_error()


_devices: dict[torch.device, _Device] = {}


def counters(device: torch.device) -> Tensor:
    """The device's two counters, which a checking pass adds its bad programs to."""
    state = _devices.get(device)
    if state is None:
        if _capturing(device):
            raise RuntimeError(
                "bcekit: the first binary_cross_entropy on a device must run outside CUDA graph capture "
                "(run the step once before capturing it)"
            )
        state = _devices[device] = _Device(device)
    return state.counters


def launched(device: torch.device) -> None:
    """After a checking pass: start the counters' copy, and raise if a finished copy shows an error (in
    synchronous mode: wait for this pass and raise for it)."""
    state = _devices[device]
    if _sync and not _capturing(device):
        state.pending = [False] * SLOTS
        bad_inputs, bad_targets = state.counters.tolist()
        state.report(bad_inputs, bad_targets)
        return
    if _capturing(device):
        return
    state.copy()
    state.poll()


def poll(device: torch.device) -> None:
    """Raise if a finished copy of ``device``'s counters shows an error not reported yet; never waits."""
    state = _devices.get(device)
    if state is not None and any(state.pending) and not _capturing(device):
        state.poll()


def check_errors(device: torch.device | str | int | None = None) -> None:
    """Wait for the GPU and raise the [0, 1] error of any probability loss not reported yet.

    bcekit's GPU kernels report an out-of-range input or target of
    :func:`bcekit.torch.binary_cross_entropy` without synchronising, at a later call (see
    :mod:`bcekit.torch._range_check`); this is the point where it is certain to surface. ``device``: one
    device, or every device bcekit ran on (None).
    """
    if device is None:
        states = list(_devices.values())
    else:
        key = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if key.type == "cuda" and key.index is None:
            key = torch.device("cuda", torch.cuda.current_device())
        states = [_devices[key]] if key in _devices else []
    for state in states:
        state.pending = [False] * SLOTS
        bad_inputs, bad_targets = state.counters.tolist()
        state.report(bad_inputs, bad_targets)


def set_sync_checks(enabled: bool) -> None:
    """Synchronous [0, 1] checks (``True``): each probability loss on a GPU waits for its kernel and
    raises at the call, at the cost of a host synchronisation per call; ``False`` (the default, unless
    ``BCEKIT_SYNC_CHECKS=1``): errors surface at a later call or at :func:`bcekit.torch.check_errors`."""
    global _sync
    _sync = bool(enabled)


def mode() -> str:
    """``'sync'`` or ``'deferred'``: for diagnostics."""
    return "sync" if _sync else "deferred"
