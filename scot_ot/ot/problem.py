"""The linear optimal-transport problem that every solver receives.

.. math::

    \\min_{P \\ge 0} \\; \\langle C, P \\rangle
        + \\varepsilon \\, \\mathrm{KL}(P \\,\\|\\, a \\otimes b)
        + \\rho_a \\, \\mathrm{KL}(P \\mathbf 1 \\,\\|\\, a)
        + \\rho_b \\, \\mathrm{KL}(P^\\top \\mathbf 1 \\,\\|\\, b)

``reg_m = (rho_a, rho_b)``; ``rho = inf`` turns a KL penalty into the hard
constraint ``P 1 = a`` (resp. ``P^T 1 = b``). Both infinite is balanced OT (then
``sum a == sum b`` is required); one infinite is semi-relaxed OT. The exact solver
(EMD) ignores ``eps``.

The problem is validated once, here; solvers trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

RegM = Union[None, float, Tuple[float, float]]

#: relative tolerance on ``|sum a - sum b| / max(sum a, sum b)`` for balanced problems
MASS_RTOL = 1e-5


def all_finite(x: torch.Tensor) -> bool:
    """True when no entry of the non-empty ``x`` is NaN or +-inf.

    ``min`` and ``max`` propagate NaN and expose infinities, so one reduction without
    a boolean temporary decides it (about 20x faster than ``isfinite(x).all()`` on a
    4000 x 4000 CPU cost).
    """
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@dataclass(frozen=True)
class OTProblem:
    """Validated cost and marginals, always batched internally.

    Attributes
    ----------
    C : (B, n, m) tensor, floating point
    a : (B, n) tensor, same dtype and device as C
    b : (B, m) tensor
    eps : float > 0, entropic regularisation
    reg_m : (rho_a, rho_b), each > 0 or ``inf``
    batched : whether the user passed a batched (B, n, m) cost; results are
        returned in the same layout.
    """

    C: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    eps: float
    reg_m: Tuple[float, float]
    batched: bool

    @classmethod
    def create(
        cls,
        C: torch.Tensor,
        a: Optional[torch.Tensor] = None,
        b: Optional[torch.Tensor] = None,
        eps: float = 0.05,
        reg_m: RegM = None,
    ) -> "OTProblem":
        """Validate the inputs and build the problem (uniform marginals by default)."""
        if not isinstance(C, torch.Tensor):
            raise TypeError(f"C: expected a torch.Tensor, got {type(C).__name__}")
        if C.dim() not in (2, 3):
            raise ValueError(f"C: expected shape (n, m) or (B, n, m), got {tuple(C.shape)}")
        if not C.is_floating_point():
            raise ValueError(f"C: expected a floating-point dtype, got {C.dtype}")
        batched = C.dim() == 3
        C3 = C if batched else C.unsqueeze(0)
        B, n, m = C3.shape
        if n == 0 or m == 0 or B == 0:
            raise ValueError(f"C: empty cost of shape {tuple(C.shape)}")
        if not all_finite(C3):
            bad = "NaN" if bool(torch.isnan(C3).any()) else "inf"
            raise ValueError(f"C: the cost contains {bad} values; every entry must be finite")

        a3 = cls._marginal("a", a, B, n, C3, batched)
        b3 = cls._marginal("b", b, B, m, C3, batched)

        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps: must be a finite number > 0, got {eps!r}")
        rho = cls._reg_m(reg_m)

        if math.isinf(rho[0]) and math.isinf(rho[1]):
            ma, mb = a3.sum(-1), b3.sum(-1)
            rel = (ma - mb).abs() / torch.maximum(ma, mb)
            if bool((rel > MASS_RTOL).any()):
                k = int(rel.argmax())
                raise ValueError(
                    "a, b: balanced OT needs equal masses, got sum(a)="
                    f"{float(ma[k]):.6g} and sum(b)={float(mb[k]):.6g} (batch {k}); "
                    "normalise them or pass reg_m for unbalanced OT"
                )
        return cls(C=C3, a=a3, b=b3, eps=float(eps), reg_m=rho, batched=batched)

    @staticmethod
    def _marginal(name, x, B, size, C3, batched):
        if x is None:
            return torch.full((B, size), 1.0 / size, dtype=C3.dtype, device=C3.device)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(x).__name__}")
        if x.dtype != C3.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} differs from the cost's {C3.dtype}")
        if x.device != C3.device:
            raise ValueError(f"{name}: device {x.device} differs from the cost's {C3.device}")
        want = (B, size) if batched else (size,)
        if tuple(x.shape) != want:
            raise ValueError(f"{name}: expected shape {want} to match C, got {tuple(x.shape)}")
        x = x.reshape(B, size)
        if not all_finite(x):
            raise ValueError(f"{name}: the marginal contains NaN or inf")
        if bool((x < 0).any()):
            raise ValueError(f"{name}: the marginal has negative entries")
        if bool((x.sum(-1) <= 0).any()):
            raise ValueError(f"{name}: the marginal has zero total mass")
        return x

    @staticmethod
    def _reg_m(reg_m: RegM) -> Tuple[float, float]:
        if reg_m is None:
            return (math.inf, math.inf)
        pair = tuple(reg_m) if isinstance(reg_m, (tuple, list)) else (reg_m, reg_m)
        if len(pair) != 2:
            raise ValueError(f"reg_m: expected a number or a pair (rho_a, rho_b), got {reg_m!r}")
        out = []
        for r in pair:
            if not isinstance(r, (int, float)) or math.isnan(r) or r <= 0:
                raise ValueError(f"reg_m: each entry must be > 0 or inf, got {reg_m!r}")
            out.append(float(r))
        return (out[0], out[1])

    # ------------------------------------------------------------------ derived
    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.C.shape)

    @property
    def balanced(self) -> bool:
        return math.isinf(self.reg_m[0]) and math.isinf(self.reg_m[1])

    def tau(self, side: int) -> float:
        """Damping exponent ``rho / (rho + eps)`` of the KL-relaxed update (1 when rho is inf)."""
        rho = self.reg_m[side]
        return 1.0 if math.isinf(rho) else rho / (rho + self.eps)

    def unbatch(self, x: torch.Tensor) -> torch.Tensor:
        """Drop the internal batch axis when the user gave an unbatched cost."""
        return x if self.batched else x[0]
