"""safetensors files: a model's weights and what describes them, with no code that could run.

A ``.safetensors`` file (Hugging Face's format) holds tensors and a flat table of
string metadata; reading one executes nothing, in any tool or torch version,
which a pickle cannot promise. This module is the format's side of the
checkpoint loader: it tells such a file from a pickle by its bytes, reads its
tensors and metadata, and turns the description of a checkpoint into metadata
and back. The description holds ``arch``, ``kernel_sizes``, ``num_classes``,
``class_names``, the run's image sizes (kept under ``args``, where the engine
reads them from a ``.pth.tar``), ``best_prec1``, ``epoch`` and the sha256 and
name of the file it was converted from. Lists are stored as JSON, numbers as
decimal strings.
"""
import hashlib
import json
import math
import os
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import UsageError

SUFFIX = ".safetensors"
# Hugging Face's loaders look for format "pt" to know the tensors are PyTorch's.
FORMAT_ENTRY = {"format": "pt"}
IMAGE_SIZES = ("train_crop_size", "val_resize_size", "val_crop_size")
SOURCE_KEYS = ("source_sha256", "source_file")

__all__ = [
    "SUFFIX", "is_weights_file", "read_weights_file", "encode_metadata", "weights_file_bytes", "file_sha256",
]


def is_weights_file(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte header length, then a JSON object that fits."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False  # the loader's own attempt then reports the file as unreadable
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= os.path.getsize(path)


def read_weights_file(path: str, map_location: Any = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The tensors of ``path`` and the checkpoint contents its metadata describes; damage raises :class:`UsageError`."""
    device = str(torch.device(map_location))
    try:
        with safe_open(path, framework="pt", device=device) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        reason = " ".join(str(error).split())
        raise UsageError(
            f"{path!r} is not a readable safetensors file ({reason}): it is truncated or damaged; "
            "convert it again with scripts/convert.py"
        ) from None
    if not tensors:
        raise UsageError(f"{path!r} holds no tensors: expected a model's weights")
    return tensors, decode_metadata(path, metadata)


# --- metadata: strings only, so lists go as JSON and numbers as decimal text -------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _read_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _read_kernel_sizes(text: str) -> list:
    sizes = json.loads(text)
    if not (isinstance(sizes, list) and sizes and all(_positive_int(size) for size in sizes)):
        raise ValueError(text)
    return sizes


def _read_names(text: str) -> list:
    names = json.loads(text)
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise ValueError(text)
    return names


# What each entry holds, and how to read it back.
_READERS: Dict[str, Tuple[str, Callable[[str], Any]]] = {
    "arch": ("a name", str),
    "kernel_sizes": ("a JSON list of kernel sizes", _read_kernel_sizes),
    "num_classes": ("a whole number", _read_int),
    "class_names": ("a JSON list of names", _read_names),
    "best_prec1": ("a number", _read_float),
    "epoch": ("a whole number", _read_int),
    **{name: ("a whole number of pixels", _read_int) for name in IMAGE_SIZES},
    **{name: ("text", str) for name in SOURCE_KEYS},
}


def decode_metadata(path: str, metadata: Mapping[str, str]) -> Dict[str, Any]:
    """Checkpoint contents from safetensors metadata; entries of other tools are ignored."""
    contents: Dict[str, Any] = {}
    for key, (what, read) in _READERS.items():
        if key not in metadata:
            continue
        try:
            contents[key] = read(metadata[key])
        except ValueError:  # json.JSONDecodeError is a ValueError too
            raise UsageError(
                f"{path!r}: its metadata {key}={metadata[key][:80]!r} is not {what}; "
                "the file is damaged or was written by another tool: convert it again with scripts/convert.py"
            ) from None
    sizes = {name: contents.pop(name) for name in IMAGE_SIZES if name in contents}
    if sizes:
        contents["args"] = sizes
    return contents


def encode_metadata(description: Mapping[str, Any]) -> Dict[str, str]:
    """safetensors metadata for a checkpoint description (see the module docstring); absent entries stay absent."""
    metadata = dict(FORMAT_ENTRY)
    for key in ("arch", *SOURCE_KEYS):
        if description.get(key) is not None:
            metadata[key] = str(description[key])
    for key in ("num_classes", "epoch"):
        if description.get(key) is not None:
            metadata[key] = str(int(description[key]))
    if description.get("best_prec1") is not None:
        metadata["best_prec1"] = repr(float(description["best_prec1"]))  # repr reads back to the same float
    for key in ("kernel_sizes", "class_names"):
        if description.get(key) is not None:
            metadata[key] = json.dumps(list(description[key]))
    saved_args = description.get("args")
    for name in IMAGE_SIZES:
        value = saved_args.get(name) if isinstance(saved_args, Mapping) else None
        if _positive_int(value):
            metadata[name] = str(value)
    return metadata


def weights_file_bytes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors file of ``state_dict`` on the CPU; tensors sharing memory are written as copies."""
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        tensor = value.detach().cpu().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        # safetensors refuses two names over one buffer (tied weights); each name gets its own bytes.
        tensors[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return safetensors_bytes(tensors, metadata=dict(metadata))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
