"""ECA-NS (Table 2): ECA's local cross-channel gate with a separate k-tap kernel for every channel.

The paper's ablation of weight sharing: channel i's weight still depends on
its k neighbours only, but through its own kernel (k * C parameters per layer
instead of ECA's k). As in the original's ``eca_ns.py``, the neighbourhoods
are unfolded into ``[B, C, k]`` and a depthwise ``Conv1d(C, C, k, groups=C)``
applies one kernel per channel; parameter ``conv.weight`` is ``[C, 1, k]``.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["eca_ns_layer"]


class eca_ns_layer(nn.Module):
    """ECA without weight sharing over ``channel`` channels, ``k_size`` taps each (the original's ``eca_ns.eca_layer``)."""

    # Where a block keeps it: in place of ECA, under ECA's name, as the original would plug it in.
    attribute_name = "eca"

    def __init__(self, channel: int, k_size: int = 3):
        super().__init__()
        if k_size < 1 or k_size % 2 == 0:
            raise ValueError(f"ECA-NS kernel size must be a positive odd integer, got {k_size}")
        self.channels = channel
        self.k_size = k_size
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(channel, channel, kernel_size=k_size, groups=channel, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.avg_pool(x)  # [B, C, 1, 1]
        # [B, 1, 1, C] -> each channel's k neighbours (zero-padded at the ends) as [B, k, C] -> [B, C, k]
        y = F.unfold(y.transpose(-1, -3), kernel_size=(1, self.k_size), padding=(0, (self.k_size - 1) // 2))
        y = self.conv(y.transpose(-1, -2)).unsqueeze(-1)  # [B, C, 1, 1]: channel i through its own kernel
        y = self.sigmoid(y)
        return x * y.expand_as(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k_size={self.k_size}"
