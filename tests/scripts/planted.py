"""Faults planted in real runs, for the tests of what a hang looks like to a user and to CI.

Load with ``PYTHONPATH=tests/scripts`` and ``--trainer.callbacks+=planted.SkipOneCollective``.
"""

import time
from pathlib import Path

import lightning as L
import torch

STARTED = "planted-hang-started"  # written in the working directory when the hang begins, holding the time


class SkipOneCollective(L.Callback):
    """At the end of the first training epoch every process but rank 1 joins one all-reduce, which rank 1 skips.

    The shape of a real bug: a collective that only some processes reach, as in a callback on rank 0 alone.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0 and trainer.global_rank != 1:
            Path(STARTED).write_text(str(time.time()))
            trainer.strategy.reduce(torch.zeros(1, device=pl_module.device), reduce_op="sum")
