"""Checkpoints that a killed job cannot leave half written: each file is written beside its old copy, then renamed."""

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, flushes that to disk, then renames it over the checkpoint.

    Lightning's ``_atomic_save`` writes its temporary file in the system's temporary folder and moves it: when that
    is another filesystem (a local ``/tmp`` and checkpoints on shared storage, as on most clusters) the move copies
    the bytes into the checkpoint itself, so a job killed during the copy leaves it truncated. A rename within one
    folder is atomic: a reader sees the old file or the new one. Remote paths (``s3://``) keep fsspec's transaction.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # one writer per checkpoint: rank 0
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes reach the disk before the name points at them
            os.replace(tmp, path)
        except BaseException:  # a full disk, an interrupt: the old checkpoint stays, the partial copy goes
            tmp.unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # and the rename itself survives a crash of the machine
        finally:
            os.close(folder)


class CrashSafeCheckpoints(L.Callback):
    """Installs ``AtomicCheckpointIO``, unless the user configured a CheckpointIO plugin of their own."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
