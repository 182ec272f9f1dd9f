"""ECA-MobileNetV2: MobileNetV2 with an ECA layer closing every inverted residual block.

The ECA layer is the last item of each block's ``conv`` Sequential, so its
kernel is stored as e.g. ``features.3.conv.4.conv.weight``, as in the original
release. The released weights (``k13``) use k = 1 for blocks narrower than 96
channels and k = 3 from there on.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .eca_module import adaptive_kernel_size, eca_layer
from .kernel_sizes import ADAPTIVE, KernelSpec, parse_kernel_sizes

__all__ = ["ConvBNReLU", "InvertedResidual", "ECA_MobileNetV2", "eca_mobilenet_v2"]

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


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1, linear), ECA; residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, k_size: int):
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
                eca_layer(oup, k_size),
            ]
        )
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def default_block_kernel_sizes() -> Tuple[int, ...]:
    """The released ``k13`` rule: k = 1 while a block's setting has c < 96, k = 3 from there on."""
    return tuple(1 if c < 96 else 3 for _, c, n, _ in INVERTED_RESIDUAL_SETTING for _ in range(n))


def resolve_block_kernel_sizes(k_size: KernelSpec, width_mult: float = 1.0) -> Tuple[int, ...]:
    """One kernel size per inverted residual block (17), from any accepted form."""
    if k_size is None:
        return default_block_kernel_sizes()
    sizes = parse_kernel_sizes(k_size, count=NUM_BLOCKS)
    if sizes == ADAPTIVE:
        return tuple(
            adaptive_kernel_size(int(c * width_mult)) for _, c, n, _ in INVERTED_RESIDUAL_SETTING for _ in range(n)
        )
    return sizes


class ECA_MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, kernel_sizes: Optional[Sequence[int]] = None):
        super().__init__()
        self.kernel_sizes = tuple(kernel_sizes) if kernel_sizes is not None else default_block_kernel_sizes()
        if len(self.kernel_sizes) != NUM_BLOCKS:
            raise ValueError(f"ECA-MobileNetV2 needs {NUM_BLOCKS} kernel sizes, got {len(self.kernel_sizes)}")
        input_channel = int(32 * width_mult)
        self.last_channel = int(1280 * max(1.0, width_mult))
        self.num_features = self.last_channel

        features: List[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
        block_kernels = iter(self.kernel_sizes)
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = int(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t, next(block_kernels)))
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


def eca_mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, k_size: KernelSpec = None) -> ECA_MobileNetV2:
    """ECA-MobileNetV2 (width 1.0). Default kernel sizes: the released ``eca_mobilenetv2_k13.pth.tar`` rule.

    ``k_size`` may also give one kernel per block (17 values), one odd integer
    for all blocks, or ``"adaptive"`` (Eq. 12 over each block's output channels).
    """
    kernel_sizes = resolve_block_kernel_sizes(k_size, width_mult)
    return ECA_MobileNetV2(num_classes=num_classes, width_mult=width_mult, kernel_sizes=kernel_sizes)
