"""Where every entropic solver starts: SCOT's (and POT's) ``u = 1/n``, or a warm start ``f``.

One iteration is a column update followed by a row update
(:mod:`scot_ot.ot.iterate`), so an iteration depends on the row potential ``f``
only: the first column update recomputes ``g`` from ``f``. A start is therefore a
row potential alone.

The default start
-----------------
SCOT's official code calls POT's ``ot.sinkhorn``, which starts from the scaling
``u = 1/n`` in ``P = diag(u) exp(-C/eps) diag(v)``. In the potentials of
:mod:`scot_ot.ot.result` (``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``, i.e.
``u_i = a_i exp(f_i/eps)``) that is

.. math::

    f^0_i = -\\varepsilon \\, (\\log n + \\log a_i) \\qquad (a_i > 0),

and ``f^0_i = 0`` where ``a_i = 0`` (such a row carries no mass, so its
potential never enters an update). ``f^0 = 0`` for uniform ``a``. Every entropic
solver (``torch-log``, ``torch-absorb``, ``fused`` and the ``pot-*`` wrappers)
starts from :func:`scot_start`, so iteration ``k`` is the same iterate for all of
them, and equals SCOT's ``k``-th Sinkhorn iterate. (For balanced problems any
``f^0 + c`` gives the same plans; POT's ``sinkhorn_log`` starts from ``u = 1``,
the same iterates.)

One difference remains with POT's own defaults, for zero weights only: POT's
``u = 1/n`` gives a zero-weight row a say in the first column update, ours
(``a_i exp(f_i/eps) = 0``) does not.

Warm starts (``init``)
----------------------
``init`` is the row potential ``f``, shape (n,) or (B, n) like ``a``: typically
``result.f`` of an earlier run, which then continues exactly (``k`` iterations,
then ``k`` more from ``result.f``, give the ``2k``-th iterate). A pair
``(f, g)`` is refused: its ``g`` would be recomputed by the first column update
and silently ignored.
"""

from __future__ import annotations

from typing import Optional

import torch

from .problem import OTProblem, all_finite


def scot_start(problem: OTProblem) -> torch.Tensor:
    """SCOT's start ``f_i = -eps (log n + log a_i)`` (0 where ``a_i = 0``), shape (B, n),
    in the problem's working dtype."""
    n, a = problem.shape[1], problem.a
    positive = a > 0
    safe = torch.where(positive, a, torch.ones_like(a))  # (B, n); no log(0), no NaN gradient
    return torch.where(positive, -problem.eps * torch.log(n * safe), torch.zeros_like(a))


def check_init(problem: OTProblem, init) -> Optional[torch.Tensor]:
    """Validate a warm start ``f`` and return it as (B, n) in the working dtype (None: no init)."""
    if init is None:
        return None
    if isinstance(init, (tuple, list)):
        raise ValueError(
            "init: expected the row potential f alone (a tensor like a, e.g. result.f), got a "
            f"{type(init).__name__} of {len(init)}; g is not taken because each iteration starts "
            "with the column update, which recomputes g from f"
        )
    B, n, _ = problem.shape
    want = (B, n) if problem.batched else (n,)
    if not isinstance(init, torch.Tensor) or tuple(init.shape) != want:
        got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(f"init: expected a tensor of shape {want} (the row potential f), got {got}")
    if not init.is_floating_point():
        raise ValueError(f"init: expected a floating-point tensor, got {init.dtype}")
    if init.device != problem.C.device:
        raise ValueError(f"init: device {init.device} differs from the cost's {problem.C.device}")
    if not all_finite(init):
        raise ValueError("init: the potential contains NaN or inf")
    return init.reshape(B, n).to(problem.dtype)


def start_potential(problem: OTProblem, init: Optional[torch.Tensor]) -> torch.Tensor:
    """The row potential a solver starts from: ``init`` (validated by :func:`check_init`) or
    :func:`scot_start`."""
    return scot_start(problem) if init is None else init
