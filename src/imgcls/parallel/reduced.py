"""Logging values that every process has already reduced, so that reading them back never communicates.

Lightning reduces a value logged with ``sync_dist=True`` lazily, when something first reads it
(``trainer.callback_metrics``, ``trainer.progress_bar_metrics``). A callback that runs on rank 0 alone, as progress
bars do, then makes that collective on rank 0 alone, while the other ranks are already in the next one: a deadlock
(Lightning #21264). So epoch values here are reduced explicitly, in hooks every process runs, and logged with
``sync_dist=False``: any callback on any rank may read them.
"""

import re
import warnings
from collections.abc import Mapping

import lightning as L
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import Tensor

_quiet: set[str] = set()


def log_reduced(module: L.LightningModule, values: Mapping[str, Tensor], prog_bar: bool = False) -> None:
    """Log ``values``, equal on every process already, once for the epoch (``LightningModule.log_dict``)."""
    for name in values.keys() - _quiet:
        # Lightning advises sync_dist=True for every unsynced epoch value it sees; these are reduced already.
        advice = rf"It is recommended to use `self\.log\({re.escape(repr(name))}"
        warnings.filterwarnings("ignore", advice, PossibleUserWarning)
        _quiet.add(name)
    module.log_dict(dict(values), sync_dist=False, prog_bar=prog_bar)
