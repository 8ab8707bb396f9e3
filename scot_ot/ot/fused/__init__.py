"""The ``fused`` solver: log-domain Sinkhorn in Triton (see :mod:`scot_ot.ot.fused.solver`).

Importing this package does not import triton; :mod:`scot_ot.ot.fused.kernels`
(which does) is loaded on the solver's first use.
"""

from .solver import FusedScheme, FusedSinkhorn

__all__ = ["FusedScheme", "FusedSinkhorn"]
