"""bcekit: binary cross-entropy, exact and fast.

Backends are separate modules so that importing one never imports another framework:

* :mod:`bcekit.numpy` needs only NumPy;
* :mod:`bcekit.torch` needs PyTorch (``pip install bcekit[torch]``);
* :mod:`bcekit.jax` needs JAX (``pip install bcekit[jax]``).

Each offers ``binary_cross_entropy``, ``binary_cross_entropy_with_logits`` and ``sigmoid_focal_loss`` with
torch's semantics; the rules live in ``bcekit._semantics`` and the formulas in ``bcekit._math``, once.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
