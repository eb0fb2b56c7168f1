"""Reading checkpoints safely: any device's checkpoint onto the CPU, tensors and plain data only.

A checkpoint is a ``.ckpt`` file, or a directory of shards written by a sharded strategy (``fsdp2``, or ``fsdp``
with ``state_dict_type: sharded``): ``.metadata``, one ``__<rank>_0.distcp`` per rank and Lightning's ``meta.pt``.
"""

import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgcls.errors import UserError

LOGS = "logs"  # where train.py writes its runs, and where predict.py and export.py look for the newest
BEST = "best"  # the file name (without .ckpt) of the best checkpoint of a run
LAST = "last"  # and of its newest: Lightning's ModelCheckpoint.CHECKPOINT_NAME_LAST


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint says about its network besides the weights: the architecture, the classes, the
    preprocessing. The one reading of an ``ImageClassifier``'s hyperparameters, for inference, resume and export."""

    arch: str  # as --model.backbone names it: a torchvision name, or timm/<name>
    class_names: list[str]
    preprocess: dict[str, Any]  # imgcls.data.transforms.build_transforms's keyword arguments
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # for the builder, e.g. a ViT's image_size

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], source: object) -> "ModelSpec":
        """Read ``hparams``; a ``UserError`` naming ``source`` if they are not an ImageClassifier's."""
        names, kwargs = hparams.get("class_names"), hparams.get("backbone_kwargs") or {}
        if not isinstance(names, list | tuple) or not names or not all(isinstance(name, str) for name in names):
            raise UserError(f"{source}: its class_names are {names!r}, not a list of class names")
        if not isinstance(hparams.get("backbone"), str) or not isinstance(kwargs, Mapping):
            raise UserError(f"{source}: not a checkpoint of this project's ImageClassifier (no backbone)")
        if not isinstance(hparams.get("preprocess"), Mapping):
            raise UserError(f"{source}: not a checkpoint of this project's ImageClassifier (no preprocess)")
        return cls(hparams["backbone"], list(names), dict(hparams["preprocess"]), dict(kwargs))

    @property
    def architecture(self) -> str:
        """``resnet18`` or ``vit_b_16(image_size=384)``: the backbone and the builder arguments that shape it."""
        kwargs = ", ".join(f"{key}={value}" for key, value in sorted(self.arch_kwargs.items()))
        return f"{self.arch}({kwargs})" if kwargs else self.arch

    @property
    def classes(self) -> str:
        return f"{len(self.class_names)} classes ({', '.join(self.class_names)})"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file or sharded directory onto the CPU, safely; user mistakes raise ``UserError``.

    A sharded directory yields Lightning's metadata and the full ``state_dict`` (not the optimizer states),
    gathered in this one process with no process group.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_sharded(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    return _torch_load(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's hyperparameters, epoch, step and the like, checked as ``load_checkpoint`` does, tensors unread.

    A file is memory-mapped, so its tensors cost nothing; a sharded directory gives its ``meta.pt``, once its
    ``.metadata`` has passed the safe unpickler (DCP itself would unpickle it with plain ``pickle``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise UserError(f"{path}: a folder without .metadata, so not a sharded checkpoint (or one half written)")
        _read_dcp_metadata(path)
        return _torch_load(path / "meta.pt") if (path / "meta.pt").is_file() else {}
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    return _torch_load(path, mmap=True)


def _torch_load(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:  # the pickle asks for a callable: the classic code-execution payload, or a foreign class
            raise _refusal(path, found[1]) from error
        raise UserError(f"{path}: not a readable PyTorch checkpoint") from error
    except Exception as error:  # torch.load fails on corrupt files with many exception types
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error


def consolidate(shards: str | Path, output: str | Path) -> Path:
    """Write a sharded checkpoint directory as one ``.ckpt`` file: full weights and metadata, no optimizer state.

    The file loads anywhere a ``.ckpt`` does (``predict.py``, ``ImageClassifier.load_from_checkpoint``).
    Resume training from the directory itself, at any world size.
    """
    shards, output = Path(shards).expanduser(), Path(output).expanduser()
    if not shards.is_dir():
        raise UserError(f"{shards}: not a directory of checkpoint shards")
    checkpoint = _load_sharded(shards)
    checkpoint.pop("optimizer_states", None)
    tmp = output.with_name(f".{output.name}.tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, tmp)
    tmp.replace(output)  # atomic: a crash leaves the old file or the new one, never half of one
    return output


def _load_sharded(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    from imgcls.compat.torch import _load_state_dict_from_keys

    if not (path / ".metadata").is_file():
        raise UserError(f"{path}: a folder without .metadata, so not a sharded checkpoint; pass a .ckpt file or shards")

    class SafeReader(FileSystemReader):
        """DCP reads ``.metadata`` with plain ``pickle``, which runs any code it names; this reader does not."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return _read_dcp_metadata(path)

    meta = _torch_load(path / "meta.pt") if (path / "meta.pt").is_file() else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is unavailable")  # one process, on purpose
            tensors = _load_state_dict_from_keys({"state_dict"}, storage_reader=SafeReader(path))
    except UserError:
        raise
    except Exception as error:  # a missing or truncated shard file, most often
        problem = f"{type(error).__name__}: {error}"
        raise UserError(f"{path}: incomplete or corrupt sharded checkpoint ({problem})") from error
    return {**meta, **tensors}


def _read_dcp_metadata(path: Path) -> Any:
    with open(path / ".metadata", "rb") as file:
        return _MetadataUnpickler(file, path).load()


class _MetadataUnpickler(pickle.Unpickler):
    """Allows only what DCP metadata holds: its own dataclasses, torch sizes and dtypes, and paths."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            found = super().find_class(module, name)
            if module.startswith("torch.distributed.checkpoint.") and isinstance(found, type):
                return found
            if (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout")}:
                return found
            if module == "torch" and isinstance(found, torch.dtype) or module == "pathlib" and name.endswith("Path"):
                return found
        raise _refusal(self.path / ".metadata", f"{module}.{name}")


def _refusal(path: Path, name: str) -> UserError:
    return UserError(f"{path}: refused, it asks to import {name}; only tensors and plain data load from checkpoints")


def latest_checkpoint(logs: str | Path = LOGS, name: str = f"{BEST}.ckpt") -> Path:
    """Return the most recently written ``name`` under ``logs``: a file, or a sharded folder that has its ``.metadata``.

    DCP writes ``.metadata`` last, so a sharded folder without it is one whose writing was cut off.
    """
    found = [path for path in Path(logs).glob(f"**/{name}") if path.is_file() or (path / ".metadata").is_file()]
    found.sort(key=lambda path: (path / ".metadata" if path.is_dir() else path).stat().st_mtime)
    if not found:
        raise UserError(f"no {name} under {Path(logs).resolve()}; train first (python train.py) or pass --checkpoint")
    return found[-1]
