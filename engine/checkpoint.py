"""Checkpoints: reading any format safely, building the model a file fits, and saving atomically.

Reading goes through :func:`read_checkpoint` everywhere (evaluation, resume,
fine-tuning, prediction, export): ``torch.load(weights_only=True)`` so a
downloaded file can never run code, ``map_location`` so a CUDA-saved file
loads on a CPU-only machine, and the ``module.`` / ``_orig_mod.`` prefixes of
DataParallel, DDP and ``torch.compile`` stripped. The released files are
legacy-format pickles of ``{epoch, arch, state_dict, best_prec1, optimizer}``
whose ``arch`` is not reliable, so the architecture and every ECA kernel size
are read from the tensors themselves. A ``.safetensors`` file (see
:mod:`engine.weights_file`) reads into the same :class:`Checkpoint`, its
contents built from its metadata and checked against its tensors.
"""
import functools
import logging
import os
import pickle
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

import models
from models.kernel_sizes import KernelSpec, format_kernel_sizes
from models.state_dicts import strip_wrapper_prefixes

from .errors import UsageError
from .weights_file import (
    IMAGE_SIZES, SUFFIX, encode_metadata, file_sha256, is_weights_file, read_weights_file, weights_file_bytes,
)

logger = logging.getLogger(__name__)

@dataclass
class Checkpoint:
    """What a checkpoint file holds, normalised."""

    path: str
    state_dict: Dict[str, torch.Tensor]
    contents: Dict[str, Any]
    # A safetensors file: weights and their description, no optimizer, schedule or random state.
    holds_weights_only: bool = False

    @property
    def epoch(self) -> Optional[int]:
        epoch = self.contents.get("epoch")
        return int(epoch) if epoch is not None else None

    @property
    def best_prec1(self) -> Optional[float]:
        return as_float(self.contents.get("best_prec1"))

    @property
    def arch_tag(self) -> Optional[str]:
        arch = self.contents.get("arch")
        return arch if isinstance(arch, str) else None


def as_float(value: Any) -> Optional[float]:
    """The original stored ``best_prec1`` as a (CUDA) tensor; everything here wants a float."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item())
    return float(value)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def not_a_checkpoint(path: str) -> str:
    """The one line for a file that ``torch.load`` cannot read, saying what to pass instead."""
    reason = "the file is empty" if os.path.getsize(path) == 0 else "it was not written by torch.save, or is damaged"
    return f"{path!r} is not a PyTorch checkpoint ({reason}): pass a file saved by torch.save, e.g. a run's checkpoint.pth.tar"


def read_checkpoint(path: str, map_location: Any = "cpu") -> Checkpoint:
    """Load ``path`` with ``weights_only=True``; a bad path or file raises :class:`UsageError`."""
    if not path:
        raise UsageError("no checkpoint path given")
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path!r} does not exist: check the path (nothing was started)")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} is not a file")
    if is_weights_file(path):
        return _read_weights_checkpoint(path, map_location)
    if path.endswith(SUFFIX):
        reason = "the file is empty" if os.path.getsize(path) == 0 else "it lacks the format's header"
        raise UsageError(
            f"{path!r} is named {SUFFIX} but is not a safetensors file ({reason}): "
            "convert it again with scripts/convert.py"
        )
    try:
        with warnings.catch_warnings():
            # Another program's pickle draws a warning about its protocol before failing below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - arbitrary bytes fail in arbitrary ways; all mean "not a checkpoint"
        refused = _refused_global(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if refused:
            raise UsageError(
                f"refused to load {path!r}: its pickle calls {refused}, which could run code; "
                "checkpoints must hold only tensors and plain data (re-save it as a plain state_dict "
                "if, and only if, you trust where it came from)"
            ) from None
        raise UsageError(not_a_checkpoint(path)) from None

    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        contents = dict(obj)
        state_dict = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        # torchvision's reference scripts store the weights under "model".
        contents = dict(obj)
        state_dict = obj["model"]
    elif _is_state_dict(obj):
        contents = {}
        state_dict = obj
    else:
        raise UsageError(
            f"{path!r} holds no model weights: expected a dict with 'state_dict' or a bare state_dict"
        )
    # A model's state_dict saved on the 'meta' device pickles shapes without data, and
    # map_location does not change that: loading it later fails with "Cannot copy out of meta tensor".
    asked_for_meta = isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "meta"
    if not asked_for_meta and any(isinstance(v, torch.Tensor) and v.is_meta for v in state_dict.values()):
        raise UsageError(
            f"{path!r} holds tensors without data (saved from a model on the 'meta' device): "
            "save the state_dict after the weights are materialised"
        )
    return Checkpoint(path=path, state_dict=strip_wrapper_prefixes(state_dict), contents=contents)


# "GLOBAL posix.system was not an allowed global" / "GLOBAL posix.system whose module posix is blocked".
# Requiring a dotted name followed by those words keeps a text file that happens to start with
# "c" (pickle's GLOBAL opcode) from being reported as a pickle that calls code.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) (?:was not an allowed global|whose module)")


def _refused_global(message: str) -> Optional[str]:
    """The callable a weights-only load refused to import, if that is why it failed."""
    match = _REFUSED_GLOBAL.search(message)
    return match.group(1) if match else None


# --- which architecture, kernel sizes and class count a state_dict fits -------------------------


@functools.lru_cache(maxsize=None)
def _reference_shapes(arch: str, num_classes: int = 1000) -> Mapping[str, Tuple[int, ...]]:
    """Parameter names and shapes of ``arch``, read-only: built once per process on the meta device.

    Identifying the architecture of a file compares it with all six, and
    ResNet-152 takes a noticeable moment to build even without memory.
    """
    with torch.device("meta"):
        model = models.ARCHITECTURES[arch](num_classes=num_classes)
    return MappingProxyType({k: tuple(v.shape) for k, v in model.state_dict().items()})


def _comparable_keys(keys) -> set:
    # BatchNorm's step counter is absent from files written before PyTorch 0.4.1 and carries no weights.
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def has_names_of(arch: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the state_dict's parameter names are exactly ``arch``'s."""
    return _comparable_keys(_reference_shapes(arch)) == _comparable_keys(state_dict)


def identify_architecture(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The architecture whose parameter names equal the state_dict's, or None."""
    return next((arch for arch in models.ARCHITECTURES if has_names_of(arch, state_dict)), None)


def eca_kernel_keys(arch: str, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """The ECA kernel names of ``state_dict`` in network order."""
    order = list(_reference_shapes(arch))
    return [k for k in order if k.endswith("eca.conv.weight") or _is_mobilenet_eca(arch, k)]


def _is_mobilenet_eca(arch: str, key: str) -> bool:
    parts = key.split(".")
    # features.<block>.conv.<last>.conv.weight: the ECA layer closing an inverted residual block.
    return arch == "eca_mobilenet_v2" and len(parts) == 6 and parts[2] == "conv" and parts[4:] == ["conv", "weight"]


def kernel_sizes_from_state_dict(arch: str, state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, ...]:
    """Kernel sizes as the constructor takes them: per stage for ResNets, per block for MobileNetV2."""
    keys = eca_kernel_keys(arch, state_dict)
    if arch == "eca_mobilenet_v2":
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
    head = "classifier.1.weight" if arch == "eca_mobilenet_v2" else "fc.weight"
    return int(state_dict[head].shape[0])


def classifier_prefix(arch: str) -> str:
    return "classifier.1." if arch == "eca_mobilenet_v2" else "fc."


def resolve_kernel_sizes(arch: str, k_size: KernelSpec) -> Tuple[int, ...]:
    """The per-stage (or per-block) kernel sizes ``-a arch --ksize k_size`` builds."""
    with torch.device("meta"):
        return models.ARCHITECTURES[arch](k_size=k_size, num_classes=1).kernel_sizes


def check_kernel_sizes(arch: str, k_size: KernelSpec, found: Tuple[int, ...], ckpt: Checkpoint) -> None:
    try:
        wanted = resolve_kernel_sizes(arch, k_size)
    except ValueError as error:
        raise UsageError(f"--ksize: {error}") from None
    if tuple(wanted) == tuple(found):
        return
    keys = eca_kernel_keys(arch, ckpt.state_dict)
    for key in keys:
        index = int(key.split(".")[1]) - 1 if arch == "eca_mobilenet_v2" else int(key[len("layer")]) - 1
        if wanted[index] != found[index]:
            raise UsageError(
                f"--ksize {k_size} asks for kernel size {wanted[index]} at {key}, but {ckpt.path!r} has "
                f"{found[index]} there (the file's sizes: {format_kernel_sizes(found)}); "
                "drop --ksize to use the file's kernel sizes"
            )


def check_fits_architecture(arch: str, ckpt: Checkpoint) -> None:
    """Raise :class:`UsageError` naming the right ``-a`` when the file holds another architecture."""
    if has_names_of(arch, ckpt.state_dict):
        if ckpt.arch_tag and ckpt.arch_tag != arch:
            logger.warning(
                "warning: %s says arch %r, but its tensors are %s's; loading them as %s",
                ckpt.path, ckpt.arch_tag, arch, arch,
            )
        return
    actual = identify_architecture(ckpt.state_dict)
    if actual:
        raise UsageError(f"{ckpt.path!r} holds {actual} weights, not {arch}: run with -a {actual}")
    reference = _comparable_keys(_reference_shapes(arch))
    missing = sorted(reference - set(ckpt.state_dict))[:3]
    unexpected = sorted(set(ckpt.state_dict) - reference)[:3]
    raise UsageError(
        f"{ckpt.path!r} does not hold {arch} weights (missing e.g. {missing}, unexpected e.g. {unexpected}); "
        "use --init-from to load only the tensors that match"
    )


def build_model(arch: str, k_size: KernelSpec = None, num_classes: int = 1000) -> nn.Module:
    """A fresh model; bad kernel sizes or an unknown name become a :class:`UsageError`."""
    if arch not in models.ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(models.ARCHITECTURES)}")
    if num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {num_classes}")
    try:
        return models.ARCHITECTURES[arch](k_size=k_size, num_classes=num_classes)
    except ValueError as error:
        raise UsageError(f"--ksize: {error}") from None


def fuse(model: nn.Module, impl: str) -> nn.Module:
    """``models.fuse_eca(model, impl)``, once at set-up; an implementation this machine cannot run is a UsageError."""
    try:
        return models.fuse_eca(model, impl=impl)
    except RuntimeError as error:  # e.g. --eca-impl triton without its kernels or a GPU
        raise UsageError(str(error)) from None


def model_from_checkpoint(
    arch: Optional[str], ckpt: Checkpoint, k_size: KernelSpec = None, num_classes: Optional[int] = None
) -> nn.Module:
    """Build the model ``ckpt`` fits, with its kernel sizes and class count, and load it strictly.

    ``arch`` None means: whichever architecture the tensors fit. A ``k_size``
    or ``num_classes`` that disagrees with the file is a :class:`UsageError`.
    """
    if arch is None:
        arch = ckpt.arch_tag if ckpt.holds_weights_only else identify_architecture(ckpt.state_dict)
        if arch is None:
            raise UsageError(f"{ckpt.path!r} holds no known ECA architecture's weights")
    check_fits_architecture(arch, ckpt)
    kernel_sizes = kernel_sizes_from_state_dict(arch, ckpt.state_dict)
    if k_size is not None:
        check_kernel_sizes(arch, k_size, kernel_sizes, ckpt)
    file_classes = num_classes_from_state_dict(arch, ckpt.state_dict)
    if num_classes is not None and num_classes != file_classes:
        raise UsageError(
            f"{ckpt.path!r} has {file_classes} classes but this run has {num_classes}: "
            "evaluate on data with the same classes, or fine-tune with --init-from"
        )
    model = models.ARCHITECTURES[arch](k_size=kernel_sizes, num_classes=file_classes)
    state_dict = dict(ckpt.state_dict)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state_dict.setdefault(key, value)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        # Same names, other shapes (e.g. another width): the file is wrong, not the code.
        raise UsageError(f"{ckpt.path!r} does not fit {arch}: {error}") from None
    return model


def load_model(path: str, arch: Optional[str] = None, k_size: KernelSpec = None, map_location: Any = "cpu"):
    """Read ``path`` and return ``(model, checkpoint)``: the one call tools need."""
    ckpt = read_checkpoint(path, map_location=map_location)
    return model_from_checkpoint(arch, ckpt, k_size=k_size), ckpt


# --- safetensors: the same Checkpoint, described by metadata instead of a pickled dict --------------

# What a weights file keeps of a checkpoint's contents, besides what its tensors show.
DESCRIBED = ("class_names", "best_prec1", "epoch", "args")


def _read_weights_checkpoint(path: str, map_location: Any) -> Checkpoint:
    tensors, contents = read_weights_file(path, map_location)
    # Another tool may have converted a DDP or compiled model's state_dict as it was.
    state_dict = strip_wrapper_prefixes(tensors)
    contents = _checked_description(path, state_dict, contents)
    if contents.get("arch") in models.ARCHITECTURES:
        # The format stores names sorted; the model's order reads better and matches the .pth.tar's.
        order = {key: position for position, key in enumerate(_reference_shapes(contents["arch"]))}
        state_dict = dict(sorted(state_dict.items(), key=lambda item: order.get(item[0], len(order))))
    return Checkpoint(path, state_dict, contents, holds_weights_only=True)


def _checked_description(
    path: str, state_dict: Mapping[str, torch.Tensor], described: Dict[str, Any]
) -> Dict[str, Any]:
    """``described`` with arch, kernel sizes and class count filled in from the tensors where absent.

    An entry that contradicts the tensors means the file was altered, or its
    description belongs to other weights: refused, since every tool trusts it.
    """
    arch = described.get("arch")
    if arch is None:
        arch = identify_architecture(state_dict)
    elif arch not in models.ARCHITECTURES or not has_names_of(arch, state_dict):
        actual = identify_architecture(state_dict) or "no known architecture"
        raise UsageError(
            f"{path!r} says arch {arch!r} in its metadata but holds {actual}'s tensors: "
            "the file was altered; convert it again from its source"
        )
    if arch is None:
        return described  # e.g. a torchvision ResNet's weights: fine for --init-from
    found = {
        "arch": arch,
        "kernel_sizes": list(kernel_sizes_from_state_dict(arch, state_dict)),
        "num_classes": num_classes_from_state_dict(arch, state_dict),
    }
    for key, value in found.items():
        if described.setdefault(key, value) != value:
            raise UsageError(
                f"{path!r} says {key} {described[key]} in its metadata but its tensors have {value}: "
                "the file was altered; convert it again from its source"
            )
    names = described.get("class_names")
    if names is not None and len(names) != found["num_classes"]:
        raise UsageError(
            f"{path!r} names {len(names)} classes but its classifier has {found['num_classes']}: "
            "its class_names belong to other weights"
        )
    return described


def describe(ckpt: Checkpoint) -> Dict[str, Any]:
    """What a weights file says of ``ckpt``: arch, kernel sizes, classes from its tensors, the rest from its contents.

    A ``.pth.tar``'s own ``arch`` is not trusted (a released file says
    ``se_resnet50``); a weights file's was checked when it was read.
    """
    not_tensors = [key for key, value in ckpt.state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise UsageError(f"{ckpt.path!r}: its state_dict holds entries that are not tensors, e.g. {not_tensors[:3]}")
    kept = DESCRIBED + (("arch",) if ckpt.holds_weights_only else ())
    described = {key: ckpt.contents[key] for key in kept if ckpt.contents.get(key) is not None}
    if "best_prec1" in described:
        described["best_prec1"] = as_float(described["best_prec1"])
    if isinstance(described.get("args"), Mapping):
        described["args"] = {name: described["args"][name] for name in IMAGE_SIZES if name in described["args"]}
    return _checked_description(ckpt.path, ckpt.state_dict, described)


def save_weights_file(ckpt: Checkpoint, path: str) -> Dict[str, Any]:
    """Write ``ckpt``'s weights and description to ``path`` as safetensors, atomically; returns the description."""
    description = describe(ckpt)
    description.update(source_sha256=file_sha256(ckpt.path), source_file=os.path.basename(ckpt.path))
    data = weights_file_bytes(ckpt.state_dict, encode_metadata(description))
    _atomic_write(path, lambda handle: handle.write(data))
    return description


def save_best_weights(best_checkpoint: str) -> str:
    """Write ``model_best.safetensors`` beside ``model_best.pth.tar``, from that file: its weights, without pickle."""
    target = (best_checkpoint[: -len(".pth.tar")] if best_checkpoint.endswith(".pth.tar")
              else os.path.splitext(best_checkpoint)[0]) + SUFFIX
    save_weights_file(read_checkpoint(best_checkpoint), target)
    return target


# --- saving ------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str, legacy_format: bool = False) -> None:
    """Write ``obj`` so that ``path`` always holds either the old file or the complete new one.

    ``legacy_format`` writes the pre-1.6 serialization of the released files, for old PyTorch versions.
    """
    _atomic_write(path, lambda handle: torch.save(obj, handle, _use_new_zipfile_serialization=not legacy_format))


def atomic_copy(source: str, destination: str) -> None:
    """Copy ``source`` to ``destination`` with the same all-or-nothing guarantee as :func:`atomic_save`."""

    def copy(handle: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle, length=16 << 20)

    _atomic_write(destination, copy)


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` into a temporary file beside ``path``, fsync it, and rename it over ``path``.

    A kill at any moment leaves ``path`` as it was (the old checkpoint, intact
    and loadable) or complete; never half written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    _fsync_directory(folder)


def _create_temporary(path: str) -> Tuple[int, str]:
    """A new, empty ``<path>.XXXXXXXX.tmp``, created with the permissions a plain ``open(path, "w")`` gives.

    Unlike ``tempfile.mkstemp`` (always 0600), the mode follows the umask, so
    checkpoints are as readable to the user's group as every other output file.
    """
    while True:
        candidate = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue


def remove_dead_writes(path: str) -> List[str]:
    """Delete the temporary files that :func:`atomic_save` / :func:`atomic_copy` left for ``path`` when killed.

    Only names of the exact form ``<basename>.<8 random characters>.tmp`` next to
    ``path`` are touched; nothing ever reads them. Call this before a run starts writing.
    """
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.[a-z0-9_]{8}\.tmp")
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if pattern.fullmatch(name):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _fsync_directory(folder: str) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
