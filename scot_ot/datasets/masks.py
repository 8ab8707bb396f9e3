"""Foreground masks of benchmark images (``scot-ot eval --masks DIR``).

A mask is an 8-bit (or 1-bit) image, nonzero = foreground, stored at any size:
SCOT's published FCN segmentations of PF-WILLOW are smaller than their images and
not always of the same aspect ratio. As SCOT's code does, a mask is **stretched to
its image's full size** (bilinear, ``align_corners=False``, values scaled to
[0, 1]) and thresholded,

.. math:: \\mathrm{fg}(x, y) = \\big[\\,\\mathrm{bilinear}(m / 255)(x, y) > 0.5\\,\\big],

which gives one boolean (H, W) map per image, in original pixels. The evaluation
uses it twice: as the independent foreground of the background-matching measure
(:func:`scot_ot.diagnostics.user_mask` reads it at each hyperpixel centre) and, with
``--marginals mask``, as SCOT's "FCN" marginals (the map replaces the CAM before the
staircase weights, so foreground hyperpixels weigh 1 and background ones 0.5).

Layout of ``DIR`` (one rule for every dataset): the mask of image ``.../<folder>/<name>.<ext>`` is

1. ``DIR/<folder>/<name>.png`` when that file exists (PF-WILLOW's
   ``PF-WILLOW-FCN/<subclass>/<image>.png``; SPair-71k's ``<category>/<image>.png``),
2. else ``DIR/<name>.png`` (a flat folder, e.g. PF-PASCAL's ``JPEGImages``).

An image without a mask raises :class:`MaskError` naming both places looked at;
evaluation records it as the pair's skip reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from .pair import PathLike

#: a stretched mask value above this is foreground
THRESHOLD = 0.5


class MaskError(ValueError):
    """A foreground mask that is missing or cannot be used (names the file)."""


def read_mask(path: PathLike, size: Tuple[int, int], name: str = "mask") -> torch.Tensor:
    """The mask file ``path`` stretched to ``size`` = (W, H) and thresholded: (H, W) bool.

    ``MaskError`` when the file is missing or is not an image (an empty foreground is
    valid: a segmenter may find nothing).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{name}: no such file: {path}")
    try:
        with Image.open(path) as im:
            m = np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # (h, w) in [0, 1]
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MaskError(f"{name}: cannot read {path} as an image ({e})") from None
    W, H = size
    t = torch.from_numpy(m)[None, None]
    stretched = torch.nn.functional.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)
    return stretched[0, 0] > THRESHOLD


class MaskFolder:
    """The masks under ``root``, looked up by image path (see the module doc).

    ``arg`` names the option that gave the folder in error messages.
    """

    def __init__(self, root: PathLike, arg: str = "--masks"):
        self.root = Path(root).expanduser()
        self.arg = arg
        if not self.root.is_dir():
            raise MaskError(f"{arg}: no such folder: {self.root}")
        self._cache: Dict[str, torch.Tensor] = {}

    def candidates(self, image_path: PathLike) -> Tuple[Path, Path]:
        """Where the mask of ``image_path`` may be, in the order they are tried."""
        p = Path(image_path)
        return self.root / p.parent.name / f"{p.stem}.png", self.root / f"{p.stem}.png"

    def path_for(self, image_path: PathLike) -> Path:
        """The mask file of ``image_path``; ``MaskError`` naming both places when there is none."""
        nested, flat = self.candidates(image_path)
        for c in (nested, flat):
            if c.is_file():
                return c
        raise MaskError(f"{self.arg}: no mask for {image_path} (looked for {nested} and {flat})")

    def load(self, image_path: PathLike, size: Tuple[int, int]) -> torch.Tensor:
        """(H, W) bool foreground of ``image_path``, whose original size is ``size`` = (W, H)."""
        return read_mask(self.path_for(image_path), size, f"{self.arg} (mask of {image_path})")

    def load_for_image(self, image_path: PathLike) -> torch.Tensor:
        """:meth:`load` at the image's own size (read from the image file's header), cached by image.

        An image that cannot be opened raises :class:`~scot_ot.matching.image.ImageError`, as
        reading it for its features would."""
        from PIL import Image, UnidentifiedImageError

        from ..matching.image import ImageError

        key = str(image_path)
        if key not in self._cache:
            try:
                with Image.open(image_path) as im:
                    size = im.size
            except (UnidentifiedImageError, OSError) as e:
                raise ImageError(f"image: cannot read {image_path} ({e})") from None
            self._cache[key] = self.load(image_path, size)
        return self._cache[key]
