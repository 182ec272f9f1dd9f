"""ECA-ResNet: ResNet with an ECA layer at the end of every residual branch.

The ECA gate re-weights the branch's channels just before the shortcut is
added, so attention shapes what each block contributes, never the identity.
Module and parameter names follow the original release (``layer3.4.eca.conv.weight``,
``layer2.0.downsample.0.weight``, ...), so its checkpoints load with ``strict=True``.
"""
import math
from typing import List, Optional, Sequence, Type, Union

import torch
from torch import nn

from .eca_module import adaptive_kernel_size, eca_layer
from .kernel_sizes import ADAPTIVE, KernelSpec, parse_kernel_sizes

__all__ = [
    "ECABasicBlock",
    "ECABottleneck",
    "ResNet",
    "eca_resnet18",
    "eca_resnet34",
    "eca_resnet50",
    "eca_resnet101",
    "eca_resnet152",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ECABasicBlock(nn.Module):
    """Two 3x3 convolutions, ECA over their output, then the shortcut (the paper's Fig. 2 in a basic block)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None, k_size: int = 3
    ):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.eca = eca_layer(planes, k_size)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.eca(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class ECABottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, ECA over 4 * planes, then the shortcut."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None, k_size: int = 3
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.eca = eca_layer(planes * self.expansion, k_size)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)
        out = self.eca(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


Block = Type[Union[ECABasicBlock, ECABottleneck]]
STAGE_PLANES = (64, 128, 256, 512)


class ResNet(nn.Module):
    """The ResNet trunk with one ECA kernel size per stage (``kernel_sizes``)."""

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, kernel_sizes: Sequence[int] = (3, 3, 3, 3)):
        super().__init__()
        self.kernel_sizes = tuple(kernel_sizes)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], kernel_sizes[0])
        self.layer2 = self._make_layer(block, 128, layers[1], kernel_sizes[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], kernel_sizes[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], kernel_sizes[3], stride=2)
        # Adaptive pooling equals the original's AvgPool2d(7) at 224 px and works at any size.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He initialisation over fan-out, as the original; the ECA Conv1d keeps PyTorch's default.
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: Block, planes: int, blocks: int, k_size: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, k_size)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes, k_size=k_size) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling: ``[B, 512 * expansion, H/32, W/32]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resolve_resnet_kernel_sizes(k_size: KernelSpec, block: Block, default: str) -> tuple:
    """Per-stage kernel sizes; ``adaptive`` applies Eq. 12 to the channels each stage's ECA sees."""
    sizes = parse_kernel_sizes(default if k_size is None else k_size, count=4)
    if sizes == ADAPTIVE:
        return tuple(adaptive_kernel_size(planes * block.expansion) for planes in STAGE_PLANES)
    return sizes


def _resnet(block: Block, layers: Sequence[int], k_size: KernelSpec, default: str, num_classes: int) -> ResNet:
    kernel_sizes = resolve_resnet_kernel_sizes(k_size, block, default)
    return ResNet(block, layers, num_classes=num_classes, kernel_sizes=kernel_sizes)


def eca_resnet18(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-18. Default kernel sizes 3577, those of the released ``eca_resnet18_k3577.pth.tar``."""
    return _resnet(ECABasicBlock, [2, 2, 2, 2], k_size, "3577", num_classes)


def eca_resnet34(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-34. Default kernel sizes 3357, those of the released ``eca_resnet34_k3357.pth.tar``."""
    return _resnet(ECABasicBlock, [3, 4, 6, 3], k_size, "3357", num_classes)


def eca_resnet50(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-50. Default kernel sizes 3557, those of the released ``eca_resnet50_k3557.pth.tar``."""
    return _resnet(ECABottleneck, [3, 4, 6, 3], k_size, "3557", num_classes)


def eca_resnet101(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-101. Default kernel sizes 3357, those of the released ``eca_resnet101_k3357.pth.tar``."""
    return _resnet(ECABottleneck, [3, 4, 23, 3], k_size, "3357", num_classes)


def eca_resnet152(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-152. Default kernel sizes 3357, those of the released ``eca_resnet152_k3357.pth.tar``."""
    return _resnet(ECABottleneck, [3, 8, 36, 3], k_size, "3357", num_classes)
