"""What ``--model.pretrained`` names for a backbone, decoded once into ``Weights``: none, published ones, or a file.

``pretrained`` is ``False`` (random initialisation), ``True`` (the default weights), a torchvision weights name
(``IMAGENET1K_V2``; timm names its weights in the model name: ``timm/resnet50.a1_in1k``), or a weights file or
sharded checkpoint folder, loaded partially (``imgcls.backbones.partial``). Published weights come through
torchvision's weights API (timm's for timm models), so a file already in the torch hub cache
(``$TORCH_HOME/hub/checkpoints/``) is used offline.
"""

import difflib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torchvision.models import WeightsEnum

from imgcls.errors import UserError

TIMM = "timm/"
WEIGHT_FILES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")
Pretrained = bool | str
# Builder arguments torchvision's builders set for themselves with published weights (``_ovewrite_named_param``).
# They change the network, so a checkpoint records them (``backbone_kwargs``) to rebuild it without the weights.
PUBLISHED_ARCH_KWARGS = {"googlenet": {"transform_input": True, "init_weights": False}}
PUBLISHED_ARCH_KWARGS["inception_v3"] = PUBLISHED_ARCH_KWARGS["googlenet"]


@dataclass(frozen=True)
class Weights:
    """The starting weights of one backbone: at most one of a file, torchvision's or timm's published weights."""

    backbone: str
    file: Path | None = None  # a weights file or sharded checkpoint folder, loaded partially
    torchvision: WeightsEnum | None = None
    timm: Any = None  # timm's pretrained config

    @property
    def published(self) -> bool:
        return self.torchvision is not None or self.timm is not None

    def preprocess(self) -> dict[str, Any]:
        """The published weights' evaluation preprocessing, as ``build_transforms`` takes it; ``{}`` for none."""
        if self.timm is not None:
            crop = self.timm.input_size[-1]
            return {
                "crop_size": crop,
                "resize_size": math.floor(crop / self.timm.crop_pct),  # timm's eval: crop_pct of the resized image
                "mean": list(self.timm.mean),
                "std": list(self.timm.std),
                "interpolation": self.timm.interpolation,
            }
        if self.torchvision is None:
            return {}
        transform = self.torchvision.transforms()
        return {
            "crop_size": transform.crop_size[0],
            "resize_size": transform.resize_size[0],
            "mean": list(transform.mean),
            "std": list(transform.std),
            "interpolation": transform.interpolation.value,
        }

    def arch_kwargs(self) -> dict[str, Any]:
        """Builder arguments these weights need: ViT's SWAG weights 384-pixel position embeddings, and the like."""
        if self.torchvision is None:
            return {}
        if self.backbone.startswith("vit_"):
            return {"image_size": self.torchvision.meta["min_size"][0]}
        if self.backbone.startswith("maxvit_"):
            return {"input_size": list(self.torchvision.meta["min_size"])}
        return dict(PUBLISHED_ARCH_KWARGS.get(self.backbone, {}))

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The published torchvision weights' tensors: from the torch hub cache, else downloaded into it."""
        assert self.torchvision is not None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(self.torchvision.url).path).name
        try:
            return self.torchvision.get_state_dict(
                progress=True, check_hash=True, weights_only=True, map_location="cpu"
            )
        except OSError as error:  # no network, a proxy, DNS, a full disk
            if cached.is_file():
                raise UserError(f"{cached}: unreadable ({error}); delete it to download it again") from error
            raise UserError(
                f"--model.pretrained: {cached} is missing and downloading {self.torchvision.url} failed ({error}); "
                f"download that file where there is internet and put it at {cached}"
            ) from error
        except Exception as error:  # a corrupt cached file or a bad hash: torch.load raises many types
            raise UserError(f"{cached}: not a weights file ({type(error).__name__}: {error}); delete it") from error


@functools.cache
def resolve_weights(backbone: str, pretrained: Pretrained = False) -> Weights:
    """Decode ``pretrained`` for ``backbone``, checking both; ``UserError`` names the option to fix."""
    file = weights_file(pretrained)
    if backbone.startswith(TIMM):
        published = pretrained is not False and file is None
        return Weights(backbone, file, timm=timm_config(backbone, pretrained) if published else None)
    choices = _torchvision_weights_of(backbone)
    if pretrained is False or file is not None:
        return Weights(backbone, file)
    if pretrained is True:
        return Weights(backbone, torchvision=choices.DEFAULT)
    try:
        return Weights(backbone, torchvision=choices[pretrained.removeprefix(f"{choices.__name__}.")])
    except KeyError as error:
        known = ", ".join(n for n in choices.__members__ if n != "DEFAULT")
        raise UserError(
            f"--model.pretrained {pretrained!r}: {backbone} has the weights {known} (true: the default)"
        ) from error


@functools.cache
def available_backbones() -> tuple[str, ...]:
    """torchvision's classification models by name."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


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


def import_timm(backbone: str) -> Any:
    """timm, once ``backbone`` is checked to be one of its models."""
    try:
        import timm
    except ImportError as error:
        raise UserError(f"--model.backbone {backbone}: timm is not installed; pip install 'imgcls[timm]'") from error
    arch = timm.models.split_model_name_tag(backbone.removeprefix(TIMM))[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(TIMM + c for c in close)}?" if close else "see timm.list_models()"
        raise UserError(f"--model.backbone {backbone!r} is not a timm model; {hint}")
    return timm


def timm_config(backbone: str, pretrained: Pretrained) -> Any:
    """timm's pretrained config for ``timm/<arch>`` or ``timm/<arch>.<tag>``, checked to name published weights."""
    name, timm = backbone.removeprefix(TIMM), import_timm(backbone)
    if not isinstance(pretrained, bool):
        raise UserError(f"--model.pretrained {pretrained}: timm names weights in the model, e.g. timm/resnet50.a1_in1k")
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as error:  # an unknown tag
        arch = timm.models.split_model_name_tag(name)[0]
        tags = ", ".join(f"{TIMM}{n}" for n in timm.list_pretrained(f"{arch}.*")[:8]) or "none"
        raise UserError(f"--model.backbone {backbone}: timm has no such weights; it has e.g. {tags}") from error
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UserError(f"--model.pretrained true: timm has no published weights for {backbone}")
    return cfg


def _torchvision_weights_of(backbone: str) -> type[WeightsEnum]:
    names = available_backbones()
    if backbone not in names:
        close = difflib.get_close_matches(backbone, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(names)}"
        raise UserError(
            f"--model.backbone {backbone!r} is not a torchvision classification model; {hint} (timm: {TIMM}NAME)"
        )
    return torchvision.models.get_model_weights(backbone)
