"""ECA-ResNet as a detection backbone: the stages under a Feature Pyramid Network.

The paper evaluates ECA-ResNets on COCO with Faster R-CNN, Mask R-CNN and
RetinaNet. :func:`eca_resnet_fpn_backbone` builds the backbone those
torchvision detectors take, the same way torchvision's ``resnet_fpn_backbone``
does for plain ResNets: frozen BatchNorm, the stem and early stages frozen,
an FPN with 256 output channels over ``layer1..layer4``.

Example, starting from an ImageNet checkpoint of this project::

    from torchvision.models.detection import FasterRCNN
    from models import eca_resnet_fpn_backbone

    backbone = eca_resnet_fpn_backbone("eca_resnet50", weights="eca_resnet50_k3557.safetensors")
    detector = FasterRCNN(backbone, num_classes=91)

``weights`` takes a checkpoint path (``.pth.tar`` or ``.safetensors``) or a
state_dict already in memory.
"""
import os
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .eca_resnet import eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152
from .kernel_sizes import KernelSpec
from .resnet import ResNet
from .state_dicts import strip_wrapper_prefixes

if TYPE_CHECKING:
    # torchvision's detection package takes about a second to import; only detection users pay for it.
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

__all__ = ["eca_resnet_fpn_backbone", "FPN_OUT_CHANNELS"]

FPN_OUT_CHANNELS = 256
RESNET_CONSTRUCTORS = {
    fn.__name__: fn for fn in (eca_resnet18, eca_resnet34, eca_resnet50, eca_resnet101, eca_resnet152)
}
# Deepest first, so that ``trainable_layers=n`` unfreezes the n stages nearest the detection heads.
TRAINABLE_IN_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
HEAD_PREFIX = "fc."


def eca_resnet_fpn_backbone(
    arch: str,
    trainable_layers: int = 3,
    weights: Union[None, str, os.PathLike, Mapping[str, torch.Tensor]] = None,
    returned_layers: Optional[Sequence[int]] = None,
    extra_blocks: Optional["ExtraFPNBlock"] = None,
    norm_layer: Optional[Callable[[int], nn.Module]] = None,
    k_size: KernelSpec = None,
) -> "BackboneWithFPN":
    """An ECA-ResNet trunk with an FPN on top, for torchvision's detectors.

    Args:
        arch: ``eca_resnet18`` ... ``eca_resnet152``.
        trainable_layers: how many of ``layer4, layer3, layer2, layer1, conv1``
            (counted from the deepest) keep ``requires_grad``; 0 to 5, as torchvision.
        weights: ImageNet weights to start from: a checkpoint path (read with
            ``engine.checkpoint.read_checkpoint``, so any file ``--resume`` takes)
            or a state_dict. ``module.`` prefixes are stripped and the classifier
            (``fc.*``) is ignored. Its ECA kernel sizes are read from its tensors
            unless ``k_size`` is given.
        returned_layers: which stages (1..4) feed the FPN; default all four.
        extra_blocks: an extra FPN level; default torchvision's ``LastLevelMaxPool``
            (the ``pool`` output Faster R-CNN and Mask R-CNN expect). RetinaNet
            wants ``LastLevelP6P7(256, 256)`` and ``returned_layers=[2, 3, 4]``.
        norm_layer: replaces every ``BatchNorm2d`` of the trunk. None means torchvision's
            ``FrozenBatchNorm2d``, as its ``resnet_fpn_backbone`` uses, because detection
            batches are too small for batch statistics; its buffers load from the
            same keys as BatchNorm's.
        k_size: ECA kernel sizes, in any form ``--ksize`` accepts.

    Returns:
        a ``BackboneWithFPN`` whose ``out_channels`` is 256, returning an
        ``OrderedDict`` of feature maps keyed ``"0"``, ``"1"``, ... and ``"pool"``.

    Raises:
        ValueError: unknown ``arch``, out-of-range ``trainable_layers`` or
            ``returned_layers``, or ``weights`` that do not fit the trunk.
        engine.errors.UsageError: a ``weights`` path that is missing or not a checkpoint.
    """
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if arch not in RESNET_CONSTRUCTORS:
        raise ValueError(f"no FPN backbone for {arch!r}; choose one of {', '.join(RESNET_CONSTRUCTORS)}")
    if not 0 <= trainable_layers <= len(TRAINABLE_IN_ORDER):
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    stages = list(returned_layers) if returned_layers is not None else [1, 2, 3, 4]
    if not stages or min(stages) < 1 or max(stages) > 4:
        raise ValueError(f"returned_layers must be stage numbers in 1..4, got {returned_layers}")

    if isinstance(weights, (str, os.PathLike)):
        # The engine builds on models, so its loader is imported only when a path needs it.
        from engine.checkpoint import read_checkpoint

        weights = read_checkpoint(os.fspath(weights)).state_dict
    state_dict = _trunk_state_dict(weights) if weights is not None else None
    if k_size is None and state_dict is not None:
        k_size = _kernel_sizes_of(state_dict)
    trunk = RESNET_CONSTRUCTORS[arch](k_size=k_size)
    _replace_batch_norm(trunk, norm_layer if norm_layer is not None else FrozenBatchNorm2d)
    if state_dict is not None:
        _load_trunk(trunk, state_dict, arch)
    _freeze_all_but(trunk, _trainable_prefixes(trainable_layers))

    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{stage}": str(position) for position, stage in enumerate(stages)},
        in_channels_list=[_stage_channels(trunk, stage) for stage in stages],
        out_channels=FPN_OUT_CHANNELS,
        extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
    )


def _trunk_state_dict(weights: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The weights without wrapper prefixes and without the ImageNet classifier."""
    return {key: value for key, value in strip_wrapper_prefixes(weights).items() if not key.startswith(HEAD_PREFIX)}


def _kernel_sizes_of(state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, ...]:
    """Per-stage ECA kernel sizes, read from the first block's kernel of each stage."""
    sizes = []
    for stage in range(1, 5):
        key = f"layer{stage}.0.eca.conv.weight"
        if key not in state_dict:
            raise ValueError(f"weights hold no {key}: they are not an ECA-ResNet's")
        sizes.append(int(state_dict[key].shape[-1]))
    return tuple(sizes)


def _replace_batch_norm(module: nn.Module, norm_layer: Callable[[int], nn.Module]) -> None:
    # The trunk is built with BatchNorm2d; swapping afterwards keeps the parameter names unchanged.
    if norm_layer is nn.BatchNorm2d:
        return
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, norm_layer(child.num_features))
        else:
            _replace_batch_norm(child, norm_layer)


def _load_trunk(trunk: ResNet, state_dict: Mapping[str, torch.Tensor], arch: str) -> None:
    result = trunk.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit {arch}'s trunk (missing e.g. {missing[:3]}, "
            f"unexpected e.g. {result.unexpected_keys[:3]})"
        )


def _trainable_prefixes(trainable_layers: int) -> List[str]:
    prefixes = list(TRAINABLE_IN_ORDER[:trainable_layers])
    if trainable_layers == len(TRAINABLE_IN_ORDER):
        # Only matters for a norm_layer with parameters (frozen BatchNorm has none).
        prefixes.append("bn1")
    return prefixes


def _freeze_all_but(trunk: nn.Module, trainable_prefixes: Sequence[str]) -> None:
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(prefix + ".") for prefix in trainable_prefixes):
            parameter.requires_grad_(False)


def _stage_channels(trunk: ResNet, stage: int) -> int:
    # Every stage doubles the channels of the one before; layer4 ends at num_features.
    return trunk.num_features // 2 ** (4 - stage)
