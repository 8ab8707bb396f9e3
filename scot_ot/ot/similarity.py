"""``similarity``: no OT at all, the similarity ``1 - C`` in place of a plan. A baseline.

SCOT's cost is ``C = 1 - max(cos, 0)`` (:func:`scot_ot.matching.scot.cosine_cost`), so
``1 - C`` is the clipped cosine similarity that HPF-style matchers score with directly.
This rule returns it, clipped at 0 (a no-op for costs in [0, 1]), scaled to the total
mass:

.. math::

    P_{ij} = |a|\\, \\frac{\\max(1 - C_{ij}, 0)}{\\sum_{kl} \\max(1 - C_{kl}, 0)}

It is the "no OT" reference of ``benchmarks/convergence.py``, registered so that
``scot-ot eval --solver`` can compare it with the OT solvers in one run. Not OT:
``eps`` is ignored, nothing is iterated (``n_iters = 0``), the marginals are not enforced,
``errors = (err,)`` is the honest marginal error ``||P1 - a||_1 + ||P^T 1 - b||_1`` of this
plan, ``converged`` only if ``err <= tol``, and the potentials are NaN. A cost with no
entry below 1 has no similarity to scale and raises a ``ValueError``.
"""

from __future__ import annotations

import time

from .dual_softmax import one_shot_result
from .iterate import validate_loop_args
from .registry import Domain, Family, SolverInfo, Stopping, register
from .result import OTResult


@register
class Similarity:
    """``similarity``: ``max(1 - C, 0)`` scaled to the total mass (module docstring)."""

    name = "similarity"
    info = SolverInfo(
        summary="not OT: the similarity 1 - C scaled to the total mass (the no-OT baseline), "
                "marginals not enforced",
        family=Family.HEURISTIC,
        solves_ot=False,
        marginals=frozenset(),
        domain=Domain.CLOSED_FORM,
        stopping=Stopping.DIRECT,
        finite_at_any_eps=True,  # eps is not used
    )

    def solve(self, problem, *, max_iter, tol, check_every) -> OTResult:
        max_iter, tol, check_every = validate_loop_args(max_iter, tol, check_every)
        t0 = time.perf_counter()
        P = problem.C.to(problem.dtype, copy=True).neg_().add_(1.0).clamp_min_(0.0)  # (B, n, m)  max(1 - C, 0)
        total = P.sum((-2, -1))  # (B,)
        if bool((total <= 0).any()):
            raise ValueError("C: every cost is >= 1, so the similarity 1 - C is zero everywhere; "
                             "the 'similarity' rule expects costs 1 - similarity in [0, 1]")
        P.mul_((problem.a.sum(-1) / total)[:, None, None])
        return one_shot_result(self.name, problem, P, 0, tol, t0)
