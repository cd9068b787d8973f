"""MobileNetV1 (Howard et al., 2017), the ImageNet model of the M-FAC paper's pruning runs.

A 3x3 stem followed by 13 depthwise-separable blocks (depthwise 3x3 + pointwise 1x1, each
with BatchNorm and ReLU), global average pooling and a linear classifier. The width
multiplier scales every channel count.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MobileNetV1", "mobilenet_v1"]

# (output channels, stride) of the depthwise-separable blocks, Table 1 of the paper.
_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3):
        super().__init__()

        def width(ch: int) -> int:
            return max(8, int(ch * width_mult))

        layers = [_conv_bn_relu(in_channels, width(32), 3, 2)]
        in_ch = width(32)
        for out, stride in _BLOCKS:
            out_ch = width(out)
            layers.append(
                nn.Sequential(
                    _conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch),
                    _conv_bn_relu(in_ch, out_ch, 1, 1),
                )
            )
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v1(num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3) -> MobileNetV1:
    """MobileNetV1; 4.2M parameters at ``width_mult=1`` and 1000 classes."""
    return MobileNetV1(num_classes, width_mult, in_channels)
