"""Decoding image files to uint8 tensors, and the dataset whose every sample carries its own seed.

Each sample's augmentation runs under a generator seeded from (seed, epoch,
index), so what a step sees depends neither on the number of workers nor on
what ran before: that is what makes a resumed run equal one that never stopped.
"""
import re
from typing import Callable, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from torchcodec.decoders import decode_image
from torchvision.transforms import v2


def decode_rgb(path: str) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``[3, H, W]`` tensor; raises ``ValueError`` if it can't be read.

    TorchCodec decodes JPEG, PNG, WebP and GIF (torchvision deprecates its own
    decoders in its favour); PIL reads the rest. An animated image gives its
    first frame, as PIL opens it.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if not data:
            raise ValueError("empty file")
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    except (RuntimeError, ValueError, OSError) as error:
        return _decode_with_pil(path, error)
    return image[0] if image.dim() == 4 else image


def _decode_with_pil(path: str, first_error: Exception) -> torch.Tensor:
    # PIL reads formats TorchCodec does not (BMP, TIFF, PPM) and some files libjpeg refuses
    # (some truncated ones); a file that neither reads is unreadable.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ValueError(f"{_for_users(first_error)}; {error}") from None
    return v2.functional.pil_to_tensor(rgb)


def _for_users(error: Exception) -> str:
    """A decoder's message without its C++ source path and without its advice to call its own functions."""
    message = re.sub(r"^\w+, \S+\.(?:cpp|cc|h):\d+, ", "", str(error))
    message = re.sub(r" If you know you have a valid image, try using the dedicated decode_\* functions.*$", "", message)
    return message.rstrip(".")  # the caller goes on with "; " and PIL's reason


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index)."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (1 << 63)


class SeededImageFolder(Dataset):
    """Images of one split; item ``(index, seed)`` is decoded and transformed with a generator seeded by ``seed``.

    A readable image yields ``(image, target, index)``; an unreadable one ``(None, path, reason)``, so that
    the batch can go on without it.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        path, target = self.samples[index]
        try:
            image = decode_rgb(path)
        except ValueError as error:
            return None, path, str(error)
        return self.transform(image, torch.Generator().manual_seed(seed)), target, index
