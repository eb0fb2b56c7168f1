"""The training command line: LightningCLI without subcommands, then fit and test the best checkpoint."""

import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from imgcls.data import ImageFolderDataModule
from imgcls.errors import UserError
from imgcls.model import MONITOR, ImageClassifier

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume training from.")
        for key in ("num_classes", "class_names", "preprocess"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.monitor": MONITOR, "checkpoint.mode": "max", "checkpoint.filename": "best", "checkpoint.save_last": True}
        )


def main(args: list[str] | None = None) -> TrainCLI:
    """Parse the command line, train, then test the best checkpoint."""
    try:
        cli = TrainCLI(
            ImageClassifier,
            ImageFolderDataModule,
            run=False,
            auto_configure_optimizers=False,  # the model owns its optimizer; see ImageClassifier.configure_optimizers
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.exists() else []},
            args=args,
        )
        trainer = cli.trainer
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best" if trainer.checkpoint_callback.best_model_path else None)
    except (UserError, MisconfigurationException) as error:
        sys.exit(f"error: {error}")
    log_dir = Path(trainer.log_dir or ".")  # a collective call under DDP: every rank asks
    if trainer.is_global_zero:
        print(f"checkpoints: {Path(trainer.checkpoint_callback.dirpath)}  (best: {trainer.checkpoint_callback.best_model_path})")
        print(f"config:      {log_dir / 'config.yaml'}")
        print(f"tensorboard: tensorboard --logdir {log_dir}")
    return cli
