"""The ECA layer: Efficient Channel Attention (Wang et al., CVPR 2020), as the paper draws it.

Each channel is re-weighted by a gate computed from the global average of its
own map and of its k neighbours in channel order, through ONE shared 1-D kernel
of k numbers: no dimensionality reduction, k parameters in all (Fig. 2).

This module is the reference for every faster implementation (``models.fuse_eca``):
the tests' oracle, what graph capture sees, and in float64 bit-identical to the
original release.
"""
import math

import torch
from torch import nn

__all__ = ["eca_layer", "adaptive_kernel_size"]


def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's Eq. 12: the odd kernel size nearest to (log2(C) + b) / gamma."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class eca_layer(nn.Module):
    """Efficient Channel Attention over ``channel`` channels with a ``k_size``-tap kernel.

    The names (``avg_pool``, ``conv``, ``sigmoid``; the one parameter
    ``conv.weight`` of shape ``[1, 1, k]``) are the original release's, so its
    checkpoints load unchanged.
    """

    # A block keeps it as ``eca``: the released checkpoints' ``layer1.0.eca.conv.weight``.
    attribute_name = "eca"

    def __init__(self, channel: int, k_size: int = 3):
        super().__init__()
        if k_size < 1 or k_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd integer, got {k_size}")
        self.channels = channel
        self.k_size = k_size
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.avg_pool(x)  # [B, C, 1, 1]: one descriptor per channel
        # The channels as a sequence [B, 1, C]: each weight sees its k neighbours, zero-padded at the ends.
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        y = self.sigmoid(y)
        return x * y.expand_as(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k_size={self.k_size}"
