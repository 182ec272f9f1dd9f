"""Starting from other weights: ``--init-from``, fine-tuning on other classes, freezing the backbone.

``--init-from`` loads every tensor whose name and shape match (a plain
torchvision ResNet, a released ECA file, one of ours) and says what it did,
so starting ECA-ResNet from ImageNet ResNet weights leaves only the ECA
kernels new. Unlike ``--resume`` it starts a new run: epoch 0, fresh optimizer.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import models
from models.kernel_sizes import KernelSpec

from .checkpoint import Checkpoint, read_checkpoint
from .errors import UsageError
from .identify import (
    architecture_candidates, check_kernel_sizes, classifier_prefix, fits, identify_architecture,
    kernel_sizes_from_state_dict,
)


@dataclass
class InitReport:
    path: str
    loaded: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)  # in the model, not in the file
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, file shape, model shape)
    unused: List[str] = field(default_factory=list)  # in the file, not in the model
    classifier_reset: bool = False

    def lines(self) -> List[str]:
        out = [f"=> initialised from {self.path!r}: {len(self.loaded)} tensors loaded"]
        if self.new:
            out.append(f"   new (not in the file, left as initialised): {len(self.new)}: {_abbreviate(self.new)}")
        for name, file_shape, model_shape in self.mismatched:
            out.append(f"   skipped {name}: shape {list(file_shape)} in the file, {list(model_shape)} in the model")
        if self.unused:
            out.append(f"   unused tensors of the file: {len(self.unused)}: {_abbreviate(self.unused)}")
        if self.classifier_reset:
            out.append("   the classifier was re-initialised for this dataset's classes (a different class count)")
        return out


def _abbreviate(names: List[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def read_init_checkpoint(path: str, arch: str, k_size: KernelSpec) -> Tuple[Checkpoint, KernelSpec]:
    """Read ``--init-from`` and return it with the kernel sizes the new model should have.

    Welcome are a file of ``arch`` itself, one of the same network without
    attention (a plain ResNet's for an SE-, CBAM- or ECA-ResNet of its depth: only
    the attention starts new), and one of no architecture here. One holding another
    architecture is a mistake that would leave most of the model untrained, and
    ECA kernels other than an explicit ``--ksize`` contradict what was asked:
    say so instead of silently loading only the tensors that happen to fit.
    Without ``--ksize`` a file of the same architecture brings its own kernel sizes.
    """
    ckpt = read_checkpoint(path)
    if fits(arch, ckpt.state_dict):
        found = kernel_sizes_from_state_dict(arch, ckpt.state_dict)
        if k_size is None:
            return ckpt, found or None
        check_kernel_sizes(arch, k_size, found, ckpt)
        return ckpt, k_size
    candidates = architecture_candidates(ckpt.state_dict)
    if not candidates or models.PLAIN_COUNTERPARTS[arch] in candidates:
        return ckpt, k_size
    held = identify_architecture(ckpt.state_dict, ckpt.arch_tag)
    choices = [held] if held else candidates
    raise UsageError(
        f"--init-from {path!r} holds {' or '.join(choices)} weights, not {arch}: "
        f"run with {' or '.join(f'-a {choice}' for choice in choices)}"
    )


def initialize_from(model: nn.Module, arch: str, path: str, ckpt: Optional[Checkpoint] = None) -> InitReport:
    """Copy into ``model`` every tensor of ``path`` whose name and shape match, and report the rest."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    target = model.state_dict()
    report = InitReport(path=path)
    matched: Dict[str, torch.Tensor] = {}
    for name, tensor in ckpt.state_dict.items():
        if name not in target:
            report.unused.append(name)
        elif tuple(tensor.shape) != tuple(target[name].shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            matched[name] = tensor
    report.loaded = sorted(matched)
    report.new = [name for name in target if name not in ckpt.state_dict and not name.endswith("num_batches_tracked")]
    head = classifier_prefix(arch)
    report.classifier_reset = any(name.startswith(head) for name, _, _ in report.mismatched)
    model.load_state_dict(matched, strict=False)
    return report


def classifier_names(arch: str, model: nn.Module) -> List[str]:
    head = classifier_prefix(arch)
    return [name for name, _ in model.named_parameters() if name.startswith(head)]


def freeze_backbone(arch: str, model: nn.Module) -> List[nn.Module]:
    """Train only the classifier; returns the backbone's norm layers, which must stay in eval mode."""
    head = set(classifier_names(arch, model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in head)
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def parameter_groups(arch: str, model: nn.Module, backbone_lr_scale: float) -> List[dict]:
    """Classifier at the full rate, everything else at ``backbone_lr_scale`` of it (fine-tuning)."""
    head = set(classifier_names(arch, model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in trainable if n not in head]
    classifier = [p for n, p in trainable if n in head]
    if backbone_lr_scale == 1.0:
        return [{"params": [p for _, p in trainable], "lr_scale": 1.0}]
    groups = [{"params": classifier, "lr_scale": 1.0}]
    if backbone:
        groups.append({"params": backbone, "lr_scale": backbone_lr_scale})
    return groups
