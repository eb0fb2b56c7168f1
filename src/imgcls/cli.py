"""The training command line: LightningCLI without subcommands; fit, then test the best checkpoint.

``main`` reads top-down: build the CLI from the config files and flags, then either print a memory plan or train
and test, in a process tuned for training; user mistakes end as one line (``imgcls.errors.exit_with``).
"""

import argparse
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from imgcls import runtime
from imgcls.backbones.factory import create_backbone
from imgcls.backbones.input_size import settle_input_size
from imgcls.backbones.meta import build_on_meta
from imgcls.backbones.weights import resolve_weights
from imgcls.callbacks.checkpointing import BestAndLast
from imgcls.callbacks.crash_safe import CrashSafeCheckpoints, check_output_folders
from imgcls.callbacks.inspection import ParameterInspector
from imgcls.callbacks.nonfinite import NonFiniteLoss
from imgcls.callbacks.preemption import EXIT_SIGTERM, Preemption
from imgcls.callbacks.tensorboard import SaveConfigAndHparams
from imgcls.checkpoints import BEST, LOGS
from imgcls.compat.lightning import quiet_known_warnings
from imgcls.data.datamodule import DEFAULT_CROP_SIZE, ImageFolderDataModule
from imgcls.data.digits import demo_defaults
from imgcls.errors import UsageError, UserError, exit_with
from imgcls.model import MONITOR, ImageClassifier
from imgcls.parallel.collectives import DEFAULT_TIMEOUT_S, apply_timeout, close, describe_failure, is_collective_failure
from imgcls.parallel.fsdp2 import fp16_trainer_args
from imgcls.parallel.registry import refuse_untested_strategy, register_strategies
from imgcls.parallel.tensor_parallel import TensorParallelStrategy, check_before_launch
from imgcls.parse_errors import one_line
from imgcls.precision import warn_if_bf16_is_emulated
from imgcls.resume import check_resumable, resolve_ckpt_path

try:  # the memory planner is optional: delete src/imgcls/planner/ and --plan goes with it
    from imgcls.planner.options import AUTO_FIT, PlanOptions
except ImportError:
    AUTO_FIT, PlanOptions = None, None


def main(
    args: list[str] | None = None, model_class: type[ImageClassifier] = ImageClassifier, config: Path | None = None
) -> "TrainCLI":
    """Parse the command line (or ``args``) over the ``config`` file, train, then test the best checkpoint.

    Args:
        args: The flags; ``None`` reads ``sys.argv``.
        model_class: The LightningModule to train, ``ImageClassifier`` or a subclass.
        config: The defaults every other config file and flag applies over (train.py passes configs/default.yaml).
    """
    debug = "--debug" in (sys.argv[1:] if args is None else args)  # known before parsing, whose errors it shows
    cli = None
    try:
        cli = build_cli(args, model_class, config)
        if cli.plan is not None and cli.trainer is None:  # --plan
            from imgcls.planner.cli import format_plan

            print(format_plan(cli.plan))
            return cli
        with runtime.tuned_for_training(cli.config.keep_freed_memory):
            fit_and_test(cli)
    except (UserError, MisconfigurationException) as error:  # Lightning refuses some settings only when fitting
        exit_with(error, debug)
    except SIGTERMException:  # a scheduler preempts the job; Preemption has saved last.ckpt
        if debug:
            raise
        print(f"stopped by SIGTERM at step {cli.trainer.global_step}; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except RuntimeError as error:
        if not is_collective_failure(error):  # a bug: its traceback says where
            raise
        timeout = cli.config.collective_timeout if cli is not None else None
        exit_with(error, debug, describe_failure(error, timeout))  # another process died or hangs
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # a run that failed
            torch.distributed.destroy_process_group()
    return cli


def build_cli(args: list[str] | None, model_class: type[ImageClassifier], config: Path | None) -> "TrainCLI":
    """Parse and instantiate the model, the data and the Trainer; ``cli.plan`` holds the plan if one was asked for."""
    if config is not None and not config.is_file():
        raise UserError(f"{config}: no such file; train.py reads its defaults from it (git checkout -- {config})")
    quiet_known_warnings()
    register_strategies()  # --trainer.strategy=fsdp and its variants: FSDP2, block by block
    return TrainCLI(
        model_class,
        ImageFolderDataModule,
        run=False,
        auto_configure_optimizers=False,  # the model owns its optimizer; see ImageClassifier.configure_optimizers
        seed_everything_default=42,
        save_config_callback=SaveConfigAndHparams,  # config.yaml, and the config and hparams in TensorBoard
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [CrashSafeCheckpoints(), Preemption()],  # atomic writes; SIGTERM
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": LOGS, "name": "", "default_hp_metric": False},  # hp_metric: at the end
            },
        },
        parser_kwargs={
            "default_config_files": [str(config)] if config is not None else [],
            "description": "Train an image classifier, then test its best checkpoint. README.md: the main flags.",
        },
        args=args,
    )


def fit_and_test(cli: "TrainCLI") -> None:
    """Train (resuming if asked), test the best checkpoint, say where everything is, close the process groups."""
    trainer = cli.trainer
    if cli.config.float32_matmul_precision is not None:
        torch.set_float32_matmul_precision(cli.config.float32_matmul_precision)
    ckpt_path = resolve_ckpt_path(cli.config.ckpt_path, trainer)
    if ckpt_path is not None:
        saved = check_resumable(ckpt_path, cli.model.hparams, trainer.strategy)
        # Where the data left off. Lightning restores it too, but sharded strategies build the training loader
        # before they restore (Lightning #20550): given now, it is there in time for every strategy.
        cli.datamodule.load_state_dict(saved.get(type(cli.datamodule).__qualname__, {}))
    check_output_folders(trainer)
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path
    trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, weights_only=True)
    log_dir = Path(trainer.log_dir or ".")  # a collective call under DDP: every rank asks
    if trainer.is_global_zero:
        print(f"checkpoints: {trainer.checkpoint_callback.dirpath}  (best: {best})")
        print(f"config:      {log_dir / 'config.yaml'}")
        print(f"tensorboard: tensorboard --logdir {log_dir}")
    close(trainer.strategy)  # Lightning leaves the process groups open


# What --help shows of Lightning's long flag lists (the Trainer's ~50, ModelCheckpoint's ~15); --help_all shows all.
SHORT_HELP = {
    "trainer": {"accelerator", "strategy", "devices", "num_nodes", "precision", "max_epochs", "max_steps",
                "accumulate_grad_batches", "gradient_clip_val", "deterministic"},
    "checkpoint": {"monitor", "mode", "every_n_train_steps", "dirpath"},
}  # fmt: skip


# Trainer flags Lightning divides by without checking them first: 0 would end the run with a ZeroDivisionError.
DIVISORS = ("accumulate_grad_batches", "check_val_every_n_epoch", "val_check_interval")


class TrainCLI(LightningCLI):
    """LightningCLI with this project's flags, links and checkpoint defaults, and ``--plan``."""

    plan: Any = None  # imgcls.planner.plan.Plan, once --plan or auto_fit made one

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Parse errors raise instead of printing the usage and a dozen lines per error: parse_arguments makes them one.
        return super().init_parser(**{**kwargs, "exit_on_error": False})

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
            "it to the OS and faulting it in again (faster CPU training, the same peak memory). false keeps glibc's "
            "defaults.",
        )
        # The data's values, made with jsonargparse's types (PositiveInt, ...): the model keeps them in every
        # checkpoint, which torch.load(weights_only=True) reads, so they go over as plain ints and floats.
        for key in ("num_classes", "class_names", "preprocess"):
            parser.link_arguments(f"data.{key}", f"model.{key}", compute_fn=plain, apply_on="instantiate")
        parser.add_lightning_class_args(BestAndLast, "checkpoint")  # --checkpoint.*: best.ckpt and last.ckpt
        parser.set_defaults({"checkpoint.monitor": MONITOR, "checkpoint.mode": "max"})
        parser.set_defaults({"checkpoint.filename": BEST, "checkpoint.save_last": True})
        parser.add_lightning_class_args(ParameterInspector, "inspection")  # --inspection.histograms=true etc.
        parser.add_lightning_class_args(NonFiniteLoss, "nonfinite_loss")  # --nonfinite_loss.action=skip
        if PlanOptions is not None:
            parser.add_class_arguments(PlanOptions, "plan")  # --plan: the memory each strategy needs, no training

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list) and "--help_all" in argv:
            argv = ["--help" if arg == "--help_all" else arg for arg in argv]
        elif isinstance(argv, list) and {"-h", "--help"} & set(argv):
            parser.usage = "train.py [--config FILE] [--print_config] [--GROUP.FLAG VALUE ...]"
            parser.epilog = "Lightning's Trainer and ModelCheckpoint take more flags: --help_all lists every one."
            for action in parser._actions:
                group, _, name = action.dest.partition(".")
                if group in SHORT_HELP and name not in SHORT_HELP[group]:
                    action.help = argparse.SUPPRESS
        # A bare --plan turns planning on; its settings are --plan.device_memory and --plan.headroom.
        if PlanOptions is not None and isinstance(argv, list) and "--plan" in argv:
            argv = ["--plan.enabled=true" if arg == "--plan" else arg for arg in argv]
        try:
            self.config = parser.parse_args(argv)
        except ArgumentError as error:  # see init_parser
            raise UsageError(one_line(str(error), parser, argv)) from error

    def before_instantiate_classes(self) -> None:
        # Written into the config, these are also what config.yaml records, and the checkpoint's hyperparameters.
        model, data = self.config.model, self.config.data
        weights = resolve_weights(model.backbone, model.pretrained)
        # What the config leaves unset comes from the weights, then, for the embedded digits, from their settings.
        for key, value in {**demo_defaults(data.root, data.dataset), **weights.preprocess()}.items():
            if data[key] is None:
                data[key] = value
        crop = data.crop_size or DEFAULT_CROP_SIZE  # a network that fixes its input size is built for it, or not
        size = settle_input_size(model.backbone, crop, weights, model.backbone_kwargs or {})
        model.backbone_kwargs = plain({**(model.backbone_kwargs or {}), **size.arch_kwargs}) or None  # see plain
        if size.crop_size != crop:
            data.crop_size, data.resize_size = size.crop_size, round((data.resize_size or crop) * size.crop_size / crop)
        if size.message:
            rank_zero_info(size.message)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        check_optimizer(self.model, self.config.model)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer | None:
        # The plan needs the model's and data's settings (linked at instantiation) but no Trainer, which would
        # start processes and refuse GPU-only strategies on a machine without the GPUs it plans for.
        options, trainer = self.config_init.get("plan"), self.config.trainer
        if options is not None and (options.enabled or trainer.strategy == AUTO_FIT):
            from imgcls.planner.cli import auto_fit, plan_run  # the planner's heavy imports, only when asked for

            self.plan = plan_run(self.model, self.datamodule, trainer, options)
            if options.enabled:
                return None
            trainer.strategy = kwargs["strategy"] = auto_fit(self.plan)  # config.yaml records the choice
        kwargs.update(fp16_trainer_args({**self.config_init.trainer, **kwargs}))
        strategy = kwargs.get("strategy", self.config_init.trainer.get("strategy"))
        refuse_untested_strategy(strategy)
        for flag in DIVISORS:
            if (value := self.config_init.trainer.get(flag)) is not None and value <= 0:
                raise UserError(f"--trainer.{flag} {value}: Lightning divides by it; give a value above 0")
        try:
            instance = super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError) as error:  # the Trainer refuses its settings (a GPU-only strategy on a CPU, ...)
            raise UserError(f"--trainer: {error}") from error
        if isinstance(instance.strategy, TensorParallelStrategy):  # what it cannot split, said before processes start
            hp = self.model.hparams
            net = build_on_meta(lambda: create_backbone(hp.backbone, hp.num_classes, **self.model.backbone_kwargs))
            check_before_launch(instance.strategy, net, hp.backbone, strategy if isinstance(strategy, str) else "")
        apply_timeout(instance.strategy, self.config.collective_timeout)
        warn_if_bf16_is_emulated(instance)
        return instance


def plain(value: Any) -> Any:
    """``value`` with every int and float in it (an instance of a subclass: jsonargparse's PositiveInt) a plain one."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, list | tuple):
        return type(value)(plain(item) for item in value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def check_optimizer(model: ImageClassifier, config: Namespace) -> None:
    """Build ``model``'s optimizer and scheduler for a stand-in parameter: arguments torch refuses (a negative
    learning rate) stop the run now, naming the flag, instead of in ``configure_optimizers`` with a traceback."""
    flag = "optimizer"
    try:
        optimizer = model.optimizer([torch.nn.Parameter(torch.zeros(1))])
        flag = "lr_scheduler"
        if model.lr_scheduler is not None:
            model.lr_scheduler(optimizer)
    except (TypeError, ValueError, KeyError) as error:  # what torch's constructors raise for arguments they refuse
        name = getattr(config[flag], "class_path", config[flag])
        raise UserError(
            f"--model.{flag} {name}: {error} (torch refuses it; set its arguments with --model.{flag}.NAME VALUE)"
        ) from error
