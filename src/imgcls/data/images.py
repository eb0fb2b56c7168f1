"""Reading image files for the model: any format and mode as 8-bit RGB, upright by its EXIF orientation."""

from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg, read_file


def read_image(path: str | Path) -> torch.Tensor | Image.Image:
    """Read an image file for the model: a JPEG as a uint8 tensor ``(3, H, W)``, any other file as ``open_image`` does.

    torchvision.io and Pillow decode JPEGs with the same libjpeg-turbo, to the same pixels; torchvision.io hands
    them over as a tensor without Pillow's image object and its copy, which makes the whole training pipeline
    faster (benchmarks/data_pipeline.py). PNGs and the rest keep Pillow, for its transparency and 16-bit
    conversions. A JPEG that torchvision.io refuses goes to Pillow, which reads it or says what is wrong with it.
    """
    if str(path).lower().endswith((".jpg", ".jpeg")):  # not Path(path).suffix: 0.1 vs 2.5 us an image
        try:
            return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            pass
    return open_image(path)


def open_image(path: str | Path) -> Image.Image:
    """Open any image file as RGB, turned upright by its EXIF orientation (``to_rgb`` says how modes convert)."""
    with Image.open(path) as image:
        ImageOps.exif_transpose(image, in_place=True)  # not a copy: to_rgb makes the one copy
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: transparency over white, 16-bit integers scaled to 8 bits.

    Grayscale, palette and CMYK (Adobe's inverted JPEGs included) go through Pillow's own conversion. Integer
    modes ``I;16*`` and ``I`` are read as 16-bit values, 0 to 65535 (what PNG and TIFF store in them). Floats (``F``,
    TIFF's 32-bit) are 0 to 1, as float pixels conventionally are, unless a value passes 1: then 0 to 255.
    """
    if image.mode == "F":  # convert("L") clips at 255 and rounds: a 0-to-1 image would come out black
        scale = 255 if image.getextrema()[1] <= 1 else 1
        image = image.point(lambda value: value * scale).convert("L")
    if image.mode.startswith("I"):
        # Pillow's convert("RGB") clips these at 255, so anything above 1/256 of full scale turns white.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Dropping alpha shows whatever colour the transparent pixels happen to store (often black).
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")
