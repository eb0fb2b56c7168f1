"""Image preprocessing: one function builds the train or eval pipeline from the settings a checkpoint carries."""

import functools
from collections.abc import Sequence
from typing import Literal

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Augment = Literal["none", "basic", "strong"]
# The modes every pipeline here runs with (nearest-exact fails in TrivialAugment; box and hamming on tensors)
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]


def build_transforms(
    train: bool,
    crop_size: int,
    resize_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: Interpolation = "bilinear",
    augment: Augment = "none",
    normalize: bool = True,
) -> v2.Compose:
    """Return the pipeline from an RGB image (PIL or uint8 tensor) to a ``(3, crop_size, crop_size)`` float tensor.

    Evaluation resizes the short side to ``resize_size`` and center-crops ``crop_size``, as torchvision's
    weights do. ``augment`` applies to training only: ``none`` is the eval pipeline, ``basic`` a random
    resized crop and a horizontal flip, ``strong`` adds TrivialAugment and random erasing. ``normalize=False``
    stops at the uint8 pixels, before scaling and normalising, for ``normalize_batch`` to finish a whole batch.
    """
    if min(crop_size, resize_size) < 1:  # torchvision would crop to nothing, or pad, without a word
        raise ValueError(f"crop_size {crop_size} and resize_size {resize_size} must be 1 or more")
    mode = InterpolationMode(interpolation)
    if train and augment != "none":
        geometry = [v2.RandomResizedCrop(crop_size, interpolation=mode), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(resize_size, interpolation=mode), v2.CenterCrop(crop_size)]
    # One random operation per image, at a random strength (TrivialAugment, https://arxiv.org/abs/2103.10158),
    # then erasing a patch: the pairing torchvision's classification training recipes use.
    strong = train and augment == "strong"
    # Erased patches take the mean colour, which normalises to about 0: torchvision's recipes erase with 0 after
    # normalising; here the pixels are still uint8.
    mean_colour = [round(255 * channel) for channel in mean]
    extra = [v2.TrivialAugmentWide(interpolation=mode), v2.RandomErasing(p=0.25, value=mean_colour)] if strong else []
    pixels = [v2.ToImage(), *geometry, *extra]
    if not normalize:
        return v2.Compose(pixels)
    return v2.Compose([*pixels, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Finish ``build_transforms(normalize=False)`` on a batch ``(B, 3, H, W)``: the same values, bit for bit.

    Done on the device, once per batch, it replaces two operations per image in the loader processes, and the
    loaders hand over uint8 pixels: a quarter of the bytes to pass between processes and to copy to a GPU.
    """
    scaled = v2.functional.to_dtype(images, torch.float32, scale=True)
    if scaled is images:  # already float32: leave the caller's tensor as it is
        scaled = scaled.clone()
    mean_t, std_t = _channel_tensors(tuple(mean), tuple(std), images.device)
    return scaled.sub_(mean_t).div_(std_t)  # Normalize's own two operations


@functools.cache
def _channel_tensors(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: v2.functional.normalize copies them from Python lists on every call, and a blocking
    # copy to a GPU waits for all the work queued there, each batch.
    return tuple(torch.tensor(values, device=device).view(-1, 1, 1) for values in (mean, std))


def build_batch_mix(
    num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, p: float = 1.0
) -> v2.Transform | None:
    """MixUp and/or CutMix for a batch ``(images, labels)``, applied with probability ``p``; ``None`` for neither.

    A mixed batch comes back with soft targets ``(B, num_classes)`` whose rows sum to 1; with both alphas set,
    each mixed batch gets one of the two at random.
    """
    mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
    mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
    return v2.RandomApply([v2.RandomChoice(mixes)], p=p) if mixes else None
