"""The training command line: LightningCLI without subcommands, then fit and test the best checkpoint."""

import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from imgcls.backbones import weights_preprocess
from imgcls.dashboard import SaveConfigAndHparams
from imgcls.data import ImageFolderDataModule
from imgcls.errors import UserError
from imgcls.inspection import ParameterInspector
from imgcls.model import MONITOR, ImageClassifier
from imgcls.strategies import register_strategies

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume training from.")
        for key in ("num_classes", "class_names", "preprocess"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": MONITOR, "checkpoint.mode": "max"})
        parser.set_defaults({"checkpoint.filename": "best", "checkpoint.save_last": True})
        parser.add_lightning_class_args(ParameterInspector, "inspection")  # --inspection.histograms=true etc.

    def before_instantiate_classes(self) -> None:
        # Preprocessing the config leaves unset comes from the pretrained weights (torchvision's weights.transforms(),
        # timm's pretrained config); written into the config, it is also what config.yaml records.
        model, data = self.config.model, self.config.data
        for key, value in weights_preprocess(model.backbone, model.pretrained).items():
            if data[key] is None:
                data[key] = value


def main(args: list[str] | None = None, model_class: type[ImageClassifier] = ImageClassifier) -> TrainCLI:
    """Parse the command line (or ``args``), train, then test the best checkpoint."""
    register_strategies()  # --trainer.strategy=fsdp / fsdp2 shard block by block
    try:
        cli = TrainCLI(
            model_class,
            ImageFolderDataModule,
            run=False,
            auto_configure_optimizers=False,  # the model owns its optimizer; see ImageClassifier.configure_optimizers
            seed_everything_default=42,
            save_config_callback=SaveConfigAndHparams,  # config.yaml, and the config and hparams in TensorBoard
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.exists() else []},
            args=args,
        )
    except (UserError, MisconfigurationException, ValueError) as error:  # Lightning rejects a configuration
        sys.exit(f"error: {' '.join(str(error).split())}")
    trainer = cli.trainer
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
        best = trainer.checkpoint_callback.best_model_path
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    except UserError as error:
        sys.exit(f"error: {error}")
    log_dir = Path(trainer.log_dir or ".")  # a collective call under DDP: every rank asks
    if trainer.is_global_zero:
        print(f"checkpoints: {trainer.checkpoint_callback.dirpath}  (best: {best})")
        print(f"config:      {log_dir / 'config.yaml'}")
        print(f"tensorboard: tensorboard --logdir {log_dir}")
    return cli
