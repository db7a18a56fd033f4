"""bcekit: binary cross-entropy, exact and fast.

Backends are separate modules so that importing one never imports another framework:

* :mod:`bcekit.numpy` needs only NumPy;
* :mod:`bcekit.torch` needs PyTorch (``pip install bcekit[torch]``);
* :mod:`bcekit.jax` needs JAX (``pip install bcekit[jax]``).

Each offers ``binary_cross_entropy``, ``binary_cross_entropy_with_logits`` and ``sigmoid_focal_loss`` with
torch's semantics; the rules live in ``bcekit._semantics`` and the formulas in ``bcekit._math``, once.
On the CPU the probability and logits losses run in C++ kernels (``bcekit._core``, through
``bcekit._native``): one multithreaded pass computes the loss and the input gradient.
:func:`set_num_threads` sets their threads for NumPy arrays; torch tensors follow
``torch.get_num_threads()``. Large outputs come from a buffer cache (so that a training step does not
fault in a fresh gradient's pages every time); :func:`empty_cache` releases it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ below returns, for type checkers and editors
    from bcekit._native import empty_cache, get_num_threads, set_num_threads

__version__ = "0.1.0"
__all__ = ["__version__", "empty_cache", "get_num_threads", "set_num_threads"]

_FROM_NATIVE = ("empty_cache", "get_num_threads", "set_num_threads")


def __getattr__(name: str) -> Any:
    # bcekit._native is imported on first use, so that importing a part that does not compute (the
    # command line's argument parser) cannot fail on a malformed BCEKIT_* variable; the part that
    # computes then raises the error naming it.
    if name in _FROM_NATIVE:
        from bcekit import _native

        return getattr(_native, name)
    raise AttributeError(f"module 'bcekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_NATIVE))
