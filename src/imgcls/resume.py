"""Finding and checking what to resume: ``--ckpt_path last`` and ``auto``, and the checks before Lightning loads it.

``--ckpt_path last`` resumes from the newest ``last.ckpt`` of any earlier run (Lightning's own ``last`` looks only in
the new run's folder, where there is none yet); ``--ckpt_path auto`` does the same when there is one and starts
afresh when there is not, so one command line serves a job that a cluster restarts.
"""

import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info

from imgcls.checkpoints import LAST, ModelSpec, holds_split, latest_checkpoint, read_metadata, tensor_names
from imgcls.compat.lightning import continue_version
from imgcls.errors import UserError
from imgcls.parallel.tensor_parallel import tensor_parallel_size


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
        found = latest_checkpoint(root, f"{LAST}.ckpt")
    except UserError as error:
        if value == "last":
            raise UserError(
                f"--ckpt_path last: no {LAST}.ckpt under {root}; train first, or pass --ckpt_path auto to start a new "
                "run when there is none"
            ) from error
        rank_zero_info(f"--ckpt_path auto: no {LAST}.ckpt under {root}; starting a new run")
        return None
    rank_zero_info(f"--ckpt_path {value}: resuming from {found}")
    run = found.parent.parent  # <save_dir>/<name>/version_N/checkpoints/last.ckpt
    logger = trainer.logger
    if (
        isinstance(logger, TensorBoardLogger)
        and run.parent == Path(logger.root_dir)
        and run / "checkpoints" == found.parent
    ):
        continue_version(logger, run.name)  # one run, one folder: its curves go on where they stopped
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # its own
    return str(found)


def check_resumable(path: str, hparams: dict[str, Any], strategy: Strategy) -> dict[str, Any]:
    """Refuse a checkpoint that is missing, unreadable, unsafe, of another network or other classes than
    ``hparams`` (the model's), a sharded folder that ``strategy`` cannot read, or one saved with tensor parallelism
    when ``strategy`` has none (or the reverse: the layouts of q, k and v differ), before Lightning loads it; each
    with a one-line ``UserError``. Return its metadata (everything but the weights and optimizer states)."""
    try:
        metadata = read_metadata(path)
    except UserError as error:
        raise UserError(f"--ckpt_path {error}") from error
    saved = metadata.get("hyper_parameters")
    fresh = f"or start a new run from its weights with --model.pretrained {path}"
    tensor_parallel = tensor_parallel_size(strategy) is not None  # else DCP fails on the missing q, k, v names
    if holds_split(tensor_names(path)) != tensor_parallel:
        how = (
            "without tensor parallelism, and this run splits its blocks; resume with the strategy it was saved with"
            if tensor_parallel
            else "with tensor parallelism (fsdp_tp), and this run has none; resume under a fsdp_tp strategy (on one "
            "process: --trainer.strategy imgcls.parallel.tensor_parallel.TensorParallelStrategy "
            "--trainer.strategy.tensor_parallel_size 1)"
        )
        raise UserError(f"--ckpt_path {path}: saved {how}, {fresh}")
    if Path(path).expanduser().is_dir() and type(strategy).load_checkpoint is Strategy.load_checkpoint:
        raise UserError(  # Lightning's single-file reader would open the folder as a file: IsADirectoryError
            f"--ckpt_path {path}: a sharded checkpoint (a folder), which only a sharded strategy resumes; add "
            f"--trainer.strategy=fsdp (at any number of devices), {fresh}"
        )
    if not isinstance(saved, dict) or "backbone" not in saved:
        raise UserError(f"--ckpt_path {path}: not a checkpoint of this project's ImageClassifier; {fresh}")
    theirs, ours = (
        ModelSpec.from_hparams(saved, f"--ckpt_path {path}"),
        ModelSpec.from_hparams(hparams, "the model", trusted=True),
    )
    if theirs.architecture != ours.architecture:
        raise UserError(
            f"--ckpt_path {path}: a {theirs.architecture} checkpoint, but the model is a {ours.architecture}; "
            f"resume with --model.backbone {theirs.arch}, {fresh}"
        )
    if theirs.class_names != ours.class_names:
        raise UserError(
            f"--ckpt_path {path}: trained on {theirs.classes}, but the data has {ours.classes}; resume with the same "
            f"classes, {fresh}"
        )
    return metadata
