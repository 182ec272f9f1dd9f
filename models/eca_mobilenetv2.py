"""ECA-MobileNetV2: the MobileNetV2 of ``mobilenetv2.py`` with an ECA layer closing every inverted residual block.

The ECA layer is the last item of each block's ``conv`` Sequential, so its
kernel is stored as e.g. ``features.3.conv.4.conv.weight``, as in the original
release. The released weights (``k13``) use k = 1 for blocks narrower than 96
channels and k = 3 from there on.
"""
import functools
from typing import Tuple

from .eca_module import adaptive_kernel_size, eca_layer
from .kernel_sizes import ADAPTIVE, KernelSpec, parse_kernel_sizes
from .mobilenetv2 import INVERTED_RESIDUAL_SETTING, NUM_BLOCKS, MobileNetV2

__all__ = ["eca_mobilenet_v2", "default_block_kernel_sizes", "resolve_block_kernel_sizes"]


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


def eca_mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, k_size: KernelSpec = None) -> MobileNetV2:
    """ECA-MobileNetV2 (width 1.0). Default kernel sizes: the released ``eca_mobilenetv2_k13.pth.tar`` rule.

    ``k_size`` may also give one kernel per block (17 values), one odd integer
    for all blocks, or ``"adaptive"`` (Eq. 12 over each block's output channels).
    """
    kernel_sizes = resolve_block_kernel_sizes(k_size, width_mult)
    blocks = [functools.partial(eca_layer, k_size=k) for k in kernel_sizes]
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, attn_layer=blocks)
