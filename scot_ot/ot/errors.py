"""The named errors of the solver layer.

``NumericalError`` is what a solver raises when it cannot produce a finite plan
(overflow or underflow of its scalings, a NaN iterate, an all-zero plan). It is a
``FloatingPointError``, so ``except FloatingPointError`` catches it too. The
message names the solver, eps and dtype and the solvers that can do better: the
registered ones that handle what the failed one handles, are finite at any eps, batch
natively and run natively on the CPU (:func:`stable_alternatives`).
``SolverUnavailableError`` is what a solver raises when it cannot run here at all (its
device or a library it needs is missing); :func:`scot_ot.ot.registry.check_solver_device`
raises it before any work.
"""

from __future__ import annotations

from typing import List, Optional, Sequence


def stable_alternatives(solver: str, device_type: Optional[str] = "cpu") -> List[str]:
    """Registered OT solvers, other than ``solver``, that handle every marginal kind ``solver``
    handles (a solver that is not registered or not OT: balanced), are finite at any eps,
    batch natively and run natively on ``device_type``; in registration order."""
    from .registry import BALANCED_NEED, _REGISTRY, suggest  # (the registry imports the solvers' errors)

    cls = _REGISTRY.get(solver)
    need = cls.info.marginals if cls is not None and cls.info.solves_ot else BALANCED_NEED
    return suggest(solver, need, stable=True, native_batching=True, device_type=device_type)


class NumericalError(FloatingPointError):
    """A solver could not produce a finite, non-zero plan for this problem."""

    def __init__(self, solver: str, eps: float, dtype, detail: str):
        self.solver, self.eps, self.dtype, self.detail = solver, eps, dtype, detail
        stable = stable_alternatives(solver)
        hint = " or ".join(f"'{s}'" for s in stable) + " (finite at any eps), " if stable else ""
        name = str(dtype).replace("torch.", "")
        wider = {"float16": "float32 or float64", "bfloat16": "float32 or float64", "float32": "float64"}
        tail = f", or a {wider[name]} cost" if name in wider else ""
        super().__init__(
            f"solver {solver!r} failed numerically at eps={eps:g} with a {name} cost: {detail}. "
            f"Use {hint}a larger eps{tail}."
        )


class SolverUnavailableError(RuntimeError):
    """A solver cannot run here: the device, or a library it needs, is missing. The message names
    the solvers that can."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class SolverMemoryError(MemoryError):
    """A solver would need more memory than is available (checked before it starts)."""

    def __init__(self, solver: str, shape, device, needed: int, available: int,
                 lean: Sequence[str] = (), lean_buffers: Sequence[int] = ()):
        """``lean``: solvers that would need less here, with the dense ``n x m`` buffers each
        needs (``lean_buffers``, rounded up; :func:`scot_ot.ot.memory.check_memory` finds them)."""
        self.solver, self.shape, self.device = solver, shape, device
        self.needed, self.available = needed, available
        B, n, m = shape
        size = f"{n} x {m}" if B == 1 else f"{B} x {n} x {m}"
        names = " or ".join(f"'{s}'" for s in lean)
        lo, hi = (min(lean_buffers), max(lean_buffers)) if lean_buffers else (0, 0)
        count = f"{lo}" if lo == hi else f"{lo}-{hi}"
        other = f"a solver that needs less ({names}: {count} dense n x m buffers)" if lean else "another device"
        super().__init__(
            f"solver {solver!r} needs about {_gib(needed)} on {device} for a {size} problem, "
            f"but only {_gib(available)} is available. Solve a smaller problem (fewer points, "
            f"or the batch in parts), or use {other}."
        )
