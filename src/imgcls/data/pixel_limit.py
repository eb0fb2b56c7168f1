"""How large preprocessing may make an image: never more pixels than Pillow's decompression-bomb limit.

Pillow refuses to open images of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` (89.5 M by default), but evaluation's
``Resize`` scales the short side to ``resize_size`` and the long side with it: a 4 KB PNG of 1 x 2,000,000 pixels
resized to 32 is 32 x 64,000,000, 6 GB of RGB bytes. Training's RandomResizedCrop crops before it resizes, so the crop
bounds it. No step may make an image of more than ``MAX_IMAGE_PIXELS``: checked from each image's size (at setup, in
the loader, in the predictor) and from the sizes a run, a checkpoint or an exported model asks for. A resize peaked at
5 to 11 bytes per pixel it makes (measured, Pillow images and tensors), so the limit holds one image to about 1 GB.
Setting ``PIL.Image.MAX_IMAGE_PIXELS = None`` lifts these checks together with Pillow's own.
"""

from collections.abc import Mapping
from math import isqrt
from typing import Any

import torch
from PIL import Image

SIZE_KEYS = ("crop_size", "resize_size")  # the preprocess settings that set the size of what is allocated


def resized(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """The size torchvision's ``Resize(resize_size)`` makes a ``width`` x ``height`` image (long side rounded down)."""
    if width <= height:
        return resize_size, int(resize_size * height / max(width, 1))
    return int(resize_size * width / max(height, 1)), resize_size


def too_large(image: Image.Image | torch.Tensor, resize_size: int) -> str | None:
    """Why resizing ``image`` (Pillow's, or a tensor ``(..., H, W)``) to ``resize_size`` passes the limit; else None."""
    width, height = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
    new_width, new_height = resized(width, height, resize_size)
    limit = Image.MAX_IMAGE_PIXELS  # read at each call: users may lower it, or lift it with None
    if limit is None or new_width * new_height <= limit:
        return None
    return (
        f"{width} x {height} pixels, which resizing to {resize_size} makes {new_width} x {new_height}, "
        f"{new_width * new_height / 1e6:,.0f} M pixels: {_over(limit)}"
    )


def too_large_setting(preprocess: Mapping[str, Any]) -> str | None:
    """Why a crop or resize size of ``preprocess`` would make every image pass the limit (a square one, the least)."""
    limit = Image.MAX_IMAGE_PIXELS
    for key in SIZE_KEYS:
        size = preprocess.get(key)
        if limit is not None and isinstance(size, int | float) and size * size > limit:
            return (
                f"{key} {size} makes every image at least {size} x {size} pixels, {size * size / 1e6:,.0f} M: "
                f"{_over(limit)}; at most {isqrt(limit)} fits"
            )
    return None


def _over(limit: int) -> str:
    return f"more than Pillow's decompression-bomb limit of {limit / 1e6:.1f} M (PIL.Image.MAX_IMAGE_PIXELS)"
