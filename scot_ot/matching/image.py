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


#: images whose shorter side is below this many pixels (before any resizing) are
#: refused: upscaled to the network's 300 px they carry no content to match
MIN_IMAGE_SIDE = 16

#: float images may exceed [0, 1] by this much (rounding of resampling); clamped
FLOAT_RANGE_SLACK = 1e-3


def load_image(x: ImageLike, name: str = "image") -> torch.Tensor:
    """RGB (3, H, W) float32 tensor in [0, 1].

    Files are decoded with PIL: 8-bit modes as PIL converts them to RGB; 16-bit
    grayscale (modes ``I;16*``, and ``I`` with values in 0..65535, as 16-bit PNGs
    decode) divided by 65535; 32-bit float (``F``) taken as is when in [0, 1].
    Grayscale is repeated to three channels and RGBA is composited on white.

    Arrays and tensors: (H, W), (C, H, W) or (H, W, C) with C in {1, 3, 4} (when
    both ends could be channels, numpy arrays are read as (H, W, C) and torch
    tensors as (C, H, W)). ``uint8`` is divided by 255, ``uint16`` by 65535, other
    integer types must hold 0..255 (divided by 255); floating point must already lie
    in [0, 1]; anything else raises :class:`ImageError` saying how to convert.

    Images with a shorter side below :data:`MIN_IMAGE_SIDE` pixels are refused.
    """
    if isinstance(x, (str, Path)):
        path = Path(x)
        if not path.is_file():
            raise ImageError(f"{name}: no such file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return _from_pil(im, f"{name}: {path}")
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"{name}: cannot read {path} as an image ({e})") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: {path} is too large to decode ({e})") from None
    if isinstance(x, Image.Image):
        return _from_pil(x, f"{name}: the PIL image")
    if isinstance(x, np.ndarray):
        return _from_array(x, name)
    if isinstance(x, torch.Tensor):
        return _from_tensor(x, name)
    raise ImageError(f"{name}: expected a path, PIL image, array or tensor, got {type(x).__name__}")


def _check_size(img: torch.Tensor, where: str) -> torch.Tensor:
    H, W = img.shape[-2:]
    if min(H, W) < MIN_IMAGE_SIDE:
        raise ImageError(f"{where} is {W} x {H} px (W x H); images need a shorter side of at least "
                         f"{MIN_IMAGE_SIDE} px (before resizing)")
    return img


def _from_pil(im: Image.Image, where: str) -> torch.Tensor:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode == "F":
            gray = arr.astype(np.float32)
            lo, hi = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -FLOAT_RANGE_SLACK or hi > 1 + FLOAT_RANGE_SLACK:
                raise ImageError(f"{where}: a 32-bit float image must hold values in [0, 1], got "
                                 f"[{lo:.4g}, {hi:.4g}]; save it as 8- or 16-bit")
            gray = np.clip(gray, 0.0, 1.0)
        else:
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            if lo < 0 or hi > 65535:
                raise ImageError(f"{where}: a 32-bit integer image with values in [{lo}, {hi}] has no "
                                 "known scale; save it as 8- or 16-bit")
            gray = arr.astype(np.float32) / 65535.0  # 16-bit grayscale
        img = torch.from_numpy(np.ascontiguousarray(gray))[None].expand(3, -1, -1).contiguous()
        return _check_size(img, where)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return _check_size(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), where)


def _channels_first(x: torch.Tensor, prefer_last: bool, name: str) -> torch.Tensor:
    """(H, W) -> (1, H, W); (C, H, W) or (H, W, C) with C in {1, 3, 4} -> (C, H, W)."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        first, last = x.shape[0] in (1, 3, 4), x.shape[-1] in (1, 3, 4)
        if last and (prefer_last or not first):
            return x.permute(2, 0, 1)
        if first:
            return x
    raise ImageError(f"{name}: expected an (H, W), (C, H, W) or (H, W, C) image with C in 1, 3, 4; "
                     f"got shape {tuple(x.shape)}")


def _from_array(x: np.ndarray, name: str) -> torch.Tensor:
    if x.dtype == np.uint16:  # torch has no general uint16 arithmetic: scale here
        x = x.astype(np.float32) / 65535.0
    elif x.dtype.kind not in "biuf":
        raise ImageError(f"{name}: expected a numeric image array, got dtype {x.dtype}")
    return _from_tensor(torch.from_numpy(np.ascontiguousarray(x)), name, prefer_last=True)


def _from_tensor(x: torch.Tensor, name: str, prefer_last: bool = False) -> torch.Tensor:
    x = _channels_first(x.detach(), prefer_last, name)
    if x.dtype == torch.bool or x.is_complex():
        raise ImageError(f"{name}: expected a numeric image, got dtype {x.dtype}; "
                         "pass uint8 (0..255) or float in [0, 1]")
    if x.numel() == 0:
        raise ImageError(f"{name}: the image is empty, shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype == getattr(torch, "uint16", None):
        x = x.float() / 65535.0
    elif not x.is_floating_point():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"{name}: an integer ({x.dtype}) image must hold 0..255, got [{lo}, {hi}]; "
                             "convert it to uint8, or to float in [0, 1]")
        x = x.float() / 255.0
    else:
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise ImageError(f"{name}: the image tensor contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < -FLOAT_RANGE_SLACK or hi > 1 + FLOAT_RANGE_SLACK:
            raise ImageError(f"{name}: a float image must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                             "for 0..255 data divide by 255 (x / 255.0) or pass it as uint8")
        x = x.clamp(0.0, 1.0)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        alpha = x[3:4]
        x = x[:3] * alpha + (1 - alpha)
    return _check_size(x.contiguous(), f"{name}: the image")


def resize_longest(img: torch.Tensor, side: int) -> Tuple[torch.Tensor, Tuple[float, float]]:
    """Bilinear resize (``align_corners=False``) so that the longest side is ``side``, as SCOT.

    SCOT's rule (``util.resize``), in float32:

    .. math:: r = \\mathrm{side} / \\max(H, W), \\qquad
        (H', W') = (\\lfloor H r \\rfloor, \\lfloor W r \\rfloor)

    (truncation, not rounding: 400 x 266 -> 300 x 199). Keypoints follow with the one
    ratio ``r`` on both axes (``x' = r x``), not with ``W'/W`` and ``H'/H``.

    Returns the image and ``(r, r)``: the scale from original to resized pixels per
    axis (x, y), equal on both axes; ``r`` is the float32 value, as a Python float.
    """
    H, W = img.shape[-2:]
    ratio = torch.tensor(side, dtype=torch.float32) / torch.tensor(max(H, W), dtype=torch.float32)
    h = max(1, int(torch.tensor(H, dtype=torch.float32) * ratio))  # truncates
    w = max(1, int(torch.tensor(W, dtype=torch.float32) * ratio))
    out = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    r = float(ratio)
    return out, (r, r)
