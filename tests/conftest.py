"""Test-session setup shared by every test module."""

import os

# The Triton kernels (bcekit.torch._triton) are tested on CPU tensors by Triton's interpreter, which must
# be chosen before triton.jit decorates them, i.e. before bcekit.torch is imported. A machine with a GPU
# runs them compiled instead (set TRITON_INTERPRET=1 yourself to interpret there too).
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
