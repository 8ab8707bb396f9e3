"""The solver layer: one problem, one result, every OT solver by name.

Importing this package registers the built-in solvers: each module below registers its
own (``@register``), in this order, which is the order in which error messages suggest
them. None of them imports triton or POT here (``fused`` loads its kernels on first use,
the POT wrappers import POT when resolved by :func:`get_solver`).
"""

from .api import solve
from .errors import NumericalError, SolverMemoryError, SolverUnavailableError
from .problem import OTProblem
from .registry import (INIT, Batching, Compute, Devices, Domain, Dtypes, Family, Marginals, Option,
                       SolverInfo, Stopping, available_solvers, check_solver_device, get_solver, register,
                       registered, solver_info, solver_table, unregister)
from .result import OTResult, marginal_error, plan_from_potentials

# the built-in solvers, registered on import
from . import torch_log, torch_absorb, pot_solvers  # noqa: E402,F401  isort:skip
from .fused import solver as _fused_solver  # noqa: E402,F401  isort:skip
from . import partial, pot_partial, dustbin, matrix_scaling, dual_softmax, similarity  # noqa: E402,F401  isort:skip

__all__ = [
    "INIT",
    "Batching",
    "Compute",
    "Devices",
    "Domain",
    "Dtypes",
    "Family",
    "Marginals",
    "NumericalError",
    "OTProblem",
    "OTResult",
    "Option",
    "SolverInfo",
    "SolverMemoryError",
    "SolverUnavailableError",
    "Stopping",
    "available_solvers",
    "check_solver_device",
    "get_solver",
    "marginal_error",
    "plan_from_potentials",
    "register",
    "registered",
    "solve",
    "solver_info",
    "solver_table",
    "unregister",
]
