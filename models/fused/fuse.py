"""``fuse_eca(model, impl)``: swap each ECA block's end for a fused one, in place (skeleton)."""
from torch import nn

IMPLS = ("auto", "reference", "cpu", "triton")


def fuse_eca(model: nn.Module, impl: str = "auto") -> nn.Module:
    if impl not in IMPLS:
        raise ValueError(f"unknown ECA implementation {impl!r}: choose one of {', '.join(IMPLS)}")
    return model
