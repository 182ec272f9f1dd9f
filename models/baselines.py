"""The paper's comparisons on the same ResNet: SE, the SE variants of Table 2, and CBAM (Table 3).

Each is ``resnet.ResNet`` with another attention module where ECA sits (after
the block's last BatchNorm, before the shortcut is added), so a comparison
between them is one of attention modules only. The plain ResNets are in
``resnet.py``, ECA and ECA-NS in ``eca_resnet.py``.
"""
from .cbam import CBAM
from .resnet import ResNet, build_resnet
from .se_module import SELayer, SEVar1, SEVar2, SEVar3

__all__ = [
    "se_resnet18",
    "se_resnet34",
    "se_resnet50",
    "se_resnet101",
    "se_resnet152",
    "se_var1_resnet50",
    "se_var2_resnet50",
    "se_var3_resnet50",
    "cbam_resnet50",
    "cbam_resnet101",
]


def se_resnet18(num_classes: int = 1000) -> ResNet:
    """SE-ResNet-18: SE (reduction 16, bias-free FC layers) closing every block."""
    return build_resnet(18, SELayer, num_classes)


def se_resnet34(num_classes: int = 1000) -> ResNet:
    """SE-ResNet-34: SE (reduction 16, bias-free FC layers) closing every block."""
    return build_resnet(34, SELayer, num_classes)


def se_resnet50(num_classes: int = 1000) -> ResNet:
    """SE-ResNet-50 (Tables 2 and 3's SENet): SE (reduction 16, bias-free FC layers) closing every block."""
    return build_resnet(50, SELayer, num_classes)


def se_resnet101(num_classes: int = 1000) -> ResNet:
    """SE-ResNet-101 (Table 3's SENet): SE (reduction 16, bias-free FC layers) closing every block."""
    return build_resnet(101, SELayer, num_classes)


def se_resnet152(num_classes: int = 1000) -> ResNet:
    """SE-ResNet-152: SE (reduction 16, bias-free FC layers) closing every block."""
    return build_resnet(152, SELayer, num_classes)


def se_var1_resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 with SE-Var1 (Table 2): ``sigmoid(GAP(x))``, no parameters.

    Its state_dict is a plain ResNet-50's: a checkpoint tells it apart by its ``arch`` only.
    """
    return build_resnet(50, SEVar1, num_classes)


def se_var2_resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 with SE-Var2 (Table 2): one weight per channel."""
    return build_resnet(50, SEVar2, num_classes)


def se_var3_resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 with SE-Var3 (Table 2): one full C x C layer, no dimensionality reduction."""
    return build_resnet(50, SEVar3, num_classes)


def cbam_resnet50(num_classes: int = 1000) -> ResNet:
    """CBAM-ResNet-50 (Table 3): channel attention (reduction 16) then 7x7 spatial attention in every block."""
    return build_resnet(50, CBAM, num_classes)


def cbam_resnet101(num_classes: int = 1000) -> ResNet:
    """CBAM-ResNet-101 (Table 3): channel attention (reduction 16) then 7x7 spatial attention in every block."""
    return build_resnet(101, CBAM, num_classes)
