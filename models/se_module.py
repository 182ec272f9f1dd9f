"""Squeeze-and-Excitation (Hu et al.) and the paper's three variants of it (Table 2).

Every gate here pools each channel to its global average ``y`` (``[B, C]``) and
re-weights the channel by ``sigmoid(f(y))``; they differ only in ``f``:

* SE: ``W2 relu(W1 y)``, FC C -> C/16 -> C, ``2 C^2 / 16`` parameters.
* SE-Var1: ``f(y) = y``, no parameters.
* SE-Var2: ``w * y``, one weight per channel (a diagonal ``W``): C parameters.
* SE-Var3: ``W y``, one full C x C layer, no reduction: C^2 parameters.

The FC layers carry no biases, so that the parameters are the paper's counts
(Table 2's ``2 x C^2 / r``, C, C^2 and Table 3's 26.77M for SE-ResNet-50) and
the names are those of ``senet.pytorch``'s ``SELayer`` (``se.fc.0.weight``,
``se.fc.2.weight``), the SE-ResNet this paper's code descends from (a released
ECA checkpoint still says ``arch: se_resnet50``).
"""
import torch
from torch import nn

__all__ = ["SELayer", "SEVar1", "SEVar2", "SEVar3"]

SE_REDUCTION = 16


class SELayer(nn.Module):
    """SE over ``channel`` channels: GAP, FC C -> C/r, ReLU, FC C/r -> C, sigmoid, rescale."""

    attribute_name = "se"

    def __init__(self, channel: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.avg_pool(x).flatten(1))
        return x * y[..., None, None].expand_as(x)


class SEVar1(nn.Module):
    """SE-Var1: ``x * sigmoid(GAP(x))``, no parameters (Table 2)."""

    attribute_name = "se"

    def __init__(self, channel: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.avg_pool(x)).expand_as(x)


class SEVar2(nn.Module):
    """SE-Var2: one weight per channel, ``sigmoid(w * GAP(x))`` (Table 2): ECA-NS with one tap.

    ``conv`` is a depthwise 1-tap ``Conv1d`` (``conv.weight`` is ``[C, 1, 1]``), so
    the weights start as PyTorch starts such a layer, as ECA-NS's kernels do.
    """

    attribute_name = "se"

    def __init__(self, channel: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(channel, channel, kernel_size=1, groups=channel, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.avg_pool(x).squeeze(-1))  # [B, C, 1]
        return x * self.sigmoid(y).unsqueeze(-1).expand_as(x)


class SEVar3(nn.Module):
    """SE-Var3: one full C x C layer without reduction, ``sigmoid(W GAP(x))`` (Table 2)."""

    attribute_name = "se"

    def __init__(self, channel: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channel, channel, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sigmoid(self.fc(self.avg_pool(x).flatten(1)))
        return x * y[..., None, None].expand_as(x)
