"""Prediction without Lightning: a checkpoint from any device, on any device, preprocessed as in validation."""

from pathlib import Path

import torch
from PIL import Image

from imgcls.backbones import create_backbone
from imgcls.checkpoints import load_checkpoint
from imgcls.errors import UserError
from imgcls.transforms import build_transforms

Prediction = list[tuple[str, float]]  # (class name, probability), most likely first


class Predictor:
    """A trained classifier in eval mode, with the class names and preprocessing saved in its checkpoint."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        ckpt = load_checkpoint(checkpoint)
        try:
            hparams = ckpt["hyper_parameters"]
            self.class_names: list[str] = hparams["class_names"]
            self.transform = build_transforms(train=False, **hparams["preprocess"])
            net = create_backbone(hparams["backbone"], hparams["num_classes"])
            weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
            net.load_state_dict(weights)
        except (KeyError, TypeError, RuntimeError) as error:
            raise UserError(f"{checkpoint}: not a checkpoint of this project's ImageClassifier ({error})") from None
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()  # eval: BatchNorm uses running statistics, Dropout is off

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], topk: int = 5) -> list[Prediction]:
        """Return the ``topk`` most likely classes for each RGB image."""
        batch = torch.stack([self.transform(image) for image in images]).to(self.device)  # (B, 3, H, W)
        probs = self.net(batch).float().softmax(dim=1)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        return [
            [(self.class_names[i], p) for i, p in zip(row_indices.tolist(), row_values.tolist())]
            for row_indices, row_values in zip(indices, values)
        ]
