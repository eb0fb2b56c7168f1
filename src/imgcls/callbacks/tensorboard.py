"""The run's own page in TensorBoard: the resolved config as text, the hyperparameters with the final metrics."""

from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter


def tensorboard(trainer: L.Trainer) -> SummaryWriter | None:
    """The writer of the trainer's TensorBoard logger on rank 0; ``None`` on other ranks or without one."""
    if not trainer.is_global_zero:
        return None
    return next((logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)


class SaveConfigAndHparams(SaveConfigCallback):
    """Save ``config.yaml`` as LightningCLI does, show it in TensorBoard's Text tab, and, when testing ends, record
    the config's values with the final metrics in the HParams tab.

    The metrics are every ``test/*`` value and ``hp_metric``, the checkpoint callback's best monitored score.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        writer = tensorboard(trainer)
        if writer is not None:
            text = self.parser.dump(self.config, skip_none=False)
            writer.add_text("config", "    " + text.replace("\n", "\n    "))  # indented: a Markdown code block

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("test/")}
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        if best is not None:
            metrics["hp_metric"] = float(best)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # other loggers take no metrics with the hyperparameters
                logger.log_hyperparams(self.hyperparameters(), metrics, step=trainer.global_step)

    def hyperparameters(self) -> dict[str, Any]:
        """The resolved config as a nested dict, without the config files it was read from."""
        values = self.config.clone().as_dict()
        return {key: value for key, value in values.items() if key not in ("config", "__default_config__")}
