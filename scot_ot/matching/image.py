"""Images in: paths, PIL images or tensors, to RGB float tensors in [0, 1]."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

ImageLike = Union[str, Path, Image.Image, torch.Tensor, np.ndarray]


class ImageError(ValueError):
    """An input that is not a usable image (names the file or argument)."""


def load_image(x: ImageLike, name: str = "image") -> torch.Tensor:
    """RGB (3, H, W) float32 tensor in [0, 1].

    Paths are decoded with PIL; grayscale is repeated to three channels and RGBA
    is composited on white. Tensors are taken as (3, H, W) or (H, W) in [0, 1]
    (uint8 tensors / arrays are divided by 255).
    """
    if isinstance(x, (str, Path)):
        path = Path(x)
        if not path.is_file():
            raise ImageError(f"{name}: no such file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return _from_pil(im)
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{name}: cannot read {path} as an image ({e})") from None
    if isinstance(x, Image.Image):
        return _from_pil(x)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
        if x.dim() == 3 and x.shape[-1] in (1, 3, 4):
            x = x.permute(2, 0, 1)
    if isinstance(x, torch.Tensor):
        return _from_tensor(x, name)
    raise ImageError(f"{name}: expected a path, PIL image, array or tensor, got {type(x).__name__}")


def _from_pil(im: Image.Image) -> torch.Tensor:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _from_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
        raise ImageError(f"{name}: expected a (3, H, W), (1, H, W) or (H, W) tensor, got {tuple(x.shape)}")
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    if not bool(torch.isfinite(x).all()):
        raise ImageError(f"{name}: the image tensor contains NaN or inf")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        alpha = x[3:4]
        x = x[:3] * alpha + (1 - alpha)
    return x.contiguous()


def resize_longest(img: torch.Tensor, side: int) -> Tuple[torch.Tensor, Tuple[float, float]]:
    """Bilinear resize so that the longest side is ``side``.

    Returns the image and the per-axis scale ``(sx, sy)`` = new size / old size
    (x' = sx * x maps original pixel coordinates into the resized image).
    """
    H, W = img.shape[-2:]
    scale = side / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    out = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return out, (w / W, h / H)
