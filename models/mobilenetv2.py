"""MobileNetV2 with an attention module closing every inverted residual block, or none (torchvision's).

The attention is the last item of each block's ``conv`` Sequential, after the
projection's BatchNorm, so ECA's kernel is stored as e.g.
``features.3.conv.4.conv.weight`` as in the original release, and without
attention the names and shapes are torchvision's ``mobilenet_v2``.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .resnet import AttentionLayer

__all__ = ["ConvBNReLU", "InvertedResidual", "MobileNetV2", "INVERTED_RESIDUAL_SETTING", "NUM_BLOCKS", "mobilenet_v2"]

# t (expansion), c (output channels), n (blocks), s (stride of the first block)
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
NUM_BLOCKS = sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING)
# One for every block, or one per block (ECA's kernel size changes along the network).
BlockAttention = Union[None, AttentionLayer, Sequence[Optional[AttentionLayer]]]


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1, linear), the attention; residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, attn_layer: Optional[AttentionLayer] = None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup

        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        if attn_layer is not None:
            layers.append(attn_layer(oup))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def per_block(attn_layer: BlockAttention) -> Tuple[Optional[AttentionLayer], ...]:
    if attn_layer is None or callable(attn_layer):
        return (attn_layer,) * NUM_BLOCKS
    layers = tuple(attn_layer)
    if len(layers) != NUM_BLOCKS:
        raise ValueError(f"attn_layer needs one entry per inverted residual block ({NUM_BLOCKS}), got {len(layers)}")
    return layers


class MobileNetV2(nn.Module):
    """MobileNetV2; ``attn_layer`` (one for all blocks, or one per block) closes every inverted residual block.

    The head's dropout is 0.25 with or without attention (the original ECA
    release's; torchvision's is 0.2), so that the two differ by the attention only.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, attn_layer: BlockAttention = None):
        super().__init__()
        block_attention = iter(per_block(attn_layer))
        input_channel = int(32 * width_mult)
        self.last_channel = int(1280 * max(1.0, width_mult))
        self.num_features = self.last_channel

        features: List[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = int(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t, next(block_attention)))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.25), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def kernel_sizes(self) -> Tuple[int, ...]:
        """The ECA kernel size of each inverted residual block; empty for a network without ECA layers."""
        sizes = tuple(getattr(block.conv[-1], "k_size", None) for block in self.features[1:-1])
        return () if None in sizes else sizes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling: ``[B, 1280, H/32, W/32]``."""
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        # Two successive means, as the original, so float64 logits agree to the last bit.
        return self.classifier(features.mean(-1).mean(-1))

    @property
    def num_classes(self) -> int:
        return self.classifier[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (width 1.0) without attention; torchvision's ``mobilenet_v2`` names and shapes, so its weights load."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)
