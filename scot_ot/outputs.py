"""Output files: checked before any work, written atomically, with the user's permissions.

Every file the package writes (results JSON, figures, keypoints) goes through
:func:`atomic_write`: the content is written to a hidden temporary file in the
target folder and renamed over the target, so a reader (or a killed run) sees the
old file or the new one, never half of one. The temporary file is created with mode
0600; before the rename it gets the mode a plain ``open(path, "w")`` would give
(``0666 & ~umask``, so 0644 under the usual umask 022).

:func:`check_output_file` and :func:`check_output_dir` run before any computation
and name the argument and the path the user gave. JSON is always standard JSON:
:func:`to_json` turns NaN and infinities into ``null``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

#: picture formats the CLI writes, by file extension (matplotlib's writers)
PICTURE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg", "tif", "tiff", "webp")


def current_umask() -> int:
    """The process umask (read from /proc where possible; else set and restored at once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, arg: str, given: PathLike) -> None:
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise ValueError(f"{arg} {given}: {folder} is a file, not a folder, so nothing can be written under it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {given}: the folder {folder} is not writable")


def check_output_file(path: PathLike, arg: str, formats: Optional[Iterable[str]] = None) -> Path:
    """``path`` as a Path if a file can be written there; ``ValueError`` naming ``arg`` and ``path`` if not.

    ``formats``: the allowed extensions (without the dot), e.g. :data:`PICTURE_FORMATS`;
    the extension decides the format that is written.
    """
    p = Path(path)
    formats = None if formats is None else tuple(formats)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise ValueError(f"{arg}: give a file name, got {str(path)!r}")
    if p.is_dir():
        example = p / ("out." + (formats[0] if formats else "json"))
        raise ValueError(f"{arg} {path}: is a folder; give a file name, e.g. {example}")
    if formats is not None:
        ext = p.suffix.lower().lstrip(".")
        if ext not in formats:
            got = f"extension .{ext}" if ext else "no extension"
            raise ValueError(f"{arg} {path}: {got}; the extension names the format written, one of "
                             + ", ".join("." + f for f in formats))
    _check_parent(p, arg, path)
    return p


def check_output_dir(path: PathLike, arg: str) -> Path:
    """``path`` as a Path if it is (or can become) a folder; ``ValueError`` naming ``arg`` if not."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{arg} {path}: is a file; give a folder (created if absent)")
    _check_parent(p / "x", arg, path)
    return p


def atomic_write(out: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``out``, then rename it to ``out``.

    Missing parent folders are created. An ``OSError`` names ``out`` (not the
    temporary file); nothing is left behind on failure.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        os.close(fd)
    except OSError as e:
        folder = _nearest_existing(out.parent)
        why = f"{folder} is a file, not a folder" if not folder.is_dir() else (e.strerror or str(e))
        raise OSError(f"cannot write {out}: {why}") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    except OSError as e:
        raise OSError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / infinite floats replaced by ``None`` and numpy scalars made plain."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj: Any, indent: Optional[int] = 1) -> str:
    """Standard JSON text (``null``, never ``NaN``) of ``obj``."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(record: Any, out: PathLike) -> Path:
    """Write ``record`` as standard JSON to ``out`` atomically (see :func:`atomic_write`)."""
    text = to_json(record) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    return atomic_write(out, write)
