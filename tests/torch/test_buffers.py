"""The pool of output storages of the torch backend's kernels (``bcekit.torch._buffers``).

Its outputs behave as torch's own: resizable both ways, never shared with a tensor, view, saved tensor or
NumPy array that is still alive; and it keeps the C++ buffer cache's memory rules (the 1/8 rule, the
limit with the least recently returned going first, the age rule, and ``bcekit.empty_cache()`` giving
the memory back to the system).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bcekit
import bcekit.torch as bce
from bcekit import _native
from bcekit.torch import _buffers

N = 2**19  # float32 elements: 2 MiB outputs, above CACHED_MIN_BYTES
SHAPE = (N // 1024, 1024)
MiB = 2**20

needs_pool = pytest.mark.skipif(
    not _buffers._ENABLED, reason="this torch has no torch._C._storage_Use_Count: outputs are plain"
)


@pytest.fixture
def pool_on():
    """The caches on with the default limit (the sanitizer run turns them off), emptied before and
    after."""
    bcekit.empty_cache()
    _native.set_cache_limit(2**30)
    yield
    limit = _native._CACHE_BYTES
    _native.set_cache_limit(2**30 if limit is None else limit)
    bcekit.empty_cache()


def _data(logits: bool, weighted: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * 2 if logits else torch.rand(SHAPE, generator=generator)
    y = torch.rand(SHAPE, generator=generator)
    w = torch.rand(SHAPE[-1], generator=generator) + 0.5 if weighted else None
    return x, y, w


def _losses(logits: bool):
    if logits:
        return bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
    return bce.binary_cross_entropy, F.binary_cross_entropy


def _outputs(logits: bool, weighted: bool, output: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same output from bcekit and from torch: the per-element loss, or x.grad after backward of
    the mean ('grad-mean': bcekit's fused pass) or of the per-element loss summed ('grad-none': its
    backward pass)."""
    x, y, w = _data(logits, weighted)
    results = []
    for loss in _losses(logits):
        if output == "loss":
            with torch.no_grad():
                results.append(loss(x, y, weight=w, reduction="none"))
            continue
        leaf = x.clone().requires_grad_(True)
        if output == "grad-mean":
            loss(leaf, y, weight=w).backward()
        else:
            loss(leaf, y, weight=w, reduction="none").sum().backward()
        results.append(leaf.grad)
    return results[0], results[1]


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "bce"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weight"])
@pytest.mark.parametrize("output", ["loss", "grad-mean", "grad-none"])
def test_outputs_resize_larger_and_smaller_as_torchs_own(logits: bool, weighted: bool, output: str) -> None:
    """``resize_`` grows and shrinks bcekit's outputs exactly as torch's: the same shapes, and the values
    up to the smaller size kept."""
    ours, theirs = _outputs(logits, weighted, output)
    assert ours.shape == theirs.shape and ours.untyped_storage().resizable()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    kept = ours.clone().reshape(-1), theirs.clone().reshape(-1)
    valid = N  # elements still holding the original values
    for size in [(2 * N,), (3, N), (N // 3,), (N + 5,)]:
        ours.resize_(size)
        theirs.resize_(size)
        assert ours.shape == theirs.shape == size
        assert ours.is_contiguous() and theirs.is_contiguous()
        valid = min(valid, ours.numel())
        for resized, original in zip((ours, theirs), kept, strict=True):
            assert torch.equal(resized.reshape(-1)[:valid], original[:valid])


def test_a_training_step_gradient_grows_like_torchs() -> None:
    """x.grad from bcekit's fused pass can be grown and then accumulated into, as one from torch."""
    x, y, _ = _data(True, False)
    grads = []
    for loss in _losses(True):
        leaf = x.clone().requires_grad_(True)
        loss(leaf, y).backward()
        grad = leaf.grad
        before = grad.clone()
        grad.resize_(2 * N)
        assert torch.equal(grad[:N], before.reshape(-1))
        grad.resize_(SHAPE)
        loss(leaf, y).backward()  # accumulated into the resized gradient
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_without_the_use_count_outputs_are_plain(pool_on, monkeypatch) -> None:
    """Where torch cannot tell the pool that a storage is free, every output is torch's own allocation."""
    monkeypatch.setattr(_buffers, "_ENABLED", False)
    x, y, _ = _data(True, False)
    output = bce.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert _buffers.held_bytes() == 0
    output.resize_(2 * N)
    assert output.shape == (2 * N,)


@needs_pool
def test_a_dropped_output_is_handed_out_again(pool_on) -> None:
    """Once nothing but the pool refers to an output's storage, the next output of its size reuses it:
    per-element losses, and the gradients of training steps that set x.grad to None."""
    x, y, _ = _data(True, False)
    first = bce.binary_cross_entropy_with_logits(x, y, reduction="none")
    address = first.data_ptr()
    del first
    assert bce.binary_cross_entropy_with_logits(x, y, reduction="none").data_ptr() == address
    leaf = x.clone().requires_grad_(True)
    addresses = []
    for _ in range(3):
        leaf.grad = None
        bce.binary_cross_entropy_with_logits(leaf, y).backward()
        addresses.append(leaf.grad.data_ptr())
    assert len(set(addresses)) == 1


def _holder(kind: str, output: torch.Tensor):
    """Something that keeps ``output``'s storage alive, and the values it reads."""
    if kind == "tensor":
        return output, lambda: output
    if kind == "view":
        view = output[1:].view(-1)
        return view, lambda: view
    if kind == "detached":
        detached = output.detach()
        return detached, lambda: detached
    if kind == "numpy":
        array = output.numpy()
        return array, lambda: torch.from_numpy(array.copy())
    if kind == "storage":
        storage, shape = output.untyped_storage(), output.shape
        return storage, lambda: torch.empty(0).set_(storage, 0, shape).clone()
    raise AssertionError(kind)


@needs_pool
@pytest.mark.parametrize("kind", ["tensor", "view", "detached", "numpy", "storage"])
def test_a_live_output_is_not_handed_out(pool_on, kind: str) -> None:
    """While a tensor, view, NumPy array or storage object over an output lives, its storage is not
    handed out: writing into the next output of its size leaves the old one's values as they were. Once
    it is dropped the storage is handed out again, unless it can no longer be resized."""
    x, y, _ = _data(True, False)
    output = bce.binary_cross_entropy_with_logits(x, y, reduction="none")
    address = output.data_ptr()
    holder, read = _holder(kind, output)
    expected = read().clone()
    del output
    again = bce.binary_cross_entropy_with_logits(-x, y, reduction="none")
    again.fill_(7.0)
    assert again.data_ptr() != address
    assert torch.equal(read(), expected)
    del holder, read
    reused = bce.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert reused.untyped_storage().resizable()
    if kind != "numpy":  # Tensor.numpy() makes a storage not resizable for good: the pool drops it
        assert reused.data_ptr() == address


@needs_pool
def test_an_output_autograd_saved_is_not_handed_out(pool_on) -> None:
    """A per-element loss that autograd saved for a later backward keeps its storage, so that backward
    gives torch's gradient even after the loss tensor itself was dropped and new outputs written."""
    x, y, _ = _data(True, False)
    results = []
    for loss in _losses(True):
        leaf = x.clone().requires_grad_(True)
        per_element = loss(leaf, y, reduction="none")
        squared = (per_element * per_element).sum()  # saves per_element for its backward
        del per_element
        for _ in range(3):
            with torch.no_grad():
                bce.binary_cross_entropy_with_logits(-x, y, reduction="none").fill_(7.0)
        squared.backward()
        results.append(leaf.grad)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@needs_pool
def test_small_outputs_do_not_use_the_pool(pool_on) -> None:
    """Outputs under CACHED_MIN_BYTES are allocated as usual (a training step at (64, 16) among them)."""
    x = torch.randn(64, 16, requires_grad=True)
    y = torch.rand(64, 16)
    bce.binary_cross_entropy_with_logits(x, y).backward()
    with torch.no_grad():
        small = bce.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert _buffers.held_bytes() == 0 and _buffer(_native.CACHED_MIN_BYTES - 4).numel() > 0
    assert _buffers.held_bytes() == 0 and x.grad is not None and small.shape == x.shape


def _buffer(nbytes: int) -> torch.Tensor:
    return _buffers.empty_like(torch.empty(nbytes // 4))


@needs_pool
def test_a_storage_serves_a_request_at_most_an_eighth_smaller(pool_on) -> None:
    size = 8 * MiB
    first = _buffer(size)
    address = first.data_ptr()
    del first
    near = _buffer(size - size // 8)
    assert near.data_ptr() == address
    del near
    assert _buffers.free_bytes() == size  # back at its own size
    far = _buffer(size - size // 8 - 4096)
    assert far.data_ptr() != address
    assert _buffers.free_bytes() == size


@needs_pool
def test_the_limit_counts_handed_out_and_free_storages(pool_on) -> None:
    """The pool holds at most the limit, handed out and free: a request that does not fit beside the storages
    in use gets a plain (resizable) allocation the pool does not keep; a limit of 0 keeps nothing."""
    sizes = [2 * MiB, 3 * MiB, 4 * MiB]  # more than 1/8 apart: none serves another size
    _native.set_cache_limit(sizes[0] + sizes[1])
    kept = [_buffer(s) for s in sizes[:2]]
    extra = _buffer(sizes[2])  # no room beside the two handed out: a plain allocation
    assert _buffers.held_bytes() == sizes[0] + sizes[1]
    assert extra.untyped_storage().resizable()
    del extra
    assert _buffers.free_bytes() == 0
    kept[1] = None
    assert _buffers.free_bytes() == sizes[1]
    plain = _buffer(sizes[2])  # no room even without the free one: which is kept
    assert _buffers.free_bytes() == sizes[1] and _buffers.held_bytes() == sizes[0] + sizes[1]
    del kept, plain
    assert _buffers.free_bytes() == sizes[0] + sizes[1]
    _native.set_cache_limit(0)
    assert _buffers.held_bytes() == 0
    plain = _buffer(sizes[0])
    assert _buffers.held_bytes() == 0 and plain.untyped_storage().resizable()


@needs_pool
@pytest.mark.parametrize("first_returned", [0, 1])
def test_the_least_recently_returned_goes_first(pool_on, first_returned: int) -> None:
    """Lowering the limit releases the least recently returned storage first, and so does a request
    for a new one that would not fit beside the free ones."""
    sizes = [2 * MiB, 3 * MiB]
    buffers = [_buffer(s) for s in sizes]
    addresses = [b.data_ptr() for b in buffers]
    buffers[first_returned] = None
    assert _buffers.free_bytes() == sizes[first_returned]  # seen returned now
    buffers[1 - first_returned] = None
    _native.set_cache_limit(sizes[1 - first_returned])
    assert _buffers.held_bytes() == sizes[1 - first_returned]
    assert _buffer(sizes[1 - first_returned]).data_ptr() == addresses[1 - first_returned]

    _native.set_cache_limit(sizes[1] + 4 * MiB)  # both, or the newcomer and either
    bcekit.empty_cache()
    buffers = [_buffer(s) for s in sizes]
    addresses = [b.data_ptr() for b in buffers]
    buffers[first_returned] = None
    assert _buffers.free_bytes() == sizes[first_returned]
    buffers[1 - first_returned] = None
    newcomer = _buffer(4 * MiB)  # room for it: the least recently returned is released
    assert _buffers.held_bytes() == sizes[1 - first_returned] + 4 * MiB
    del newcomer
    _native.set_cache_limit(2**30)
    assert _buffer(sizes[1 - first_returned]).data_ptr() == addresses[1 - first_returned]


@needs_pool
def test_a_storage_no_request_takes_within_its_age_is_released(pool_on) -> None:
    age = _native._core.CACHE_MAX_AGE
    old = _buffer(64 * MiB)
    del old
    for _ in range(age):
        _buffer(MiB)  # requests of another size (one storage, handed out and returned each time)
    assert _buffers.free_bytes() == 64 * MiB + MiB
    held = _buffer(MiB)
    assert _buffers.free_bytes() == 0  # the 64 MiB one has waited more than `age` requests
    del held


@needs_pool
def test_empty_cache_releases_the_free_storages(pool_on) -> None:
    live = _buffer(2 * MiB)
    dropped = _buffer(3 * MiB)
    del dropped
    bcekit.empty_cache()
    assert _buffers.free_bytes() == 0 and _buffers.held_bytes() == 2 * MiB
    address = live.data_ptr()
    del live
    assert _buffer(2 * MiB).data_ptr() == address  # returned after empty_cache: kept as usual


def test_buffers_are_aligned_for_the_kernels(pool_on) -> None:
    """The kernels' vector stores want 64-byte aligned outputs, reused or fresh, of any size."""
    for nbytes in [MiB, MiB + 4, 3 * MiB + 12, 4 * MiB, 4 * MiB + 64, 64 * MiB + 4]:
        first = _buffer(nbytes)
        assert first.data_ptr() % 64 == 0
        del first
        assert _buffer(nbytes - 4 * (nbytes // 64 // 4)).data_ptr() % 64 == 0


_MEMORY_SCRIPT = """
import torch, bcekit, bcekit.torch as bce
from bcekit.torch import _buffers
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
generator = torch.Generator().manual_seed(0)
x = torch.randn(2**21, generator=generator) * 2
y = torch.rand(2**21, generator=generator)
sizes = torch.randint(2**18, 2**21, (400,), generator=generator).tolist()
def step(n):  # a per-element loss and a gradient of n float32 each
    leaf = x[:n].detach().requires_grad_(True)
    loss = bce.binary_cross_entropy_with_logits(leaf, y[:n], reduction="none")
    loss.sum().backward()
    return loss, leaf
step(2**18)
bcekit.empty_cache()
start = rss()
held = free = 0
for n in sizes:
    loss, leaf = step(n)
    held = max(held, _buffers.held_bytes())
    del loss, leaf
    free = max(free, _buffers.free_bytes())
bcekit.empty_cache()
print(held, free, rss() - start)
"""


@needs_pool
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident size from /proc")
def test_varying_sizes_keep_a_bounded_pool_and_empty_cache_gives_memory_back() -> None:
    """400 training steps whose outputs vary between 1 and 8 MiB: the pool holds no more than what its
    last CACHE_MAX_AGE requests could use (each 8 MiB at most) beside the two outputs in use, far below its
    1 GiB limit, and after empty_cache() the process's resident memory is back within 32 MiB of where it
    started."""
    environment = {**os.environ, "BCEKIT_CACHE_BYTES": str(2**30)}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    held, free, grown = (int(v) for v in done.stdout.split())
    age = _native._core.CACHE_MAX_AGE
    assert held > 0  # the outputs came from the pool
    assert free <= age * 8 * MiB
    assert held <= (age + 2) * 8 * MiB
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # ASan's shadow memory stays resident
        assert grown <= 32 * MiB
