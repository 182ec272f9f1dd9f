"""ECA-Net models, and the networks the paper compares them with.

The package namespace holds exactly the architectures as lower-case callables,
so the original's ``-a`` enumeration (``name.islower() and callable(...)`` over
``models.__dict__``) offers them and nothing else. The building blocks
(``eca_layer``, ``SELayer``, ``ResNet``, ``parse_kernel_sizes``, the FPN backbone
helper, ...) are reached as ``models.NAME`` or ``from models import NAME`` all
the same, through the module-level ``__getattr__`` below.
"""
import importlib
import inspect
import re

from .baselines import (
    cbam_resnet50, cbam_resnet101, se_resnet18, se_resnet34, se_resnet50, se_resnet101, se_resnet152,
    se_var1_resnet50, se_var2_resnet50, se_var3_resnet50,
)
from .eca_mobilenetv2 import eca_mobilenet_v2
from .eca_resnet import eca_ns_resnet50, eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152
from .mobilenetv2 import mobilenet_v2
from .resnet import resnet18, resnet34, resnet50, resnet101, resnet152

# Architectures by name: what ``-a`` accepts. The released ECA models first, then the paper's comparisons.
ARCHITECTURES = {
    fn.__name__: fn
    for fn in (
        eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152, eca_mobilenet_v2,
        resnet18, resnet34, resnet50, resnet101, resnet152, mobilenet_v2,
        se_resnet18, se_resnet34, se_resnet50, se_resnet101, se_resnet152,
        se_var1_resnet50, se_var2_resnet50, se_var3_resnet50, eca_ns_resnet50, cbam_resnet50, cbam_resnet101,
    )
}
# Those with ECA kernel sizes (``k_size``, ``--ksize``): ECA and ECA-NS.
ECA_ARCHITECTURES = frozenset(name for name, fn in ARCHITECTURES.items() if "k_size" in inspect.signature(fn).parameters)
# Each architecture's network without attention (torchvision's model of the same name): what it adds to.
PLAIN_COUNTERPARTS = {name: re.search(r"(resnet\d+|mobilenet_v2)$", name).group(1) for name in ARCHITECTURES}

_BUILDING_BLOCKS = {
    "eca_layer": "eca_module",
    "adaptive_kernel_size": "eca_module",
    "eca_ns_layer": "eca_ns",
    "SELayer": "se_module",
    "SEVar1": "se_module",
    "SEVar2": "se_module",
    "SEVar3": "se_module",
    "CBAM": "cbam",
    "parse_kernel_sizes": "kernel_sizes",
    "ADAPTIVE": "kernel_sizes",
    "ResNet": "resnet",
    "BasicBlock": "resnet",
    "Bottleneck": "resnet",
    "MobileNetV2": "mobilenetv2",
    "eca_resnet_fpn_backbone": "detection",
    "fuse_eca": "fused",
}


def __getattr__(name: str):
    if name in _BUILDING_BLOCKS:
        return getattr(importlib.import_module(f".{_BUILDING_BLOCKS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_BUILDING_BLOCKS))


__all__ = ["ARCHITECTURES", "ECA_ARCHITECTURES", "PLAIN_COUNTERPARTS", *ARCHITECTURES, *_BUILDING_BLOCKS]
