"""Random OT problems shared by the solver test modules: SCOT-like cosine costs and positive marginals.

Every draw goes through a seeded :class:`torch.Generator`, in float64, then is cast.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cosine_cost(g: torch.Generator, n: int, m: int, d: int = 8, dtype=F64) -> torch.Tensor:
    """``1 - max(cos, 0)`` between random unit features, in [0, 1] (SCOT's cost)."""
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=F64), dim=1)
    return (1.0 - (x @ y.T).clamp_min(0.0)).to(dtype)


def marginal(g: torch.Generator, n: int, mass: float = 1.0, dtype=F64) -> torch.Tensor:
    """``n`` positive weights (each at least 0.2 / 1.2 of the largest possible) summing to ``mass``."""
    x = torch.rand(n, generator=g, dtype=F64) + 0.2
    return (x * (mass / x.sum())).to(dtype)
