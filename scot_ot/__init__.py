"""scot_ot: semantic correspondence as optimal transport (SCOT, Liu et al., CVPR 2020)."""

from . import solvers as _solvers  # noqa: F401  (registers the built-in solvers)
from .ot import OTProblem, OTResult, available_solvers, get_solver, solve

__version__ = "0.1.0"

__all__ = ["OTProblem", "OTResult", "available_solvers", "get_solver", "solve", "__version__"]
