"""Checkpoints that a killed job cannot leave half written: each file is written beside its old copy, then renamed."""

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from imgcls.checkpoints import write_failure
from imgcls.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, flushes that to disk, then renames it over the checkpoint.

    Lightning's ``_atomic_save`` writes its temporary file in the system's temporary folder and moves it: when that
    is another filesystem (a local ``/tmp`` and checkpoints on shared storage, as on most clusters) the move copies
    the bytes into the checkpoint itself, so a job killed during the copy leaves it truncated. A rename within one
    folder is atomic: a reader sees the old file or the new one. Remote paths (``s3://``) keep fsspec's transaction.

    The file is written without the CRC32 ``torch.save`` computes for each record by default: ``torch.load`` never
    checks it (only zip tools do, and they report a mismatch), and computing it is half the time of a save (0.11 of
    0.21 s for resnet18 with AdamW's state). The rename and the flush are what keep the file whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # one writer per checkpoint: rank 0
        crc32 = torch.serialization.get_crc32_options()
        try:
            torch.serialization.set_crc32_options(False)
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes reach the disk before the name points at them
            os.replace(tmp, path)
        except BaseException as error:  # a full disk, an interrupt: the old checkpoint stays, the partial copy goes
            tmp.unlink(missing_ok=True)
            failure = write_failure(path, error)
            if failure is None:
                raise
            raise failure from error
        finally:
            torch.serialization.set_crc32_options(crc32)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # and the rename itself survives a crash of the machine
        finally:
            os.close(folder)


def check_writable(folder: Path, flag: str) -> None:
    """Make ``folder``, as the run would, and a file in it: a ``UserError`` naming ``flag`` if that fails, before
    training rather than at the first checkpoint, an epoch later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # unnamed where the filesystem allows: nothing to clean up
            pass
    except OSError as error:
        file = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
        reason = f"{file} is a file" if file is not None else error.strerror or error
        raise UserError(
            f"{flag} {folder}: checkpoints cannot be written there ({reason}); point {flag} at a folder you can "
            "write to"
        ) from error


def check_output_folders(trainer: L.Trainer) -> None:
    """``check_writable`` for each local folder the run writes: its logger's and its checkpoints'."""
    folders, callback = {}, trainer.checkpoint_callback
    if trainer.logger is not None and trainer.logger.save_dir:
        folders["--trainer.logger.save_dir"] = str(trainer.logger.save_dir)
    if callback is not None and callback.dirpath:
        folders["--checkpoint.dirpath"] = str(callback.dirpath)
    elif callback is not None and trainer.logger is None:  # Lightning's default: <default_root_dir>/checkpoints
        folders["--trainer.default_root_dir"] = str(trainer.default_root_dir)
    for flag, folder in folders.items():
        if "://" not in folder:  # s3:// and the like: fsspec's to check
            check_writable(Path(folder), flag)


class CrashSafeCheckpoints(L.Callback):
    """Installs ``AtomicCheckpointIO``, unless the user configured a CheckpointIO plugin of their own."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
