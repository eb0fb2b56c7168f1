"""Decode + augment images/s in one loader worker: the template's datasets against a plain torchvision pipeline.

    python benchmarks/data_pipeline.py                    # 3,000 JPEGs of 256-512 px, written once to data/bench_jpegs
    python benchmarks/data_pipeline.py --images 500 --repeats 3

The images are crops of scikit-learn's two sample photographs (real JPEG content; scikit-learn comes with
`pip install -e ".[bench]"`), at random sizes of 256 to 512 pixels a side, in 10 class folders. Both sides read the same
files with one thread, as a DataLoader worker does: the baseline is torchvision's ImageFolder with its reference
recipe (Pillow decoding, then RandomResizedCrop(224) and a flip, or Resize and CenterCrop for evaluation); the
template is ImageFolderDataModule's own datasets, which decode JPEGs with torchvision.io
(imgcls.data.images.read_image) and stop at uint8 pixels. Each side's time includes stacking every 64 images into a
batch, and for the template normalising that batch, which training does on the device
(imgcls.data.transforms.normalize_batch), here in the same thread. A third row shows the template decoding with
Pillow instead, which is what torchvision.io buys. Runs alternate; prints medians and ratios. Goal: >= 1.0.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from imgcls.data.datamodule import ImageFolderDataModule
from imgcls.data.images import open_image
from imgcls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

GOAL = 1.0  # the template's images/s over the baseline's
CLASSES = 10
BATCH = 64


def write_jpegs(root: Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` JPEGs of 256-512 px under ``root/<class>/`` unless that many are there; return ``root``."""
    if len(list(root.glob("*/*.jpg"))) >= count:
        return root
    from sklearn.datasets import load_sample_images  # china.jpg and flower.jpg, 427 x 640, in scikit-learn

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = (int(side) for side in rng.integers(256, 513, size=2))
        top, left = (int(rng.integers(0, limit // 3)) for limit in photo.shape[:2])
        crop = Image.fromarray(photo[top:, left:])
        folder = root / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.resize((width, height), Image.Resampling.BICUBIC).save(folder / f"{index:05d}.jpg", quality=90)
    return root


def torchvision_reference(root: Path, train: bool) -> Dataset:
    """torchvision's ImageFolder with its classification reference's preprocessing (PIL backend)."""
    geometry = [v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()] if train else [v2.Resize(256), v2.CenterCrop(224)]
    tail = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return ImageFolder(str(root), transform=v2.Compose([*geometry, *tail]))


def template(root: Path, train: bool, decode: Callable | None = None) -> Dataset:
    """The dataset ``ImageFolderDataModule`` trains (``basic`` augmentation) or evaluates on, at 224 px."""
    data = ImageFolderDataModule(str(root), augment="basic", crop_size=224, val_fraction=0.5, check_images="none")
    data.setup("fit")
    dataset = data.datasets["train" if train else "val"]
    if decode is not None:
        dataset.dataset.loader = decode  # the Subset's ImageFiles
    return dataset


def images_per_s(dataset: Dataset, count: int, finish: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Read ``count`` images, stack them by batches of ``BATCH`` and ``finish`` each batch; return images/s."""
    start = time.perf_counter()
    for first in range(0, count, BATCH):
        finish(torch.stack([dataset[index][0] for index in range(first, min(first + BATCH, count))]))
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/bench_jpegs"), help="where the JPEGs are written")
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to write (default: 3000)")
    parser.add_argument("--per_run", type=int, default=500, help="images read per timed run (default: 500)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each pipeline (default: 5)")
    args = parser.parse_args(argv)
    root = write_jpegs(args.root, args.images)
    torch.set_num_threads(1)  # what each DataLoader worker gets
    for train in (True, False):
        pipelines = {
            "torchvision ImageFolder": torchvision_reference(root, train),
            "template (torchvision.io)": template(root, train),
            "template, Pillow decoding": template(root, train, decode=open_image),
        }
        normalize = partial(normalize_batch, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        finish = {name: normalize if name.startswith("template") else lambda batch: batch for name in pipelines}
        per_run = min(args.per_run, *(len(dataset) for dataset in pipelines.values()))
        results: dict[str, list[float]] = {name: [] for name in pipelines}
        for repeat in range(args.repeats):
            names = list(pipelines)
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotating who goes first
                results[name].append(images_per_s(pipelines[name], per_run, finish[name]))
        baseline = statistics.median(results["torchvision ImageFolder"])
        stage = "training (RandomResizedCrop 224, flip)" if train else "evaluation (Resize 256, CenterCrop 224)"
        print(f"{stage}: images/s in one thread, median of {args.repeats} runs of {per_run} JPEGs from {root}")
        for name, runs in results.items():
            median = statistics.median(runs)
            print(f"  {name:27} {median:7.1f}   ratio {median / baseline:.2f}")
    print(f"goal: template/torchvision >= {GOAL}")


if __name__ == "__main__":
    main()
