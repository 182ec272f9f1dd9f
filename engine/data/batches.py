"""Batches: stacked in the workers, normalised once, mixed per step.

Workers send uint8 batches (a quarter of the bytes of float) and the device
normalises them; training on the CPU, the workers normalise them instead.
:class:`BatchPreparer` makes that choice, and only it.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch.utils.data import get_worker_info
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W], or float32 when the workers normalised it
    targets: torch.Tensor
    unreadable: List[Tuple[str, str]]  # (path, reason) of images left out of this batch
    indices: List[int] = field(default_factory=list)  # the dataset indices of the images, in order

    def __len__(self) -> int:
        return int(self.targets.numel())


class Normalise:
    """uint8 ``[B, 3, H, W]`` -> ImageNet-normalised float32 on ``device``, in ``memory_format``."""

    def __init__(self, device: torch.device, memory_format: torch.memory_format):
        self.memory_format = memory_format
        # (x / 255 - mean) / std as x * scale + offset: one pass over the converted batch, not two.
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.offset = -mean / std

    def __call__(self, images: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is None:
            converted = images.to(dtype=torch.float32, memory_format=self.memory_format)
        else:
            converted = out.copy_(images)
        return torch.addcmul(self.offset, converted, self.scale, out=converted)


class BatchPreparer:
    """A loader's batch -> normalised float on the training device, in the memory format the model uses."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.device = device
        self.normalise = Normalise(device, torch.channels_last if channels_last else torch.contiguous_format)
        # The one decision of where batches are normalised. On the CPU the workers do it: done in the
        # main process, that work would keep its thread pool spinning on the cores the workers decode on.
        self.worker_normalise: Optional[Normalise] = self.normalise if device.type == "cpu" else None

    def __call__(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images(batch.images), batch.targets.to(self.device, non_blocking=True)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 ``[B, 3, H, W]`` stack normalised on the device, or one the workers normalised already."""
        if images.is_floating_point():
            return images.to(self.device, non_blocking=True)
        return self.normalise(images.to(self.device, non_blocking=True))


class Collate:
    """A worker's items -> :class:`Batch`, the images stacked where the batch will travel.

    In a loader worker the stack is written straight into shared memory, which
    is where the queue to the main process would otherwise copy it. With
    ``normalise`` the worker also normalises the batch, and the float batch travels.
    """

    def __init__(self, normalise: Optional[Normalise] = None):
        self.normalise = normalise

    def __call__(self, items) -> Batch:
        good = [item for item in items if item[0] is not None]
        unreadable = [(path, reason) for image, path, reason in items if image is None]
        targets = torch.tensor([target for _, target, _ in good], dtype=torch.int64)
        return Batch(self.stack([image for image, _, _ in good]), targets, unreadable,
                     indices=[index for _, _, index in good])

    def stack(self, images: List[torch.Tensor]) -> torch.Tensor:
        shape = (len(images), *images[0].shape) if images else (0, 3, 1, 1)
        if self.normalise is None:
            return _stack_into(images, travelling_tensor(shape, torch.uint8))
        stacked = _stack_into(images, torch.empty(shape, dtype=torch.uint8))  # stays in the worker
        return self.normalise(stacked, out=travelling_tensor(shape, torch.float32, self.normalise.memory_format))


def _stack_into(images: List[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    return torch.stack(images, out=out) if images else out


def travelling_tensor(
    shape: Tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """An empty tensor for a batch, in shared memory when made in a loader worker.

    Allocated there directly, as torch's own ``default_collate`` does:
    ``share_memory_()`` would copy a private allocation over instead.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, memory_format=memory_format)
    layout = torch.empty(shape, dtype=dtype, memory_format=memory_format, device="meta")
    storage = torch.UntypedStorage._new_shared(layout.numel() * layout.element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, layout.stride())


class BatchMixer:
    """MixUp / CutMix on the prepared batch, seeded per step so that a resumed run mixes alike."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if len(choices) > 1 else (choices[0] if choices else None)

    @property
    def enabled(self) -> bool:
        return self.mix is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, seed: int):
        with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
            torch.manual_seed(seed)
            return self.mix(images, targets)
