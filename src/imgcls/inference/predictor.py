"""Prediction without Lightning: a checkpoint or an exported bundle, on any device, preprocessed as in validation."""

from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from imgcls.backbones.factory import create_backbone
from imgcls.checkpoints import ModelSpec, join_state, load_checkpoint
from imgcls.data.pixel_limit import too_large, too_large_setting
from imgcls.data.transforms import build_transforms
from imgcls.errors import UserError
from imgcls.inference.exported import MANIFEST, is_bundle, read_bundle

Prediction = list[tuple[str, float]]  # (class name, probability), most likely first


def load_weights(source: str | Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Read the spec and the backbone's state dict from a Lightning checkpoint (file or sharded folder) or a bundle."""
    path = Path(source).expanduser()
    if is_bundle(path):
        return read_bundle(path)
    ckpt = load_checkpoint(path)
    hparams, state = ckpt.get("hyper_parameters"), ckpt.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise UserError(f"{source}: not a checkpoint of this project's ImageClassifier (no hyperparameters or weights)")
    # tensor parallelism's checkpoints hold q, k and v apart: joined, they are the plain network's
    return ModelSpec.from_hparams(hparams, source), join_state(_submodule_state(state, "net"))


def _submodule_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of submodule ``name``, keyed as its own ``state_dict()`` keys them.

    The version metadata comes along: some modules read it when loading (MNASNet refuses to load without it).
    """
    prefix = f"{name}."
    own = OrderedDict((key.removeprefix(prefix), value) for key, value in state.items() if key.startswith(prefix))
    metadata = getattr(state, "_metadata", {})
    own._metadata = {key.removeprefix(name).removeprefix("."): value for key, value in metadata.items()
                     if key == name or key.startswith(prefix)}  # fmt: skip
    return own


def build_network(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The network ``spec`` describes, holding ``weights`` in float32, in eval mode.

    It is built on the meta device and the weights are assigned, not copied, so no time goes into a random
    initialisation they would overwrite: bit-identical logits for every torchvision classification model.
    A network with tensors that no state dict holds (non-persistent buffers, in some timm models) or a constructor
    that computes with tensor values (RegNet's widths) is built for real.
    """
    net = _on_meta_device(spec)
    if net is not None:
        net.load_state_dict(weights, assign=True)
    if net is None or any(buffer.is_meta for buffer in net.buffers()):
        net = _create(spec)
        net.load_state_dict(weights, assign=True)
    return net.float().eval()  # eval: BatchNorm uses its running statistics and Dropout is off


class UnbuildableNetwork(UserError):
    """The architecture a checkpoint or bundle names, with its builder arguments, is not one the library builds."""


def _create(spec: ModelSpec) -> nn.Module:
    try:
        return create_backbone(spec.arch, len(spec.class_names), **spec.arch_kwargs)
    except (TypeError, ValueError) as error:  # an unknown architecture, or builder arguments it refuses
        raise UnbuildableNetwork(f"{spec.architecture} cannot be built ({error})") from error


def _on_meta_device(spec: ModelSpec) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return create_backbone(spec.arch, len(spec.class_names), **spec.arch_kwargs)
    except UserError:
        raise
    except Exception:  # the constructor needs tensor values: "Cannot copy out of meta tensor", "item() on meta", ...
        return None


def _fix(bundle: bool, keys: str) -> str:
    return f"; correct {keys} there, or export again with export.py" if bundle else ""


class Predictor:
    """A trained classifier in eval mode, with the class names and preprocessing saved alongside its weights."""

    def __init__(self, source: str | Path, device: str = "cpu") -> None:
        self.spec, weights = load_weights(source)
        self.class_names = self.spec.class_names
        bundle = is_bundle(Path(source).expanduser())
        where = Path(source) / MANIFEST if bundle else source  # a bundle's settings are in a file people edit
        if setting := too_large_setting(self.spec.preprocess):  # before anything is built to that size
            raise UserError(f"{where}: refused, its preprocess {setting}{_fix(bundle, 'preprocess')}")
        try:
            self.transform = build_transforms(train=False, **self.spec.preprocess)
        except (TypeError, ValueError) as error:
            settings = f"unusable preprocessing settings {self.spec.preprocess} ({error})"
            raise UserError(f"{where}: {settings}{_fix(bundle, 'preprocess')}") from error
        self.device = torch.device(device)
        try:
            net = build_network(self.spec, weights)
        except UnbuildableNetwork as error:
            raise UserError(f"{where}: {error}{_fix(bundle, 'arch and arch_kwargs')}") from error
        except (RuntimeError, ValueError) as error:  # load_state_dict's complaints: missing, unexpected, misshapen keys
            summary = " ".join(str(error).split())[:300]
            expected = f"a {len(self.class_names)}-class {self.spec.arch}"
            raise UserError(f"{source}: its weights do not fit {expected} ({summary})") from error
        self.net = net.to(self.device)

    def too_large(self, image: Image.Image) -> str | None:
        """Why preprocessing ``image`` would make it larger than Pillow's decompression-bomb limit, or ``None``."""
        return too_large(image, self.spec.preprocess["resize_size"])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Turn RGB images into the batch the network takes, ``(B, 3, crop_size, crop_size)``, on the device.

        An image that resizing would make too large raises ``UserError``, before any is resized.
        """
        for index, image in enumerate(images):
            if reason := self.too_large(image):
                raise UserError(f"image {index} of the batch: refused, {reason}")
        return torch.stack([self.transform(image) for image in images]).to(self.device)

    @torch.inference_mode()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """Return the class probabilities, ``(B, num_classes)`` on the CPU."""
        return self.net(self.preprocess(images)).float().softmax(dim=1).cpu()

    def __call__(self, images: list[Image.Image], topk: int = 5) -> list[Prediction]:
        """Return the ``topk`` most likely classes for each RGB image."""
        values, indices = self.probabilities(images).topk(min(topk, len(self.class_names)), dim=1)
        return [
            [(self.class_names[i], p) for i, p in zip(row_indices.tolist(), row_values.tolist(), strict=True)]
            for row_indices, row_values in zip(indices, values, strict=True)
        ]
