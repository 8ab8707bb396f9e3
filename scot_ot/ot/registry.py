"""Solvers by name: the one place where a string becomes a solver, and what each one declares.

A solver is a class with

- ``name``: the registry key (a string used only at the CLI/config edge);
- ``info``: a :class:`SolverInfo`, its typed capabilities;
- ``solve(problem, *, max_iter, tol, check_every, **options) -> OTResult``, taking as
  keywords exactly the options ``info.options`` declares.

It registers itself with the :func:`register` class decorator in its own module, and
:mod:`scot_ot.ot` imports the built-in modules, so adding a solver is one file
(``docs/solvers.md``, "Adding a solver"). :func:`get_solver` instantiates the class on
each call (the POT wrappers import POT there, so the first ``import ot`` is not counted
as OT time); everything else here reads the class's ``info`` and instantiates nothing.

Behaviour follows the declared capabilities, never a list of names:
:func:`scot_ot.solve` refuses a KL-relaxed problem unless ``info.marginals`` has its
kind, and a cost that requires grad unless ``info.differentiable``; the alternatives that
error messages suggest come from :func:`suggest`; the memory guard calls ``info.memory``;
``scot-ot solvers`` and the tables of README.md and docs/solvers.md are
:func:`solver_table`; the contract tests (``tests/test_solver_contract.py``) are generated
from ``info`` for every registered solver.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Protocol,
                    Tuple, Type)

import torch

from .problem import COST_DTYPES, OTProblem
from .result import OTResult


class Family(enum.Enum):
    """What kind of method it is."""

    ENTROPIC = "entropic"  # entropic OT at the problem's eps
    EXACT = "exact"  # the linear program; eps is ignored
    HEURISTIC = "not OT"  # a matching rule that does not enforce the marginals


class Marginals(enum.Enum):
    """A marginal constraint a solver handles (``info.marginals`` is a set of them).

    ``KL_UNBALANCED`` and ``SEMI_RELAXED`` are the kinds of problem ``reg_m`` makes
    (both sides relaxed; one side relaxed): :func:`scot_ot.solve` refuses a problem whose
    kind the solver does not declare. The others describe what the solver computes from a
    problem with ``reg_m=None``: ``BALANCED`` meets ``P1 = a``, ``P^T 1 = b``;
    ``PARTIAL_MASS`` moves the mass given by the option ``mass`` with ``P1 <= a``,
    ``P^T 1 <= b``; ``DUSTBIN`` sends what it leaves unmatched to a dustbin, and its
    result reports it (``unmatched_a``, ``unmatched_b``: ``P1 + unmatched_a = a``).
    """

    BALANCED = "balanced"
    KL_UNBALANCED = "unbalanced (KL)"
    SEMI_RELAXED = "semi-relaxed"
    PARTIAL_MASS = "partial (mass m)"
    DUSTBIN = "dustbins"


#: what a solver that does not solve OT approximates: the balanced problem it is given
BALANCED_NEED: FrozenSet[Marginals] = frozenset({Marginals.BALANCED})


class Domain(enum.Enum):
    """Where the iterates live."""

    LOG = "log"
    KERNEL = "kernel"
    KERNEL_ABSORPTION = "kernel+absorption"
    KERNEL_MATRIX = "kernel, matrix materialised"
    NETWORK_SIMPLEX = "network simplex"
    CLOSED_FORM = "closed form"


class Batching(enum.Enum):
    """How a batch (B, n, m) is solved."""

    NATIVE = "native"  # all problems at once
    LOOP = "loop"  # one problem after the other


class Stopping(enum.Enum):
    """What ``max_iter``, ``tol`` and ``check_every`` do (each is validated for every solver)."""

    LOOP = "loop"  # the common loop (scot_ot.ot.iterate): a check every check_every, stop at tol
    FIXED = "fixed"  # exactly max_iter iterations, one check at the end
    DIRECT = "direct"  # no iterations to set: solved directly, one check


class Compute(enum.Enum):
    """The precision a solver computes in."""

    WORKING = "working dtype"  # the cost's dtype; float32 for a float16/bfloat16 cost
    FLOAT32 = "float32"
    FLOAT64 = "float64"


#: every float dtype a cost may have (:mod:`scot_ot.ot.problem`)
FLOAT_DTYPES: Tuple[torch.dtype, ...] = COST_DTYPES


@dataclass(frozen=True)
class Devices:
    """Device types the cost may be on, and how the solver uses them."""

    types: Tuple[str, ...] = ("cpu", "cuda")
    #: on "cpu" only in the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported)
    cpu_interpreter_only: bool = False
    #: computes on the host whatever the cost's device; results return to that device
    computes_on_cpu: bool = False
    #: reads a value on the host every iteration (cheap on the CPU, a sync on a GPU)
    host_read_per_iteration: bool = False

    def native(self, device_type: str) -> bool:
        """Runs on ``device_type`` as it is meant to (not in an interpreter)."""
        return device_type in self.types and not (device_type == "cpu" and self.cpu_interpreter_only)


@dataclass(frozen=True)
class Dtypes:
    """The cost dtypes a solver takes (others raise ``ValueError``) and what it computes in.
    Results are always in the problem's working dtype."""

    cost: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    compute: Compute = Compute.WORKING


@dataclass(frozen=True)
class Option:
    """A solver-specific keyword option of :func:`scot_ot.solve`.

    ``example``: a valid value on a cost in [0, 1] with unit marginals (for the docs, the
    CLI help and the contract tests); a required option must have one.
    """

    name: str
    description: str
    required: bool = False
    example: Any = None


#: the warm start every Sinkhorn-type solver takes (:mod:`scot_ot.ot.start`)
INIT = Option("init", "the row potential f to start from, shape (n,) or (B, n), e.g. result.f "
                      "(default: SCOT's u = 1/n)")

Estimate = Callable[..., Dict[torch.device, int]]


@dataclass(frozen=True, kw_only=True)
class SolverInfo:
    """The typed capabilities of a solver. ``summary`` is for humans and drives nothing.

    ``solves_ot``: False for a rule that does not enforce the marginals (its reported
    error is then its honest marginal violation). ``finite_at_any_eps``: never overflows or
    underflows whatever ``eps`` (log domain, absorption, or eps unused); a solver without
    it may raise :class:`scot_ot.NumericalError` at small eps. ``memory``: the estimate
    ``(problem, **options) -> {device: bytes}`` of what it allocates beyond the cost
    (:mod:`scot_ot.ot.memory`); None is three dense buffers.
    """

    summary: str
    family: Family
    marginals: FrozenSet[Marginals]
    domain: Domain
    devices: Devices = Devices()
    dtypes: Dtypes = Dtypes()
    batching: Batching = Batching.NATIVE
    stopping: Stopping = Stopping.LOOP
    differentiable: bool = False
    solves_ot: bool = True
    finite_at_any_eps: bool = False
    options: Tuple[Option, ...] = ()
    memory: Optional[Estimate] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "marginals", frozenset(self.marginals))
        object.__setattr__(self, "options", tuple(self.options))
        checks = [
            (isinstance(self.summary, str) and bool(self.summary), "summary: a non-empty string"),
            (isinstance(self.family, Family), "family: a Family"),
            (all(isinstance(m, Marginals) for m in self.marginals), "marginals: Marginals members"),
            (isinstance(self.domain, Domain), "domain: a Domain"),
            (isinstance(self.devices, Devices) and bool(self.devices.types), "devices: a Devices with types"),
            (isinstance(self.dtypes, Dtypes) and bool(self.dtypes.cost)
             and set(self.dtypes.cost) <= set(FLOAT_DTYPES), "dtypes: a Dtypes of float dtypes"),
            (isinstance(self.batching, Batching), "batching: a Batching"),
            (isinstance(self.stopping, Stopping), "stopping: a Stopping"),
            (all(isinstance(o, Option) for o in self.options), "options: Option instances"),
            (len(set(self.option_names)) == len(self.options), "options: names must be unique"),
            (all(o.example is not None for o in self.options if o.required),
             "options: a required option needs an example"),
            (self.solves_ot == (self.family is not Family.HEURISTIC),
             "solves_ot: False exactly for the HEURISTIC family"),
            (bool(self.marginals) == self.solves_ot, "marginals: empty exactly when it does not solve OT"),
            (Marginals.PARTIAL_MASS not in self.marginals or "mass" in self.option_names,
             "marginals: PARTIAL_MASS needs the option 'mass'"),
            (self.memory is None or callable(self.memory), "memory: a callable or None"),
        ]
        bad = [why for ok, why in checks if not ok]
        if bad:
            raise TypeError(f"SolverInfo: expected {'; '.join(bad)}")

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def required_options(self) -> Tuple[Option, ...]:
        return tuple(o for o in self.options if o.required)

    @property
    def takes_init(self) -> bool:
        """Takes the warm start :data:`INIT`."""
        return INIT.name in self.option_names


class Solver(Protocol):
    """A registered solver. It may also define ``check_device(device)``, raising
    :class:`~scot_ot.ot.errors.SolverUnavailableError` when it cannot run on ``device`` here
    (see :func:`check_solver_device`)."""

    name: str
    info: SolverInfo

    def solve(
        self, problem: OTProblem, *, max_iter: int, tol: float, check_every: int, **options
    ) -> OTResult: ...


_REGISTRY: Dict[str, Type[Solver]] = {}  # in registration order (the order suggestions list)


def _check_solver_class(cls) -> None:
    name, info = getattr(cls, "name", None), getattr(cls, "info", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", name):
        raise TypeError(f"register: {cls!r} needs a class attribute `name`, lower-case letters, digits, "
                        f"'.', '+' and '-' (no ':', ',' or '=': the CLI splits specs there), got {name!r}")
    if not isinstance(info, SolverInfo):
        raise TypeError(f"register: solver {name!r} needs a class attribute `info`, a SolverInfo")
    solve = getattr(cls, "solve", None)
    if not callable(solve):
        raise TypeError(f"register: solver {name!r} needs a method solve(problem, *, max_iter, tol, "
                        "check_every, **options)")
    params = inspect.signature(solve).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        takes = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        missing = [o for o in ("max_iter", "tol", "check_every", *info.option_names) if o not in takes]
        if missing:
            raise TypeError(f"register: solver {name!r}: solve() does not take {', '.join(missing)} "
                            "(the loop arguments and every option in info.options)")


def register(cls=None, *, replace: bool = False):
    """Register a solver class under ``cls.name``; use as a class decorator (``@register``).

    The class is checked (``name``, ``info``, a ``solve`` taking every declared option) and
    instantiated only by :func:`get_solver`. A name already taken raises ``ValueError``
    unless ``replace=True``.
    """
    def add(cls):
        _check_solver_class(cls)
        if cls.name in _REGISTRY and not replace:
            raise ValueError(f"solver {cls.name!r} is already registered")
        _REGISTRY[cls.name] = cls
        return cls

    return add if cls is None else add(cls)


def unregister(name: str) -> None:
    """Remove a registered solver (``KeyError`` if there is none of that name)."""
    del _REGISTRY[name]


@contextlib.contextmanager
def registered(cls) -> Iterator[type]:
    """``with registered(MySolver): ...``: registered inside the block only (tests, experiments)."""
    register(cls)
    try:
        yield cls
    finally:
        unregister(cls.name)


def available_solvers() -> List[str]:
    """Names of the registered solvers, sorted."""
    return sorted(_REGISTRY)


def _solver_class(name: str) -> Type[Solver]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"solver: unknown solver {name!r}; available: {', '.join(available_solvers())}"
        )
    return _REGISTRY[name]


def get_solver(name: str) -> Solver:
    """An instance of the solver registered under ``name``; unknown names list the available ones."""
    return _solver_class(name)()


def solver_info(name: str) -> SolverInfo:
    """The :class:`SolverInfo` of a registered solver, without instantiating it."""
    return _solver_class(name).info


def check_solver_device(name: str, device: torch.device) -> None:
    """Raise :class:`~scot_ot.ot.errors.SolverUnavailableError` unless solver ``name`` can run on
    ``device`` here: a device type its :class:`Devices` lists, and whatever its own
    ``check_device`` asks (``fused``: CUDA, or the Triton interpreter on the CPU). Cheap; for
    callers that want to refuse before any work."""
    from .errors import SolverUnavailableError

    cls = _solver_class(name)
    if device.type not in cls.info.devices.types:
        others = suggest(name, cls.info.marginals or BALANCED_NEED, device_type=device.type)
        raise SolverUnavailableError(
            f"solver {name!r} runs on {' or '.join(cls.info.devices.types)}, not {device.type}"
            + (f"; on {device.type} use {quoted(others)}" if others else ""))
    check = getattr(cls, "check_device", None)
    if check is not None:
        check(device)


def problem_kind(problem: OTProblem) -> Marginals:
    """``BALANCED`` (``reg_m=None``), ``SEMI_RELAXED`` (one side relaxed) or ``KL_UNBALANCED``."""
    relaxed = sum(not math.isinf(rho) for rho in problem.reg_m)
    return (Marginals.BALANCED, Marginals.SEMI_RELAXED, Marginals.KL_UNBALANCED)[relaxed]


def suggest(instead_of: Optional[str], need: Iterable[Marginals], *, differentiable: bool = False,
            stable: bool = False, native_batching: bool = False,
            device_type: Optional[str] = None) -> List[str]:
    """OT solvers other than ``instead_of`` that handle every kind in ``need`` and, when asked, are
    differentiable, finite at any eps (``stable``), batch natively and run natively on
    ``device_type``; in registration order (the built-ins: ``scot_ot.ot.__init__``'s order)."""
    need = frozenset(need)
    out = []
    for name, cls in _REGISTRY.items():
        i = cls.info
        if (name != instead_of and i.solves_ot and need <= i.marginals
                and (i.differentiable or not differentiable) and (i.finite_at_any_eps or not stable)
                and (i.batching is Batching.NATIVE or not native_batching)
                and (device_type is None or i.devices.native(device_type))):
            out.append(name)
    return out


def quoted(names: List[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    q = [f"'{n}'" for n in names]
    return q[0] if len(q) == 1 else f"{', '.join(q[:-1])} or {q[-1]}"


# ----------------------------------------------------------------------------- the table
_DTYPE_SHORT = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def _devices(d: Devices) -> str:
    types = [t for t in d.types if not (t == "cpu" and d.cpu_interpreter_only)]
    text = ", ".join(types)
    notes = (["cpu only in the Triton interpreter"] * d.cpu_interpreter_only
             + ["computed on the CPU"] * d.computes_on_cpu
             + ["a host read per iteration"] * d.host_read_per_iteration)
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _dtypes(d: Dtypes) -> str:
    cost = "any float" if set(d.cost) == set(FLOAT_DTYPES) else ", ".join(_DTYPE_SHORT[t] for t in d.cost)
    return cost if d.compute is Compute.WORKING else f"{cost}; computes in {d.compute.value}"


def _options(info: SolverInfo) -> str:
    return ", ".join(f"`{o.name}`" + (" (required)" if o.required else "") for o in info.options) or "–"


def solver_table(names: Optional[List[str]] = None) -> str:
    """Markdown table of the registered solvers' capabilities (``scot-ot solvers``, README.md,
    docs/solvers.md); ``names`` defaults to :func:`available_solvers`."""
    rows = ["| solver | family | marginals | domain | devices | cost dtypes | batches | autograd | "
            "options | what it is |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in available_solvers() if names is None else names:
        i = solver_info(name)
        marginals = ", ".join(m.value for m in Marginals if m in i.marginals) or "not enforced"
        rows.append(f"| `{name}` | {i.family.value} | {marginals} | {i.domain.value} | {_devices(i.devices)} | "
                    f"{_dtypes(i.dtypes)} | {i.batching.value} | {'yes' if i.differentiable else '–'} | "
                    f"{_options(i)} | {i.summary} |")
    return "\n".join(rows)


TABLE_START, TABLE_END = "<!-- solver-table:start -->", "<!-- solver-table:end -->"


def with_solver_table(text: str) -> str:
    """``text`` with the part between :data:`TABLE_START` and :data:`TABLE_END` replaced by
    :func:`solver_table` (``ValueError`` without exactly one pair of markers)."""
    if text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1:
        raise ValueError(f"expected one {TABLE_START} ... {TABLE_END} pair")
    head, rest = text.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    return f"{head}{TABLE_START}\n{solver_table()}\n{TABLE_END}{tail}"
