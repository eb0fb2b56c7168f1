"""The baseline: classify images with export.py's folder using only torch, torchvision and Pillow.

    python benchmarks/plain_torchvision.py exported/ photo.jpg [more.jpg ...]

This is what another program does with an exported folder, and the reference that predict.py's cold start and
warm latency are measured against (benchmarks/predict_latency.py). Prints one JSON object per image: its
probability per class.
"""

import json
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2


def load(folder: Path) -> tuple[torch.nn.Module, v2.Compose, list[str]]:
    """The network in eval mode, its preprocessing and its class names, from an exported folder."""
    info = json.loads((folder / "model.json").read_text())
    if info["library"] != "torchvision":
        sys.exit(f"error: {info['arch']} is a {info['library']} model; build it with {info['library']}")
    net = torchvision.models.get_model(info["arch"], num_classes=info["num_classes"], **info["arch_kwargs"])
    net.load_state_dict(torch.load(folder / info["files"]["state_dict"], weights_only=True))
    pre = info["preprocess"]
    preprocess = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre["resize_size"], interpolation=InterpolationMode(pre["interpolation"])),
            v2.CenterCrop(pre["crop_size"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre["mean"], pre["std"]),
        ]
    )
    return net.eval(), preprocess, info["class_names"]


@torch.inference_mode()
def classify(net: torch.nn.Module, preprocess: v2.Compose, images: list[str]) -> torch.Tensor:
    """Class probabilities ``(B, num_classes)`` of the image files."""
    batch = torch.stack([preprocess(ImageOps.exif_transpose(Image.open(path)).convert("RGB")) for path in images])
    return net(batch).softmax(dim=1)


if __name__ == "__main__":
    net, preprocess, class_names = load(Path(sys.argv[1]))
    paths = sys.argv[2:]
    for path, row in zip(paths, classify(net, preprocess, paths).tolist(), strict=True):
        print(json.dumps({"image": path, "probabilities": dict(zip(class_names, row, strict=True))}))
