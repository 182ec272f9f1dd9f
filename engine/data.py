"""Data: the ImageFolder layout, uint8 decoding and augmentation in the workers, seeded order.

Workers decode JPEGs and augment on uint8 tensors; the batch is converted to
float and normalised once (:class:`BatchPreparer`): for a GPU on the device,
after copying uint8 (a quarter of the bytes), and for training on the CPU in
the workers, which keeps the main process's thread pool off their cores.

Every random choice is a function of (seed, epoch, sample): the sampler yields
``(index, sample_seed)`` pairs and each sample's augmentation runs under its
own seed. The data a step sees therefore does not depend on the number of
workers or on what ran before, which is what makes a resumed run equal to one
that never stopped.

Unreadable images (empty files, broken JPEGs, text named ``.JPEG``) are
skipped and reported by path, unless ``--strict-data`` makes them fatal.
"""
import atexit
import math
import multiprocessing
import os
import re
import shutil
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchcodec.decoders import decode_image
from torchvision.transforms import v2

from .distributed import DistContext
from .errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFETCHED_BATCHES = 4  # per loader worker


# --- the folder layout ---------------------------------------------------------------------------


def _class_folders(split_dir: str) -> List[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def _split_dir(root: str, split: str) -> str:
    return os.path.join(root, split)


def check_data_root(root: str, need_train: bool) -> List[str]:
    """Check DATA's layout and return the class names (from train/, checked against val/)."""
    if not os.path.exists(root):
        raise UsageError(f"DATA folder {root!r} does not exist: pass the folder holding train/ and val/")
    if not os.path.isdir(root):
        raise UsageError(f"DATA {root!r} is not a folder: pass the folder holding train/ and val/")
    train_dir, val_dir = _split_dir(root, "train"), _split_dir(root, "val")
    if need_train and not os.path.isdir(train_dir):
        raise UsageError(f"{root!r} has no train/ folder: training needs DATA/train/CLASS/*.JPEG")
    if not os.path.isdir(val_dir):
        raise UsageError(f"{root!r} has no val/ folder: evaluation needs DATA/val/CLASS/*.JPEG")
    reference = train_dir if os.path.isdir(train_dir) else val_dir
    classes = _class_folders(reference)
    if not classes:
        raise UsageError(f"{reference!r} has no class folders: put each class's images in {reference}/CLASS/")
    if reference == train_dir:
        val_classes = _class_folders(val_dir)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(classes))[:5]
            raise UsageError(
                f"val/ and train/ of {root!r} have different class folders "
                f"(only in train/: {only_train}, only in val/: {only_val}): both need the same classes"
            )
    return classes


def image_files(folder: str) -> List[str]:
    """Every file under ``folder`` (recursively, symlinks followed) named as an image, sorted."""
    return sorted(
        os.path.join(dirpath, filename)
        for dirpath, _, filenames in os.walk(folder, followlinks=True)
        for filename in filenames
        if filename.lower().endswith(IMAGE_EXTENSIONS)
    )


def list_samples(split_dir: str, classes: Sequence[str]) -> List[Tuple[str, int]]:
    """Every image file under ``split_dir/CLASS``, in a fixed order, with its class index."""
    samples: List[Tuple[str, int]] = []
    for index, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        files = image_files(folder)
        if not files:
            raise UsageError(
                f"class folder {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder"
            )
        samples.extend((path, index) for path in files)
    return samples


# --- decoding and transforms ---------------------------------------------------------------------


def decode_rgb(path: str) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``[3, H, W]`` tensor; raises ``ValueError`` if it can't be read.

    TorchCodec decodes JPEG, PNG, WebP and GIF (torchvision's own decoders are
    deprecated in its favour); PIL reads the rest. An animated image gives its
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


class TrainTransform:
    """RandomResizedCrop + horizontal flip (+ optional auto-augment) on a uint8 image, drawn from ``generator``.

    The crop is sampled as torchvision's ``RandomResizedCrop`` samples it
    (area 8-100%, aspect ratio 3/4-4/3, ten tries, then a centre crop), but
    from the sample's own generator: no global RNG state to fork per image,
    which costs as much as the crop itself.
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


# ImageNet's evaluation geometry: resize the shorter side to 256, centre-crop 224.
DEFAULT_RESIZE_SIZE = 256
DEFAULT_CROP_SIZE = 224


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

    A checkpoint evaluates at the sizes it was validated at during training;
    files without saved arguments (the original release's) at ImageNet's. A
    crop given alone is resized in ImageNet's 256 / 224 ratio.
    """
    # An explicit 0 must reach the check below, not fall through to a default.
    crop = crop_size if crop_size is not None else saved_size(contents, "val_crop_size") or DEFAULT_CROP_SIZE
    resize = resize_size
    if resize is None and crop_size is None:
        resize = saved_size(contents, "val_resize_size")
    if resize is None:
        # Keep ImageNet's 256 / 224 ratio for any other crop.
        resize = round(crop * DEFAULT_RESIZE_SIZE / DEFAULT_CROP_SIZE)
    resize_flag, crop_flag = flags
    if crop < 1 or resize < 1:
        raise UsageError(f"{resize_flag} and {crop_flag} must be positive (got {resize}, {crop})")
    if crop > resize:
        raise UsageError(f"{crop_flag} {crop} is larger than {resize_flag} {resize}")
    return resize, crop


class ValTransform:
    """Resize the shorter side, then centre-crop; deterministic, so the generator is unused."""

    def __init__(self, resize_size: int, crop_size: int):
        self.resize_size = resize_size
        self.crop_size = crop_size

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        image = v2.functional.resize(image, [self.resize_size], antialias=True)
        return v2.functional.center_crop(image, [self.crop_size, self.crop_size])


def _for_users(error: Exception) -> str:
    """A decoder's message without what only its developers can use.

    The C++ decoders prefix their messages with "read_header_and_start,
    /long/build/path/DecodeJpeg.cpp:208, ", and TorchCodec's refusal of an
    unknown format ends by suggesting its own functions.
    """
    message = re.sub(r"^\w+, \S+\.(?:cpp|cc|h):\d+, ", "", str(error))
    message = re.sub(r" If you know you have a valid image, try using the dedicated decode_\* functions.*$", "", message)
    return message.rstrip(".")  # the caller goes on with "; " and PIL's reason


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index)."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (1 << 63)


class SeededImageFolder(Dataset):
    """Images of one split; item ``(index, seed)`` is decoded and transformed with a generator seeded by ``seed``.

    An unreadable image yields ``(None, path, reason)`` so the batch can go on without it.
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
        return self.transform(image, torch.Generator().manual_seed(seed)), target, None


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W], or float32 when the workers normalised it (training on the CPU)
    targets: torch.Tensor
    unreadable: List[Tuple[str, str]]  # (path, reason) of images left out of this batch

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


class Collate:
    """A worker's items -> :class:`Batch`, the images stacked where the batch will travel.

    In a loader worker the stack is written straight into shared memory, which
    is where the queue to the main process would otherwise copy it. With
    ``normalise`` (training on the CPU) the worker also normalises the batch:
    done in the main process, that millisecond of work per batch leaves the
    intra-op thread pool spinning on the cores the workers decode on (2 workers
    on 2 cores: 1112 against 1348 img/s, interleaved in one process).
    """

    def __init__(self, normalise: Optional[Normalise] = None):
        self.normalise = normalise

    def __call__(self, items) -> Batch:
        good = [(image, target) for image, target, _ in items if image is not None]
        unreadable = [(path, reason) for image, path, reason in items if image is None]
        targets = torch.tensor([target for _, target in good], dtype=torch.int64)
        return Batch(self.stack([image for image, _ in good]), targets, unreadable)

    def stack(self, images: List[torch.Tensor]) -> torch.Tensor:
        shape = (len(images), *images[0].shape) if images else (0, 3, 1, 1)
        if self.normalise is None:
            return stack_into(images, travelling_tensor(shape, torch.uint8))
        # The uint8 stack stays in the worker; the normalised float batch travels.
        stacked = stack_into(images, torch.empty(shape, dtype=torch.uint8))
        return self.normalise(stacked, out=travelling_tensor(shape, torch.float32, self.normalise.memory_format))


def stack_into(images: List[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    return torch.stack(images, out=out) if images else out


def travelling_tensor(
    shape: Tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """An empty tensor for a batch, allocated in shared memory when made in a loader worker.

    As torch's own ``default_collate`` allocates it (``share_memory_()`` would
    copy a private allocation over instead).
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, memory_format=memory_format)
    layout = torch.empty(shape, dtype=dtype, memory_format=memory_format, device="meta")
    storage = torch.UntypedStorage._new_shared(layout.numel() * layout.element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, layout.stride())


# --- order ---------------------------------------------------------------------------------------


class SeededSampler(Sampler):
    """This rank's share of the dataset as ``(index, sample_seed)`` pairs.

    Training (``shuffle=True``): a permutation drawn from (seed, epoch), padded
    to a multiple of the world size like ``DistributedSampler``. Evaluation
    (``shuffle=False``): rank r takes indices r, r + world, ... with no padding,
    so every image is counted exactly once whatever the number of processes.
    ``skip`` leaves out the first samples of this rank's share (a resumed epoch).
    """

    def __init__(self, size: int, ctx: DistContext, seed: int, shuffle: bool):
        self.size = size
        self.rank, self.world = ctx.rank, ctx.world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        total = math.ceil(self.size / self.world) * self.world
        # Repeat, not just extend, so that even a dataset smaller than the world gives every rank a full share.
        order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index in self._indices()[self.skip:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        # Arithmetic, not len(self._indices()): that would draw a whole permutation on every call.
        share = math.ceil(self.size / self.world) if self.shuffle else len(range(self.rank, self.size, self.world))
        return max(share - self.skip, 0)


def build_loader(
    dataset: SeededImageFolder,
    sampler: SeededSampler,
    batch_size: int,
    workers: int,
    ctx: DistContext,
    drop_last: bool,
    normalise: Optional[Normalise] = None,
) -> DataLoader:
    """The loader of ``dataset``; with ``normalise`` its batches come normalised (see :class:`Collate`)."""
    if workers > 0:
        # Runs before multiprocessing's own exit handler (atexit is last in, first out).
        atexit.register(kill_loader_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(normalise),
        pin_memory=ctx.is_cuda,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCHED_BATCHES if workers > 0 else None,
        # Our own generator keeps the loader from drawing on the global RNG the model's dropout uses.
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )


def out_of_shared_memory(error: BaseException) -> bool:
    """Whether ``error`` is a loader worker failing for want of shared memory.

    Whether a worker fails allocating a batch there or dies of SIGBUS writing
    it, the loader's error says "shared memory".
    """
    return isinstance(error, RuntimeError) and "shared memory" in str(error)


def shared_memory_advice(directory: str = "/dev/shm") -> str:
    """What to do when the loader's workers run out of shared memory, with the space there is now."""
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.0f} MiB free"
    except OSError:
        free = "not found"
    return (
        f"the data loader's workers ran out of shared memory ({directory}: {free}), where each holds up to "
        f"{PREFETCHED_BATCHES} batches: give it more (docker run --shm-size=8g, or a larger tmpfs on {directory}) "
        f"or pass a smaller -j or -b"
    )


def default_workers(ctx: DistContext) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(ctx.local_world_size, 1)))


# --- on the device -------------------------------------------------------------------------------


class BatchPreparer:
    """A loader's batch -> normalised float on the training device, in the memory format the model uses.

    On a GPU the uint8 batch (a quarter of the bytes to copy) is normalised on
    the device. Training on the CPU, the loader's workers normalise it already
    (:class:`Collate` with :attr:`worker_normalise`), and the float batch passes.
    """

    def __init__(self, device: torch.device, channels_last: bool):
        self.device = device
        self.normalise = Normalise(device, torch.channels_last if channels_last else torch.contiguous_format)

    @property
    def worker_normalise(self) -> Optional[Normalise]:
        """The normalisation for the loader's workers to apply: this one on the CPU, none for a GPU."""
        return self.normalise if self.device.type == "cpu" else None

    def __call__(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images(batch.images), batch.targets.to(self.device, non_blocking=True)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 ``[B, 3, H, W]`` stack normalised on the device, or one the workers normalised already."""
        if images.is_floating_point():
            return images.to(self.device, non_blocking=True)
        return self.normalise(images.to(self.device, non_blocking=True))


class BatchMixer:
    """MixUp / CutMix on the prepared batch, seeded per step so a resumed run mixes alike."""

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


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops at a step boundary.

    Without this a Ctrl-C kills the workers first and the main process fails
    fetching the next batch instead of saving a checkpoint. The price is that
    SIGTERM no longer ends them: see :func:`kill_loader_workers`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def kill_loader_workers() -> None:
    """At exit, SIGKILL the loader workers still alive (daemonic children).

    A run that ends on an exception keeps its loaders referenced from the
    traceback until the interpreter is gone, so their persistent workers are
    still waiting for work when multiprocessing's exit handler sends them
    SIGTERM, which they ignore, and joins them: the process would hang for
    ever after printing the error. Daemonic children are never meant to
    outlive the main process, so killing them outright loses nothing.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()
