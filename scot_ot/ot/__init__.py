"""The solver layer: one problem, one result, every OT solver by name."""

from .api import solve
from .problem import OTProblem
from .registry import SolverInfo, available_solvers, get_solver, register
from .result import OTResult, marginal_error, plan_from_potentials

__all__ = [
    "OTProblem",
    "OTResult",
    "SolverInfo",
    "available_solvers",
    "get_solver",
    "marginal_error",
    "plan_from_potentials",
    "register",
    "solve",
]
