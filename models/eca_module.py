"""The ECA layer: Efficient Channel Attention (Wang et al., CVPR 2020).

Each channel is re-weighted by a gate computed from the global average of its
own feature map and of its k neighbours in channel order, through one shared
1-D kernel of k numbers. No dimensionality reduction, k parameters in total.
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
    """Efficient Channel Attention over ``channel`` channels with a k-tap kernel.

    Attribute names (``avg_pool``, ``conv``, ``sigmoid``) and the single
    parameter ``conv.weight`` of shape ``[1, 1, k]`` are those of the original
    release, so its checkpoints load unchanged.
    """

    def __init__(self, channel: int, k_size: int = 3):
        super().__init__()
        if k_size < 1 or k_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd integer, got {k_size}")
        self.channels = channel
        self.k_size = k_size
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel weights in (0, 1), shaped ``[B, C, 1, 1]`` to broadcast over ``x``."""
        y = self.avg_pool(x)  # [B, C, 1, 1]
        # The channels become a 1-channel sequence so one kernel slides across them.
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return self.sigmoid(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)

    def forward_add(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """``self(x) + shortcut`` in one pass over memory, as residual blocks need it."""
        return torch.addcmul(shortcut, x, self.gate(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k_size={self.k_size}"
