"""The private parts of Lightning this project relies on, in one place: the first to check after an upgrade."""

import logging
import warnings
from collections.abc import Callable, Iterable
from datetime import timedelta
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.connector import _convert_precision_to_unified_args
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

# Lines Lightning prints on every run that ask nothing of the user: advertisements, and notes on its own choices.
NOISE = (
    "💡 Tip:",  # install litlogger / litmodels
    "Trainer already configured with model summary callbacks",  # imgcls.callbacks.summary.ParameterSummary is one
    "Loading `train_dataloader` to estimate number of stepping batches.",
)


def quiet_known_warnings() -> None:
    """Silence the warnings and notes Lightning's own code gives on every run that need nothing of the user."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # with this torch
    # 16-mixed under FSDP2: the loss scaler's overflow flag is a 1-element tensor, replicated as it should be
    warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1 and ndim!=0")
    # Steps count across epochs, so an epoch shorter than log_every_n_steps still logs every n steps.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_drop_noise)


def _drop_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(NOISE)


def continue_version(logger: TensorBoardLogger, version: str) -> None:
    """Make ``logger`` write into its existing run folder ``version`` (it picks a new one on first use otherwise)."""
    logger._version = version


def unified_precision(precision: Any) -> str | None:
    """Lightning's precision flag in its current spelling (``16`` -> ``16-mixed``, ``bf16`` -> ``bf16-mixed``)."""
    return _convert_precision_to_unified_args(precision)


def finds_unused_parameters(strategy: Strategy) -> bool:
    """Whether a DDP strategy looks for parameters without gradients (``ddp_find_unused_parameters_true``)."""
    return bool(getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"))


def device_mesh(strategy: Strategy) -> DeviceMesh | None:
    """The device mesh of a ``ModelParallelStrategy`` once it has built one (its property raises before); else None."""
    return getattr(strategy, "_device_mesh", None)


def set_device_mesh(strategy: Strategy, mesh: DeviceMesh) -> None:
    """Make ``mesh`` the device mesh of a ``ModelParallelStrategy`` and of its LightningModule, in place of the one
    ``setup_environment`` made."""
    strategy._device_mesh = strategy.lightning_module._device_mesh = mesh


def set_collective_timeout(strategy: Strategy, timeout: timedelta) -> bool:
    """Give the process group ``strategy`` will create this timeout; ``False`` if it creates none.

    ``DDPStrategy``, ``FSDPStrategy`` and ``ModelParallelStrategy`` take ``timeout`` in their constructors and keep
    it in ``_timeout`` until ``setup_environment`` creates the process group.
    """
    if not hasattr(strategy, "_timeout"):
        return False
    strategy._timeout = timeout
    return True


def collective_timeout(strategy: Strategy) -> timedelta | None:
    """The timeout ``strategy`` gives its process group (see ``set_collective_timeout``)."""
    return getattr(strategy, "_timeout", None)


def replace_sigterm_handler(trainer: L.Trainer, handler: Callable[[int, FrameType | None], None]) -> None:
    """Make the Trainer install ``handler`` for SIGTERM, in place of its own, whenever it installs its handlers.

    The Trainer installs ``_SignalConnector._sigterm_notifier_fn`` at the start of every fit and test.
    """
    trainer._signal_connector._sigterm_notifier_fn = handler


def stop_as_on_sigterm(trainer: L.Trainer) -> None:
    """Make the Trainer stop as it does after its own SIGTERM handler: ``SIGTERMException`` once this batch ends."""
    trainer._signal_connector.received_sigterm = True


def replace_norm_clipping(plugin: Precision, clip: Callable[[Iterable[Tensor], float], Any]) -> None:
    """Make ``plugin`` clip gradients by norm with ``clip(parameters, max_norm)`` instead of
    ``torch.nn.utils.clip_grad_norm_``: ``Precision.clip_gradients`` calls its ``clip_grad_by_norm``, which this
    replaces (after unscaling, under ``16-mixed``)."""

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
        clip(plugin.main_params(optimizer), clip_val)

    plugin.clip_grad_by_norm = clip_grad_by_norm


def threads_per_process(processes: int) -> None:
    """Give this process a share of the CPUs for its intra-op threads (unless ``OMP_NUM_THREADS`` sets them), as
    Lightning's launcher does in every DDP process; under ``ModelParallelStrategy`` it does so in the first process
    only (the others have no launcher), so the others ran as many threads as there are CPUs."""
    _set_num_threads_if_needed(num_processes=processes)


def release_fsdp1_names(names: Iterable[str]) -> None:
    """Stop Lightning treating ``names`` as its FSDP1 strategy: it refuses those names without a GPU, even once
    they are registered to another strategy (``_check_strategy_and_fallback``)."""
    FSDPStrategy._registered_strategies[:] = [n for n in FSDPStrategy._registered_strategies if n not in names]
