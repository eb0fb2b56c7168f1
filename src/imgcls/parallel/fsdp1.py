"""FSDP1 (Lightning's ``FSDPStrategy``, GPUs only) with every backbone block as its own FSDP unit."""

import dataclasses
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import MixedPrecision
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from imgcls.compat.lightning import activation_checkpointing_kwargs
from imgcls.parallel.blocks import block_classes
from imgcls.parallel.sharded_checkpoints import save_folder_atomically


class FSDP1Strategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with every backbone block as its own FSDP unit.

    Args:
        checkpoint_blocks: Recompute each block's activations in the backward pass instead of storing them:
            far less activation memory for about a third more compute.
        **kwargs: Everything ``lightning.pytorch.strategies.FSDPStrategy`` takes: ``cpu_offload``,
            ``sharding_strategy`` (``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD``), ``state_dict_type``
            (``full`` or ``sharded``), or an ``auto_wrap_policy`` of your own, which replaces the block policy.
    """

    def __init__(self, checkpoint_blocks: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint_blocks = checkpoint_blocks

    def _setup_model(self, model: nn.Module) -> nn.Module:
        self.wrap_blocks_of(model)
        return super()._setup_model(model)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        save = super().save_checkpoint
        if self._state_dict_type != "sharded":
            return save(checkpoint, filepath, storage_options)
        save_folder_atomically(self, filepath, lambda folder: save(checkpoint, folder))

    def wrap_blocks_of(self, model: nn.Module) -> None:
        """Point the wrapping (and checkpointing) policy at ``model``'s blocks, unless the user gave a policy."""
        blocks = block_classes(model)
        if blocks and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
        if blocks and self.checkpoint_blocks and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = activation_checkpointing_kwargs(blocks)

    @property
    def mixed_precision_config(self) -> MixedPrecision | None:
        config = super().mixed_precision_config
        if config is None or self.mixed_precision is not None:  # the user's own MixedPrecision is kept as given
            return config
        # Lightning reduces gradients in fp16/bf16 under 16-mixed/bf16-mixed; summing many ranks' gradients
        # in 16 bits loses the small updates, so reduce in fp32 (the cost is twice the reduce traffic).
        changes: dict[str, Any] = {"reduce_dtype": torch.float32}
        if config.param_dtype == torch.float32:
            # FSDP keeps BatchNorm out of low-precision units by wrapping each one separately (dozens of tiny
            # all-gathers); with fp32 parameters there is nothing to keep out, so BatchNorm stays in its block.
            changes["_module_classes_to_ignore"] = ()
        return dataclasses.replace(config, **changes)
