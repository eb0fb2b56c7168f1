"""Tensor parallelism x FSDP2 (2-D) for vision transformers: each block's attention and MLP split over the
tensor-parallel processes, FSDP2 across the data-parallel ones.

Inside each block (Megatron-LM's layout): q, k, v and the MLP's first Linear are split by columns (output features,
so whole heads), the attention's output projection and the MLP's second Linear by rows (input features), so a
block's forward makes two all-reduces of its activations and its backward two more. LayerNorms, the patch embedding
and the head stay whole on every tensor-parallel process, which all read the same batches; FSDP2 shards every
parameter over the data-parallel processes.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from imgcls.checkpoints import qkv_part, split_names, split_state
from imgcls.compat.lightning import replace_norm_clipping, set_device_mesh
from imgcls.errors import UserError
from imgcls.parallel.blocks import block_classes
from imgcls.parallel.deferred_init import derive
from imgcls.parallel.fsdp2 import FSDP2Strategy, grid_mesh
from imgcls.parallel.parts import local_part
from imgcls.parallel.tp_attention import SPLIT_ATTENTION, split_attention

SUPPORTED = "torchvision's vit_* and timm's ViTs (vit_*, deit_*: blocks of self-attention and a two-layer MLP)"


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a block class keeps what tensor parallelism splits."""

    attention: str  # the attention module's attribute
    inputs: int  # positional arguments the block passes its attention (torchvision: query, key, value)
    mlp: tuple[str, str]  # the MLP's first and second Linear
    out: str  # the attention's output projection


TIMM_BLOCK = Family("attn", 1, ("mlp.fc1", "mlp.fc2"), "proj")
FAMILIES = {  # (module, class name) of a block -> its family
    ("torchvision.models.vision_transformer", "EncoderBlock"): Family(
        "self_attention", 3, ("mlp.0", "mlp.3"), "out_proj"
    ),
    ("timm.models.vision_transformer", "Block"): TIMM_BLOCK,
    ("timm.models.vision_transformer", "ResPostBlock"): TIMM_BLOCK,
}


class TensorParallelStrategy(FSDP2Strategy):
    """Tensor parallelism inside each ViT block over ``tensor_parallel_size`` processes, FSDP2 across the rest.

    The processes form a (data parallel x tensor parallel) grid; each row of ``tensor_parallel_size`` consecutive
    ranks (on one node, where the links are fastest) splits every block and reads the same batches. Checkpoints keep
    the plain network's tensor names but for q, k and v (``imgcls.parallel.tp_attention``); ``predict.py``,
    ``export.py``, ``scripts/consolidate_checkpoint.py`` and ``--model.pretrained`` read them as the plain network.

    Args:
        tensor_parallel_size: Processes that split each block: a divisor of all processes, of the blocks' heads
            and of their MLP's width. 1 splits nothing, and resumes a checkpoint saved at any size on one process.
        **kwargs: What ``FSDP2Strategy`` takes (``checkpoint_blocks``, ``save_distributed_checkpoint``, ...), but
            hybrid sharding (``shard_group_size``).
    """

    def __init__(self, tensor_parallel_size: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tensor_parallel_size = tensor_parallel_size

    def setup_environment(self) -> None:
        if self.shard_group_size is not None:
            raise UserError(
                "--trainer.strategy.shard_group_size: hybrid sharding does not combine with tensor parallelism"
            )
        super().setup_environment()  # the process group, and FSDP2's mesh of all processes
        self.check_processes(self.world_size)
        size = self.tensor_parallel_size
        self._data_parallel_size, self._tensor_parallel_size = self.world_size // size, size
        # Made here, not by Lightning (whose init_device_mesh groups would wait 30 minutes, not --collective_timeout).
        # The data module and Lightning's sampler arguments read its data-parallel half: a split shares its batches.
        mesh = grid_mesh(self, size, ("data_parallel", "tensor_parallel"))
        set_device_mesh(self, mesh)
        self.shard_mesh = mesh["data_parallel"]

    def check_processes(self, processes: int) -> None:
        """Refuse a split size that does not divide ``processes``."""
        size = self.tensor_parallel_size
        if not isinstance(size, int) or size < 1 or processes % size:
            raise UserError(
                f"--trainer.strategy.tensor_parallel_size {size}: give a divisor of the {processes} processes "
                "(--trainer.devices x --trainer.num_nodes)"
            )

    def setup(self, trainer: Any) -> None:
        split_blocks(self.lightning_module, self.device_mesh["tensor_parallel"])
        # The split layers' gradients live on the 2-D mesh, the others on its data-parallel half: torch's clipping
        # cannot take a norm over both
        replace_norm_clipping(self.precision_plugin, clip_grad_norm_)
        super().setup(trainer)  # FSDP2 over the data-parallel processes, then each process makes its shards


def split_blocks(module: nn.Module, mesh: DeviceMesh) -> None:
    """Split every block of ``module``'s networks over ``mesh``, weights carried over; blocks split already stay."""
    for net in [child for child in module.children() if any(True for _ in child.parameters())]:
        check_splittable(net, mesh.size())
        make_splittable(net)
        blocks = block_classes(net)
        for block in [m for m in net.modules() if type(m) in blocks]:
            _parallelize(block, _family(type(block)), mesh)


def make_splittable(net: nn.Module) -> nn.Module:
    """Give each block of ``net`` the attention tensor parallelism can split, with the same weights: the network
    computes what it computed (in place; returns ``net``)."""
    blocks = block_classes(net)
    for name, block in [(n, m) for n, m in net.named_modules() if type(m) in blocks]:
        family = _family(type(block))
        attention = block.get_submodule(family.attention)
        if not isinstance(attention, SPLIT_ATTENTION):
            split = split_attention(attention)
            _carry_weights(net, f"{name}.{family.attention}", attention, split)
            block.register_module(family.attention, split)
    return net


def check_splittable(net: nn.Module, size: int, name: str = "this network", flag: str = "") -> None:
    """Refuse, in one line naming what is supported, a network whose blocks cannot be split ``size`` ways."""
    blocks = block_classes(net)
    unknown = sorted(kind.__qualname__ for kind in blocks if _family(kind) is None)
    refused = f"--trainer.strategy{' ' + flag if flag else ''}: tensor parallelism splits {SUPPORTED}, not {name}"
    if unknown or not blocks:
        found = "its blocks are " + ", ".join(unknown) if unknown else "no repeated blocks"
        raise UserError(f"{refused} ({found})")
    for block in [m for m in net.modules() if type(m) in blocks]:
        family = _family(type(block))
        attention = block.get_submodule(family.attention)
        first, second = (block.get_submodule(layer) for layer in family.mlp)
        try:
            split = attention if isinstance(attention, SPLIT_ATTENTION) else split_attention(attention)
        except ValueError as error:
            raise UserError(f"{refused} (its blocks hold {error})") from error
        mlp = block.get_submodule(family.mlp[0].rpartition(".")[0])
        weighted = [m for m in mlp.children() if m not in (first, second) and any(True for _ in m.parameters())]
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)) or weighted:
            raise UserError(f"{refused} (its MLP is not two Linear layers with an activation between them)")
        if split.num_heads % size or first.out_features % size:
            raise UserError(
                f"--trainer.strategy.tensor_parallel_size {size}: {name}'s blocks have {split.num_heads} heads and "
                f"an MLP {first.out_features} wide; give a size that divides both"
            )


def check_before_launch(strategy: TensorParallelStrategy, net: nn.Module, name: str, flag: str = "") -> None:
    """What the strategy would refuse in every process, said once before any starts: a number of processes its
    split size does not divide, or a network ``net`` (on the meta device: no memory) it cannot split."""
    strategy.check_processes(strategy.num_nodes * strategy.num_processes)
    check_splittable(net, strategy.tensor_parallel_size, name, flag)


def tensor_parallel_size(strategy: Any) -> int | None:
    """The processes that split each block under ``strategy`` (a registered name or an instance); ``None`` for
    strategies that split nothing."""
    if isinstance(strategy, TensorParallelStrategy):
        return strategy.tensor_parallel_size
    entry = StrategyRegistry[strategy] if isinstance(strategy, str) and strategy in StrategyRegistry else None
    if entry is None or entry["strategy"] is not TensorParallelStrategy:
        return None
    return entry["init_params"].get("tensor_parallel_size", 2)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients on several device meshes (torch's stacks their norms, which
    DTensor refuses across meshes): each process's part of the norm, weighted so that copies count once, summed in
    one all-reduce over all processes; then every part scaled in place. Returns the whole gradient's norm."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    parts = [local_part(param.grad, world) for param in parameters if param.grad is not None]
    total = torch.zeros((), device=parts[0][0].device if parts else None)
    for part, weight in parts:
        if math.isinf(norm_type):  # a maximum needs no weights: copies are equal
            total = torch.maximum(total, part.detach().abs().max().float()) if part.numel() else total
        else:
            total += torch.linalg.vector_norm(part.detach(), norm_type, dtype=torch.float32) ** norm_type * weight
    op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
    if world > 1:
        dist.all_reduce(total, op=op)
    total = total if math.isinf(norm_type) else total ** (1 / norm_type)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for part, _ in parts:
        part.mul_(scale.to(part.device, part.dtype))
    return total


def _parallelize(block: nn.Module, family: Family, mesh: DeviceMesh) -> None:
    if isinstance(block.get_submodule(family.mlp[0]).weight, DTensor):
        return  # parallelized already: a second setup (testing after fitting)
    qkv = "in_proj" if hasattr(block.get_submodule(family.attention), "in_proj") else "qkv"
    replicated = (Replicate(), *[None] * (family.inputs - 1))
    plan = {
        # q, k and v take one input: their input gradients are summed, then all-reduced once instead of thrice
        family.attention: PrepareModuleInput(input_layouts=replicated, desired_input_layouts=replicated),
        **{f"{family.attention}.{qkv}.{p}": ColwiseParallel() for p in "qkv"},
        f"{family.attention}.{family.out}": RowwiseParallel(),
        family.mlp[0]: ColwiseParallel(),
        family.mlp[1]: RowwiseParallel(),
    }
    # src_data_rank=None: each process keeps its part of its own tensors (equal everywhere: a seeded build), so
    # nothing is broadcast; on the meta device there is nothing to send anyway
    parallelize_module(block, mesh, plan, src_data_rank=None)


def _carry_weights(net: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (on the meta device) ``old``'s weights in the split layout, trainable as they were: recorded for
    ``materialize`` if ``net`` was built deferred, else copied."""
    sources = {}
    for name, param in old.named_parameters():
        for new_name, index in split_names(name):
            sources[f"{path}.{new_name}"] = (f"{path}.{name}", functools.partial(qkv_part, index=index))
            new.get_parameter(new_name).requires_grad_(param.requires_grad)
    if not derive(net, sources):
        state = {name: tensor.detach().clone() for name, tensor in split_state(old.state_dict()).items()}
        new.load_state_dict(state, assign=True)


def _family(kind: type) -> Family | None:
    """The family of a block class, or of the class FSDP2 derived it from (``FSDPEncoderBlock``)."""
    keys = [(base.__module__, base.__qualname__) for base in kind.__mro__]
    return next((FAMILIES[key] for key in keys if key in FAMILIES), None)
