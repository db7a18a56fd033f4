"""The outputs of the C++ kernels on CPU tensors (gradients, per-element losses): a pool of storages
allocated by torch and handed out again once nothing but the pool refers to them.

A training step frees its gradient and asks for the next one of the same size. A fresh allocation would
have its pages faulted in by the kernel's stores one 4 KiB page at a time, which at 2^24 float32 elements
costs about twice the pass; a storage from the pool is already mapped. The storages come from torch's CPU
allocator (64-byte aligned, as the kernels' aligned vector stores want), so a tensor over one is
resizable like any tensor torch allocates itself.

Outputs of at least :data:`bcekit._native.CACHED_MIN_BYTES` come from the pool, under the rules of the
C++ core's buffer cache (which keeps serving NumPy outputs):

* a storage is handed out again only when nothing but the pool refers to it: no tensor, view, autograd
  saved tensor, NumPy array or ``untyped_storage()`` object over it is alive (torch's count of strong
  references to the storage is 1, and the pool's storage object has only the pool's references); one
  that can no longer be resized (``Tensor.numpy()`` makes it so) or was moved to shared memory is
  dropped then instead;
* a free storage serves a request of its size or up to 1/8 smaller, the smallest one that fits;
* the pool holds at most ``bcekit._native.cache_limit()`` bytes (``BCEKIT_CACHE_BYTES``, default
  1 GiB, 0 turns it off), handed out and free together, as sized when they were last seen free: to make
  room for a new storage the least recently returned free ones are released first, and a request that
  still does not fit gets a plain allocation the pool does not keep;
* a free storage that no request takes within ``_core.CACHE_MAX_AGE`` requests is released;
* :func:`bcekit.empty_cache` releases every free storage and, on glibc, hands the freed heap memory
  back to the system (``malloc_trim``): glibc keeps freed blocks below its mmap threshold otherwise.

torch gives no notice when a storage's last outside reference goes, so the pool looks at the storages
it has handed out at each request (and at :func:`bcekit.empty_cache`): a storage counts as returned at
the first request that finds it free, and its memory stays with the pool until then.

Storages of 32 MiB and more are advised as transparent huge pages (Linux; the common THP setting
"madvise" honours it), the whole 2 MiB pages inside the storage: a pass streaming through a 64 MiB
gradient then misses the TLB once per 2 MiB rather than once per 4 KiB. glibc gives blocks that large a
memory mapping of their own (its mmap threshold grows to 32 MiB at most), so the advice goes with the
storage; smaller blocks come from its heap, where advice would outlive the storage.

Where torch lacks ``torch._C._storage_Use_Count`` (builds without CUDA before torch 2.8), or without the
C++ core, every output is a plain allocation.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from bcekit import _native

__all__ = ["empty_like", "held_bytes", "free_bytes"]

_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_MAX_AGE: int = _native._core.CACHE_MAX_AGE if _native._core is not None else 0
_ENABLED = _use_count is not None and _native._core is not None

_HUGE = 1 << 21
_HUGE_MIN = 1 << 25


class _Buffer:
    """A storage of the pool, its size when last seen free, and the request count when it was."""

    __slots__ = ("storage", "nbytes", "returned")

    def __init__(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        self.storage = storage
        self.nbytes = nbytes
        self.returned = 0


def _python_references(buffer: _Buffer) -> int:
    return sys.getrefcount(buffer.storage)


# The references to a storage object that only the pool holds, counted as _is_free counts them (the
# interpreter's own references during the call differ between Python versions).
_POOL_REFERENCES = _python_references(_Buffer(torch.UntypedStorage(0), 0))


def _is_free(buffer: _Buffer) -> bool:
    return _use_count(buffer.storage._cdata) == 1 and _python_references(buffer) == _POOL_REFERENCES


def _libc_function(name: str) -> Callable[..., int] | None:
    """A function of the C library this process runs on (glibc on Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # musl has no malloc_trim
        return None


_madvise = _libc_function("madvise")
if _madvise is not None:
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_malloc_trim = _libc_function("malloc_trim")
if _malloc_trim is not None:
    _malloc_trim.argtypes = (ctypes.c_size_t,)
    _malloc_trim.restype = ctypes.c_int


def _advise_huge_pages(storage: torch.UntypedStorage, nbytes: int) -> None:
    """Advise the whole 2 MiB pages of a new storage as transparent huge pages (advice: failure is
    harmless). Called before the storage's pages are first written, when the advice takes effect."""
    if _madvise is None or _MADV_HUGEPAGE is None or nbytes < _HUGE_MIN:
        return
    address = storage.data_ptr()
    start = -(-address // _HUGE) * _HUGE
    end = (address + nbytes) // _HUGE * _HUGE
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)


class _Pool:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.out: list[_Buffer] = []  # handed out, in the order handed out
        self.free: list[_Buffer] = []  # least recently returned first
        self.held = 0  # bytes of both lists
        self.clock = 0  # requests so far
        self.untrimmed = False  # storages released since the last malloc_trim

    # under self.lock
    def collect(self) -> None:
        """Move the handed-out storages that only the pool still refers to onto the free list."""
        still_out = []
        for buffer in self.out:
            if not _is_free(buffer):
                still_out.append(buffer)
                continue
            storage = buffer.storage
            nbytes = storage.nbytes()  # resize_ may have grown it, storage.resize_ shrunk it
            self.held += nbytes - buffer.nbytes
            buffer.nbytes, buffer.returned = nbytes, self.clock
            # share_memory_() moves a storage into shared memory: not the pool's kind any more
            if nbytes >= _native.CACHED_MIN_BYTES and storage.resizable() and not storage.is_shared():
                self.free.append(buffer)
            else:
                self.held -= nbytes
        if len(still_out) != len(self.out):
            self.out = still_out

    def release_first(self) -> None:
        self.held -= self.free.pop(0).nbytes
        self.untrimmed = True

    def take(self, x: Tensor, nbytes: int) -> Tensor:
        self.collect()
        self.clock += 1
        while self.free and self.clock - self.free[0].returned > _MAX_AGE:
            self.release_first()
        best = None
        for buffer in self.free:  # the smallest that fits, wasting at most 1/8 of itself
            size = buffer.nbytes
            if size >= nbytes and size - nbytes <= size // 8 and (best is None or size < best.nbytes):
                best = buffer
        if best is not None:
            self.free.remove(best)
        else:
            limit = _native.cache_limit()
            if self.held - sum(buffer.nbytes for buffer in self.free) + nbytes > limit:
                return torch.empty_like(x)  # no room even without the free ones: keep those
            while self.held + nbytes > limit:
                self.release_first()
            best = _Buffer(torch.UntypedStorage(nbytes, device="cpu"), nbytes)
            _advise_huge_pages(best.storage, nbytes)
            self.held += nbytes
        self.out.append(best)
        return x.new_empty(0).set_(best.storage, 0, x.shape)

    def release(self, keep: int) -> None:
        """Release free storages, least recently returned first, until the pool holds at most ``keep``
        bytes or has none free; then return the heap memory freed since the last time to the system."""
        with self.lock:
            self.collect()
            while self.free and self.held > keep:
                self.release_first()
            trim, self.untrimmed = self.untrimmed, False
        if trim and _malloc_trim is not None:
            _malloc_trim(0)

    def after_fork(self) -> None:
        # a forked child has only the forking thread: a lock another thread held stays held there
        self.lock = threading.RLock()


_pool = _Pool()
if _ENABLED:
    _native.register_cache(_pool.release)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_pool.after_fork)


def empty_like(x: Tensor) -> Tensor:
    """An uninitialised tensor shaped like the contiguous CPU tensor ``x``, of its dtype: from the pool
    when it has at least :data:`bcekit._native.CACHED_MIN_BYTES` (see the module docstring)."""
    nbytes = x.numel() * x.element_size()
    if nbytes < _native.CACHED_MIN_BYTES or not _ENABLED:
        return torch.empty_like(x)
    with _pool.lock:
        return _pool.take(x, nbytes)


def held_bytes() -> int:
    """Bytes of the storages the pool holds, handed out or free (as sized when last seen free)."""
    with _pool.lock:
        _pool.collect()
        return _pool.held


def free_bytes() -> int:
    """Bytes of the pool's free storages, those it would hand out again."""
    with _pool.lock:
        _pool.collect()
        return sum(buffer.nbytes for buffer in _pool.free)
