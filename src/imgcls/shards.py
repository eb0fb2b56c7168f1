"""Sharded checkpoint folders (``torch.distributed.checkpoint``), read so that nothing in them can run code.

A folder holds ``.metadata`` (a pickle), one ``__<rank>_0.distcp`` per rank, and Lightning's ``meta.pt``. DCP itself
unpickles ``.metadata`` with plain ``pickle`` and every non-tensor entry of the shards with
``torch.load(weights_only=False)``: a folder with a clean ``.metadata`` can still run code from one entry. Here
``.metadata`` goes through an unpickler that knows DCP's own classes by name and refuses anything else before
importing it, and every non-tensor entry is unpickled with ``weights_only=True`` first (which refuses callables and
foreign classes): only then does DCP get it. ``check_folder`` does this for a whole folder, so that a folder is
safe to hand to Lightning, which loads it with DCP's defaults.
"""

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from imgcls.compat.torch import _load_state_dict_from_keys
from imgcls.errors import UserError

DCP = "torch.distributed.checkpoint."
# Everything a .metadata pickle names, by module and name, checked before anything is imported.
METADATA_GLOBALS = {
    (f"{DCP}metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {(f"{DCP}filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout")}  # fmt: skip
METADATA_GLOBALS |= {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
METADATA_GLOBALS |= {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath")}


def read_metadata(folder: Path) -> Metadata:
    """The folder's ``.metadata``, unpickled safely; ``UserError`` for a missing, truncated or unsafe one."""
    try:
        with open(folder / ".metadata", "rb") as file:
            found = _MetadataUnpickler(file, folder / ".metadata").load()
    except UserError:
        raise
    except FileNotFoundError as error:
        raise UserError(
            f"{folder}: a folder without .metadata, so not a sharded checkpoint (or one half written)"
        ) from error
    except Exception as error:  # truncated or not a pickle: the unpickler raises many kinds
        raise UserError(  # DCP writes it last: a save cut off leaves none; this is a damaged file or copy
            f"{folder / '.metadata'}: not readable ({type(error).__name__}: {error}); the folder is damaged or was "
            "copied in part: copy it again from where it was written, or use another checkpoint"
        ) from error
    if not isinstance(found, Metadata):
        raise UserError(f"{folder / '.metadata'}: not the metadata of a sharded checkpoint")
    return found


def load_entries(folder: Path, keys: set[str] | None) -> dict[str, Any]:
    """The entries under ``keys`` (all with ``None``) of a sharded folder, in this process, checked as they are read."""
    reader = CheckedReader(folder)  # reads and checks .metadata first
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is unavailable")  # one process, on purpose
            return _load_state_dict_from_keys(keys, storage_reader=reader)
    except (Exception, CheckpointException) as error:  # DCP's wraps what the reader raised; a missing shard, mostly
        if reader.refused is not None:
            raise reader.refused from error
        if isinstance(error, CheckpointException):  # one process: one failure, the exception DCP caught
            error = next(iter(error.failures.values()))[0]
        problem = f"{type(error).__name__}: {' '.join(str(error).split())}"
        raise UserError(f"{folder}: incomplete or corrupt sharded checkpoint ({problem})") from error


def check_folder(folder: Path) -> None:
    """Refuse a sharded folder if its ``.metadata`` or any non-tensor entry of its shards names code to run."""
    objects = {fqn for fqn, item in read_metadata(folder).state_dict_metadata.items()
               if isinstance(item, BytesStorageMetadata)}  # fmt: skip
    if objects:
        load_entries(folder, objects)


class CheckedReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` and the non-tensor entries unpickled safely first."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.folder = folder
        self.metadata = read_metadata(folder)
        self.refused: UserError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _CheckedBytes(planner, self))


class _CheckedBytes:
    """A load planner whose ``load_bytes`` unpickles each entry with ``weights_only=True`` before DCP unpickles it."""

    def __init__(self, planner: Any, reader: CheckedReader) -> None:
        self._planner, self._reader = planner, reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as error:
            found = re.search(r"GLOBAL (\S+)", str(error))
            asks = f"it asks to import {found[1]}" if found else f"not plain data ({type(error).__name__})"
            self._reader.refused = UserError(
                f"{self._reader.folder}: refused the entry {read_item.dest_index.fqn}, {asks}; only tensors and plain "
                "data load from checkpoints"
            )
            raise self._reader.refused from error
        self._planner.load_bytes(read_item, io.BytesIO(data))


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in METADATA_GLOBALS:  # before importing anything
            raise refusal(self.path, f"{module}.{name}")
        return super().find_class(module, name)


def refusal(path: Path, name: str) -> UserError:
    return UserError(f"{path}: refused, it asks to import {name}; only tensors and plain data load from checkpoints")
