"""Surviving killed jobs: atomic checkpoint writes, and finding and checking what to resume.

``--ckpt_path last`` resumes from the newest ``last.ckpt`` of any earlier run (Lightning's own ``last`` looks only in
the new run's folder, where there is none yet); ``--ckpt_path auto`` does the same when there is one and starts
afresh when there is not, so one command line serves a job that a cluster restarts.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info

from imgcls.checkpoints import latest_checkpoint, read_metadata
from imgcls.errors import UserError

LAST = "last.ckpt"


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


def save_folder_atomically(strategy: Strategy, filepath: Any, save: Callable[[Path], None]) -> None:
    """Write a sharded checkpoint with ``save(folder)`` into a folder beside ``filepath``, then rename it there.

    Lightning's sharded strategies write into the checkpoint's folder in place: a job killed while saving leaves
    new shards beside the old ``meta.pt`` (a checkpoint that loads, with weights and training state of two
    different steps) or half the shards. Here every rank writes into ``.<name>.partial``; once all are done,
    rank 0 swaps it in with two renames, so the old checkpoint stays whole until the new one is. A folder cannot
    be renamed over another, so a kill between the two renames (microseconds) leaves the previous checkpoint as
    ``.<name>.old``.
    """
    path = Path(strategy.broadcast(filepath))  # rank 0's name, as Lightning's strategies do
    partial, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    if strategy.is_global_zero:
        shutil.rmtree(partial, ignore_errors=True)  # a save cut off earlier
    strategy.barrier("sharded_checkpoint_start")
    try:
        save(partial)
    except BaseException:
        if strategy.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    strategy.barrier("sharded_checkpoint_written")  # every rank's shards are on disk
    if strategy.is_global_zero:
        shutil.rmtree(old, ignore_errors=True)
        if path.is_dir():
            os.replace(path, old)
        elif path.exists():
            path.unlink()  # a single-file checkpoint of an earlier run under this name
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    strategy.barrier("sharded_checkpoint_renamed")


class CrashSafeCheckpoints(L.Callback):
    """Installs ``AtomicCheckpointIO``, unless the user configured a CheckpointIO plugin of their own."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def checkpoint_root(trainer: L.Trainer) -> Path:
    """Where the runs of this configuration keep their checkpoints: ``--checkpoint.dirpath``, else the log folder."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath)
    if trainer.logger is not None and trainer.logger.save_dir:
        return Path(trainer.logger.save_dir)
    return Path(trainer.default_root_dir) / "checkpoints"  # ModelCheckpoint's folder without a logger


def resolve_ckpt_path(value: str | None, trainer: L.Trainer) -> str | None:
    """The checkpoint ``--ckpt_path`` names: ``last`` and ``auto`` become the newest ``last.ckpt`` of earlier runs."""
    if value not in ("last", "auto"):
        return value
    root = checkpoint_root(trainer)
    try:
        found = latest_checkpoint(root, LAST)
    except UserError:
        if value == "last":
            raise UserError(
                f"--ckpt_path last: no {LAST} under {root}; train first, or pass --ckpt_path auto to start a new "
                "run when there is none"
            ) from None
        rank_zero_info(f"--ckpt_path auto: no {LAST} under {root}; starting a new run")
        return None
    rank_zero_info(f"--ckpt_path {value}: resuming from {found}")
    return str(found)


def check_resumable(path: str, hparams: dict[str, Any]) -> None:
    """Refuse a checkpoint that is missing, unreadable, unsafe, or of another network or other classes than
    ``hparams`` (the model's), before Lightning loads it; each with a one-line ``UserError``."""
    try:
        saved = read_metadata(path).get("hyper_parameters")
    except UserError as error:
        raise UserError(f"--ckpt_path {error}") from None
    fresh = f"or start a new run from its weights with --model.pretrained {path}"
    if not isinstance(saved, dict) or "backbone" not in saved:
        raise UserError(f"--ckpt_path {path}: not a checkpoint of this project's ImageClassifier; {fresh}")
    theirs, ours = _architecture(saved), _architecture(hparams)
    if theirs != ours:
        raise UserError(
            f"--ckpt_path {path}: a {theirs} checkpoint, but the model is a {ours}; "
            f"resume with --model.backbone {saved['backbone']}, {fresh}"
        )
    theirs, ours = _classes(saved), _classes(hparams)
    if theirs != ours:
        raise UserError(
            f"--ckpt_path {path}: trained on {theirs}, but the data has {ours}; resume with the same classes, {fresh}"
        )


def _architecture(hparams: dict[str, Any]) -> str:
    kwargs = ", ".join(f"{key}={value}" for key, value in sorted((hparams.get("backbone_kwargs") or {}).items()))
    return f"{hparams['backbone']}({kwargs})" if kwargs else str(hparams["backbone"])


def _classes(hparams: dict[str, Any]) -> str:
    names = list(hparams.get("class_names") or [])
    return f"{hparams['num_classes']} classes ({', '.join(map(str, names))})"
