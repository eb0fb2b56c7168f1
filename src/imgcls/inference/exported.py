"""The exported bundle: a folder that plain torchvision loads, with no code from this project.

- model.json: the architecture, class names, preprocessing, and the files in the folder;
- state_dict.pt: for ``torchvision.models.get_model(arch, num_classes=N, **arch_kwargs)`` (``library``
  ``torchvision``) or ``timm.create_model(arch, num_classes=N, **arch_kwargs)`` (``timm``), through
  ``load_state_dict(torch.load(path, weights_only=True))``;
- model.pt2 (optional): a torch.export program, batch size dynamic;
- model.onnx (optional): ONNX, batch size dynamic.
"""

import json
from pathlib import Path

import torch

from imgcls.backbones.weights import TIMM
from imgcls.checkpoints import ModelSpec
from imgcls.errors import UserError

MANIFEST = "model.json"
STATE_DICT = "state_dict.pt"
FORMAT_VERSION = 1
# How the preprocess values are applied, for readers of model.json; the same steps as transforms.build_transforms.
PIPELINE = (
    "torchvision.transforms.v2: ToImage(), Resize(resize_size, interpolation), CenterCrop(crop_size), "
    "ToDtype(float32, scale=True), Normalize(mean, std) on an RGB image; the model takes (N, 3, crop_size, crop_size) "
    "and returns (N, num_classes) logits"
)


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def write_bundle(directory: Path, spec: ModelSpec, state_dict: dict[str, torch.Tensor], files: dict[str, str]) -> None:
    """Write ``state_dict.pt`` and ``model.json``, listing ``files`` (format -> file name) besides the state dict."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / STATE_DICT)
    manifest = {
        "format_version": FORMAT_VERSION,
        "library": "timm" if spec.arch.startswith(TIMM) else "torchvision",
        "arch": spec.arch.removeprefix(TIMM),
        "arch_kwargs": spec.arch_kwargs,
        "num_classes": len(spec.class_names),
        "class_names": spec.class_names,
        "preprocess": spec.preprocess,
        "pipeline": PIPELINE,
        "files": {"state_dict": STATE_DICT, **files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_bundle(directory: Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Return the spec and the state dict of a bundle written by ``write_bundle``."""
    source = directory / MANIFEST
    try:
        manifest = json.loads(source.read_text())
        arch = TIMM + manifest["arch"] if manifest["library"] == "timm" else manifest["arch"]
        name = manifest["files"]["state_dict"]
        weights = directory / name
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{source}: not an exported model description ({error!r})") from error
    if Path(name).name != name or not weights.is_file():  # not a path elsewhere, nor a pipe or a device to block on
        raise UserError(
            f"{source}: its state_dict file {name!r} is not a file in {directory}; correct it there, or export again "
            "with export.py"
        )
    if not isinstance(manifest.get("arch_kwargs", {}), dict):
        raise UserError(
            f"{source}: its arch_kwargs are {manifest['arch_kwargs']!r}, not a mapping of the builder's arguments such "
            'as {"image_size": 384} ({} for none); correct it there, or export again with export.py'
        )
    spec = ModelSpec.from_hparams(
        {**manifest, "backbone": arch, "backbone_kwargs": manifest.get("arch_kwargs")}, source
    )
    try:
        # mmap: tensors are read from the page cache as the model touches them, not copied up front
        return spec, torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch.load fails on missing, corrupt and unsafe files with many exception types
        raise UserError(
            f"{weights}: not a readable state dict ({type(error).__name__}); export again with export.py"
        ) from error
