"""Shared plumbing of the data modules: seeded loaders over train/val/test datasets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["BaseDataModule"]


class BaseDataModule(pl.LightningDataModule):
    """Subclasses fill ``train_set``/``val_set``/``test_set`` in ``setup``."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, pin_memory: bool = False):
        super().__init__()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.collate_fn: Callable[[list], Any] | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool, stage: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created the {stage} split")
        # A seeded generator makes the shuffling order reproducible across runs.
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=generator,
            collate_fn=self.collate_fn,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, "train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, "test")


def split_indices(n: int, holdout_sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """A seeded random partition of ``range(n)`` into the rest followed by parts of the given sizes."""
    sizes = [int(s) for s in holdout_sizes]
    rest = n - sum(sizes)
    if rest <= 0 or min(sizes, default=0) < 0:
        raise ValueError(f"cannot hold out {sizes} of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, [rest, *sizes]))


class TransformedSubset(Dataset):
    """``indices`` of an ``(image, label)`` dataset with its own image transform.

    Lets a training split (augmented) and a validation split (not augmented) share one loaded
    copy of the underlying data.
    """

    def __init__(self, dataset: Dataset, indices: torch.Tensor | list[int], transform: Callable | None):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.indices[i]]
        return (self.transform(image) if self.transform is not None else image), label
