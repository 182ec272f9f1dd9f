"""Checkpoints: reading any format safely, building the model a file fits, and saving atomically.

Reading goes through :func:`read_checkpoint` everywhere (evaluation, resume,
fine-tuning, prediction, export): ``torch.load(weights_only=True)`` so a
downloaded file can never run code, ``map_location`` so a CUDA-saved file
loads on a CPU-only machine, and the ``module.`` / ``_orig_mod.`` prefixes of
DataParallel, DDP and ``torch.compile`` stripped. The released files are
legacy-format pickles of ``{epoch, arch, state_dict, best_prec1, optimizer}``
whose ``arch`` is not reliable, so the architecture and every ECA kernel size
are read from the tensors themselves (:mod:`engine.identify`). A ``.safetensors`` file (see
:mod:`engine.weights_file`) reads into the same :class:`Checkpoint`, its
contents built from its metadata and checked against its tensors.
"""
import os
import pickle
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

import models
from models.kernel_sizes import KernelSpec
from models.state_dicts import strip_wrapper_prefixes

from .errors import UsageError
from .identify import (
    _reference_shapes, architecture_of, check_fits_architecture, check_kernel_sizes, check_ksize_applies, construct,
    fits, identify_architecture, kernel_sizes_from_state_dict, num_classes_from_state_dict,
)
from .weights_file import (
    IMAGE_SIZES, SUFFIX, encode_metadata, file_sha256, is_weights_file, read_weights_file, weights_file_bytes,
)


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


# --- building the model a file fits ------------------------------------------------------------


def build_model(arch: str, k_size: KernelSpec = None, num_classes: int = 1000) -> nn.Module:
    """A fresh model; bad kernel sizes, ``--ksize`` without ECA layers or an unknown name become a :class:`UsageError`."""
    if arch not in models.ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(models.ARCHITECTURES)}")
    if num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {num_classes}")
    check_ksize_applies(arch, k_size)
    try:
        return construct(arch, k_size, num_classes)
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

    ``arch`` None means: whichever architecture the tensors fit (their ``arch``
    field deciding between architectures with the same tensors). A ``k_size``
    or ``num_classes`` that disagrees with the file is a :class:`UsageError`.
    """
    if arch is None:
        arch = architecture_of(ckpt)
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
    model = construct(arch, kernel_sizes or None, num_classes=file_classes)
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
    path: str, state_dict: Mapping[str, torch.Tensor], described: Dict[str, Any], arch_tag: Optional[str] = None
) -> Dict[str, Any]:
    """``described`` with arch, kernel sizes and class count filled in from the tensors where absent.

    An entry that contradicts the tensors means the file was altered, or its
    description belongs to other weights: refused, since every tool trusts it.
    ``arch_tag`` (a ``.pth.tar``'s own ``arch``) decides only between
    architectures whose tensors are the same.
    """
    arch = described.get("arch")
    if arch is None:
        arch = identify_architecture(state_dict, arch_tag)
    elif arch not in models.ARCHITECTURES or not fits(arch, state_dict):
        actual = identify_architecture(state_dict) or "no known architecture"
        raise UsageError(
            f"{path!r} says arch {arch!r} in its metadata but holds {actual}'s tensors: "
            "the file was altered; convert it again from its source"
        )
    if arch is None:
        # A foreign network's weights, or a torchvision ResNet-50's (the same tensors as SE-Var1's):
        # fine for --init-from, or with -a.
        return described
    kernel_sizes = kernel_sizes_from_state_dict(arch, state_dict)
    found = {
        "arch": arch,
        "kernel_sizes": list(kernel_sizes) if kernel_sizes else None,
        "num_classes": num_classes_from_state_dict(arch, state_dict),
    }
    for key, value in found.items():
        if value is None and described.get(key) is None:
            continue
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
    ``se_resnet50``) beyond telling apart architectures with the same tensors;
    a weights file's was checked when it was read.
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
    return _checked_description(ckpt.path, ckpt.state_dict, described, arch_tag=ckpt.arch_tag)


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
