"""torchvision's own datasets (CIFAR10, MNIST, Flowers102, ...) by class name, from files already on disk."""

import difflib
import inspect
from pathlib import Path

import torchvision.datasets
from torch.utils.data import Dataset
from torchvision.datasets import VisionDataset

from imgcls.errors import UserError

SPLITS = ("train", "val", "test")


def open_torchvision_splits(name: str, root: Path, download: bool = False) -> dict[str, Dataset]:
    """Open dataset ``name`` from ``root``, without transforms: its ``train`` split and its ``val``/``test`` if any.

    Datasets that take ``train: bool`` (CIFAR10, MNIST, ...) have a train and a test split; those that take
    ``split: str`` (Flowers102, Food101, ...) get each of ``train``, ``val``, ``test`` they accept.
    """
    found = getattr(torchvision.datasets, name, None)
    if not (isinstance(found, type) and issubclass(found, VisionDataset)):
        names = [
            n for n, c in vars(torchvision.datasets).items() if isinstance(c, type) and issubclass(c, VisionDataset)
        ]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(sorted(names))}"
        raise UserError(f"--data.dataset {name!r} is not a torchvision dataset; {hint}")
    params = inspect.signature(found).parameters
    if "train" in params:
        choices = {"train": {"train": True}, "test": {"train": False}}
    elif "split" in params:
        choices = {split: {"split": split} for split in SPLITS}
    else:
        raise UserError(f"--data.dataset {name}: it has neither train= nor split=; use an ImageFolder tree instead")
    extra = {"download": download} if "download" in params else {}
    opened = {}
    for split, kwargs in choices.items():
        try:
            opened[split] = found(str(root), **kwargs, **extra)
        except ValueError as error:  # torchvision's verify_str_arg: the dataset has no such split
            if split == "train":
                raise UserError(
                    f"--data.dataset {name}: it has no split named 'train'; use an ImageFolder tree"
                ) from error
        except (RuntimeError, OSError) as error:  # torchvision: "Dataset not found or corrupted"
            hint = "" if download else " or pass --data.download true"
            raise UserError(
                f"--data.dataset {name}: not readable under --data.root {root} ({error}); put it there{hint}"
            ) from error
        except TypeError as error:  # a required argument this option does not set (EMNIST's split=)
            raise UserError(f"--data.dataset {name}: needs arguments this option does not set ({error})") from error
    if not isinstance(getattr(opened["train"], "classes", None), list | tuple):
        raise UserError(f"--data.dataset {name}: it does not name its classes (no .classes); use an ImageFolder tree")
    return opened
