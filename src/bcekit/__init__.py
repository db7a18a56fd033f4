"""bcekit: binary cross-entropy, exact and fast.

Backends are separate modules so that importing one never imports another framework:

* :mod:`bcekit.numpy` needs only NumPy;
* :mod:`bcekit.torch` needs PyTorch (``pip install bcekit[torch]``).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
