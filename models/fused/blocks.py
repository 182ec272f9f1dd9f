"""The paper's blocks with their end (BatchNorm -> ECA -> + shortcut -> ReLU) run by ``dispatch``.

Each fused block adopts the plain block's own submodules under the same names,
so parameters, buffers and ``state_dict`` keys are the plain model's. Only
blocks whose attention is an ``eca_layer`` are fused: the block ends here know
ECA's one shared kernel, and other attention modules (SE, CBAM, ECA-NS) keep
their blocks plain.
"""
from typing import Optional, Type

import torch
from torch import nn

from ..eca_module import eca_layer
from ..mobilenetv2 import InvertedResidual
from ..resnet import BasicBlock, Bottleneck
from .dispatch import block_end


def adopt(module: nn.Module, source: nn.Module) -> None:
    """Give ``module`` the submodules (in order) and plain attributes (``stride``, ``downsample=None``, ...) of ``source``."""
    for name, child in source.named_children():
        module.add_module(name, child)
    for name, value in vars(source).items():
        if not name.startswith("_") and name != "training":
            setattr(module, name, value)
    module.train(source.training)


class FusedBlock(nn.Module):
    """A plain block's submodules and attributes, with a forward that ends in :func:`dispatch.block_end`."""

    plain_type: type

    def __init__(self, block: nn.Module, impl: str):
        super().__init__()
        adopt(self, block)
        self.impl = impl

    @staticmethod
    def fuses(block: nn.Module) -> bool:
        """Whether ``block`` (of ``plain_type``) ends in an ECA layer this block end can run."""
        return isinstance(getattr(block, "attention", None), eca_layer)

    def to_plain(self) -> nn.Module:
        """The plain block, holding these very submodules."""
        plain = self.plain_type.__new__(self.plain_type)
        nn.Module.__init__(plain)
        adopt(plain, self)
        del plain.impl
        return plain

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class FusedBasicBlock(FusedBlock):
    plain_type = BasicBlock
    expansion = BasicBlock.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return block_end(self.conv2(out), self.bn2, self.eca, identity, relu=True, impl=self.impl)


class FusedBottleneck(FusedBlock):
    plain_type = Bottleneck
    expansion = Bottleneck.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return block_end(self.conv3(out), self.bn3, self.eca, identity, relu=True, impl=self.impl)


class FusedInvertedResidual(FusedBlock):
    """``conv`` is [expand?, depthwise, project conv, project BatchNorm, ECA]: the last three end the block."""

    plain_type = InvertedResidual

    @staticmethod
    def fuses(block: nn.Module) -> bool:
        return isinstance(block.conv[-1], eca_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.conv[:-3]:
            out = layer(out)
        project, norm, eca = self.conv[-3:]
        shortcut: Optional[torch.Tensor] = x if self.use_res_connect else None
        return block_end(project(out), norm, eca, shortcut, relu=False, impl=self.impl)


FUSED_TYPES = {fused.plain_type: fused for fused in (FusedBasicBlock, FusedBottleneck, FusedInvertedResidual)}


def fused_type_of(block: nn.Module) -> Optional[Type[FusedBlock]]:
    """The fused block that can stand in for ``block``, or None (another module, or a block without ECA)."""
    fused_type = FUSED_TYPES.get(type(block))
    return fused_type if fused_type is not None and fused_type.fuses(block) else None
