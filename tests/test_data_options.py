"""Data options: augmentation presets, MixUp/CutMix soft targets, class-balanced sampling, torchvision datasets."""

import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import QUICK, exit_message, train
from PIL import Image
from torchvision.datasets import MNIST

from imgcls.data.datamodule import ImageFolderDataModule
from imgcls.data.digits import write_digits
from imgcls.data.transforms import build_batch_mix, build_transforms
from imgcls.model import ImageClassifier


@pytest.mark.parametrize(
    ("augment", "extra"),
    [("none", set()), ("basic", set()), ("strong", {"TrivialAugmentWide", "RandomErasing"})],
)
def test_presets_crop_any_image_to_the_model_size(augment: str, extra: set[str]) -> None:
    pipeline = build_transforms(train=True, crop_size=24, resize_size=28, augment=augment)
    rng = np.random.default_rng(0)
    for width, height in [(8, 8), (40, 30), (300, 100)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out = pipeline(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    steps = {type(step).__name__ for step in pipeline.transforms}
    assert extra <= steps and ("RandomResizedCrop" in steps) == (augment != "none")


def test_mixup_and_cutmix_turn_labels_into_soft_targets() -> None:
    images, labels = torch.rand(16, 3, 8, 8), torch.arange(16) % 10
    for mixup, cutmix in [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)]:
        mixed, soft = build_batch_mix(10, mixup, cutmix, p=1.0)(images, labels)
        assert mixed.shape == images.shape and soft.shape == (16, 10)
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(16))
    _, untouched = build_batch_mix(10, mixup_alpha=0.2, p=0.0)(images, labels)
    assert torch.equal(untouched, labels)
    assert build_batch_mix(10) is None


class TargetShapes(L.Callback):
    """Records the shape of the targets each training step receives."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.shapes.append(tuple(batch[1].shape))


@pytest.mark.slow
def test_soft_targets_train_and_validation_keeps_hard_labels(in_tmp: Path) -> None:
    data = ImageFolderDataModule(
        crop_size=32, resize_size=32, augment="strong", mixup_alpha=0.2, cutmix_alpha=1.0, batch_size=16, num_workers=0
    )
    model = ImageClassifier(num_classes=data.num_classes, class_names=data.class_names, preprocess=data.preprocess)
    shapes = TargetShapes()
    # A bare Trainer: only the batches' target shapes matter here; train.py's defaults, bar included, run elsewhere
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, callbacks=[shapes], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert shapes.shapes == [(16, 10)] * 3
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["train/acc"] <= 1
    assert 0 <= metrics["val/acc"] <= 1


def test_balanced_sampling_draws_every_class_equally_often(tmp_path: Path) -> None:
    for name, count in {"common": 40, "rare": 4}.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("L", (4, 4), i).save(tmp_path / name / f"{i}.png")
    rare_share = {}
    for balanced in (False, True):
        data = ImageFolderDataModule(
            str(tmp_path), batch_size=4, num_workers=0, crop_size=4, resize_size=4, balanced_sampling=balanced
        )
        data.setup("fit")
        labels = torch.cat([targets for _ in range(10) for _, targets in data.train_dataloader()])
        rare_share[balanced] = (labels == data.class_names.index("rare")).float().mean().item()
    assert rare_share[False] < 0.15 and rare_share[True] > 0.4  # 4 of 44 images, drawn half the time


def write_fake_mnist(root: Path, n_train: int = 64, n_test: int = 32) -> None:
    """MNIST's raw files in their own format (IDX: a big-endian header, then uint8 pixels), with random digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + labels.tobytes())


@pytest.mark.slow
def test_a_torchvision_dataset_on_disk_trains(in_tmp: Path) -> None:
    write_fake_mnist(in_tmp / "mnist")
    data = ["--data.dataset=MNIST", "--data.root=mnist", "--data.crop_size=28", "--data.resize_size=28"]
    cli = train([*QUICK, *data, "--data.batch_size=16"])
    splits = cli.datamodule.datasets
    assert (len(splits["train"]) + len(splits["val"]), len(splits["test"])) == (64, 32)  # MNIST's own test split
    saved = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)["hyper_parameters"]
    assert saved["class_names"] == MNIST.classes and saved["num_classes"] == 10
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])  # grayscale images became RGB


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("CIFAR11", "error: --data.dataset 'CIFAR11' is not a torchvision dataset; did you mean CIFAR10, CIFAR100"),
        ("CIFAR10", "or pass --data.download true"),
    ],
)
def test_dataset_mistakes_get_one_line_errors(in_tmp: Path, dataset: str, message: str) -> None:
    (in_tmp / "empty").mkdir()
    with pytest.raises(SystemExit) as error:  # nothing is downloaded: download is off by default
        train([*QUICK, f"--data.dataset={dataset}", "--data.root=empty"])
    assert message in str(error.value.code) and "\n" not in str(error.value.code)
    assert not any((in_tmp / "empty").iterdir())


def own_images(root: Path, per_class: int) -> Path:
    """A user's folder of real images: the first ``per_class`` digits of 0 and of 1, in folders ``zero`` and ``one``."""
    digits = write_digits(root.parent / "digits")
    for name, digit in (("zero", 0), ("one", 1)):
        (root / name).mkdir(parents=True)
        for path in sorted((digits / "train" / str(digit)).iterdir())[:per_class]:
            (root / name / path.name).write_bytes(path.read_bytes())
    return root


def test_own_images_get_imagenet_preprocessing_and_a_batch_that_fits_them(in_tmp: Path) -> None:
    own_images(in_tmp / "mine", per_class=70)  # 140 images: 126 to train, 14 to validate
    # One process, one step: the bar would add only output (test_train.py runs train.py with it, as users do).
    one_step = ["--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false", "--data.num_workers=0"]
    mine = train([*one_step, "--data.root=mine"]).datamodule
    assert (mine.preprocess["crop_size"], mine.preprocess["resize_size"], mine.augment) == (224, 256, "basic")
    assert mine.batch_size == 8 and len(mine.train_dataloader()) == 15  # 64 would give one step an epoch
    demo = train(one_step).datamodule  # the embedded digits keep their own small settings
    assert (demo.preprocess["crop_size"], demo.preprocess["resize_size"], demo.augment) == (32, 32, "none")
    assert demo.batch_size == 64


def test_a_resize_that_would_pad_is_refused(in_tmp: Path) -> None:
    """(A crop of 0 or less is refused by its type: tests/test_hostile_errors.py.)"""
    message = exit_message([*QUICK, "--data.crop_size=224", "--data.resize_size=32"])
    assert "--data.resize_size 32 is smaller than --data.crop_size" in message
