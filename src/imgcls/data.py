"""The data: any ImageFolder tree on disk, or the embedded digits, as a LightningDataModule."""

import os
import copy
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from imgcls.digits import write_digits
from imgcls.errors import UserError
from imgcls.transforms import IMAGENET_MEAN, IMAGENET_STD, Augment, build_transforms, open_image

DIGITS_ROOT = Path("data/digits")


class ImageFolderDataModule(L.LightningDataModule):
    """Images in class folders: ``root/{train,val[,test]}/<class>/*`` or ``root/<class>/*``.

    Args:
        root: The dataset folder. ``None`` uses the embedded digits, written to ``data/digits`` on first use.
        val_fraction: Share of the training images held out for validation when ``root`` has no ``val``
            folder (a seeded split). Without a ``test`` folder, testing uses the validation images.
        batch_size: Images per batch and per device.
        num_workers: Loader processes per device; ``None`` uses the CPUs this process may run on.
        pin_memory: Page-locked host memory for faster copies; ``None`` enables it when CUDA is present.
        persistent_workers: Keep loader processes alive between epochs.
        crop_size: Side of the square the model sees.
        resize_size: Short side before the center crop in evaluation; ``None`` is ``crop_size * 8 / 7``.
        mean: Per-channel normalisation mean (RGB).
        std: Per-channel normalisation standard deviation (RGB).
        interpolation: Resize interpolation (``bilinear``, ``bicubic``, ``nearest``).
        augment: Training augmentation preset.
        seed: Seed of the train/val split.
    """

    def __init__(
        self,
        root: str | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        crop_size: int = 224,
        resize_size: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        augment: Augment = "basic",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root is not None else write_digits(DIGITS_ROOT)
        if not self.root.is_dir():
            raise UserError(f"--data.root {self.root}: no such folder; point it at an ImageFolder tree")
        self.train_dir = self.root / "train" if (self.root / "train").is_dir() else self.root
        self.class_names = _class_names(self.train_dir)
        self.num_classes = len(self.class_names)
        self.preprocess = {
            "crop_size": crop_size,
            "resize_size": resize_size or round(crop_size * 8 / 7),
            "mean": list(mean),
            "std": list(std),
            "interpolation": interpolation,
        }
        self.datasets: dict[str, Dataset] = {}

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        train_tf = build_transforms(train=True, augment=self.hparams.augment, **self.preprocess)
        eval_tf = build_transforms(train=False, **self.preprocess)
        val_dir = self.root / "val"
        if self.train_dir != self.root and val_dir.is_dir():
            train, val = ImageFolder(self.train_dir, train_tf, loader=open_image), self._folder(val_dir, eval_tf)
        else:
            images = ImageFolder(self.train_dir, loader=open_image)
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
            n_val = max(1, round(len(images) * self.hparams.val_fraction))
            train = Subset(_with_transform(images, train_tf), order[n_val:])
            val = Subset(_with_transform(images, eval_tf), order[:n_val])
        test_dir = self.root / "test"
        test = self._folder(test_dir, eval_tf) if self.train_dir != self.root and test_dir.is_dir() else val
        self.datasets = {"train": train, "val": val, "test": test}

    def _folder(self, path: Path, transform: Any) -> ImageFolder:
        found = _class_names(path)
        if found != self.class_names:
            raise UserError(f"{path}: its class folders {found} differ from the training classes {self.class_names}")
        return ImageFolder(path, transform, loader=open_image)

    def _loader(self, split: str) -> DataLoader:
        workers = self.hparams.num_workers
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
        pin = self.hparams.pin_memory
        dataset, sampler = self.datasets[split], None
        if split != "train" and self.trainer is not None and self.trainer.world_size > 1:
            # Lightning's default DistributedSampler pads by repeating images, which biases the metrics;
            # this one gives each rank a disjoint share, and torchmetrics sums the counts exactly.
            trainer = self.trainer
            sampler = UnrepeatedDistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=split == "train",
            sampler=sampler,
            drop_last=split == "train",
            num_workers=workers,
            pin_memory=torch.cuda.is_available() if pin is None else pin,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def _class_names(folder: Path) -> list[str]:
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())  # as ImageFolder sorts them
    if not names:
        raise UserError(f"{folder}: no class folders; put images in {folder}/<class name>/")
    return names


def _with_transform(images: ImageFolder, transform: Any) -> ImageFolder:
    """A copy of ``images`` with another transform, without scanning the folder again."""
    view = copy.copy(images)
    view.transform = transform
    return view
