"""CIFAR-10 from the original python pickle batches, read by ``torchvision.datasets.CIFAR10``."""

from __future__ import annotations

import os
from pathlib import Path

from torchvision import transforms
from torchvision.datasets import CIFAR10

from lightning_mfac.app.data.base import BaseDataModule, TransformedSubset, split_indices

__all__ = ["CIFAR10DataModule"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _PresentCIFAR10(CIFAR10):
    """CIFAR10 that checks the batch files exist instead of hashing them.

    torchvision compares every file with the md5 of the official release, which rejects any
    other file in the same format (a subset, the small files tests write) and re-hashes 180 MB
    on every start. The module verifies checksums where it matters, when it downloads
    (``prepare_data`` with ``download=True`` uses the stock, md5-checking class); files already
    in ``data_dir`` are trusted.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10 with the usual crop-and-flip augmentation and per-channel normalisation.

    ``data_dir`` contains (or receives, with ``download=True``) ``cifar-10-batches-py/``.
    ``val_size`` training images, chosen by ``seed``, form the validation split (never
    augmented); ``val_size=0`` validates on the test batch instead, as most CIFAR papers report.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    in_channels = 3

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = False,
        augment: bool = True,
        val_size: int = 5000,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.augment = bool(augment)
        self.val_size = int(val_size)

    def prepare_data(self) -> None:
        if self.download:
            CIFAR10(self.data_dir, train=True, download=True)

    def _check_files(self) -> None:
        folder = Path(self.data_dir) / CIFAR10.base_folder
        names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found under data_dir={self.data_dir!r}: missing {', '.join(missing)} in "
                f"{folder}. Set download=True (needs network) or point data_dir at the folder that "
                f"contains {CIFAR10.base_folder}/."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_files()
        normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        augment = (
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if self.augment else []
        )
        train_tf = transforms.Compose(augment + normalize)
        eval_tf = transforms.Compose(normalize)

        root = os.fspath(self.data_dir)
        train_data = _PresentCIFAR10(root, train=True)
        test_data = _PresentCIFAR10(root, train=False)
        n = len(train_data)
        if not 0 <= self.val_size < n:
            raise ValueError(f"val_size={self.val_size} must be in [0, {n}) for {n} training images")
        train_idx, val_idx = split_indices(n, (self.val_size,), self.seed)
        self.train_set = TransformedSubset(train_data, train_idx, train_tf)
        self.test_set = TransformedSubset(test_data, range(len(test_data)), eval_tf)
        self.val_set = TransformedSubset(train_data, val_idx, eval_tf) if self.val_size else self.test_set
