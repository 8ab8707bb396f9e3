"""Size guards: estimate the memory a solver needs before it starts, refuse what cannot fit.

A dense OT solver's memory is a few ``n x m`` buffers besides the cost. The
estimate counts the buffers the solver allocates *beyond the cost the caller
already holds*, per device, for the forward solve (``result.plan`` included;
gradients through an unrolled loop need more and are not counted):

=========================== ===================================================
solver                      extra bytes (``B`` problems of ``n x m``, ``s`` = itemsize of the working dtype)
=========================== ===================================================
``pot-emd``                 host, per problem: float64 cost copy (8, none for a
                            float64 CPU cost) + POT's plan and network simplex
                            (25 per arc); POT's float64 plans (8 B), stacked
                            (8 B) and cast to the working dtype (s B); all
                            times 1.1
``torch-log``               2 buffers of ``s``: one log-kernel step (the
                            log-sum-exp runs in it), then the plan
``torch-absorb``            3 buffers: the stabilised kernel and one log-domain
                            absorption step, then the plan
``pot-*`` (entropic)        POT's kernel (or ``-C/eps``), its temporaries and
                            plan, the previous chunk's plan: 6 (``pot-sinkhorn``),
                            4 (``-log``), 6 (``-stabilized``), 7 (``pot-unbalanced``)
                            buffers of ``s``
``fused``                   nothing beyond C, except a rounded copy of C when
                            ``cost_dtype`` differs from C's dtype, and the plan
                            (float32) when asked for
any other solver            3 buffers of ``s`` (:func:`default_bytes`)
=========================== ===================================================

The working dtype is that of the marginals, potentials and plans: the cost's dtype,
float32 for a half-precision cost (:func:`scot_ot.ot.problem.working_dtype`).

The factors are the live peaks measured on the CPU, plus one buffer (float32, n = m
= 1500 and 2500, 20 iterations and the plan, peak resident memory of a fresh process
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every freed buffer leaves the process):
``torch-log`` 1.0 buffer, ``torch-absorb`` 1.0 (no absorption in those iterations),
``pot-sinkhorn`` 4-5, ``-log`` 3, ``-stabilized`` 4-5, ``pot-unbalanced`` 5-6;
``pot-emd`` 41 bytes per entry (estimate 58). ``tests/test_memory.py`` checks that the
estimates of ``pot-emd``, ``torch-log`` and ``pot-sinkhorn`` bound the measured peak
within a factor of 2.5. Without that setting glibc keeps some freed buffers for reuse,
so the resident size can exceed the live peak by a buffer or two.

A solver declares its estimate in its :class:`scot_ot.ot.registry.SolverInfo`,
``memory=`` a function ``(problem, **options) -> {device: bytes}`` (the functions of
this module or its own); without one, :func:`default_bytes` applies.
:func:`check_memory` compares the estimate with the memory available on each
device (``/proc/meminfo`` ``MemAvailable`` and the cgroup limit on Linux;
``torch.cuda.mem_get_info`` plus the blocks torch's allocator caches, on CUDA) and
raises :class:`SolverMemoryError` when it does not fit, naming the registered stable
solvers that would need less there. When the available memory
is unknown (another OS, another device), nothing is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .errors import SolverMemoryError
from .problem import OTProblem

Estimate = Callable[..., Dict[torch.device, int]]
CPU = torch.device("cpu")

#: bytes per arc of POT's network simplex (``ot.emd`` on float64 numpy peaks at 32-33 bytes
#: per entry, its float64 plan included)
EMD_BYTES_PER_ARC = 25
#: safety factor of the ``pot-emd`` estimate (allocator and small-size overheads)
EMD_MARGIN = 1.1


def _entries(problem: OTProblem) -> int:
    """``n * m`` of one problem."""
    _, n, m = problem.shape
    return n * m


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dense_buffers(k: float) -> Estimate:
    """An estimate of ``k`` dense ``(B, n, m)`` buffers of the working dtype on the cost's device."""
    def estimate(problem: OTProblem, **options) -> Dict[torch.device, int]:
        B = problem.shape[0]
        return {problem.C.device: int(math.ceil(k * B * _entries(problem) * problem.a.element_size()))}
    return estimate


#: three dense buffers of the working dtype: a step, a temporary, the plan
default_bytes = dense_buffers(3)


def emd_bytes(problem: OTProblem, **options) -> Dict[torch.device, int]:
    """``pot-emd``: float64 host copies, POT's plan and network simplex, the plans returned."""
    B, nm, C = problem.shape[0], _entries(problem), problem.C
    native = C.dtype == torch.float64 and C.device.type == "cpu"  # .double().numpy() shares C
    per_problem = nm * ((0 if native else 8) + EMD_BYTES_PER_ARC)  # cost copy, network simplex
    plans = B * nm * (8 + 8 + (0 if native else problem.a.element_size()))  # POT's plans, np.stack, cast
    need = {CPU: int(EMD_MARGIN * (per_problem + plans))}
    if C.device.type != "cpu":
        need[C.device] = B * nm * problem.a.element_size()  # the plan copied back to the device
    return need


def fused_bytes(problem: OTProblem, cost_dtype: Optional[torch.dtype] = None, **options) -> Dict[torch.device, int]:
    """``fused``: streams C; a rounded copy when ``cost_dtype`` differs, and the float32 plan."""
    B, nm, C = problem.shape[0], _entries(problem), problem.C
    copy = 0 if cost_dtype is None or cost_dtype == C.dtype else _itemsize(cost_dtype)
    return {C.device: B * nm * (copy + 4)}


def needed_bytes(solver, problem: OTProblem, **options) -> Dict[torch.device, int]:
    """The estimate the solver declares (``solver.info.memory``), else :func:`default_bytes`."""
    estimate = solver.info.memory or default_bytes
    return estimate(problem, **options)


def _leaner(name: str, problem: OTProblem, device: torch.device, need: int):
    """Registered solvers that handle what ``name`` handles, stable and native on ``device``
    (:func:`scot_ot.ot.errors.stable_alternatives`), and need less than ``need`` bytes there:
    their names and their needs in dense ``n x m`` buffers of the working dtype."""
    from .errors import stable_alternatives
    from .registry import solver_info

    buffer = problem.shape[0] * _entries(problem) * problem.a.element_size()
    names, buffers = [], []
    for alt in stable_alternatives(name, device.type):
        alt_need = (solver_info(alt).memory or default_bytes)(problem).get(device, 0)
        if alt_need < need:
            names.append(alt)
            buffers.append(max(1, math.ceil(alt_need / buffer)))
    return names, buffers


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2: no limit) -> None


def _cgroup_headroom() -> Optional[int]:
    """Limit minus usage of this process's memory cgroup (v2, then v1), None without a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 2**60:  # v1 writes "no limit" as ~2^63
            return max(lim - use, 0)
    return None


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new allocations on ``device``; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free = torch.cuda.mem_get_info(device)[0]
            # blocks torch's caching allocator holds but does not use are free for this process too
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free + cached)
    if device.type != "cpu":
        return None
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    if "MemAvailable" not in fields:
        return None
    avail = int(fields["MemAvailable"].split()[0]) * 1024  # "123456 kB"
    cgroup = _cgroup_headroom()
    return avail if cgroup is None else min(avail, cgroup)


def check_memory(solver, problem: OTProblem, **options) -> None:
    """Raise :class:`SolverMemoryError` when ``solver``'s estimate exceeds the memory available."""
    for device, need in needed_bytes(solver, problem, **options).items():
        have = available_bytes(device)
        if have is not None and need > have:
            name = getattr(solver, "name", str(solver))
            lean, buffers = _leaner(name, problem, device, need)
            raise SolverMemoryError(name, tuple(problem.shape), device, need, have, lean, buffers)
