"""A job killed at a chosen step, for the exact-resume tests: as a node that fails, or a scheduler's SIGKILL.

Load with ``PYTHONPATH=tests/scripts`` and ``--trainer.callbacks+={"class_path": "interrupted.KillAtStep",
"init_args": {"step": N}}``.
"""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the whole job (every rank, every loader process) as training step ``step`` starts.

    Lightning runs checkpoint callbacks after the others, so a checkpoint of step ``step - 1`` has been asked for by
    then; the kill waits for its file, which a background thread writes while training goes on.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            trainer.strategy.checkpoint_io.wait()
            os.killpg(os.getpgrp(), signal.SIGKILL)
