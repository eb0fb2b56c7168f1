"""Image preprocessing: one function builds the train or eval pipeline from the settings a checkpoint carries."""

from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Augment = Literal["none", "basic"]


def build_transforms(
    train: bool,
    crop_size: int,
    resize_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bilinear",
    augment: Augment = "none",
) -> v2.Compose:
    """Return the pipeline from an RGB PIL image to a normalised float tensor ``(3, crop_size, crop_size)``.

    Evaluation resizes the short side to ``resize_size`` and center-crops ``crop_size``, as torchvision's
    weights do. ``augment`` applies to training only: ``none`` is the eval pipeline, ``basic`` a random
    resized crop and a horizontal flip.
    """
    mode = InterpolationMode(interpolation)
    if train and augment == "basic":
        geometry = [v2.RandomResizedCrop(crop_size, interpolation=mode), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(resize_size, interpolation=mode), v2.CenterCrop(crop_size)]
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def open_image(path: str | Path) -> Image.Image:
    """Open any image file as RGB, turned upright by its EXIF orientation."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
