"""Per-image hyperpixels and CAM on disk (``scot-ot eval --cache-dir DIR``), computed once for every run.

An image's file is ``DIR/<kk>/<key>.pt`` with

.. math::

    \\text{key} = \\operatorname{sha256}\\big(\\operatorname{sha256}(\\text{image file bytes})
    \\,\\Vert\\, \\operatorname{sha256}(\\text{settings})\\big)

where the settings are everything the features depend on: the backbone's name and a
digest of its weights (the tensors themselves, so the same file under another name is
the same key and a retrained file is not), the hyperpixel layers and norm, every
ensemble backbone's name, layers and weights digest, the image side, the
CAM settings (on/off, scales, top-k, maximum area), the device type (CPU and GPU
convolutions round differently), the versions of scot_ot and torch, and the file
format. Change any of them and the key changes: the old files are never read for the
new setting. With mask marginals (``--marginals mask``) the image file's digest is
followed by its mask file's, so the stored weights follow the mask. A renamed or copied image keeps its key (its bytes are the same).

Files are written with :func:`torch.save` to a temporary file and renamed into place
(:func:`scot_ot.outputs.atomic_write`), so several processes (torchrun ranks, array
tasks) may share one folder: a reader sees a whole file or none. They are read with
``torch.load(weights_only=True)`` (tensors, numbers, strings: no code runs). A file
that cannot be read or does not hold what it should is recomputed and rewritten, with
one warning; a folder that cannot be written is used read-only, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..matching.hyperpixels import Hyperpixels
from ..outputs import atomic_write

#: bumped when the file layout changes (old files then miss)
FORMAT = 1


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict: names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_settings(model) -> Dict[str, Any]:
    """What the hyperpixels of an image depend on, besides the image (see the module doc)."""
    import scot_ot

    ex = model.extractor
    return {"format": FORMAT, "backbone": model.backbone.name, "weights_sha256": weights_digest(model.backbone),
            "layers": list(ex.layers), "hyperpixel_norm": ex.norm,
            "ensemble": [{"backbone": b.name, "layers": list(ids), "weights_sha256": weights_digest(b)}
                         for b, ids in zip(ex.companions, ex.companion_layers)],
            "image_side": int(model.image_side), "use_cam": bool(ex.use_cam),
            "cam_scales": list(ex.cam_scales), "cam_top_k": int(ex.cam_top_k),
            "cam_max_area": float(ex.cam_max_area), "device_type": model.device.type,
            "scot_ot": scot_ot.__version__, "torch": torch.__version__}


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DiskCache:
    """Hyperpixels of image files under ``folder``, for the settings of ``model``.

    Counters: ``hits`` (read from disk), ``writes``, ``corrupt`` (unreadable files,
    recomputed), ``write_failed`` (whether the folder turned out not to be writable).
    """

    def __init__(self, folder, model, mask_file=None):
        self.folder = Path(folder)
        self.mask_file = mask_file  # image path -> its mask file, when masks replace the CAM
        self.settings = feature_settings(model)
        self.settings_sha256 = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()
        self.device = model.device
        self.hits = self.writes = self.corrupt = 0
        self.write_failed = False

    def key(self, image_path) -> Optional[str]:
        """The key of an image file; None if the file cannot be read (extraction then reports why)."""
        try:
            content = file_digest(image_path)
            if self.mask_file is not None:
                content += file_digest(self.mask_file(image_path))
        except (OSError, ValueError):  # ValueError: no mask (MaskError), reported by the extraction
            return None
        return hashlib.sha256(f"{content}\0{self.settings_sha256}".encode()).hexdigest()

    def file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, image_path) -> Optional[Hyperpixels]:
        """The stored hyperpixels of ``image_path``, or None (absent, unreadable image, corrupt file)."""
        key = self.key(image_path)
        if key is None:
            return None
        f = self.file(key)
        if not f.is_file():
            return None
        try:
            obj = torch.load(f, map_location=self.device, weights_only=True)
            hp = _from_record(obj, key, self.settings_sha256)
        except Exception as e:  # noqa: BLE001 -- any unreadable file is recomputed, never fatal
            self.corrupt += 1
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"feature cache file {f} is unreadable ({why[:200]}); recomputing it")
            return None
        self.hits += 1
        return hp

    def save(self, image_path, hp: Hyperpixels) -> None:
        """Store ``hp`` for ``image_path`` (atomically); a folder that cannot be written is warned about once."""
        if self.write_failed:
            return
        key = self.key(image_path)
        if key is None:
            return
        record = _to_record(hp, key, self.settings_sha256)
        try:
            atomic_write(self.file(key), lambda tmp: torch.save(record, tmp))
        except OSError as e:
            self.write_failed = True
            warnings.warn(f"feature cache folder {self.folder}: {e}; going on without writing to it")
            return
        self.writes += 1

    def counters(self) -> Dict[str, Any]:
        return {"disk_hits": self.hits, "disk_writes": self.writes, "disk_corrupt": self.corrupt}


def _to_record(hp: Hyperpixels, key: str, settings: str) -> dict:
    # a copy with its own storage: torch.save of a view would also save the rest of its base tensor
    cpu = lambda t: None if t is None else t.detach().to("cpu").clone()  # noqa: E731
    return {"format": FORMAT, "key": key, "settings_sha256": settings,
            "feats": cpu(hp.feats), "boxes": cpu(hp.boxes), "centres": cpu(hp.centres),
            "grid": [int(v) for v in hp.grid], "size": [int(v) for v in hp.size],
            "scale": [float(v) for v in hp.scale], "weights": cpu(hp.weights), "cam": cpu(hp.cam)}


def _from_record(obj: Any, key: str, settings: str) -> Hyperpixels:
    """The :class:`Hyperpixels` in a loaded file; ``ValueError`` saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not a dict")
    if obj.get("format") != FORMAT or obj.get("key") != key or obj.get("settings_sha256") != settings:
        raise ValueError("its format, key or settings do not match its name")
    feats, boxes, centres, weights, cam = (obj.get(k) for k in ("feats", "boxes", "centres", "weights", "cam"))
    if not all(isinstance(t, torch.Tensor) for t in (feats, boxes, centres, weights)):
        raise ValueError("a tensor is missing")
    grid, size, scale = obj.get("grid"), obj.get("size"), obj.get("scale")
    if not (isinstance(grid, list) and len(grid) == 2 and isinstance(size, list) and len(size) == 2
            and isinstance(scale, list) and len(scale) == 2):
        raise ValueError("grid, size or scale is not a pair")
    n = feats.shape[0]
    if feats.ndim != 2 or boxes.shape != (n, 4) or centres.shape != (n, 2) or weights.shape != (n,) \
            or grid[0] * grid[1] != n or (cam is not None and not isinstance(cam, torch.Tensor)):
        raise ValueError("tensor shapes do not agree")
    return Hyperpixels(feats, boxes, centres, (int(grid[0]), int(grid[1])), (int(size[0]), int(size[1])),
                       (float(scale[0]), float(scale[1])), weights, cam)
