"""Sharded checkpoints (a folder, one file per rank) written so that a killed job leaves the previous one whole."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import Strategy


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
