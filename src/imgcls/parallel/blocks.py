"""The repeated units of a network (ResNet blocks, ViT encoder blocks, ...): what FSDP shards and checkpoints."""

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
