"""ImageNet-style image folders: ``data_dir/train/<class>/*.JPEG`` and ``data_dir/val/<class>/...``."""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from lightning_mfac.app.data.base import BaseDataModule

__all__ = ["ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(BaseDataModule):
    """Class-per-subfolder image data with the standard ImageNet preprocessing.

    Training images get a random resized crop and a flip; evaluation images are resized to
    ``image_size / 0.875`` and center-cropped. The test split is ``data_dir/test`` if it exists,
    else ``val`` (ImageNet's test labels are not public).
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.data_dir = str(data_dir)
        self.image_size = int(image_size)
        self.augment = bool(augment)
        self.input_shape = (3, self.image_size, self.image_size)
        self.in_channels = 3
        self._classes: list[str] | None = None

    def _folder(self, split: str) -> Path:
        folder = Path(self.data_dir) / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"image folder {folder} not found: data_dir={self.data_dir!r} must contain train/ and "
                "val/ with one subfolder of images per class"
            )
        return folder

    @property
    def classes(self) -> list[str]:
        # Read from the directory listing so the app can size the model head before setup().
        if self._classes is None:
            self._classes = find_classes(self._folder("train"))[0]
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if self.augment:
            train_tf = [transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip()]
        else:
            train_tf = [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)]
        eval_tf = [transforms.Resize(round(self.image_size / 0.875)), transforms.CenterCrop(self.image_size)]

        train_dir, val_dir = self._folder("train"), self._folder("val")
        self.train_set = ImageFolder(train_dir, transform=transforms.Compose(train_tf + normalize))
        self.val_set = ImageFolder(val_dir, transform=transforms.Compose(eval_tf + normalize))
        if self.val_set.classes != self.train_set.classes:
            raise ValueError(f"class folders of {val_dir} differ from those of {train_dir}")
        test_dir = Path(self.data_dir) / "test"
        self.test_set = (
            ImageFolder(test_dir, transform=transforms.Compose(eval_tf + normalize))
            if test_dir.is_dir()
            else self.val_set
        )
        self._classes = self.train_set.classes
