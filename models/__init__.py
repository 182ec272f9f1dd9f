"""ECA-Net models.

The package namespace holds exactly the architectures as lower-case callables,
so the original's ``-a`` enumeration (``name.islower() and callable(...)`` over
``models.__dict__``) offers them and nothing else. The building blocks
(``eca_layer``, ``parse_kernel_sizes``, the FPN backbone helper, ...) are
reached as ``models.NAME`` or ``from models import NAME`` all the same, through
the module-level ``__getattr__`` below.
"""
import importlib

from .eca_mobilenetv2 import eca_mobilenet_v2
from .eca_resnet import eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152

# Architectures by name: what ``-a`` accepts.
ARCHITECTURES = {
    fn.__name__: fn
    for fn in (eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152, eca_mobilenet_v2)
}

_BUILDING_BLOCKS = {
    "eca_layer": "eca_module",
    "adaptive_kernel_size": "eca_module",
    "parse_kernel_sizes": "kernel_sizes",
    "ADAPTIVE": "kernel_sizes",
    "ResNet": "eca_resnet",
    "ECA_MobileNetV2": "eca_mobilenetv2",
    "eca_resnet_fpn_backbone": "detection",
    "fuse_eca": "fused",
}


def __getattr__(name: str):
    if name in _BUILDING_BLOCKS:
        return getattr(importlib.import_module(f".{_BUILDING_BLOCKS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_BUILDING_BLOCKS))


__all__ = ["ARCHITECTURES", *ARCHITECTURES, *_BUILDING_BLOCKS]
