"""Unreadable images in class folders: found at setup, and caught with their paths while batches load.

``check_images`` sets what setup reads of every file: ``header`` (the default) opens it as Pillow does, which finds
empty files, files that are not images, broken headers and decompression bombs (about 50 µs an image: a minute
for ImageNet's 1.28 million); ``full`` decodes every image as training will, which also finds truncated files but
costs a decode each (milliseconds: an hour for ImageNet); ``none`` reads nothing. Both also refuse images that
evaluation's resize would make too large (``imgcls.data.pixel_limit``). Whatever setup did not find is caught by the
loader, which hands the path and the reason over instead of crashing a worker process.
``on_bad_image`` sets what happens to such files: ``error`` stops with their paths, ``skip`` drops them with a warning.
"""

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from imgcls.data.images import read_image
from imgcls.data.pixel_limit import too_large
from imgcls.data.walk import FolderWalk
from imgcls.errors import UserError

OnBadImage = Literal["error", "skip"]
CheckImages = Literal["none", "header", "full"]
SHOWN = 5  # files named in a one-line error
FILES_PER_WORKER = 1000  # below this, starting a loader process costs more than checking the files in this one
FIX = "delete or replace them, or pass --data.on_bad_image skip to train without them"


@dataclass(frozen=True)
class BadImage:
    """A file that is not a usable image, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


@dataclass(frozen=True)
class BadBatch:
    """What a loader hands over instead of a batch that held unreadable images it may not skip."""

    message: str


class CheckedImageFolder(ImageFolder):
    """An ``ImageFolder`` whose items are ``BadImage`` for files that fail to open, instead of an exception.

    Its folders are walked by ``walk`` (loops refused; one walk for every split finds files read twice), as the
    ``split`` named. Images that resizing to ``resize_size`` would make too large are ``BadImage`` too. It also
    remembers the files it passed over because their names are not of an image type (``ignored``).
    """

    def __init__(
        self,
        root: str | Path,
        walk: FolderWalk | None = None,
        split: str = "train",
        resize_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.ignored: list[str] = []
        self.walk, self.split, self.resize_size = walk or FolderWalk(), split, resize_size
        super().__init__(root, loader=read_image, is_valid_file=self._has_image_name, allow_empty=True, **kwargs)

    def make_dataset(self, directory: str | Path, class_to_idx: dict[str, int], **_: Any) -> list[tuple[str, int]]:
        """ImageFolder's samples, in its order, listed by ``FolderWalk`` rather than ``os.walk``."""
        samples = []
        for name, index in sorted(class_to_idx.items()):
            files = self.walk.files(os.path.join(directory, name), self.split, name)
            samples += [(path, index) for path in files if self._has_image_name(path)]
        return samples

    def _has_image_name(self, path: str) -> bool:
        if is_image_name(path):
            return True
        if not os.path.basename(path).startswith("."):  # .DS_Store and the like are nobody's mistake
            self.ignored.append(path)
        return False

    def __getitem__(self, index: int) -> tuple[Any, int] | BadImage:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as error:  # anything a file's contents can make Pillow raise
            return BadImage(path, describe(error))
        reason = too_large(image, self.resize_size) if self.resize_size else None
        if reason is not None:  # a file that changed since setup, or that setup did not check
            return BadImage(path, reason)
        return (self.transform(image) if self.transform else image), target

    def empty_classes(self) -> list[str]:
        """The class folders that hold no images."""
        counts = Counter(self.targets)
        return [os.path.join(self.root, name) for index, name in enumerate(self.classes) if not counts[index]]

    def drop(self, paths: set[str]) -> None:
        """Leave the files ``paths`` out of the dataset."""
        self.samples = self.imgs = [sample for sample in self.samples if sample[0] not in paths]
        self.targets = [target for _, target in self.samples]


def is_image_name(path: str) -> bool:
    """Whether ImageFolder reads ``path`` as an image: by its extension, one of ``IMG_EXTENSIONS``."""
    return has_file_allowed_extension(path, IMG_EXTENSIONS)


def describe(error: Exception) -> str:
    """Why an image failed to open, in words."""
    if isinstance(error, Image.DecompressionBombError):
        return f"refused as a possible decompression bomb: {error}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read"
    return f"corrupt or truncated: {type(error).__name__}: {error}"


def problem(path: str, full: bool = False, resize_size: int | None = None) -> str | None:
    """Why ``path`` is not a usable image, or ``None``: from its header alone, or from a full decode with ``full``.

    With ``resize_size``, an image that resizing would make too large is not usable either.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file, 0 bytes"
        if full:
            image = read_image(path)
        else:
            image = Image.open(path)  # reads the header: format, mode and size (the decompression bomb check)
            image.close()
    except Exception as error:
        return describe(error)
    return too_large(image, resize_size) if resize_size else None


class _Problems(Dataset):
    def __init__(self, paths: list[str], full: bool, resize_size: int | None) -> None:
        self.paths, self.full, self.resize_size = paths, full, resize_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str | None:
        return problem(self.paths[index], self.full, self.resize_size)


def find_bad_images(
    paths: list[str], full: bool = False, workers: int = 0, resize_size: int | None = None
) -> list[BadImage]:
    """The files of ``paths`` that are not usable images, checked in up to ``workers`` loader processes."""
    workers = min(workers, len(paths) // FILES_PER_WORKER)
    workers = workers if workers > 1 else 0  # one loader process is no faster than this one
    problems = _Problems(paths, full, resize_size)
    loader = DataLoader(problems, batch_size=256, num_workers=workers, collate_fn=list)
    reasons = [reason for batch in loader for reason in batch]
    return [BadImage(path, reason) for path, reason in zip(paths, reasons, strict=True) if reason is not None]


def check_splits(
    splits: dict[str, CheckedImageFolder], check: CheckImages, on_bad: OnBadImage, workers: int = 0
) -> None:
    """Refuse files reached twice; find the unreadable files of every split and stop or drop them; then refuse class
    folders left empty."""
    splits["train"].walk.refuse_files_read_twice(is_image_name, carved="val" not in splits)
    if check != "none":
        paths = [path for split in splits.values() for path, _ in split.samples]
        resize_size = splits["train"].resize_size
        bad = find_bad_images(paths, full=check == "full", workers=workers, resize_size=resize_size)
        if bad and on_bad == "error":
            more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
            shown = ", ".join(map(str, bad[:SHOWN]))
            raise UserError(f"{len(bad)} unreadable image files: {shown}{more}; {FIX}")
        for image in bad:
            rank_zero_warn(f"{image}: skipped (--data.on_bad_image skip)")
        for split in splits.values():
            split.drop({image.path for image in bad})
    empty = [folder for split in splits.values() for folder in split.empty_classes()]
    if empty:
        ignored = [path for split in splits.values() for path in split.ignored]
        types = sorted({Path(path).suffix.lower() or Path(path).name for path in ignored})
        besides = f"; other files there are not read: {', '.join(types)}" if types else ""
        raise UserError(
            f"class folders without usable images: {', '.join(empty)}; add images ({', '.join(IMG_EXTENSIONS)}) "
            f"or remove the folders{besides}"
        )


def collate(samples: list[Any], on_bad: OnBadImage = "error") -> Any:
    """``default_collate`` of the samples that loaded; a ``BadBatch`` if some did not and may not be skipped."""
    bad = [sample for sample in samples if isinstance(sample, BadImage)]
    if not bad:
        return default_collate(samples)
    if on_bad == "error":
        hint = "--data.check_images full finds every such file before training"
        return BadBatch(f"cannot read {', '.join(map(str, bad))}; {FIX} ({hint})")
    for image in bad:
        warnings.warn(f"{image}: skipped (--data.on_bad_image skip)", stacklevel=2)
    good = [sample for sample in samples if not isinstance(sample, BadImage)]
    if not good:
        # Rare (a last, short batch): nothing is left to train or evaluate on, and Lightning cannot skip a batch.
        return BadBatch(
            f"every image of a batch is unreadable: {', '.join(map(str, bad))}; delete or replace them, or pass "
            "--data.check_images full to leave such files out before training"
        )
    return default_collate(good)


def raise_if_bad(batch: Any) -> Any:
    """Raise the ``UserError`` a loader put in place of a batch; in the main process, so its message is clean."""
    if isinstance(batch, BadBatch):
        raise UserError(batch.message)
    return batch
