"""Models for the experiment app: the paper's CIFAR ResNets and MobileNetV1, a quickstart CNN,
torchvision ImageNet models and small Transformers (the latter need ``transformers``)."""

from lightning_mfac.app.models.mobilenet_v1 import MobileNetV1, mobilenet_v1
from lightning_mfac.app.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from lightning_mfac.app.models.small_cnn import QuickstartCNN, quickstart_cnn
from lightning_mfac.app.models.torchvision_models import mobilenet_v2, resnet18, resnet50
from lightning_mfac.app.models.transformers_models import bert_classifier, gpt_lm

__all__ = [
    "CifarResNet",
    "MobileNetV1",
    "QuickstartCNN",
    "bert_classifier",
    "gpt_lm",
    "mobilenet_v1",
    "mobilenet_v2",
    "quickstart_cnn",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet50",
]
