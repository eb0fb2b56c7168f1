"""How much training the images allow: the default batch size fitted to them, and too few images refused.

Lightning runs epochs of 0 training steps without a word when the training split is empty, or smaller than one batch
per device (the training loader drops its last, incomplete batch); then it tests the network as initialised, writes
no checkpoint and exits with status 0. Here such a split is refused at setup.
"""

import math

from imgcls.errors import UserError

MAX_BATCH_SIZE, MIN_BATCH_SIZE = 64, 8  # the range the default batch size is fitted in
MIN_STEPS_PER_EPOCH = 16  # fewer, and a few hundred images get too few optimizer steps in a handful of epochs


def fitted_batch_size(images: int, devices: int) -> int:
    """The default batch per device: 64, halved down to 8 until an epoch has at least 16 steps on ``devices``, and
    never more than the images a device gets (else it would train 0 steps)."""
    size = MAX_BATCH_SIZE
    while size > MIN_BATCH_SIZE and images // (size * devices) < MIN_STEPS_PER_EPOCH:
        size //= 2
    return min(size, per_device(images, devices))


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
