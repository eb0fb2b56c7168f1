"""The repeated units of a network (ResNet blocks, ViT encoder blocks, ...): what FSDP shards, checkpoints and
compiles."""

from typing import Any

import torch
from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Return the classes of the outermost composite modules that repeat inside a ``Sequential`` or ``ModuleList``.

    This finds torchvision's ``BasicBlock``/``Bottleneck`` (ResNet), ``EncoderBlock`` (ViT), ``CNBlock``
    (ConvNeXt), ``SwinTransformerBlock``, ``MBConv`` (EfficientNet) and timm's blocks, without a list per model:
    a block is a layer a stage stacks several times. Classes nested inside another block (the ``Linear`` layers
    of a ViT MLP) are left out, so each block becomes one FSDP unit.
    """
    candidates: set[type[nn.Module]] = set()
    for container in model.modules():
        if isinstance(container, CONTAINERS):
            # Composite children only: a stack of plain Linear or Conv2d layers is not a block.
            kinds = [type(m) for m in container.children() if _is_composite(m)]
            candidates |= {kind for kind in kinds if kinds.count(kind) > 1}
    nested = {
        type(inner)
        for outer in model.modules()
        if type(outer) in candidates
        for inner in outer.modules()
        if inner is not outer and type(inner) in candidates
    }
    return candidates - nested


def _is_composite(module: nn.Module) -> bool:
    return not isinstance(module, CONTAINERS) and any(True for _ in module.children())


def compile_blocks(model: nn.Module, **options: Any) -> list[nn.Module]:
    """``torch.compile`` the forward of each block, leaving the hooks around it (FSDP's, checkpointing's) eager.

    Blocks of one class share one compiled graph. The modules stay as they are, so their weights keep their names
    (``torch.compile(module)`` would add ``_orig_mod.`` to each). Returns the blocks, for ``uncompile_blocks``.
    """
    blocks = block_classes(model)
    compiled = [m for m in model.modules() if type(m) in blocks]
    for block in compiled:
        block.forward = torch.compile(block.forward, **options)
    return compiled


def uncompile_blocks(blocks: list[nn.Module]) -> None:
    """Undo ``compile_blocks``: each block runs its class's forward again."""
    for block in blocks:
        del block.forward
