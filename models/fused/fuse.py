"""``fuse_eca(model, impl)``: the explicit transformation from the paper's model to a fast one."""
from torch import nn

from .blocks import FusedBlock, fused_type_of
from .dispatch import IMPLS, check_impl


def fuse_eca(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Give every ECA block of ``model`` a fused end run by ``impl``, in place; returns ``model``.

    Blocks with another attention module (SE, CBAM, ECA-NS) or none, and
    models without ECA blocks, are left as they are.

    Like torchvision's quantizable ``fuse_model()``, this swaps modules and
    keeps every parameter and buffer under its name, so ``state_dict``,
    ``strict=True`` loading, DDP and EMA behave as on the plain model.
    ``impl="reference"`` makes the blocks plain again. A single block passed
    as ``model`` cannot be swapped in place: the fused block is returned.
    """
    check_impl(impl)
    swapped = _swapped(model, impl)
    if swapped is not None:
        return swapped
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            swapped = _swapped(child, impl)
            if swapped is not None:
                setattr(module, child_name, swapped)
    return model


def _swapped(module: nn.Module, impl: str):
    """``module`` as a block run by ``impl``, or None when it is not an ECA block."""
    plain = module.to_plain() if isinstance(module, FusedBlock) else module
    fused_type = fused_type_of(plain)
    if fused_type is None:
        return None
    return plain if impl == "reference" else fused_type(plain, impl)


__all__ = ["IMPLS", "fuse_eca"]
