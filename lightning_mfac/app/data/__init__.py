"""Lightning data modules for the experiment app.

Each takes ``batch_size``, ``num_workers`` and ``seed``, provides train/val/test loaders and
exposes what the app needs to size a model: ``num_classes`` (or ``vocab_size``) and, for
images, ``input_shape``/``in_channels``.
"""

from lightning_mfac.app.data.base import BaseDataModule
from lightning_mfac.app.data.cifar import CIFAR10DataModule
from lightning_mfac.app.data.digits import DigitsDataModule
from lightning_mfac.app.data.glue import GLUEDataModule, WordTokenizer
from lightning_mfac.app.data.imagefolder import ImageFolderDataModule
from lightning_mfac.app.data.synthetic import SyntheticDataModule
from lightning_mfac.app.data.text import TextCorpusDataModule

__all__ = [
    "BaseDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "GLUEDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "TextCorpusDataModule",
    "WordTokenizer",
]
