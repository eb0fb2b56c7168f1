"""Which checkpoints a run keeps: the best by the monitored metric, and ``last.ckpt``, always the newest state."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from imgcls.callbacks.crash_safe import AtomicCheckpointIO


class BestAndLast(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, whose ``last.ckpt`` is written at every point it checks, improvement or not.

    Lightning writes ``last.ckpt`` only where a top-k checkpoint was written too: with a monitored metric and
    ``save_top_k=1`` it is a copy of the last improvement, and resuming from it after a crash redoes every epoch
    since. Here ``last.ckpt`` follows every epoch (and every ``every_n_train_steps``); the best stays apart. Where
    the best was written in the same step, ``last.ckpt`` becomes a hard link to it rather than a second copy of the
    same state (Lightning's ``save_last="link"`` makes a symbolic link, which follows the best when it changes).
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_unless_saved(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_unless_saved(trainer)

    def _save_last_unless_saved(self, trainer: L.Trainer) -> None:
        written = self._last_global_step_saved == trainer.global_step  # by the top-k save of this step
        if self.save_last and not written and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        saved, last = (
            self._last_checkpoint_saved,
            self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST),
        )
        same_step = self.save_last and self._last_global_step_saved == trainer.global_step and saved != last
        another_runs = self._enable_version_counter and last != self.last_model_path and self.file_exists(last, trainer)
        if not same_step or another_runs:  # Lightning names it last-v1.ckpt then
            return super()._save_last_checkpoint(trainer, monitor_candidates)
        io = trainer.strategy.checkpoint_io
        files = isinstance(io, AtomicCheckpointIO) and trainer.strategy.broadcast(not Path(saved).is_dir())
        if not files:  # a sharded folder, or a CheckpointIO of the user's: written again
            return super()._save_last_checkpoint(trainer, monitor_candidates)
        self.last_model_path = last
        if trainer.is_global_zero:
            io.link(saved, last)  # once the best is written, by the same thread
