"""ECA-Net models. Every lower-case callable here that names an architecture is an ``-a`` choice."""
from .detection import eca_resnet_fpn_backbone
from .eca_mobilenetv2 import ECA_MobileNetV2, eca_mobilenet_v2
from .eca_module import adaptive_kernel_size, eca_layer
from .eca_resnet import ResNet, eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152
from .kernel_sizes import ADAPTIVE, parse_kernel_sizes

# Architectures by name: what ``-a`` accepts. The other callables above are building blocks.
ARCHITECTURES = {
    fn.__name__: fn
    for fn in (eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152, eca_mobilenet_v2)
}

__all__ = [
    "ARCHITECTURES", "ADAPTIVE", "ECA_MobileNetV2", "ResNet", "adaptive_kernel_size", "eca_layer",
    "eca_mobilenet_v2", "eca_resnet18", "eca_resnet34", "eca_resnet50", "eca_resnet101", "eca_resnet152",
    "eca_resnet_fpn_backbone", "parse_kernel_sizes",
]
