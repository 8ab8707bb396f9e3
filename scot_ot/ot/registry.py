"""Solvers by name: the one place where a string becomes a solver.

A solver is an object with

- ``name``: the registry key;
- ``info``: a :class:`SolverInfo` (what it supports, for the README table and for
  refusing problems it cannot solve);
- ``options``: the extra keyword options it accepts (beyond the common ones);
- ``solve(problem, *, max_iter, tol, check_every, **options) -> OTResult``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Protocol, Tuple

from .problem import OTProblem
from .result import OTResult


@dataclass(frozen=True)
class SolverInfo:
    domain: str  # "log", "kernel", "kernel+absorption", "exact (network simplex)"
    unbalanced: bool  # accepts finite reg_m
    devices: str  # "cpu, cuda" ...
    exact: bool  # False: entropic
    batched: str  # "native" or "loop"
    summary: str


class Solver(Protocol):
    name: str
    info: SolverInfo
    options: Tuple[str, ...]

    def solve(
        self, problem: OTProblem, *, max_iter: int, tol: float, check_every: int, **options
    ) -> OTResult: ...


_REGISTRY: Dict[str, Callable[[], Solver]] = {}


def register(name: str, factory: Callable[[], Solver]) -> None:
    """Register a solver factory under ``name`` (called lazily, on first use)."""
    if name in _REGISTRY:
        raise ValueError(f"solver {name!r} is already registered")
    _REGISTRY[name] = factory


def available_solvers() -> List[str]:
    """Names of the registered solvers, sorted."""
    return sorted(_REGISTRY)


def get_solver(name: str) -> Solver:
    """The solver registered under ``name``; unknown names list the available ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"solver: unknown solver {name!r}; available: {', '.join(available_solvers())}"
        )
    return _REGISTRY[name]()


def solver_table(names: List[str]) -> str:
    """Markdown table of the solvers' capabilities (the README's solver table)."""
    rows = ["| solver | domain | balanced / unbalanced | devices | exact or entropic | batches | what it is |",
            "|---|---|---|---|---|---|---|"]
    for name in names:
        i = get_solver(name).info
        kind = "balanced, unbalanced (KL), semi-relaxed" if i.unbalanced else "balanced"
        rows.append(f"| `{name}` | {i.domain} | {kind} | {i.devices} | "
                    f"{'exact' if i.exact else 'entropic'} | {i.batched} | {i.summary} |")
    return "\n".join(rows)
