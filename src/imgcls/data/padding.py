"""Evaluation split between processes without repeating images, which would bias the metrics."""

from typing import Any

from torch.utils.data import Dataset

IGNORE_INDEX = -100  # the label of padding: cross_entropy's default ignore_index, and the metrics' too


class PaddedForRanks(Dataset):
    """``dataset`` padded to a multiple of ``world`` with copies of its first image labelled ``IGNORE_INDEX``."""

    def __init__(self, dataset: Dataset, world: int) -> None:
        self.dataset, self.size = dataset, len(dataset)
        self.padded = -(-self.size // world) * world

    def __len__(self) -> int:
        return self.padded

    def __getitem__(self, index: int) -> Any:
        if index < self.size:
            return self.dataset[index]
        return self.dataset[0][0], IGNORE_INDEX
