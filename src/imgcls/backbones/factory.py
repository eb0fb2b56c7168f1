"""Backbones by name: torchvision classification models and ``timm/<name>``, with a head sized to ``num_classes``."""

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from imgcls.backbones.partial import load_partial, read_state_dict
from imgcls.backbones.weights import TIMM, Weights, import_timm
from imgcls.errors import UserError

# Builder arguments some torchvision models always get here: without auxiliary heads, training returns one tensor
# of logits, not a tuple. Exported folders record them, for a plain get_model call (imgcls.inference.export).
ARCH_DEFAULTS = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def create_backbone(
    name: str,
    num_classes: int,
    weights: Weights | None = None,
    *,
    prefix: str | None = None,
    strict: bool = False,
    report: Callable[[str], None] = print,
    **kwargs: Any,
) -> nn.Module:
    """Build backbone ``name`` with a new ``num_classes``-way head, starting from ``weights``.

    Args:
        name: A torchvision model name (``resnet50``) or ``timm/<name>`` (``timm/convnext_tiny.fb_in22k``).
        num_classes: Outputs of the head.
        weights: ``imgcls.backbones.weights.resolve_weights(name, pretrained)``; ``None`` initialises at random.
        prefix: Stripped from the tensor names of a weights file, besides the known wrapper prefixes.
        strict: Raise ``UserError`` if a tensor outside the head does not fit, instead of skipping it.
        report: Receives the loading report.
        kwargs: Passed to the torchvision builder or to ``timm.create_model``.
    """
    weights = weights or Weights(name)
    if name.startswith(TIMM):
        net = _create_timm(name, num_classes, weights, report, **kwargs)
    else:
        kwargs = {**ARCH_DEFAULTS.get(name, {}), **weights.arch_kwargs(), **kwargs}
        net = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        if weights.torchvision is not None:
            # torchvision refuses weights with num_classes != 1000: load them into the net, the old head skipped
            state_dict, source = fit_position_embeddings(net, weights.torchvision_state_dict()), weights.torchvision
            report(str(load_partial(net, state_dict, f"{name} {source.name}", strict=strict, head=head_names(net))))
    if weights.file is not None:
        state_dict = fit_position_embeddings(net, read_state_dict(weights.file))
        report(str(load_partial(net, state_dict, str(weights.file), prefix, strict, head=head_names(net))))
    return net


def fit_position_embeddings(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ViT's position embeddings resized to ``net``'s image size, as torchvision does for its SWAG
    weights (``interpolate_embeddings``: bicubic, the class token kept); other tensors as they are."""
    if not isinstance(net, VisionTransformer):
        return state_dict
    ours = net.encoder.pos_embedding.shape
    for key in [key for key in state_dict if key.endswith("encoder.pos_embedding") and state_dict[key].shape != ours]:
        resized = interpolate_embeddings(net.image_size, net.patch_size, {"encoder.pos_embedding": state_dict[key]})
        state_dict = {**state_dict, key: resized["encoder.pos_embedding"]}
    return state_dict


def head_names(net: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head: timm's ``pretrained_cfg["classifier"]``, else the last Linear or Conv2d.

    Every torchvision classification model registers its classifier last (``fc``, ``classifier.1``, ``heads.head``).
    """
    classifier = getattr(net, "pretrained_cfg", {}).get("classifier")
    if classifier:
        return (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return ([name for name, module in net.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)][-1],)


def _create_timm(
    name: str, num_classes: int, weights: Weights, report: Callable[[str], None], **kwargs: Any
) -> nn.Module:
    timm, cfg = import_timm(name), weights.timm
    try:
        # timm drops the old classifier itself when num_classes differs, and loads with weights_only / safetensors
        net = timm.create_model(name.removeprefix(TIMM), pretrained=cfg is not None, num_classes=num_classes, **kwargs)
    except OSError as error:  # huggingface_hub: not cached, and no network
        raise UserError(
            f"--model.pretrained: timm's weights {cfg.hf_hub_id or cfg.url} are not cached and downloading them "
            f"failed ({type(error).__name__}); run once with internet, or pass a weights file as --model.pretrained"
        ) from error
    if cfg is not None:
        report(f"{name}: loaded timm's weights {cfg.hf_hub_id or cfg.url}, new {num_classes}-way head")
    return net
