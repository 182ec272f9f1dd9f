"""Data: the ImageFolder layout, uint8 decoding and augmentation in the workers, seeded order, batches.

One module per concern: ``folders`` (the layout, listed once), ``dataset``
(decoding, per-sample seeds), ``transforms`` (train and validation geometry,
evaluation sizes), ``sampler`` (seeded order over ranks), ``batches`` (stacking,
normalisation, mixing) and ``loader`` (the DataLoader and its workers).
Unreadable images are skipped and reported by path, unless ``--strict-data``.
"""
from .batches import IMAGENET_MEAN, IMAGENET_STD, Batch, BatchMixer, BatchPreparer, Normalise
from .dataset import SeededImageFolder, decode_rgb, sample_seed
from .folders import IMAGE_EXTENSIONS, check_data_root, image_files, list_samples
from .loader import PREFETCHED_BATCHES, build_loader, default_workers, out_of_shared_memory, shared_memory_advice
from .sampler import SeededSampler
from .transforms import (
    DEFAULT_CROP_SIZE, DEFAULT_RESIZE_SIZE, TrainTransform, ValTransform, evaluation_sizes, saved_size,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Batch", "BatchMixer", "BatchPreparer", "Normalise",
    "SeededImageFolder", "decode_rgb", "sample_seed",
    "IMAGE_EXTENSIONS", "check_data_root", "image_files", "list_samples",
    "PREFETCHED_BATCHES", "build_loader", "default_workers", "out_of_shared_memory", "shared_memory_advice",
    "SeededSampler",
    "DEFAULT_CROP_SIZE", "DEFAULT_RESIZE_SIZE", "TrainTransform", "ValTransform", "evaluation_sizes", "saved_size",
]
