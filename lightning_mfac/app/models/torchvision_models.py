"""torchvision ImageNet models with a configurable head (and optional pretrained weights)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["mobilenet_v2", "resnet18", "resnet50"]


def _build(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(name, weights=None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=weights)
    except OSError as err:  # urllib's URLError is an OSError: no network, or a broken cache file
        raise RuntimeError(
            f"could not fetch pretrained weights {weights} for {name} ({err}). Without network "
            f"access, place the file {weights.url.rsplit('/', 1)[-1]} in "
            "$TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints), or use pretrained=False."
        ) from err


def _replace_head(get: Callable[[], nn.Linear], set_: Callable[[nn.Linear], None], num_classes: int) -> None:
    head = get()
    if head.out_features != num_classes:
        set_(nn.Linear(head.in_features, num_classes))


def _cifar_stem(model: nn.Module) -> None:
    # The 7x7/2 stem and the max pool reduce a 32x32 image to 8x8 before the first block;
    # small-image setups use a 3x3/1 stem without pooling instead.
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def resnet18(num_classes: int = 1000, pretrained: bool = False, cifar_stem: bool = False) -> nn.Module:
    """torchvision ResNet-18 (11.7M parameters at 1000 classes)."""
    model = _build("resnet18", pretrained)
    _replace_head(lambda: model.fc, lambda m: setattr(model, "fc", m), num_classes)
    if cifar_stem:
        _cifar_stem(model)
    return model


def resnet50(num_classes: int = 1000, pretrained: bool = False, cifar_stem: bool = False) -> nn.Module:
    """torchvision ResNet-50 (25.6M parameters at 1000 classes)."""
    model = _build("resnet50", pretrained)
    _replace_head(lambda: model.fc, lambda m: setattr(model, "fc", m), num_classes)
    if cifar_stem:
        _cifar_stem(model)
    return model


def mobilenet_v2(num_classes: int = 1000, pretrained: bool = False) -> nn.Module:
    """torchvision MobileNetV2 (3.5M parameters at 1000 classes)."""
    model = _build("mobilenet_v2", pretrained)
    _replace_head(lambda: model.classifier[-1], lambda m: model.classifier.__setitem__(-1, m), num_classes)
    return model
