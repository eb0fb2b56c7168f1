"""The embedded default dataset: 1,797 handwritten digits, written out as an ImageFolder tree.

``digits.csv.gz`` beside this file is the test set of the UCI "Optical Recognition of Handwritten Digits" data
(E. Alpaydin and C. Kaynak, 1998; https://archive.ics.uci.edu/dataset/80, CC BY 4.0), one digit a row: 64 pixel
values of 0 to 16 (8x8, row by row), then its label; the copy scikit-learn ships as ``load_digits``. Kept here
rather than imported from scikit-learn, which would bring scipy, and with it a second of every run's start-up:
torchmetrics imports scipy.signal whenever scipy is installed.
"""

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}
SEED = 0
DIGITS_ROOT = Path("data/digits")  # where train.py writes them, in the folder it runs in
# The digits are 8x8 pixels: 32-pixel crops of the whole digit, no augmentation. Only for them: a --data.root gets
# the data module's defaults.
DIGITS_DEFAULTS = {"crop_size": 32, "augment": "none"}


def demo_defaults(root: str | None, dataset: str | None) -> dict[str, Any]:
    """The settings unset options take for the embedded digits (no ``root``); ``{}`` for anyone's own data."""
    return DIGITS_DEFAULTS if root is None and dataset is None else {}


def write_digits(root: str | Path) -> Path:
    """Write the 1,797 8x8 digits as PNGs under ``root/{train,val,test}/<digit>/`` unless there; return ``root``.

    Pixels are 8-bit grayscale, ink bright on black: ``round(v * 255 / 16)`` for ``v`` in 0..16.
    The split is stratified per class with a fixed seed, so every machine writes the same files.
    """
    root = Path(root)
    if root.exists():
        return root
    rows = np.loadtxt(Path(__file__).with_name("digits.csv.gz"), delimiter=",")  # (N, 65)
    pixels = np.rint(rows[:, :-1].reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)  # (N, 8, 8)
    targets = rows[:, -1].astype(int)
    # Written to a private folder, then renamed: concurrent ranks and interrupted runs never see half a set.
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    rng = np.random.default_rng(SEED)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(targets == label))
        bounds = np.cumsum([round(f * len(indices)) for f in SPLITS.values()])[:-1]
        for split, part in zip(SPLITS, np.split(indices, bounds), strict=True):
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in part:
                Image.fromarray(pixels[index]).save(folder / f"{index:04d}.png")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp)
    return root
