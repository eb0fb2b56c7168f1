"""Writing predictions: one line per image as a table, JSON or CSV, and annotated copies of the images."""

import csv
import json
import math
import os
from pathlib import Path
from typing import Literal, TextIO

from PIL import Image, ImageDraw, ImageFont

from imgcls.inference.predictor import Prediction

Format = Literal["table", "json", "csv"]
ANNOTATED_MIN_SIDE = 224  # smaller images are enlarged first, so that the label is readable


class PredictionWriter:
    """Writes each image's top-k classes as it comes; the table and the CSV open with a header line.

    Args:
        fmt: ``table`` (aligned columns), ``json`` (one object per line) or ``csv``.
        stream: Where the lines go.
        topk: Classes per image, for the header.
        image_width: Width of the table's image column: the longest image name.
        label_width: Width of the table's label columns: the longest class name.
    """

    def __init__(self, fmt: Format, stream: TextIO, topk: int, image_width: int = 0, label_width: int = 0) -> None:
        self.fmt, self.stream = fmt, stream
        self.image_width, self.label_width = max(image_width, len("image")), label_width
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            ranks = range(1, topk + 1)
            self.csv.writerow(["image", *(f"{kind}_{k}" for k in ranks for kind in ("label", "probability"))])
        elif fmt == "table":
            columns = "".join(f"  {f'top-{k}':<{self.label_width + 8}}" for k in range(1, topk + 1))
            print(f"{'image':<{self.image_width}}{columns}".rstrip(), file=stream)

    def write(self, image: str, prediction: Prediction) -> None:
        if self.fmt == "json":
            labels = [{"label": label, "probability": prob} for label, prob in prediction]
            print(json.dumps({"image": image, "predictions": labels}), file=self.stream)
        elif self.fmt == "csv":
            self.csv.writerow([image, *(value for label_prob in prediction for value in label_prob)])
        else:
            cells = "".join(f"  {label:<{self.label_width}} {prob:7.2%}" for label, prob in prediction)
            print(f"{image:<{self.image_width}}{cells}", file=self.stream)
        self.stream.flush()  # answers appear batch by batch, also through a pipe


def annotated_paths(images: list[Path], out_dir: Path) -> list[Path]:
    """Where each image's annotated copy goes: its place below the images' common folder, under ``out_dir``.

    A suffix Pillow cannot write gets ``.png`` appended.
    """
    folders = [image.resolve().parent for image in images]
    root = Path(os.path.commonpath(folders))
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    paths = []
    for image, folder in zip(images, folders, strict=True):
        target = out_dir / folder.relative_to(root) / image.name
        paths.append(target if target.suffix.lower() in writable else target.with_name(target.name + ".png"))
    return paths


def save_annotated(image: Image.Image, text: str, path: Path) -> None:
    """Save an RGB ``image`` with ``text`` on a white band above it, enlarged first if it is small."""
    scale = math.ceil(ANNOTATED_MIN_SIDE / min(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=max(12, min(image.size) // 12))
    band = round(font.size * 1.6)
    canvas = Image.new("RGB", (image.width, image.height + band), "white")
    canvas.paste(image, (0, band))
    ImageDraw.Draw(canvas).text((font.size // 3, band // 2), text, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
