"""Too few images to train on: refused at setup, before a run trains nothing and tests an untrained network.

Lightning runs epochs of 0 training steps without a word when the training split is empty, or smaller than one batch
per device (the training loader drops its last, incomplete batch); then it tests the network as initialised, writes
no checkpoint and exits with status 0.
"""

import math

from imgcls.errors import UserError


def per_device(images: int, devices: int) -> int:
    """Training images each device gets an epoch: the sampler pads the split to a multiple of ``devices``."""
    return math.ceil(images / devices)


def refuse_empty_training(images: int, held_out: int, val_fraction: float, source: str, folder: bool = True) -> None:
    """Refuse a split that holds ``held_out`` of ``images`` out for validation and keeps none to train on.

    ``folder``: ``source`` is a folder of class folders, which the user may split into train/ and val/.
    """
    if held_out < images:
        return
    fraction = math.floor(100 * (images - 1) / images) / 100  # rounds images * fraction to images - 1 at most
    keep = f"a smaller fraction (at most {fraction:g} here)" if fraction > 0 else "more images"
    split = f", or split the images into {source}/train and {source}/val yourself" if folder else ""
    raise UserError(
        f"--data.val_fraction {val_fraction:g} holds out all {images} images of {source} for validation and leaves "
        f"none to train on; give {keep}{split}"
    )


def refuse_idle_epochs(images: int, batch_size: int, devices: int, source: str, held_out: int = 0) -> None:
    """Refuse a batch larger than the training images each device gets: every epoch would train 0 steps.

    ``held_out``: the images of ``source`` held out of these for validation, to explain the count.
    """
    most = per_device(images, devices)
    if batch_size <= most:
        return
    of_all = f" ({held_out} of its {images + held_out} held out for validation)" if held_out else ""
    each = f", {most} for each of the {devices} devices" if devices > 1 else ""
    raise UserError(
        f"--data.batch_size {batch_size} is larger than the {images} training images of {source}{of_all}{each}: "
        f"every epoch would train 0 steps, as the last, incomplete batch is dropped; use --data.batch_size {most} or "
        "less, or leave it unset to fit it to the data"
    )
