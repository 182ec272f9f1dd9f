"""Training and validation geometry on uint8 images, and the sizes a checkpoint's run used."""
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from torchvision.transforms import v2

from ..errors import UsageError

# ImageNet's evaluation geometry: resize the shorter side to 256, centre-crop 224.
DEFAULT_RESIZE_SIZE = 256
DEFAULT_CROP_SIZE = 224


class TrainTransform:
    """RandomResizedCrop + horizontal flip (+ optional auto-augment) on a uint8 image, drawn from ``generator``.

    The crop is sampled as torchvision's ``RandomResizedCrop`` samples it (area
    8-100%, aspect ratio 3/4-4/3, ten tries, then a centre crop), but from the
    sample's own generator: no global RNG state to fork per image.
    """

    SCALE = (0.08, 1.0)
    LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))

    def __init__(self, crop_size: int, auto_augment: Optional[str] = None):
        self.crop_size = crop_size
        self.auto_augment = _auto_augment(auto_augment)

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> Tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            draws = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target_area = area * (self.SCALE[0] + draws[0] * (self.SCALE[1] - self.SCALE[0]))
            aspect = math.exp(self.LOG_RATIO[0] + draws[1] * (self.LOG_RATIO[1] - self.LOG_RATIO[0]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        ratio = width / height
        if ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = self.crop_box(image.shape[-2], image.shape[-1], generator)
        image = v2.functional.resized_crop(image, top, left, h, w, [self.crop_size, self.crop_size], antialias=True)
        if torch.rand(1, generator=generator).item() < 0.5:
            image = v2.functional.horizontal_flip(image)
        if self.auto_augment is not None:
            # torchvision's policies draw from the global RNG: give them this sample's seed for the call.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 1 << 62, (1,), generator=generator)))
                image = self.auto_augment(image)
        return image


def _auto_augment(name: Optional[str]) -> Optional[Callable]:
    if name is None:
        return None
    if name == "imagenet":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    if name == "ta_wide":
        return v2.TrivialAugmentWide()
    if name == "randaugment":
        return v2.RandAugment()
    raise ValueError(f"unknown auto-augment policy {name!r}")


class ValTransform:
    """Resize the shorter side, then centre-crop; deterministic, so the generator is unused."""

    def __init__(self, resize_size: int, crop_size: int):
        self.resize_size = resize_size
        self.crop_size = crop_size

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        image = v2.functional.resize(image, [self.resize_size], antialias=True)
        return v2.functional.center_crop(image, [self.crop_size, self.crop_size])


def saved_size(contents: Mapping[str, Any], name: str) -> Optional[int]:
    """An image size a checkpoint's run was made with (its saved arguments), if it records a valid one."""
    saved = contents.get("args")
    value = saved.get(name) if isinstance(saved, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def evaluation_sizes(
    resize_size: Optional[int],
    crop_size: Optional[int],
    contents: Mapping[str, Any],
    flags: Tuple[str, str] = ("--resize-size", "--crop-size"),
) -> Tuple[int, int]:
    """Validation resize and crop: the flags, else the checkpoint's run's, else 256 / 224.

    A checkpoint thus evaluates at the sizes it was validated at during
    training; the original release's files (no saved arguments) at ImageNet's.
    A crop given alone is resized in ImageNet's 256 / 224 ratio.
    """
    # An explicit 0 must reach the check below, not fall through to a default.
    crop = crop_size if crop_size is not None else saved_size(contents, "val_crop_size") or DEFAULT_CROP_SIZE
    resize = resize_size
    if resize is None and crop_size is None:
        resize = saved_size(contents, "val_resize_size")
    if resize is None:
        resize = round(crop * DEFAULT_RESIZE_SIZE / DEFAULT_CROP_SIZE)
    resize_flag, crop_flag = flags
    if crop < 1 or resize < 1:
        raise UsageError(f"{resize_flag} and {crop_flag} must be positive (got {resize}, {crop})")
    if crop > resize:
        raise UsageError(f"{crop_flag} {crop} is larger than {resize_flag} {resize}")
    return resize, crop
