"""The training command line: LightningCLI without subcommands, then fit and test the best checkpoint."""

import gc
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from imgcls.allocator import keep_freed_memory
from imgcls.backbones import weights_preprocess
from imgcls.collectives import DEFAULT_TIMEOUT_S, apply_timeout, close, describe_failure, is_collective_failure
from imgcls.dashboard import SaveConfigAndHparams
from imgcls.data import ImageFolderDataModule
from imgcls.errors import UserError
from imgcls.inspection import ParameterInspector
from imgcls.model import MONITOR, ImageClassifier
from imgcls.numerics import NonFiniteLoss
from imgcls.plan import Plan
from imgcls.plan_cli import AUTO_FIT, PlanOptions, auto_fit, format_plan, plan_run
from imgcls.preemption import EXIT_SIGTERM, Preemption
from imgcls.resume import CrashSafeCheckpoints, check_resumable, resolve_ckpt_path
from imgcls.strategies import register_strategies

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Checkpoint to resume training from: a file, a sharded folder, 'last' (the newest last.ckpt of the "
            "earlier runs) or 'auto' (that one if there is one, else a new run).",
        )
        parser.add_argument("--debug", action="store_true", help="Show the traceback of an error, not one line.")
        parser.add_argument(
            "--collective_timeout",
            type=float | None,
            default=DEFAULT_TIMEOUT_S,
            help="Seconds a process waits in one collective (an all-reduce, a barrier) for the others before the "
            "run stops with an error naming it; null keeps the strategy's own timeout (PyTorch's 30 minutes).",
        )
        parser.add_argument(
            "--float32_matmul_precision",
            type=Literal["highest", "high", "medium"] | None,
            default=None,
            help="torch.set_float32_matmul_precision: 'high' lets float32 matrix products use TF32 tensor cores on "
            "GPUs that have them (faster, about 3 fewer decimal digits); unset keeps PyTorch's 'highest'.",
        )
        parser.add_argument(
            "--keep_freed_memory",
            type=bool,
            default=True,
            help="On Linux: let glibc keep the memory each training step frees for the next one, instead of returning "
            "it to the OS and faulting it in again (CPU training 7-15 %% faster here, the same peak memory). false "
            "keeps glibc's defaults.",
        )
        for key in ("num_classes", "class_names", "preprocess"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": MONITOR, "checkpoint.mode": "max"})
        parser.set_defaults({"checkpoint.filename": "best", "checkpoint.save_last": True})
        parser.add_lightning_class_args(ParameterInspector, "inspection")  # --inspection.histograms=true etc.
        parser.add_lightning_class_args(NonFiniteLoss, "nonfinite_loss")  # --nonfinite_loss.action=skip
        parser.add_class_arguments(PlanOptions, "plan")  # --plan: the memory each strategy needs, no training

    def before_instantiate_classes(self) -> None:
        # Preprocessing the config leaves unset comes from the pretrained weights (torchvision's weights.transforms(),
        # timm's pretrained config); written into the config, it is also what config.yaml records.
        model, data = self.config.model, self.config.data
        for key, value in weights_preprocess(model.backbone, model.pretrained).items():
            if data[key] is None:
                data[key] = value

    plan: Plan | None = None

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # A bare --plan turns planning on; its settings are --plan.device_memory and --plan.headroom.
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list) and "--plan" in argv:
            self.config = parser.parse_args(["--plan.enabled=true" if arg == "--plan" else arg for arg in argv])
        else:
            super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer | None:
        # The plan needs the model's and data's settings (linked at instantiation) but no Trainer, which would
        # start processes and refuse GPU-only strategies on this machine.
        options, trainer = self.config_init.plan, self.config.trainer
        if options.enabled or trainer.strategy == AUTO_FIT:
            self.plan = plan_run(self.model, self.datamodule, trainer, options)
            if options.enabled:
                return None
            trainer.strategy = kwargs["strategy"] = auto_fit(self.plan)  # config.yaml records the choice
        instance = super().instantiate_trainer(**kwargs)
        apply_timeout(instance.strategy, self.config.collective_timeout)
        return instance


def main(args: list[str] | None = None, model_class: type[ImageClassifier] = ImageClassifier) -> TrainCLI:
    """Parse the command line (or ``args``), train, then test the best checkpoint."""
    register_strategies()  # --trainer.strategy=fsdp / fsdp2 shard block by block
    debug = "--debug" in (sys.argv[1:] if args is None else args)  # known before parsing, whose errors it shows
    try:
        cli = TrainCLI(
            model_class,
            ImageFolderDataModule,
            run=False,
            auto_configure_optimizers=False,  # the model owns its optimizer; see ImageClassifier.configure_optimizers
            seed_everything_default=42,
            save_config_callback=SaveConfigAndHparams,  # config.yaml, and the config and hparams in TensorBoard
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [CrashSafeCheckpoints(), Preemption()]},  # atomic writes; SIGTERM
            parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.exists() else []},
            args=args,
        )
    except (UserError, MisconfigurationException, ValueError) as error:  # Lightning rejects a configuration
        _exit(error, debug)
    if cli.plan is not None and cli.trainer is None:  # --plan
        print(format_plan(cli.plan))
        return cli
    trainer = cli.trainer
    if cli.config.float32_matmul_precision is not None:
        torch.set_float32_matmul_precision(cli.config.float32_matmul_precision)
    # What is built by now (imported modules, the config, the model: about half a million objects) lives for the
    # whole run. Freezing it keeps Python's full garbage collections from scanning it all again during training,
    # a 0.4 s pause every few epochs here that hand-written loops, with smaller heaps, do not pay.
    gc.freeze()
    try:
        with keep_freed_memory(cli.config.keep_freed_memory):  # see imgcls.allocator
            ckpt_path = resolve_ckpt_path(cli.config.ckpt_path, trainer)
            if ckpt_path is not None:
                check_resumable(ckpt_path, cli.model.hparams)
            trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
            best = trainer.checkpoint_callback.best_model_path
            trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, weights_only=True)
    except (UserError, MisconfigurationException) as error:  # Lightning refuses some settings only when fitting
        _exit(error, debug)
    except SIGTERMException:  # a scheduler preempts the job; Preemption has saved last.ckpt
        if debug:
            raise
        print(f"stopped by SIGTERM at step {trainer.global_step}; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except RuntimeError as error:
        if not is_collective_failure(error):  # a bug: its traceback says where
            raise
        _exit(error, debug, describe_failure(error, cli.config.collective_timeout))  # another process died or hangs
    else:
        log_dir = Path(trainer.log_dir or ".")  # a collective call under DDP: every rank asks
        if trainer.is_global_zero:
            print(f"checkpoints: {trainer.checkpoint_callback.dirpath}  (best: {best})")
            print(f"config:      {log_dir / 'config.yaml'}")
            print(f"tensorboard: tensorboard --logdir {log_dir}")
        close(trainer.strategy)  # Lightning leaves the process groups open
    finally:
        gc.unfreeze()  # so that callers in this process (tests, notebooks) get these objects collected again
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # a run that failed
            torch.distributed.destroy_process_group()
    return cli


def _exit(error: BaseException, debug: bool, message: str | None = None) -> NoReturn:
    """Exit with ``message`` (else ``error``'s) as one line, ``error: ...``; with ``--debug``, raise ``error``."""
    if debug:
        raise error
    sys.exit(f"error: {' '.join((message or str(error)).split())}")
