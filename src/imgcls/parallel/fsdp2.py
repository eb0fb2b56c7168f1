"""FSDP2 (``fully_shard``, GPUs and CPUs) applied block by block, and activation checkpointing on the same blocks."""

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from imgcls.compat.lightning import collective_timeout, threads_per_process, unified_precision
from imgcls.compat.torch import checkpoint
from imgcls.errors import UserError
from imgcls.parallel.blocks import block_classes
from imgcls.parallel.deferred_init import materialize
from imgcls.parallel.sharded_checkpoints import save_folder_atomically

# --trainer.precision values whose parameters FSDP gathers in 16 bits (weights and optimizer stay in fp32)
GATHER_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2: ``fully_shard`` on each backbone block, then on the network, over all processes.

    Built on Lightning's ``ModelParallelStrategy`` (data parallel over every process, no tensor parallelism).
    Parameters become DTensors sharded across ranks. Runs on GPUs and on CPUs (gloo). The network is built on the
    meta device and each process makes only its own shards (``imgcls.parallel.deferred_init``). Under
    ``bf16-mixed`` (``16-mixed``) blocks without BatchNorm are gathered in bf16 (fp16); gradients are always reduced
    in fp32. Under ``16-mixed`` a step is skipped on every process when any process's gradient shards overflowed
    (the loss scaler's check runs on DTensors, so over all shards).

    Args:
        checkpoint_blocks: Recompute each block's activations in the backward pass instead of storing them.
        cpu_offload: Keep sharded parameters, gradients and optimizer states in CPU memory (GPU only).
        reshard_after_forward: Free gathered parameters after each block's forward (ZeRO-3). ``False`` keeps
            them until the backward (ZeRO-2): less communication, more memory.
        shard_group_size: Hybrid sharding: shard within groups of this many processes and replicate across the
            groups, so only gradient all-reduces cross between them. ``node``: one node's processes; ``None``:
            shard over all processes.
        sync_every_micro_batch: With ``--trainer.accumulate_grad_batches``, reduce-scatter the gradients after
            every micro-batch, keeping them sharded. ``False`` (the default) reduces once per optimizer step, but
            each process holds its units' unsharded gradients between the micro-batches (as much as DDP does).
        **kwargs: Everything ``ModelParallelStrategy`` takes, e.g. ``save_distributed_checkpoint=False`` for a
            single-file checkpoint instead of a directory of shards.
    """

    def __init__(
        self,
        checkpoint_blocks: bool = False,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        shard_group_size: int | Literal["node"] | None = None,
        sync_every_micro_batch: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.checkpoint_blocks = checkpoint_blocks
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.shard_group_size = shard_group_size
        self.sync_every_micro_batch = sync_every_micro_batch
        self.shard_mesh: DeviceMesh | None = None

    def setup_environment(self) -> None:
        threads_per_process(self.num_processes)  # on CPUs: processes that round alike, without oversubscribing
        if self._tensor_parallel_size == "auto":  # FSDP2 alone: no tensor parallelism
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        self.shard_mesh = self.device_mesh["data_parallel"]
        size = self.num_processes if self.shard_group_size == "node" else self.shard_group_size
        if size is not None and size != self.world_size:
            if not isinstance(size, int) or size < 1 or self.world_size % size:
                raise UserError(
                    f"--trainer.strategy.shard_group_size {self.shard_group_size}: give a divisor of the "
                    f"{self.world_size} processes, or node"
                )
            self.shard_mesh = grid_mesh(self, size, ("replicate", "shard"))  # the sampler splits over all

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
            self.shard_mesh,
            checkpoint_blocks=self.checkpoint_blocks,
            gather_dtype=GATHER_DTYPES.get(str(getattr(self.precision_plugin, "precision", ""))),
            offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
            reshard_after_forward=self.reshard_after_forward,
        )
        materialize(self.lightning_module, torch.device("cpu") if offload else self.root_device)
        super().setup(trainer)

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Accumulating gradients: no reduce-scatter until the last micro-batch before an optimizer step.

        Lightning's loop enters this around each earlier micro-batch, but its own version acts on DDP only.
        """
        units = self.lightning_module.modules()
        modules = [] if self.sync_every_micro_batch else [m for m in units if isinstance(m, FSDPModule)]
        for module in modules:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module.set_requires_gradient_sync(True, recurse=False)


def grid_mesh(strategy: ModelParallelStrategy, size: int, names: tuple[str, str]) -> DeviceMesh:
    """All processes as a 2-D mesh of rows of ``size`` consecutive ranks (one node's, where ranks are consecutive).

    Its process groups are made here, not by ``init_device_mesh``, so that ``--collective_timeout`` reaches them (its
    groups would wait 30 minutes).
    """
    layout = torch.arange(strategy.world_size).view(-1, size)  # (rows, ranks in a row)
    groups = [
        dist.new_subgroups_by_enumeration(ranks.tolist(), timeout=collective_timeout(strategy))[0]
        for ranks in (layout.T, layout)
    ]
    return DeviceMesh.from_group(groups, strategy.root_device.type, layout, mesh_dim_names=names)


def shard_blocks(
    module: nn.Module,
    mesh: Any,
    checkpoint_blocks: bool = False,
    gather_dtype: torch.dtype | None = None,
    **fsdp_kwargs: Any,
) -> None:
    """Apply ``fully_shard`` to each block of ``module``'s networks, then to each network; skip what is sharded.

    With ``gather_dtype``, units without BatchNorm are gathered and computed in it; BatchNorm's units stay in fp32
    (autocast still runs their convolutions in 16 bits), as 16-bit running statistics drift.
    """
    if checkpoint_blocks:
        recompute_blocks(module)

    def shard(unit: nn.Module) -> None:
        low = gather_dtype is not None and not _holds_batchnorm(unit)
        policy = MixedPrecisionPolicy(param_dtype=gather_dtype if low else None, reduce_dtype=torch.float32)
        fully_shard(unit, mesh=mesh, mp_policy=policy, **fsdp_kwargs)

    blocks = block_classes(module)
    for block in [m for m in module.modules() if type(m) in blocks and not isinstance(m, FSDPModule)]:
        shard(block)
    for child in module.children():  # the networks (metrics hold no parameters)
        if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
            shard(child)


def recompute_blocks(module: nn.Module) -> int:
    """Activation checkpointing: each block keeps only its input and recomputes the rest in the backward pass.

    Returns the number of blocks it applied to; blocks that already recompute are left alone.
    """
    blocks = block_classes(module)
    todo = [m for m in module.modules() if type(m) in blocks and checkpoint.state(m) is None]
    for block in todo:
        checkpoint(block)
    return len(todo)


def _holds_batchnorm(unit: nn.Module) -> bool:
    """Whether ``unit`` itself (not a sub-unit already sharded) has BatchNorm parameters."""
    if isinstance(unit, nn.modules.batchnorm._BatchNorm):
        return True
    return any(_holds_batchnorm(child) for child in unit.children() if not isinstance(child, FSDPModule))


def fp16_trainer_args(trainer: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments that let ``16-mixed`` reach an ``FSDP2Strategy`` given as an instance (a config's
    ``class_path``): Lightning refuses the flag for every ``ModelParallelStrategy`` instance, but not the plugin,
    whose loss scaler checks the DTensor gradients of all shards (tests/test_fsdp.py). ``{}`` for other settings."""
    strategy, precision = trainer.get("strategy"), unified_precision(trainer.get("precision"))
    if not isinstance(strategy, FSDP2Strategy) or precision != "16-mixed":
        return {}
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        rank_zero_warn("--trainer.precision 16-mixed: fp16 autocast needs a GPU; on the CPU, bf16-mixed instead")
        return {"precision": "bf16-mixed"}
    return {"precision": None, "plugins": [*(trainer.get("plugins") or []), MixedPrecision("16-mixed", "cuda")]}
