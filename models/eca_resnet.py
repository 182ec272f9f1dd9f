"""ECA-ResNet: the ResNet of ``resnet.py`` with an ECA layer at the end of every residual branch.

Module and parameter names follow the original release (``layer3.4.eca.conv.weight``,
``layer2.0.downsample.0.weight``, ...), so its checkpoints load with ``strict=True``.
ECA-NS (Table 2), the same gate with one kernel per channel, sits in the same place
under the same name, as the original's ``eca_ns.py`` would in its ``eca_resnet.py``.
"""
import functools
from typing import Callable, Tuple

from torch import nn

from .eca_module import adaptive_kernel_size, eca_layer
from .eca_ns import eca_ns_layer
from .kernel_sizes import ADAPTIVE, KernelSpec, parse_kernel_sizes
from .resnet import DEPTHS, STAGE_PLANES, ResNet, build_resnet

__all__ = [
    "eca_resnet18",
    "eca_resnet34",
    "eca_resnet50",
    "eca_resnet101",
    "eca_resnet152",
    "eca_ns_resnet50",
    "resolve_resnet_kernel_sizes",
]


def resolve_resnet_kernel_sizes(k_size: KernelSpec, depth: int, default: str) -> Tuple[int, ...]:
    """Per-stage kernel sizes; ``adaptive`` applies Eq. 12 to the channels each stage's ECA sees."""
    sizes = parse_kernel_sizes(default if k_size is None else k_size, count=len(STAGE_PLANES))
    if sizes == ADAPTIVE:
        expansion = DEPTHS[depth][0].expansion
        return tuple(adaptive_kernel_size(planes * expansion) for planes in STAGE_PLANES)
    return sizes


def _with_kernels(layer: Callable[..., nn.Module], depth: int, k_size: KernelSpec, default: str, num_classes: int) -> ResNet:
    kernel_sizes = resolve_resnet_kernel_sizes(k_size, depth, default)
    stages = [functools.partial(layer, k_size=k) for k in kernel_sizes]
    return build_resnet(depth, stages, num_classes)


def eca_resnet18(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-18. Default kernel sizes 3577, those of the released ``eca_resnet18_k3577.pth.tar``."""
    return _with_kernels(eca_layer, 18, k_size, "3577", num_classes)


def eca_resnet34(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-34. Default kernel sizes 3357, those of the released ``eca_resnet34_k3357.pth.tar``."""
    return _with_kernels(eca_layer, 34, k_size, "3357", num_classes)


def eca_resnet50(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-50. Default kernel sizes 3557, those of the released ``eca_resnet50_k3557.pth.tar``."""
    return _with_kernels(eca_layer, 50, k_size, "3557", num_classes)


def eca_resnet101(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-101. Default kernel sizes 3357, those of the released ``eca_resnet101_k3357.pth.tar``."""
    return _with_kernels(eca_layer, 101, k_size, "3357", num_classes)


def eca_resnet152(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ECA-ResNet-152. Default kernel sizes 3357, those of the released ``eca_resnet152_k3357.pth.tar``."""
    return _with_kernels(eca_layer, 152, k_size, "3357", num_classes)


def eca_ns_resnet50(k_size: KernelSpec = None, num_classes: int = 1000) -> ResNet:
    """ResNet-50 with ECA-NS (Table 2): one k-tap kernel per channel instead of one shared. Default k = 3, as the paper."""
    return _with_kernels(eca_ns_layer, 50, k_size, "3333", num_classes)
