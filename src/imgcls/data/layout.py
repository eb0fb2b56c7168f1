"""The layout of an image folder: which folders are classes and which are splits, and that the splits agree."""

import os
from pathlib import Path

from imgcls.errors import UserError

SPLITS = ("val", "test")  # the folders beside train/ read as splits


def class_names(folder: Path) -> list[str]:
    """The class folders in ``folder``, sorted as ImageFolder sorts them."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not names:
        raise UserError(f"{folder}: no class folders; put images in {folder}/<class name>/")
    return names


def split_folders(root: Path, train_dir: Path, classes: list[str]) -> dict[str, Path]:
    """``train_dir``, and the ``val``/``test`` folders beside it, each with the same class folders."""
    folders = {"train": train_dir}
    for split in SPLITS:
        path = root / split
        if train_dir != root and path.is_dir():
            _refuse_other_classes(path, class_names(path), train_dir, classes)
            folders[split] = path
        elif train_dir == root and split in classes:
            _refuse_split_read_as_class(path, classes)
    return folders


def _refuse_other_classes(path: Path, found: list[str], train_dir: Path, classes: list[str]) -> None:
    if found != classes:
        missing = [str(train_dir / name) for name in classes if name not in found]
        extra = [str(path / name) for name in found if name not in classes]
        differences = [f"no {path.name} folder for {', '.join(missing)}"] if missing else []
        differences += [f"{', '.join(extra)} not in {train_dir}"] if extra else []
        raise UserError(
            f"{path}: its class folders differ from the training classes ({'; '.join(differences)}); "
            f"give {path} the same class folders as {train_dir}"
        )


def _refuse_split_read_as_class(folder: Path, classes: list[str]) -> None:
    """Refuse ``root/val`` or ``root/test`` that holds class folders of ``root``'s own: a split, read as a class."""
    shared = sorted({entry.name for entry in os.scandir(folder) if entry.is_dir()} & set(classes))
    if shared:
        train = folder.parent / "train"
        raise UserError(
            f"{folder} holds class folders of {folder.parent} ({', '.join(shared)}): a {folder.name} split, but "
            f"without a {train} folder it is read as one more class, {folder.name}; move the training class folders "
            f"into {train}"
        )
