"""Which checkpoints a run keeps: the best by the monitored metric, and ``last.ckpt``, always the newest state."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLast(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, whose ``last.ckpt`` is written at every point it checks, improvement or not.

    Lightning writes ``last.ckpt`` only where a top-k checkpoint was written too: with a monitored metric and
    ``save_top_k=1`` it is a copy of the last improvement, and resuming from it after a crash redoes every epoch
    since. Here ``last.ckpt`` follows every epoch (and every ``every_n_train_steps``); the best stays apart.
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
