"""The data: any ImageFolder tree on disk, a torchvision dataset, or the embedded digits, as a LightningDataModule."""

import copy
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from imgcls.data.checks import CheckedImageFolder, CheckImages, OnBadImage, check_splits, collate, raise_if_bad
from imgcls.data.digits import DIGITS_ROOT, demo_defaults, write_digits
from imgcls.data.layout import class_names, split_folders
from imgcls.data.padding import PaddedForRanks
from imgcls.data.pixel_limit import too_large_setting
from imgcls.data.torchvision_datasets import open_torchvision_splits
from imgcls.data.trainable import MAX_BATCH_SIZE, fitted_batch_size, refuse_empty_training, refuse_idle_epochs
from imgcls.data.training_order import (
    SeededSamples,
    TrainingOrder,
    balanced_weights,
    derived_seed,
    replicas,
    seed_training_batch,
)
from imgcls.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    Interpolation,
    build_batch_mix,
    build_transforms,
    normalize_batch,
)
from imgcls.data.walk import FolderWalk
from imgcls.errors import UserError

DEFAULT_CROP_SIZE = 224


class ImageFolderDataModule(L.LightningDataModule):
    """Images in class folders: ``root/{train,val[,test]}/<class>/*`` or ``root/<class>/*``; or a torchvision dataset.

    Preprocessing left at ``None`` is filled in by the CLI from the backbone's pretrained weights; what is still
    unset follows ImageNet's convention: a ``DEFAULT_CROP_SIZE`` crop, bilinear, ImageNet mean and std, ``basic``
    augmentation. The embedded digits (no ``root``) take ``imgcls.data.digits.DIGITS_DEFAULTS`` instead, resized to
    the crop.

    The datasets and loaders give uint8 images; ``on_after_batch_transfer`` normalises each batch on the device
    (``imgcls.data.transforms.normalize_batch``), which is faster than per image in the loader processes.

    Args:
        root: The dataset folder. ``None`` uses the embedded digits, written to ``data/digits`` on first use.
        dataset: A torchvision dataset class (``CIFAR10``, ``MNIST``, ``Flowers102``, ...) to read from ``root``
            instead of class folders. Its test split, if any, is the test set.
        download: Let the torchvision dataset download itself into ``root`` when missing.
        val_fraction: Share of the training images (above 0, below 1) held out for validation when ``root`` has
            no ``val`` folder (a seeded split). Without a ``test`` folder, testing uses the validation images.
        batch_size: Images per batch and per device; ``None`` fits it to the data: 64, or less for small datasets
            (halved down to 8 until an epoch has at least 16 steps).
        num_workers: Loader processes per device; ``None`` uses the CPUs this process may run on.
        pin_memory: Page-locked host memory for faster copies; ``None`` enables it when CUDA is present.
        persistent_workers: Keep loader processes alive between epochs.
        crop_size: Side of the square the model sees.
        resize_size: Short side before the center crop in evaluation, at least ``crop_size``; ``None`` is
            ``crop_size * 8 / 7`` (``crop_size`` for the digits).
        mean: Per-channel normalisation mean (RGB).
        std: Per-channel normalisation standard deviation (RGB).
        interpolation: Resize interpolation: ``bilinear``, ``bicubic``, ``nearest`` or ``lanczos``.
        augment: Training augmentation preset: ``none``, ``basic`` (random resized crop and flip), ``strong``
            (``basic`` with TrivialAugment and random erasing); ``None`` is ``basic`` (``none`` for the digits).
        mixup_alpha: MixUp's Beta(alpha, alpha) mixing strength for training batches; 0 disables it.
        cutmix_alpha: CutMix's strength for training batches; 0 disables it. With both, each batch gets one.
        mix_prob: Share of training batches (0 to 1) that are mixed when MixUp or CutMix is enabled.
        balanced_sampling: Draw training images so every class is equally frequent (with replacement).
        seed: Seed of the train/val split and of the training order; the augmentation's depends on it and on
            ``--seed_everything`` (``imgcls.data.training_order``).
        check_images: What setup reads of every image file in class folders: ``header`` (fast: finds empty,
            non-image and broken files and decompression bombs), ``full`` (decodes each: also finds truncated
            files; slow for large datasets) or ``none``. Files that fail later are caught while loading.
        on_bad_image: ``error`` stops with the paths of unreadable images; ``skip`` leaves them out, with a warning.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: str | None = None,
        download: bool = False,
        val_fraction: OpenUnitInterval = 0.1,
        batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        crop_size: PositiveInt | None = None,
        resize_size: PositiveInt | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None,
        interpolation: Interpolation | None = None,
        augment: Augment | None = None,
        mixup_alpha: NonNegativeFloat = 0.0,
        cutmix_alpha: NonNegativeFloat = 0.0,
        mix_prob: ClosedUnitInterval = 1.0,
        balanced_sampling: bool = False,
        seed: int = 0,
        check_images: CheckImages = "header",
        on_bad_image: OnBadImage = "error",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sources: dict[str, Dataset] = {}  # splits without transforms; ImageFolder ones are opened in setup
        if dataset is not None:
            if root is None:
                raise UserError(f"--data.dataset {dataset} needs --data.root, the folder that holds its files")
            self.root = Path(root).expanduser()
            self.sources = open_torchvision_splits(dataset, self.root, download)
            self.class_names = [str(name) for name in self.sources["train"].classes]
        else:
            self.root = Path(root).expanduser() if root is not None else write_digits(DIGITS_ROOT)
            if not self.root.is_dir():
                raise UserError(f"--data.root {self.root}: no such folder; point it at an ImageFolder tree")
            self.train_dir = self.root / "train" if (self.root / "train").is_dir() else self.root
            self.class_names = class_names(self.train_dir)
            if len(self.class_names) == 1:
                raise UserError(
                    f"{self.train_dir}: a single class folder, {self.train_dir / self.class_names[0]}; a classifier "
                    f"needs two or more, so put each class's images in a folder of its own under {self.train_dir}"
                )
        self.num_classes = len(self.class_names)
        for flag, size in (("crop_size", crop_size), ("resize_size", resize_size)):
            if size is not None and size < 1:
                raise UserError(f"--data.{flag} {size}: give a size in pixels of 1 or more, or leave it unset")
        demo = demo_defaults(root, dataset)
        crop_size = crop_size or demo.get("crop_size") or DEFAULT_CROP_SIZE
        resize_size = resize_size or (crop_size if demo else round(crop_size * 8 / 7))  # digits fill their frame
        if resize_size < crop_size:  # the center crop would pad evaluation images with black borders
            raise UserError(
                f"--data.resize_size {resize_size} is smaller than --data.crop_size {crop_size}: evaluation would crop "
                f"a padded image; set --data.resize_size to {crop_size} or more, or leave it unset ({crop_size} * 8/7)"
            )
        self.augment = augment or demo.get("augment") or "basic"
        self.batch_size = batch_size  # None until setup fits it to the training images
        self.preprocess = {
            "crop_size": crop_size,
            "resize_size": resize_size,
            "mean": list(mean or IMAGENET_MEAN),
            "std": list(std or IMAGENET_STD),
            "interpolation": interpolation or "bilinear",
        }
        if min(self.preprocess["std"]) <= 0:  # normalize_batch divides by it: infinities, not an error, otherwise
            raise UserError(f"--data.std {self.preprocess['std']}: every channel's must be above 0")
        self.mix = build_batch_mix(self.num_classes, mixup_alpha, cutmix_alpha, mix_prob)
        self.datasets: dict[str, Dataset] = {}
        # seed_everything has seeded torch by now: --seed_everything changes the augmentation, as it did the loaders'
        self.augment_seed = derived_seed(seed, torch.initial_seed())
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples of its global order) a checkpoint left off at
        self.training_order: TrainingOrder | None = None  # once the training loader is built

    @property
    def largest_batch_size(self) -> int:
        """The batch per device setup may pick: the one given, else the most the fitted default takes."""
        return self.hparams.batch_size or MAX_BATCH_SIZE

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        if too_large := too_large_setting(self.preprocess):
            raise UserError(f"--data.{too_large}")
        train_tf = build_transforms(train=True, augment=self.augment, normalize=False, **self.preprocess)
        eval_tf = build_transforms(train=False, normalize=False, **self.preprocess)
        if self.hparams.dataset is not None:  # torchvision datasets hand over images as stored: MNIST's are gray
            train_tf, eval_tf = v2.Compose([v2.RGB(), train_tf]), v2.Compose([v2.RGB(), eval_tf])
        sources = self.sources or self._folders()
        train, val, test = sources["train"], sources.get("val"), sources.get("test")
        source = str(self.train_dir) if not self.sources else f"--data.dataset {self.hparams.dataset} in {self.root}"
        n_val = 0  # held out of train
        if val is None:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
            n_val = max(1, round(len(train) * self.hparams.val_fraction))
            refuse_empty_training(len(train), n_val, self.hparams.val_fraction, source, folder=not self.sources)
            val = Subset(_with_transform(train, eval_tf), order[:n_val])
            train = Subset(_with_transform(train, train_tf), order[n_val:])
        else:
            train, val = _with_transform(train, train_tf), _with_transform(val, eval_tf)
        test = _with_transform(test, eval_tf) if test is not None else val
        self.datasets = {"train": train, "val": val, "test": test}
        devices = replicas(self.trainer)[0]  # the processes that read different batches
        if self.batch_size is None:
            self.batch_size = fitted_batch_size(len(train), devices)
        refuse_idle_epochs(len(train), self.batch_size, devices, source, n_val)

    def _folders(self) -> dict[str, Dataset]:
        """The ImageFolder splits: ``train``, and ``val``/``test`` where ``root`` has them beside ``train``."""
        walk, resize_size = FolderWalk(), self.preprocess["resize_size"]  # one walk: a file read in two splits
        folders = {
            split: CheckedImageFolder(path, walk, split, resize_size)
            for split, path in split_folders(self.root, self.train_dir, self.class_names).items()
        }
        check_splits(folders, self.hparams.check_images, self.hparams.on_bad_image, self._workers())
        return folders

    def _workers(self) -> int:
        workers = self.hparams.num_workers
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
        return workers

    def _loader(self, split: str) -> DataLoader:
        workers = self._workers()
        pin = self.hparams.pin_memory
        dataset = self.datasets[split]
        world, rank = replicas(self.trainer)  # tensor-parallel processes read the same batches
        if split == "train":
            # A seeded order at every world size: the global batches are the same images in the same order on 1 device
            # or on 8, so a run can move between machines, resume anywhere (see TrainingOrder), and stay comparable.
            weights = balanced_weights(dataset, self.num_classes) if self.hparams.balanced_sampling else None
            sampler = self.training_order = TrainingOrder(
                dataset, world, rank, self.hparams.seed, self.augment_seed, weights
            )
            if self.resume_at is not None:
                sampler.resume(*self.resume_at)
            dataset = SeededSamples(dataset)
        else:
            # Lightning's default sampler pads evaluation by repeating images, which biases the metrics. Here the
            # padding is labelled IGNORE_INDEX, so loss and metrics skip it, and every rank still runs the same
            # number of batches, which sharded models need: each forward is a collective.
            dataset = PaddedForRanks(dataset, world)
            sampler = DistributedSampler(dataset, world, rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=split == "train",
            num_workers=workers,
            pin_memory=torch.cuda.is_available() if pin is None else pin,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            collate_fn=partial(collate, on_bad=self.hparams.on_bad_image),  # unreadable images: see imgcls.data.checks
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return raise_if_bad(batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        if self.trainer.training:  # the first random draw of each training step comes after this
            batches = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready  # this one's index, resumed or not
            seed_training_batch(self.augment_seed, batches, replicas(self.trainer)[1])
        images = normalize_batch(images, self.preprocess["mean"], self.preprocess["std"])  # uint8 until here
        if self.mix is not None and self.trainer.training:
            images, targets = self.mix(images, targets)  # labels (B,) become soft targets (B, num_classes)
        # Lightning casts batches to 16-true / bf16-true precision before this hook, when they were still uint8.
        return self.trainer.precision_plugin.convert_input(images), targets

    def state_dict(self) -> dict[str, Any]:
        """Where training is: the epoch and the samples of its global order done (the next epoch's start at its end)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {"augment_seed": self.augment_seed}
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # saved at the epoch's end: the next one starts from its beginning
            epoch, done = epoch + 1, 0
        samples = done * self.batch_size * replicas(trainer)[0]
        return {"augment_seed": self.augment_seed, "epoch": epoch, "samples": samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.training_order is not None:  # given once already (imgcls.cli), and the loader started from it
            return
        self.augment_seed = state.get("augment_seed", self.augment_seed)
        if "epoch" in state:
            self.resume_at = (state["epoch"], state["samples"])
            # Lightning warns that a plain loader restarts a resumed epoch; this one goes on where it stopped.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def _with_transform(images: Dataset, transform: Any) -> Dataset:
    """A copy of ``images`` with another transform, without scanning the folder or reading the files again."""
    view = copy.copy(images)
    view.transform = transform
    return view
