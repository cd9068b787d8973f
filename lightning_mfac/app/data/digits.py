"""The offline quickstart data set: scikit-learn's 8x8 handwritten digits (1,797 images)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_mfac.app.data.base import BaseDataModule, split_indices

__all__ = ["DigitsDataModule"]


class DigitsDataModule(BaseDataModule):
    """Digits as ``(1, 8, 8)`` float images in [0, 1] with integer labels 0-9.

    The data ships inside scikit-learn, so this works without network access. The
    train/val/test split (default 70/15/15) is a seeded random permutation.
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    in_channels = 1

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
    ):
        super().__init__(batch_size, num_workers, seed)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} is out of range: expected a fraction in [0, 1).")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction={val_fraction} + test_fraction={test_fraction} leaves no training "
                             "images: expected fractions that sum to less than 1.")
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are counts of set cells in 4x4 blocks of the original 32x32 bitmap: 0..16.
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        n = len(y)
        sizes = (round(self.val_fraction * n), round(self.test_fraction * n))
        train, val, test = split_indices(n, sizes, self.seed)
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])
