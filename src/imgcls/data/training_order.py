"""The order and the random draws of training, as functions of the seed and the position, so a run resumes exactly.

Loader processes carry random state that no checkpoint can hold (persistent workers keep theirs across epochs), and
Lightning drops a resumable loader's state once ``trainer.estimated_stepping_batches`` has been read (Lightning
#20550), as the default schedule does. So nothing here has state to save beyond one position:

- ``TrainingOrder`` gives each epoch's shuffled order from ``(seed, epoch)`` alone, and starts a resumed epoch at
  the sample where the checkpoint left it;
- each sample's augmentation draws from its own seed, drawn for its position in the epoch's order from
  ``(augment_seed, epoch)``, which ``SeededSamples`` applies in whichever loader process gets it;
- ``seed_training_batch`` seeds each training batch's draws in the training process (MixUp/CutMix, dropout) from
  the batch's index and the rank.

Ranks here are data-parallel ranks (``replicas``): the tensor-parallel processes that split one model read the same
batches and draw the same numbers.

A run stopped at any step and resumed then trains on the same images, augmented the same way, as one that went on.
The per-sample seeds depend on the position in the global order, not on the rank, so the same global batch gets
the same augmented images on 1 device or 8.
"""

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset

from imgcls.errors import UserError


def derived_seed(*keys: int | str) -> int:
    """A 63-bit seed for ``keys``: unrelated keys give unrelated seeds (a hash, unlike ``seed + epoch``)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def replicas(trainer: Any) -> tuple[int, int]:
    """How many processes read different batches, and which of them this one is (Lightning's
    ``Strategy.distributed_sampler_kwargs``): under tensor parallelism fewer than the processes."""
    if trainer is None:
        return 1, 0
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return kwargs.get("num_replicas", trainer.world_size), kwargs.get("rank", trainer.global_rank)


def seed_training_batch(seed: int, batch_index: int, rank: int) -> None:
    """Seed every random draw of one training batch in this process (CPU and devices) from its index and the rank."""
    torch.manual_seed(derived_seed(seed, "batch", batch_index, rank))


class TrainingOrder(DistributedSampler):
    """This rank's share of each epoch's shuffled order, as ``(augmentation seed, index)`` pairs; resumable mid-epoch.

    The order is ``DistributedSampler``'s (a permutation seeded by ``seed + epoch``, padded to a multiple of the
    ranks, dealt out in turn), or with ``weights`` a seeded draw with replacement in proportion to them. Its length is
    always the whole epoch's, as Lightning counts the batches of a resumed epoch from the start.

    Args:
        dataset: The training images.
        num_replicas: Processes that share the epoch.
        rank: This process's index among them.
        seed: Seed of the order.
        augment_seed: Seed of every sample's augmentation.
        weights: Per-image draw weights (balanced sampling); ``None`` shuffles.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        augment_seed: int,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed)
        self.augment_seed, self.weights = augment_seed, weights
        self.skip = 0  # samples of the global order the next epoch starts after (a resumed epoch)

    def resume(self, epoch: int, samples: int) -> None:
        """Start the next iteration in ``epoch``, after the first ``samples`` of its global order."""
        self.set_epoch(epoch)
        self.skip = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.weights is None:
            mine = list(super().__iter__())
        else:
            seeded = torch.Generator().manual_seed(self.seed + self.epoch)
            drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=seeded)
            mine = drawn[self.rank : self.total_size : self.num_replicas].tolist()
        # One seed per position of the global order, this rank's every num_replicas-th: the same image at the same
        # place of a global batch is augmented alike on any number of devices.
        seeded = torch.Generator().manual_seed(derived_seed(self.augment_seed, self.epoch))
        seeds = torch.randint(2**62, (self.total_size,), generator=seeded)[self.rank :: self.num_replicas].tolist()
        first = max(0, -(-(self.skip - self.rank) // self.num_replicas))  # positions p * num_replicas + rank < skip
        self.skip = 0
        return zip(seeds[first:], mine[first:], strict=True)


def balanced_weights(dataset: Dataset, num_classes: int) -> torch.Tensor:
    """Per-image draw weights that make every class equally frequent, from the dataset's ``targets`` (no image read)."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    if getattr(base, "targets", None) is None:
        raise UserError("--data.balanced_sampling: this dataset does not list its labels (no .targets)")
    labels = torch.as_tensor(base.targets)
    labels = labels if indices is None else labels[torch.as_tensor(indices)]
    return (1.0 / torch.bincount(labels, minlength=num_classes).clamp(min=1))[labels].double()


class SeededSamples(Dataset):
    """``dataset`` read with ``(seed, index)`` keys: each sample's random transforms draw from its own seed.

    It seeds torch's CPU generator, which torchvision's transforms draw from, and leaves it so: in a loader process
    nothing else draws from it, and in the training process (``num_workers=0``) ``seed_training_batch`` comes next.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds CUDA: 80 us a call without a GPU
        return self.dataset[index]
