"""Sharded training strategies that wrap each backbone block: FSDP (FSDP1, GPUs) and FSDP2 (GPUs and CPUs).

``register_strategies()`` (train.py calls it) makes ``--trainer.strategy=fsdp`` shard block by block instead of
treating the whole network as one unit (Lightning's default, which gathers every parameter at once).
"""

import dataclasses
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _activation_checkpointing_kwargs
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecision, OffloadPolicy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from imgcls.blocks import block_classes
from imgcls.resume import save_folder_atomically


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
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, blocks)

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


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2: ``fully_shard`` on each backbone block, then on the network, over all processes.

    Built on Lightning's ``ModelParallelStrategy`` (data parallel over every process, no tensor parallelism).
    Parameters become DTensors sharded across ranks. Runs on GPUs and on CPUs (gloo).

    Args:
        checkpoint_blocks: Recompute each block's activations in the backward pass instead of storing them.
        cpu_offload: Keep sharded parameters, gradients and optimizer states in CPU memory (GPU only).
        reshard_after_forward: Free gathered parameters after each block's forward (ZeRO-3). ``False`` keeps
            them until the backward (ZeRO-2): less communication, more memory.
        **kwargs: Everything ``ModelParallelStrategy`` takes, e.g. ``save_distributed_checkpoint=False`` for a
            single-file checkpoint instead of a directory of shards.
    """

    def __init__(
        self,
        checkpoint_blocks: bool = False,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.checkpoint_blocks = checkpoint_blocks
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        if self._tensor_parallel_size == "auto":  # FSDP2 alone: no tensor parallelism
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        save = super().save_checkpoint
        if not self._save_distributed_checkpoint:
            return save(checkpoint, filepath, storage_options)
        save_folder_atomically(self, filepath, lambda folder: save(checkpoint, folder))

    def setup(self, trainer: Any) -> None:
        offload = self.cpu_offload and self.root_device.type != "cpu"
        if self.cpu_offload and not offload:
            rank_zero_warn(
                "cpu_offload: the model is on the CPU already, so there is nothing to offload; training without"
            )
        shard_blocks(
            self.lightning_module,
            self.device_mesh["data_parallel"],
            checkpoint_blocks=self.checkpoint_blocks,
            offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
            reshard_after_forward=self.reshard_after_forward,
        )
        super().setup(trainer)


def shard_blocks(module: nn.Module, mesh: Any, checkpoint_blocks: bool = False, **fsdp_kwargs: Any) -> None:
    """Apply ``fully_shard`` to each block of ``module``'s networks, then to each network; skip what is sharded."""
    if checkpoint_blocks:
        recompute_blocks(module)
    blocks = block_classes(module)
    for block in [m for m in module.modules() if type(m) in blocks and not isinstance(m, FSDPModule)]:
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    for child in module.children():  # the networks (metrics hold no parameters)
        if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh, **fsdp_kwargs)


def recompute_blocks(module: nn.Module) -> int:
    """Activation checkpointing: each block keeps only its input and recomputes the rest in the backward pass.

    Returns the number of blocks it applied to; blocks that already recompute are left alone.
    """
    from torch.distributed._composable import checkpoint

    blocks = block_classes(module)
    todo = [m for m in module.modules() if type(m) in blocks and checkpoint.state(m) is None]
    for block in todo:
        checkpoint(block)
    return len(todo)


def register_strategies() -> None:
    """Make ``--trainer.strategy`` names resolve to the block-wise strategies."""
    StrategyRegistry.register("fsdp", FSDP1Strategy, "FSDP, one unit per backbone block", override=True)
    StrategyRegistry.register(
        "fsdp_cpu_offload", FSDP1Strategy, "FSDP per block, with CPU offload", override=True, cpu_offload=True
    )
    StrategyRegistry.register("fsdp2", FSDP2Strategy, "FSDP2 (fully_shard), one unit per backbone block", override=True)
    # The names --plan recommends and --trainer.strategy=auto_fit picks (imgcls.plan)
    variants = {
        "checkpointing": {"checkpoint_blocks": True},
        "cpu_offload": {"cpu_offload": True},
        "cpu_offload_checkpointing": {"cpu_offload": True, "checkpoint_blocks": True},
    }
    for name, options in variants.items():
        description = f"FSDP2 per block, {name.replace('_', ' ')}"
        StrategyRegistry.register(f"fsdp2_{name}", FSDP2Strategy, description, override=True, **options)
