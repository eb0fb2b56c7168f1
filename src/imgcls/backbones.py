"""Backbones by name: torchvision classification models and ``timm/<name>``, with a head sized to ``num_classes``.

``pretrained`` is ``False`` (random initialisation), ``True`` (the default weights), a torchvision weights name
(``IMAGENET1K_V2``; timm names its weights in the model name: ``timm/resnet50.a1_in1k``) or a weights file, which
is loaded partially (``imgcls.pretrained``). Published weights come through torchvision's weights API (timm's for
timm models), so a file already in the torch hub cache (``$TORCH_HOME/hub/checkpoints/``) is used offline.
"""

import difflib
import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from imgcls.errors import UserError
from imgcls.pretrained import load_partial, read_state_dict

TIMM = "timm/"
WEIGHT_FILES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")
Pretrained = bool | str


@cache
def available_backbones() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: Pretrained = False,
    *,
    prefix: str | None = None,
    strict: bool = False,
    report: Callable[[str], None] = print,
    **kwargs: Any,
) -> nn.Module:
    """Build backbone ``name`` with a new ``num_classes``-way head, starting from ``pretrained`` weights.

    Args:
        name: A torchvision model name (``resnet50``) or ``timm/<name>`` (``timm/convnext_tiny.fb_in22k``).
        num_classes: Outputs of the head.
        pretrained: ``False``, ``True``, a weights name or a weights file (see the module docstring).
        prefix: Stripped from the tensor names of a weights file, besides the known wrapper prefixes.
        strict: Raise ``UserError`` if a tensor outside the head does not fit, instead of skipping it.
        report: Receives the loading report.
        kwargs: Passed to the torchvision builder or to ``timm.create_model``.
    """
    file = weights_file(pretrained)
    if name.startswith(TIMM):
        net = _create_timm(name.removeprefix(TIMM), num_classes, pretrained, report, **kwargs)
    else:
        weights = torchvision_weights(name, pretrained)
        if name in ("googlenet", "inception_v3"):
            kwargs.setdefault("aux_logits", False)  # auxiliary heads make training return a tuple of logits
        kwargs = {**architecture_kwargs(name, pretrained), **kwargs}
        net = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        if weights is not None:
            # torchvision refuses weights with num_classes != 1000: load them into the net, the old head skipped
            state_dict, source = _torchvision_state_dict(weights), f"{name} {weights.name}"
            report(str(load_partial(net, state_dict, source, strict=strict, head=head_names(net))))
    if file is not None:
        report(str(load_partial(net, read_state_dict(file), str(file), prefix, strict, head=head_names(net))))
    return net


def weights_preprocess(name: str, pretrained: Pretrained) -> dict[str, Any]:
    """The evaluation preprocessing of the published weights ``pretrained`` names; ``{}`` for none or a file.

    Keys as ``build_transforms`` takes them: ``crop_size``, ``resize_size``, ``mean``, ``std``, ``interpolation``;
    read from torchvision's ``weights.transforms()`` or timm's pretrained config.
    """
    if pretrained is False or weights_file(pretrained) is not None:
        return {}
    if name.startswith(TIMM):
        cfg = _timm_weights(_import_timm(name), name.removeprefix(TIMM), pretrained)
        crop = cfg.input_size[-1]
        resize = math.floor(crop / cfg.crop_pct)  # as timm's eval transform: crop_pct of the resized image
        return {"crop_size": crop, "resize_size": resize, "mean": list(cfg.mean), "std": list(cfg.std),
                "interpolation": cfg.interpolation}  # fmt: skip
    transform = torchvision_weights(name, pretrained).transforms()
    return {
        "crop_size": transform.crop_size[0],
        "resize_size": transform.resize_size[0],
        "mean": list(transform.mean),
        "std": list(transform.std),
        "interpolation": transform.interpolation.value,
    }


def architecture_kwargs(name: str, pretrained: Pretrained) -> dict[str, Any]:
    """Builder arguments that torchvision's builders set themselves for these weights (``_ovewrite_named_param``).

    They change the network (ViT SWAG weights: 384-pixel position embeddings; Inception: input rescaling), so a
    checkpoint records them to rebuild the same network without the weights.
    """
    weights = None if name.startswith(TIMM) else torchvision_weights(name, pretrained)
    if weights is None:
        return {}
    if name.startswith("vit_"):
        return {"image_size": weights.meta["min_size"][0]}
    if name.startswith("maxvit_"):
        return {"input_size": list(weights.meta["min_size"])}
    if name in ("googlenet", "inception_v3"):
        return {"transform_input": True, "init_weights": False}
    return {}


def head_names(net: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head: timm's ``pretrained_cfg["classifier"]``, else the last Linear or Conv2d.

    Every torchvision classification model registers its classifier last (``fc``, ``classifier.1``, ``heads.head``).
    """
    classifier = getattr(net, "pretrained_cfg", {}).get("classifier")
    if classifier:
        return (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return ([name for name, module in net.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)][-1],)


def torchvision_weights(name: str, pretrained: Pretrained) -> WeightsEnum | None:
    """The torchvision weights ``pretrained`` names for backbone ``name``; ``None`` for none or a file."""
    names = available_backbones()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(names)}"
        raise UserError(
            f"--model.backbone {name!r} is not a torchvision classification model; {hint} (timm: timm/NAME)"
        )
    if pretrained is False or weights_file(pretrained) is not None:
        return None
    choices = torchvision.models.get_model_weights(name)
    if pretrained is True:
        return choices.DEFAULT
    try:
        return choices[pretrained.removeprefix(f"{choices.__name__}.")]
    except KeyError:
        known = ", ".join(n for n in choices.__members__ if n != "DEFAULT")
        raise UserError(
            f"--model.pretrained {pretrained!r}: {name} has the weights {known} (true: the default)"
        ) from None


def weights_file(pretrained: Pretrained) -> Path | None:
    """The weights file or sharded checkpoint folder ``pretrained`` names; ``None`` for a flag or a weights name."""
    if isinstance(pretrained, bool):
        return None
    path = Path(pretrained).expanduser()
    if path.suffix not in WEIGHT_FILES and len(path.parts) == 1 and not path.exists():
        return None
    if not path.exists():
        raise UserError(f"--model.pretrained {pretrained}: no such file")
    return path


def _torchvision_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """The weights' tensors, through torchvision's API: from the torch hub cache, else downloaded into it."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True, map_location="cpu")
    except OSError as error:  # no network, a proxy, DNS, a full disk
        if cached.is_file():
            raise UserError(f"{cached}: unreadable ({error}); delete it to download it again") from None
        raise UserError(
            f"--model.pretrained: {cached} is missing and downloading {weights.url} failed ({error}); "
            f"download that file where there is internet and put it at {cached}"
        ) from None
    except Exception as error:  # a corrupt cached file or a bad hash: torch.load raises many types
        raise UserError(f"{cached}: not a weights file ({type(error).__name__}: {error}); delete it") from None


def _import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(f"--model.backbone {name}: timm is not installed; pip install 'imgcls[timm]'") from None
    return timm


def _timm_weights(timm: Any, name: str, pretrained: Pretrained) -> Any:
    """timm's pretrained config for ``name`` (``arch`` or ``arch.tag``), checked to name published weights."""
    if not isinstance(pretrained, bool):
        raise UserError(f"--model.pretrained {pretrained}: timm names weights in the model, e.g. timm/resnet50.a1_in1k")
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # an unknown tag
        arch = timm.models.split_model_name_tag(name)[0]
        tags = ", ".join(f"timm/{n}" for n in timm.list_pretrained(f"{arch}.*")[:8]) or "none"
        raise UserError(f"--model.backbone timm/{name}: timm has no such weights; it has e.g. {tags}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UserError(f"--model.pretrained true: timm has no published weights for timm/{name}")
    return cfg


def _create_timm(
    name: str, num_classes: int, pretrained: Pretrained, report: Callable[[str], None], **kwargs: Any
) -> nn.Module:
    timm = _import_timm(TIMM + name)
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(TIMM + c for c in close)}?" if close else "see timm.list_models()"
        raise UserError(f"--model.backbone {TIMM + name!r} is not a timm model; {hint}")
    published = pretrained is True or (isinstance(pretrained, str) and weights_file(pretrained) is None)
    cfg = _timm_weights(timm, name, pretrained) if published else None
    try:
        # timm drops the old classifier itself when num_classes differs, and loads with weights_only / safetensors
        net = timm.create_model(name, pretrained=published, num_classes=num_classes, **kwargs)
    except OSError as error:  # huggingface_hub: not cached, and no network
        raise UserError(
            f"--model.pretrained: timm's weights {cfg.hf_hub_id or cfg.url} are not cached and downloading them "
            f"failed ({type(error).__name__}); run once with internet, or pass a weights file as --model.pretrained"
        ) from None
    if cfg is not None:
        report(f"{TIMM}{name}: loaded timm's weights {cfg.hf_hub_id or cfg.url}, new {num_classes}-way head")
    return net
