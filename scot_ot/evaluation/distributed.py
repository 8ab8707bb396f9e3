"""``scot-ot eval`` under ``torchrun``: one shard per rank, one merged record on rank 0.

torchrun starts one process per rank and tells each who it is through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``). Rank ``r`` of ``W`` evaluates shard ``r + 1`` of
``W`` (:mod:`.shards`; inside ``--shard K/N`` when both are given), on
``cuda:LOCAL_RANK`` when CUDA is present, and saves its pairs to its own *part file*
beside ``--out`` after every pair, so ``--resume`` continues each rank where it
stopped. When every rank is done, rank 0 gathers the records
(:func:`torch.distributed.gather_object`: gloo on the CPU, NCCL on GPUs), merges them
with :func:`~.merge.merge_records`, writes ``--out`` atomically, and the ranks delete
their part files.

A rank that fails exits at once with its error (and exit status); torchrun then stops
the other ranks, which save their part files, and fails the run. ``--out`` is written
only after a complete gather and merge, so no half-merged file is ever left.

Threads: P processes on a machine with C cores each use ``max(1, C // P)`` torch
threads, unless the user set ``OMP_NUM_THREADS`` (torchrun sets it to 1 for its
workers when the user did not; the launcher's own environment tells the two apart).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

#: how long rank 0 waits for the slowest rank at the gather (shards may differ by hours)
GATHER_TIMEOUT = datetime.timedelta(days=7)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class RankError(RuntimeError):
    """The ranks could not gather their results (another rank failed or vanished)."""


@dataclass(frozen=True)
class Launch:
    """Who this process is in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def part_file(self, out: Path) -> Path:
        """This rank's part file beside ``out``: ``NAME.part-R-of-W.json`` (R counted from 1)."""
        return out.with_name(f"{out.stem}.part-{self.rank + 1}-of-{self.world_size}{out.suffix}")


def launch_from_env(environ: Optional[Dict[str, str]] = None) -> Optional[Launch]:
    """The :class:`Launch` torchrun describes in the environment; None outside torchrun.

    ``ValueError`` naming the variable when one is there but not a valid number.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    values = {}
    for name in _ENV:
        text = env.get(name)
        if text is None and name.startswith("LOCAL_"):
            text = env["RANK"] if name == "LOCAL_RANK" else env["WORLD_SIZE"]
        try:
            values[name] = int(text)
        except (TypeError, ValueError):
            raise ValueError(f"torchrun: the environment variable {name}={text!r} is not an integer") from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size):
        raise ValueError(f"torchrun: RANK={launch.rank}, WORLD_SIZE={launch.world_size}, "
                         f"LOCAL_RANK={launch.local_rank}, LOCAL_WORLD_SIZE={launch.local_world_size} "
                         "do not describe a rank")
    return launch


def rank_label() -> str:
    """``"rank R of W"`` under torchrun, else ``""`` (never raises: for message prefixes)."""
    try:
        launch = launch_from_env()
    except ValueError:
        return ""
    return launch.label if launch is not None else ""


def resolve_device(device: Optional[str], launch: Launch) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``cuda`` (or no ``--device`` when CUDA is present)."""
    import torch

    if device is None:
        return f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{launch.local_rank}"
    if device.startswith("cuda:") and launch.local_world_size > 1:
        raise ValueError(f"--device: {device!r} under torchrun with {launch.local_world_size} processes per "
                         "machine would put them all on one GPU; give --device cuda: rank r takes cuda:LOCAL_RANK")
    return device


def _launcher_environ() -> Optional[Dict[str, str]]:
    """The environment torchrun itself was started with (Linux), or None if it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def threads_per_rank(launch: Launch) -> Optional[int]:
    """``max(1, C // P)`` for C cores and P local ranks; None when the user chose ``OMP_NUM_THREADS``."""
    if "OMP_NUM_THREADS" in os.environ:
        parent = _launcher_environ()
        if parent is None or "OMP_NUM_THREADS" in parent:
            return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // launch.local_world_size)


def init(launch: Launch, device: str) -> str:
    """Join the process group (NCCL on GPUs, gloo on the CPU); returns the backend."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, timeout=GATHER_TIMEOUT)
    return backend


def gather_records(launch: Launch, record: dict) -> Optional[list]:
    """Every rank's record on rank 0 (in rank order), None on the others; :class:`RankError` if a rank is gone."""
    import torch.distributed as dist

    out = [None] * launch.world_size if launch.rank == 0 else None
    try:
        dist.gather_object(record, out, dst=0)
    except RuntimeError as e:
        raise RankError(f"the ranks could not gather their results ({_first_sentence(e)}): another rank "
                        "failed (its error is above); the part files stay for --resume") from None
    return out


def broadcast(launch: Launch, value):
    """``value`` of rank 0 on every rank."""
    import torch.distributed as dist

    box = [value if launch.rank == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise RankError(f"lost the other ranks after the gather ({_first_sentence(e)})") from None
    return box[0]


def _first_sentence(e: Exception) -> str:
    """``"Connection closed by peer [127.0.0.1]:6047"`` from gloo's ``"[.../pair.cc:561] Connection ... . More."``."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().split("\n")[0])
    return (text.split(". ")[0] or type(e).__name__)[:160]


def seed_part(out: Path, part: Path, config: dict, pair_ids) -> None:
    """``--resume`` after a merged run: start this rank's part file from ``out``'s pairs of its shard.

    ``config``: this rank's configuration (with its ``shard`` levels); ``out`` must hold
    the same one at the level above (``ValueError`` listing the differences, as resume does).
    """
    from ..outputs import write_json
    from .run import config_diff, read_results

    old = read_results(out)
    strip = lambda c: {k: v for k, v in c.items() if k != "shard"}  # noqa: E731
    diff = config_diff(strip(old["config"]), strip(config))
    if old["config"].get("shard", []) != config.get("shard", [])[:-1]:
        diff.append(f"shard: {old['config'].get('shard', 'all')} in the file, "
                    f"{config.get('shard', [])[:-1] or 'all'} now")
    if diff:
        raise ValueError(f"--resume: {out} was made with another configuration ({'; '.join(diff)}); "
                         "use another --out, or drop --resume to overwrite it")
    ids = set(pair_ids)
    write_json({"config": config, "pairs": [p for p in old["pairs"] if p["pair_id"] in ids],
                "skipped": [], "complete": False}, part)


def close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
