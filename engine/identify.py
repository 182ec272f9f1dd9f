"""Which architecture, kernel sizes and class count a state_dict holds, read from its tensors.

A file's ``arch`` field is not reliable (a released ECA-ResNet-50 says
``se_resnet50``), so the tensors decide: an architecture fits a state_dict
when the names are its own and so are the shapes, but for what a file may
choose (the ECA kernel lengths, the class count). Where the tensors fit several
architectures (a plain ResNet-50's and SE-Var1's, which has no parameters, are
the same), the ``arch`` field decides among them, and when it names none of
them the error lists them.
"""
import functools
import logging
from types import MappingProxyType
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

import models
from models.kernel_sizes import KernelSpec, format_kernel_sizes

from .errors import UsageError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "architecture_candidates", "architecture_of", "check_fits_architecture", "check_kernel_sizes",
    "check_ksize_applies", "classifier_prefix", "construct", "eca_kernel_keys", "fits", "has_names_of",
    "identify_architecture", "kernel_sizes_from_state_dict", "num_classes_from_state_dict", "resolve_kernel_sizes",
]


def construct(arch: str, k_size: KernelSpec = None, num_classes: int = 1000) -> nn.Module:
    """``models.ARCHITECTURES[arch]`` built with ``k_size`` where it has ECA kernels (``check_ksize_applies`` first)."""
    constructor = models.ARCHITECTURES[arch]
    if arch in models.ECA_ARCHITECTURES:
        return constructor(k_size=k_size, num_classes=num_classes)
    return constructor(num_classes=num_classes)


def check_ksize_applies(arch: str, k_size: KernelSpec) -> None:
    """``--ksize`` sets ECA kernels: for an architecture without them it is a mistake, said in one line."""
    if k_size is not None and arch not in models.ECA_ARCHITECTURES:
        raise UsageError(f"--ksize sets ECA kernel sizes, and {arch} has no ECA layers: drop --ksize")


@functools.lru_cache(maxsize=None)
def _reference_shapes(arch: str) -> Mapping[str, Tuple[int, ...]]:
    """Parameter names and shapes of ``arch`` (default kernels, 1000 classes), read-only: built once per process on the meta device."""
    with torch.device("meta"):
        model = construct(arch)
    return MappingProxyType({k: tuple(v.shape) for k, v in model.state_dict().items()})


def _comparable_keys(keys) -> set:
    # BatchNorm's step counter is absent from files written before PyTorch 0.4.1 and carries no weights.
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def has_names_of(arch: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the state_dict's parameter names are exactly ``arch``'s."""
    return _comparable_keys(_reference_shapes(arch)) == _comparable_keys(state_dict)


def _chosen_by_the_file(arch: str, key: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """``shape`` without what files of one architecture differ in: an ECA kernel's length, the classifier's rows."""
    if key in _kernel_key_set(arch):
        return shape[:-1]
    if key.startswith(classifier_prefix(arch)):
        return shape[1:]
    return shape


def fits(arch: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the state_dict holds ``arch``'s tensors: its names, and its shapes but for kernel lengths and class count."""
    if not has_names_of(arch, state_dict):
        return False
    return all(
        _chosen_by_the_file(arch, key, tuple(state_dict[key].shape)) == _chosen_by_the_file(arch, key, shape)
        for key, shape in _reference_shapes(arch).items()
        if key in state_dict
    )


def architecture_candidates(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """The architectures the state_dict fits; failing that, those whose names it has (their loading says which shape is off)."""
    named = [arch for arch in models.ARCHITECTURES if has_names_of(arch, state_dict)]
    return [arch for arch in named if fits(arch, state_dict)] or named


def identify_architecture(state_dict: Mapping[str, torch.Tensor], arch_tag: Optional[str] = None) -> Optional[str]:
    """The architecture of the state_dict's tensors; where several fit, the one ``arch_tag`` names; else None.

    A tag whose architecture the tensors fit is the answer straight away: it is
    the only candidate, or the one that decides among them, and the search over
    every architecture is paid only by files without a (true) tag.
    """
    if arch_tag in models.ARCHITECTURES and fits(arch_tag, state_dict):
        return arch_tag
    candidates = architecture_candidates(state_dict)
    return candidates[0] if len(candidates) == 1 else None


def architecture_of(ckpt: "Checkpoint") -> str:
    """The architecture ``ckpt`` holds (see :func:`identify_architecture`), or a :class:`UsageError` that says why not."""
    arch = identify_architecture(ckpt.state_dict, ckpt.arch_tag)
    if arch is not None:
        return arch
    candidates = architecture_candidates(ckpt.state_dict)
    if not candidates:
        raise UsageError(
            f"{ckpt.path!r} holds the weights of none of the architectures -a offers; "
            "--init-from starts a new run from whichever of its tensors match"
        )
    tag = f"its arch field says {ckpt.arch_tag!r}" if ckpt.arch_tag else "it has no arch field"
    raise UsageError(
        f"{ckpt.path!r} holds tensors that fit {' and '.join(candidates)} alike, and {tag}: "
        f"say which with {' or '.join(f'-a {arch}' for arch in candidates)}"
    )


@functools.lru_cache(maxsize=None)
def _kernel_key_set(arch: str) -> frozenset:
    return frozenset(eca_kernel_keys(arch))


def eca_kernel_keys(arch: str) -> List[str]:
    """The names of ``arch``'s ECA (and ECA-NS) kernels, in network order; none without ECA layers."""
    return [k for k in _reference_shapes(arch) if k.endswith("eca.conv.weight") or _is_mobilenet_eca(arch, k)]


def _is_mobilenet_eca(arch: str, key: str) -> bool:
    parts = key.split(".")
    # features.<block>.conv.<last>.conv.weight: the ECA layer closing an inverted residual block.
    return arch == "eca_mobilenet_v2" and len(parts) == 6 and parts[2] == "conv" and parts[4:] == ["conv", "weight"]


def _is_mobilenet(arch: str) -> bool:
    return arch.endswith("mobilenet_v2")


def kernel_sizes_from_state_dict(arch: str, state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, ...]:
    """Kernel sizes as the constructor takes them: per stage for ResNets, per block for MobileNetV2; () without ECA."""
    keys = eca_kernel_keys(arch)
    if _is_mobilenet(arch) or not keys:
        return tuple(int(state_dict[k].shape[-1]) for k in keys)
    per_stage: Dict[str, int] = {}
    for key in keys:
        stage, size = key.split(".")[0], int(state_dict[key].shape[-1])
        if per_stage.setdefault(stage, size) != size:
            raise UsageError(
                f"{key} has kernel size {size} but other ECA layers of {stage} have {per_stage[stage]}: "
                "one kernel size per stage is supported"
            )
    return tuple(per_stage[f"layer{i}"] for i in range(1, 5))


def num_classes_from_state_dict(arch: str, state_dict: Mapping[str, torch.Tensor]) -> int:
    return int(state_dict[classifier_prefix(arch) + "weight"].shape[0])


def classifier_prefix(arch: str) -> str:
    return "classifier.1." if _is_mobilenet(arch) else "fc."


def resolve_kernel_sizes(arch: str, k_size: KernelSpec) -> Tuple[int, ...]:
    """The per-stage (or per-block) kernel sizes ``-a arch --ksize k_size`` builds."""
    with torch.device("meta"):
        return construct(arch, k_size, num_classes=1).kernel_sizes


def check_kernel_sizes(arch: str, k_size: KernelSpec, found: Tuple[int, ...], ckpt: "Checkpoint") -> None:
    """Raise :class:`UsageError` naming the first layer where ``--ksize`` and the file's kernels disagree."""
    check_ksize_applies(arch, k_size)
    try:
        wanted = resolve_kernel_sizes(arch, k_size)
    except ValueError as error:
        raise UsageError(f"--ksize: {error}") from None
    if tuple(wanted) == tuple(found):
        return
    for key in eca_kernel_keys(arch):
        index = int(key.split(".")[1]) - 1 if _is_mobilenet(arch) else int(key[len("layer")]) - 1
        if wanted[index] != found[index]:
            raise UsageError(
                f"--ksize {k_size} asks for kernel size {wanted[index]} at {key}, but {ckpt.path!r} has "
                f"{found[index]} there (the file's sizes: {format_kernel_sizes(found)}); "
                "drop --ksize to use the file's kernel sizes"
            )


def check_fits_architecture(arch: str, ckpt: "Checkpoint") -> None:
    """Raise :class:`UsageError` naming the right ``-a`` when the file holds another architecture."""
    if fits(arch, ckpt.state_dict):
        if ckpt.arch_tag and ckpt.arch_tag != arch:
            same = ckpt.arch_tag in models.ARCHITECTURES and fits(ckpt.arch_tag, ckpt.state_dict)
            logger.warning(
                "warning: %s says arch %r, %s; loading them as %s", ckpt.path, ckpt.arch_tag,
                f"whose tensors are the same as {arch}'s" if same else f"but its tensors are {arch}'s", arch,
            )
        return
    actual = identify_architecture(ckpt.state_dict, ckpt.arch_tag)
    if actual and actual != arch:
        raise UsageError(f"{ckpt.path!r} holds {actual} weights, not {arch}: run with -a {actual}")
    if has_names_of(arch, ckpt.state_dict):
        return  # another width, say: loading names the tensor whose shape is off
    reference = _comparable_keys(_reference_shapes(arch))
    missing = sorted(reference - set(ckpt.state_dict))[:3]
    unexpected = sorted(set(ckpt.state_dict) - reference)[:3]
    raise UsageError(
        f"{ckpt.path!r} does not hold {arch} weights (missing e.g. {missing}, unexpected e.g. {unexpected}); "
        "use --init-from to load only the tensors that match"
    )

