"""A training loss that is not finite (NaN or infinite) stops the run with the step it happened at, or skips the batch.

Gradient clipping is Lightning's own: ``--trainer.gradient_clip_val`` (and ``--trainer.gradient_clip_algorithm``).
"""

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from imgcls.errors import UserError


class NonFiniteLoss(L.Callback):
    """Checks every training loss before its backward pass; ``action`` says what a NaN or infinite one does.

    Args:
        action: ``error`` stops training, naming the step; ``skip`` leaves that step's weights and optimizer state
            as they were (every gradient is dropped, so the optimizer passes over every parameter) and goes on.
    """

    def __init__(self, action: Literal["error", "skip"] = "error") -> None:
        self.action = action
        self.skipping = False  # a loss of the current optimizer step (any micro-batch when accumulating) was bad
        self.where = ""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Summed over the processes, so that all of them stop, or skip, together: one alone would leave the others
        # waiting for it in the gradient all-reduce.
        bad = trainer.strategy.reduce((~torch.isfinite(loss.detach())).float(), reduce_op="sum")
        if not bad.item():
            return
        if self.action == "error":
            value = loss.item() if not torch.isfinite(loss) else "in another process"
            raise UserError(
                f"the training loss is not finite ({value}) at {self.where}; lower --model.optimizer.lr, "
                "clip gradients with --trainer.gradient_clip_val, check the data, or pass --nonfinite_loss.action "
                "skip to skip such batches"
            )
        self.skipping = True

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.skipping:
            optimizer.zero_grad(set_to_none=True)  # optimizers pass over parameters without a gradient
            self.skipping = False
            rank_zero_warn(f"the training loss is not finite at {self.where}; skipped that step's update")
