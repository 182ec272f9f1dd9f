"""CBAM (Woo et al., ECCV 2018): channel attention, then spatial attention, over a block's output.

* Channel: the map's global average and global maximum per channel go through
  one shared MLP (C -> C/16 -> C, ReLU between), their outputs are summed, and
  ``sigmoid`` of the sum re-weights the channels.
* Spatial: the mean and the maximum over channels at each position (``[avg, max]``,
  the paper's order), a 7x7 convolution to one map, BatchNorm as in the authors'
  code, and ``sigmoid`` re-weights the positions.

The MLP carries no biases, as the SE layers here (``se_module``), so CBAM and SE
differ only in what CBAM adds; that is also what the paper's 26.77M for both
on ResNet-50 counts.
"""
import torch
from torch import nn

from .se_module import SE_REDUCTION

__all__ = ["CBAM", "ChannelGate", "SpatialGate", "ChannelPool"]


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both descriptors in one batch [2B, C]: the shared MLP runs once, and is counted as applied twice.
        descriptors = torch.cat([self.avg_pool(x).flatten(1), self.max_pool(x).flatten(1)])
        from_avg, from_max = self.mlp(descriptors).chunk(2)
        return x * self.sigmoid(from_avg + from_max)[..., None, None].expand_as(x)


class ChannelPool(nn.Module):
    """``[mean, max]`` over the channels at every position: ``[B, 2, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)


class SpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.pool = ChannelPool()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        # The authors' code: BatchNorm after the convolution, with their momentum.
        self.bn = nn.BatchNorm2d(1, momentum=0.01)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.bn(self.conv(self.pool(x))))


class CBAM(nn.Module):
    """Channel then spatial attention over ``channels`` channels; kept by a block as ``cbam``."""

    attribute_name = "cbam"

    def __init__(self, channels: int, reduction: int = SE_REDUCTION, spatial_kernel: int = 7):
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_gate(self.channel_gate(x))
