"""FSDP2 (``fully_shard``, GPUs and CPUs) applied block by block, and activation checkpointing on the same blocks."""

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

from imgcls.compat.torch import checkpoint
from imgcls.parallel.blocks import block_classes
from imgcls.parallel.sharded_checkpoints import save_folder_atomically


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
    blocks = block_classes(module)
    todo = [m for m in module.modules() if type(m) in blocks and checkpoint.state(m) is None]
    for block in todo:
        checkpoint(block)
    return len(todo)
