"""scot_ot: semantic correspondence as optimal transport (SCOT, Liu et al., CVPR 2020).

``scot_ot.solve`` and the solver registry import only torch; ``scot_ot.SCOT`` (the
image pipeline, which needs torchvision) is imported on first access.
"""

from .ot import (NumericalError, OTProblem, OTResult, SolverMemoryError, SolverUnavailableError, available_solvers,
                 get_solver, solve)

__version__ = "0.1.0"

__all__ = ["NumericalError", "OTProblem", "OTResult", "SCOT", "SolverMemoryError", "SolverUnavailableError",
           "available_solvers", "get_solver", "solve", "__version__"]


def __getattr__(name):
    if name == "SCOT":
        from .matching import SCOT

        return SCOT
    raise AttributeError(f"module 'scot_ot' has no attribute {name!r}")
