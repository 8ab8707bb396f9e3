"""Size guards: a solver that cannot fit is refused before it allocates, with needed vs available."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import scot_ot
from scot_ot.ot import OTProblem, get_solver, memory
from scot_ot.ot.errors import SolverMemoryError

GiB = 2**30


def unvalidated_problem(n: int, m: int, dtype=torch.float32) -> OTProblem:
    """An (n, m) problem whose cost is one stored number (expand): no n x m allocation, no validation.
    Marginals in the working dtype (float32 for a half-precision cost)."""
    C = torch.zeros(1, dtype=dtype).expand(1, n, m)
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    a = torch.full((1, n), 1.0 / n, dtype=work)
    b = torch.full((1, m), 1.0 / m, dtype=work)
    return OTProblem(C=C, a=a, b=b, eps=0.05, reg_m=(math.inf, math.inf), batched=False)


def test_emd_20000_is_refused_without_allocating(monkeypatch):
    """The issue's case: pot-emd on 20000 x 20000 ran past 90 s at 15 GB. Now: refused at once."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * GiB)
    p = unvalidated_problem(20000, 20000)
    need = memory.needed_bytes(get_solver("pot-emd"), p)
    # float32 cost: float64 copy 8 + network simplex 25 + POT's plan 8 + stacked 8 + cast 4, times 1.1
    assert need == {torch.device("cpu"): int(1.1 * 4e8 * 53)}
    t = time.perf_counter()
    with pytest.raises(SolverMemoryError) as info:
        memory.check_memory(get_solver("pot-emd"), p)
    assert time.perf_counter() - t < 1.0
    err = info.value
    assert isinstance(err, MemoryError)
    assert (err.needed, err.available) == (int(1.1 * 4e8 * 53), 8 * GiB)
    msg = str(err)
    assert "'pot-emd' needs about 21.72 GiB on cpu for a 20000 x 20000 problem" in msg
    assert "only 8.00 GiB is available" in msg
    assert "smaller problem" in msg and "'torch-log' or 'torch-absorb': 2-3 dense n x m buffers" in msg


def test_solve_refuses_before_the_solver_runs(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * 2**20)

    def never(*args, **kwargs):
        raise AssertionError("the solver ran although it cannot fit")

    monkeypatch.setattr(type(get_solver("pot-emd")), "solve", never)
    C = torch.rand(600, 700)  # pot-emd: 600 * 700 * 53 * 1.1 = 24 MiB > 10 MiB
    with pytest.raises(SolverMemoryError, match=r"needs about 23\.4 MiB .* only 10\.0 MiB"):
        scot_ot.solve(C, solver="pot-emd")
    # 2 float32 buffers = 3.2 MiB fit: torch-log runs
    assert scot_ot.solve(C, solver="torch-log", max_iter=2).n_iters == 2


def test_estimates_per_solver():
    p = unvalidated_problem(100, 200)
    nm4 = 100 * 200 * 4
    cpu = torch.device("cpu")
    expected = {"torch-log": 2, "torch-absorb": 3, "pot-sinkhorn": 6, "pot-sinkhorn-log": 4,
                "pot-sinkhorn-stabilized": 6, "pot-unbalanced": 7}
    for name, k in expected.items():
        assert memory.needed_bytes(get_solver(name), p) == {cpu: k * nm4}, name
    # a bfloat16 cost is iterated in float32: float32 buffers
    assert memory.needed_bytes(get_solver("torch-log"), unvalidated_problem(100, 200, torch.bfloat16)) == {cpu: 2 * nm4}
    # float64 CPU cost: POT's emd reads it in place, nothing to cast back
    p64 = unvalidated_problem(100, 200, torch.float64)
    assert memory.needed_bytes(get_solver("pot-emd"), p64) == {cpu: int(1.1 * 100 * 200 * (25 + 16))}
    # fused: the float32 plan, plus a rounded copy only when cost_dtype narrows the cost
    assert memory.fused_bytes(p) == {cpu: nm4}
    assert memory.fused_bytes(p, cost_dtype=torch.bfloat16) == {cpu: 100 * 200 * (2 + 4)}

    info = get_solver("torch-log").info  # a solver declares its estimate in its SolverInfo
    declares = type("Declares", (), {"name": "my-solver", "info": dataclasses.replace(info, memory=lambda p: {cpu: 7})})
    assert memory.needed_bytes(declares, p) == {cpu: 7}
    silent = type("Silent", (), {"name": "my-solver", "info": dataclasses.replace(info, memory=None)})
    assert memory.needed_bytes(silent, p) == {cpu: 3 * nm4}  # the default: 3 dense buffers


def test_unknown_available_memory_refuses_nothing(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    memory.check_memory(get_solver("pot-emd"), unvalidated_problem(100000, 100000))


def test_available_bytes_reads_meminfo():
    have = memory.available_bytes(torch.device("cpu"))
    if have is None:
        pytest.skip("no /proc/meminfo here")
    total = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    assert 0 < have <= total
    assert memory.available_bytes(torch.device("meta")) is None


PEAK_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import torch
    import scot_ot
    from scot_ot.ot import get_solver, memory, OTProblem

    solver, n = sys.argv[1], int(sys.argv[2])
    C = torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    p = OTProblem.create(C)
    est = memory.needed_bytes(get_solver(solver), p)[torch.device("cpu")]
    # warm-up on a small problem: loads the code pages of every kernel used (they count in RSS)
    small = torch.rand(64, 64, generator=torch.Generator().manual_seed(1))
    scot_ot.solve(small, solver=solver, max_iter=20, check_every=10).plan

    def status(key):  # "VmRSS:  123 kB" -> bytes
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current resident size
    before = status("VmRSS")
    r = scot_ot.solve(C, solver=solver, max_iter=20, check_every=10)
    r.plan
    print(json.dumps({"estimate": est, "before": before, "peak": status("VmHWM")}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("solver, n", [("pot-emd", 1500), ("torch-log", 1500), ("pot-sinkhorn", 1500)])
def test_estimate_bounds_the_measured_peak(solver, n):
    """Peak RSS growth of one solve (plan included), measured in a fresh process: the estimate is an
    upper bound, and at most 2.5 times the measurement. A fixed mmap threshold makes glibc return
    every freed buffer (>= 64 KiB) to the system, so the resident size follows the live buffers."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, solver, str(n)], capture_output=True,
                         text=True, timeout=300, check=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    used = r["peak"] - r["before"]
    assert used > 0, r
    assert used <= r["estimate"] <= 2.5 * used, (solver, used / n**2, r["estimate"] / n**2)
