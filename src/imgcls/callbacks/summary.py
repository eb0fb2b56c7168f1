"""The model summary at the start of fitting: layers, trainable and frozen parameters, size at the chosen precision."""

import warnings

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as LayerSummary
from torch import nn

from imgcls.callbacks.tensorboard import tensorboard


def parameter_table(module: nn.Module) -> str:
    """A Markdown table of the trainable and frozen parameters and their size in the dtypes they are stored in."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()}))
    return (
        "| parameters | count |\n|---|---:|\n"
        f"| trainable | {trainable:,} |\n| frozen | {frozen:,} |\n| total | {trainable + frozen:,} |\n"
        f"| size ({dtypes}) | {parameter_bytes(module) / 1e6:,.1f} MB |"
    )


def parameter_bytes(module: nn.Module) -> int:
    """Bytes the parameters take in the dtypes they have (full tensors, also when sharded)."""
    return sum(p.numel() * p.dtype.itemsize for p in module.parameters())


class ParameterSummary(RichModelSummary):
    """Lightning's layer table at the start of fitting, with trainable and frozen (non-trainable) parameters.

    The size counts each parameter in the dtype it has after the precision plugin converted the model: 4 bytes in
    ``32-true`` and the ``*-mixed`` precisions (the weights stay float32), 2 in ``bf16-true``. The same numbers go to
    TensorBoard's Text tab as ``model/summary``.

    Args:
        max_depth: Depth of the layer table; 0 prints no table.
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> LayerSummary:
        with warnings.catch_warnings():
            # Lightning sizes parameters from the precision's name and warns for mixed ones; ours reads the dtypes.
            warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
            return _DtypeSizedSummary(pl_module, max_depth=self._max_depth)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_text("model/summary", parameter_table(pl_module))


class _DtypeSizedSummary(LayerSummary):
    @property
    def model_size(self) -> float:
        return parameter_bytes(self._model) / 1e6  # MB, as Lightning reports it
