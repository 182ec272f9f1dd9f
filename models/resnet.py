"""ResNet with an attention module at the end of every residual branch, or none (torchvision's ResNet).

The attention re-weights the branch's output after its last BatchNorm and
before the shortcut is added, where the paper (and SENet before it) puts it, so
attention shapes what each block contributes, never the identity. The
attention is a constructor argument, as timm's ``attn_layer``: ECA, SE and its
variants, ECA-NS and CBAM are the same network with another module there.

Module and parameter names are torchvision's, plus the attention under the name
its class gives (``layer3.4.eca.conv.weight``, ``layer1.0.se.fc.0.weight``), so
torchvision's ResNet weights and the released ECA checkpoints load with ``strict=True``.
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

__all__ = [
    "AttentionLayer",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "DEPTHS",
    "STAGE_PLANES",
    "build_resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

# Builds the attention over a block's ``channels`` output channels.
AttentionLayer = Callable[[int], nn.Module]
# One for every stage, or one per stage (ECA's kernel size changes from stage to stage).
StageAttention = Union[None, AttentionLayer, Sequence[Optional[AttentionLayer]]]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """What both blocks share: the attention over the branch, kept under the name its class gives."""

    attention_name: Optional[str]

    def add_attention(self, attn_layer: Optional[AttentionLayer], channels: int) -> None:
        """Register ``attn_layer(channels)`` as ``eca``, ``se``, ``cbam``, ... (its ``attribute_name``)."""
        self.attention_name = None
        if attn_layer is not None:
            attention = attn_layer(channels)
            self.attention_name = getattr(attention, "attribute_name", "attention")
            self.add_module(self.attention_name, attention)

    @property
    def attention(self) -> Optional[nn.Module]:
        """The attention over the branch's output; None in a plain ResNet."""
        return self._modules[self.attention_name] if self.attention_name is not None else None


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions, the attention over their output, then the shortcut."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        attn_layer: Optional[AttentionLayer] = None,
    ):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.add_attention(attn_layer, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        if self.attention is not None:
            out = self.attention(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's V1.5), 1x1 expand, the attention over 4 * planes, the shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        attn_layer: Optional[AttentionLayer] = None,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.add_attention(attn_layer, planes * self.expansion)
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
        if self.attention is not None:
            out = self.attention(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


Block = Type[Union[BasicBlock, Bottleneck]]
STAGE_PLANES = (64, 128, 256, 512)
# depth -> (block, blocks per stage)
DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def per_stage(attn_layer: StageAttention) -> Tuple[Optional[AttentionLayer], ...]:
    if attn_layer is None or callable(attn_layer):
        return (attn_layer,) * len(STAGE_PLANES)
    layers = tuple(attn_layer)
    if len(layers) != len(STAGE_PLANES):
        raise ValueError(f"attn_layer needs one entry per stage ({len(STAGE_PLANES)}), got {len(layers)}")
    return layers


class ResNet(nn.Module):
    """The ResNet trunk; ``attn_layer`` (one for all stages, or one per stage) closes every block's branch."""

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, attn_layer: StageAttention = None):
        super().__init__()
        stage_attention = per_stage(attn_layer)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stage_attention[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stage_attention[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stage_attention[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stage_attention[3], stride=2)
        # Adaptive pooling equals the original's AvgPool2d(7) at 224 px and works at any size.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He initialisation over fan-out, as the original ECA release and torchvision (the same
                # distribution); Conv1d and Linear layers (ECA, SE) keep PyTorch's defaults.
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: Block, planes: int, blocks: int, attn_layer: Optional[AttentionLayer], stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, attn_layer)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes, attn_layer=attn_layer) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    @property
    def kernel_sizes(self) -> Tuple[int, ...]:
        """The ECA kernel size of each stage, as ``--ksize`` writes them; empty for a network without ECA layers."""
        sizes = tuple(getattr(getattr(stage[0], "eca", None), "k_size", None)
                      for stage in (self.layer1, self.layer2, self.layer3, self.layer4))
        return () if None in sizes else sizes

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


def build_resnet(depth: int, attn_layer: StageAttention = None, num_classes: int = 1000) -> ResNet:
    """The ResNet of ``depth`` (18, 34, 50, 101, 152) with ``attn_layer`` in every block."""
    block, layers = DEPTHS[depth]
    return ResNet(block, layers, num_classes=num_classes, attn_layer=attn_layer)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 without attention; torchvision's ``resnet18`` names and shapes, so its weights load."""
    return build_resnet(18, None, num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    """ResNet-34 without attention; torchvision's ``resnet34`` names and shapes, so its weights load."""
    return build_resnet(34, None, num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 without attention (Table 2's vanilla); torchvision's ``resnet50`` names and shapes."""
    return build_resnet(50, None, num_classes)


def resnet101(num_classes: int = 1000) -> ResNet:
    """ResNet-101 without attention; torchvision's ``resnet101`` names and shapes, so its weights load."""
    return build_resnet(101, None, num_classes)


def resnet152(num_classes: int = 1000) -> ResNet:
    """ResNet-152 without attention; torchvision's ``resnet152`` names and shapes, so its weights load."""
    return build_resnet(152, None, num_classes)
