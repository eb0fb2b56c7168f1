"""Backbones by name: any torchvision classification model, with its head sized to ``num_classes``."""

import difflib
from functools import cache

import torchvision
from torch import nn

from imgcls.errors import UserError


@cache
def available_backbones() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def create_backbone(name: str, num_classes: int) -> nn.Module:
    """Build backbone ``name`` with a freshly initialised ``num_classes``-way head."""
    names = available_backbones()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(names)}"
        raise UserError(f"--model.backbone {name!r} is not a torchvision classification model; {hint}")
    return torchvision.models.get_model(name, num_classes=num_classes)
