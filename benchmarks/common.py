"""Helpers shared by the benchmarks: the machine record, timing statistics, JSON output, a table.

A benchmark writes one JSON file::

    {"benchmark": name, "machine": machine(device), "config": {...}, "records": [...]}

with one record per measurement, and prints :func:`table` of the records last.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` benchmarks this checkout, installed or not
    sys.path.insert(0, str(ROOT))


def machine(device: str = "cpu") -> Dict[str, object]:
    """Where and with what a benchmark ran: platform, CPU, threads, GPU, library versions, date."""
    import numpy as np
    import torch

    rec: Dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": device,
        "load_avg_1_5_15": load_average(),
    }
    try:
        import ot

        rec["pot"] = ot.__version__
    except ImportError:
        rec["pot"] = None
    try:
        import scot_ot

        rec["scot_ot"] = scot_ot.__version__
    except ImportError:
        rec["scot_ot"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(torch.device(device))
        rec["cuda"] = torch.version.cuda
    return rec


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (other processes skew CPU timings): None if unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def default_out(name: str, device: str) -> Path:
    """``benchmarks/results/<name>-<device>-<YYYYMMDD>.json``."""
    return RESULTS / f"{name}-{device.split(':')[0]}-{time.strftime('%Y%m%d')}.json"


def spread(samples: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min and max of repeated timings (linear-interpolated quartiles)."""
    import numpy as np

    x = np.asarray(samples, dtype=float)
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3),
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def write_json(record: dict, out: Path) -> None:
    """Write ``record`` to ``out`` atomically (temporary file, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=out.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, out)


def table(rows: Iterable[Dict[str, object]], columns: Sequence[str],
          headers: Optional[Sequence[str]] = None) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``; missing cells print as ``-``."""
    headers = list(headers or columns)
    cells: List[List[str]] = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def random_cosine_cost(n: int, d: int, features: str, noise: float, seed: int, dtype, device: str = "cpu"):
    """``1 - max(cos, 0)`` between random unit features, (n, n): ``y`` independent of ``x``
    (``features="iid"``) or a noisy permutation of it (``"matched"``, noise ``noise``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    if features == "iid":
        y = torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        y = x[torch.randperm(n, generator=g)] + noise * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.nn.functional.normalize(y, dim=1)
    return (1.0 - (x @ y.T).clamp_min(0.0)).to(dtype=dtype, device=device)  # (n, n)
