"""Sharded checkpoints (a folder, one file per rank) written so that a killed job leaves the previous one whole."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import Strategy
from torch.distributed.checkpoint import CheckpointException

from imgcls.checkpoints import write_failure
from imgcls.errors import UserError


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
    except BaseException as error:
        if strategy.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        if not isinstance(error, CheckpointException):
            raise
        raise shard_write_failure(path, error, strategy.global_rank) from error  # DCP told every rank
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


def shard_write_failure(path: Path, error: CheckpointException, rank: int) -> UserError:
    """One line for a sharded checkpoint that some rank could not write, as DCP reports it to every ``rank``.

    DCP gathers the failures of every rank pickled, which drops the OSError behind torch.save's "unexpected pos" (a
    write cut short) where it was not kept: then its message says what happened, and the likely causes.
    """
    rank = rank if rank in error.failures else min(error.failures)
    failure = error.failures[rank][0]
    found = write_failure(path, failure)
    if found is not None:
        return found
    reason = " ".join(str(failure).split())
    return UserError(
        f"{path}: the sharded checkpoint could not be written (rank {rank}: {type(failure).__name__}: {reason}; "
        "a write cut short is a full disk, a quota or ulimit -f); the one before, if any, is unchanged: make room, "
        "then resume with --ckpt_path last"
    )
