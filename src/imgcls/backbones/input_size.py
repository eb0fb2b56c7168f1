"""The image size a backbone is built for, settled with the data's crop before anything is built for real.

Some networks fix their input size: a ViT's position embeddings (torchvision's ``image_size``, timm's
``img_size``), MaxViT's attention partitions (``input_size``). Others have a smallest size they run at (Inception
v3: 75 pixels). The rule: a network whose builder takes a size is built for the data's crop when it runs at that
size; otherwise the data takes the network's own size, where the network runs; otherwise a one-line error names
both sizes and the flag. Whether a network runs at a size is checked on the meta device: the network built with
its parameters there and a forward on a meta batch check shapes only, without memory or computation.
"""

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from imgcls.backbones.factory import create_backbone
from imgcls.backbones.meta import build_on_meta
from imgcls.backbones.weights import TIMM, Weights, import_timm
from imgcls.errors import UserError

DEFAULT_SIZE = 224  # the usual ImageNet crop, for networks that publish no size of their own
SIZE_ARGUMENTS = ("image_size", "input_size", "img_size")  # torchvision's ViT, torchvision's MaxViT, timm


@dataclass(frozen=True)
class InputSize:
    """How backbone and data agree: builder arguments for the network, and the crop the data should use."""

    arch_kwargs: dict[str, Any]  # e.g. {"image_size": 32}; the checkpoint records them in backbone_kwargs
    crop_size: int
    message: str = ""  # what was decided, for one line of output; empty when nothing needed deciding


def settle_input_size(backbone: str, crop_size: int, weights: Weights, backbone_kwargs: dict[str, Any]) -> InputSize:
    """The builder arguments and crop size that let ``backbone`` run on the data; ``UserError`` if none do."""
    given = {**weights.arch_kwargs(), **backbone_kwargs}
    try:
        argument = size_argument(_probe(backbone, given))
    except UserError:
        raise
    except Exception as error:  # whatever the builder raises for arguments it does not take
        reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
        message = f"--model.backbone_kwargs {backbone_kwargs}: {backbone} does not build with them ({reason})"
        raise UserError(message) from error
    if argument is not None and argument not in backbone_kwargs:
        sized = {argument: [crop_size, crop_size] if argument == "input_size" else crop_size}
        if runs_at(backbone, crop_size, {**given, **sized}):
            if given.get(argument) == sized[argument]:
                return InputSize({}, crop_size)  # the weights' own size (ViT SWAG at 384)
            return InputSize(sized, crop_size, f"{backbone}: built for {crop_size}-pixel images (--data.crop_size)")
    elif runs_at(backbone, crop_size, given):
        return InputSize({}, crop_size)
    for size in own_sizes(backbone):
        if size != crop_size and runs_at(backbone, size, given):
            return InputSize(
                {}, size, f"{backbone} does not run on {crop_size}-pixel images: the data's crop becomes {size} pixels"
            )
    raise UserError(
        f"--model.backbone {backbone} runs neither on --data.crop_size {crop_size} nor on its own sizes "
        f"{', '.join(map(str, own_sizes(backbone)))}; set --data.crop_size and --data.resize_size to a size it takes"
    )


def size_argument(net: nn.Module) -> str | None:
    """The argument of ``net``'s class that fixes its input size, if it has one."""
    parameters = inspect.signature(type(net)).parameters
    return next((name for name in SIZE_ARGUMENTS if name in parameters), None)


def own_sizes(backbone: str) -> list[int]:
    """The sizes ``backbone`` is made for, smallest first: its published weights' smallest and evaluation sizes."""
    if backbone.startswith(TIMM):
        cfg = import_timm(backbone).models.get_pretrained_cfg(backbone.removeprefix(TIMM))
        return [int(cfg.input_size[-1])] if cfg is not None else [DEFAULT_SIZE]
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    smallest, evaluated = weights.meta["min_size"][0], weights.transforms().crop_size[0]
    return sorted({size for size in (smallest, evaluated) if size > 1} or {DEFAULT_SIZE})


def runs_at(backbone: str, size: int, kwargs: dict[str, Any]) -> bool:
    """Whether ``backbone`` built with ``kwargs`` takes a batch of ``size``-pixel images (on meta tensors)."""
    try:
        net = _probe(backbone, kwargs).eval()
        with torch.device("meta"):
            net(torch.empty(2, 3, size, size))
    except UserError:
        raise
    except Exception:  # a size the network cannot take: builders and forwards raise many kinds
        return False
    return True


def _probe(backbone: str, kwargs: dict[str, Any]) -> nn.Module:
    with warnings.catch_warnings():  # the real build, later, says whatever its builder has to say
        warnings.simplefilter("ignore")
        return build_on_meta(lambda: create_backbone(backbone, 2, **kwargs))
