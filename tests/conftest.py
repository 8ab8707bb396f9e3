"""Test-session setup, imported by pytest before any test module.

The ``fused`` solver's Triton kernels run on CUDA, or, on a machine without CUDA,
in the Triton interpreter, which triton enables only when ``TRITON_INTERPRET=1``
is set before triton is first imported (by anything: torchvision and POT import
it). So the variable is set here, before the test modules import them, and
``python -m pytest -q`` runs ``tests/test_fused.py`` on any machine. With CUDA
it is left alone and the same tests run on the GPU.
"""

import os
import sys

import torch  # (does not import triton)

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/conftest.py could select its interpreter; "
            "run pytest with TRITON_INTERPRET=1 set"
        )
    os.environ["TRITON_INTERPRET"] = "1"
