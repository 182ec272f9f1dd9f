"""The ImageFolder layout: ``DATA/{train,val}/CLASS/*.JPEG``, checked once and listed in a fixed order."""
import os
from typing import List, Sequence, Tuple

from ..errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def class_folders(split_dir: str) -> List[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def check_data_root(root: str, need_train: bool) -> List[str]:
    """Check DATA's layout and return the class names (from train/, checked against val/)."""
    if not os.path.exists(root):
        raise UsageError(f"DATA folder {root!r} does not exist: pass the folder holding train/ and val/")
    if not os.path.isdir(root):
        raise UsageError(f"DATA {root!r} is not a folder: pass the folder holding train/ and val/")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if need_train and not os.path.isdir(train_dir):
        raise UsageError(f"{root!r} has no train/ folder: training needs DATA/train/CLASS/*.JPEG")
    if not os.path.isdir(val_dir):
        raise UsageError(f"{root!r} has no val/ folder: evaluation needs DATA/val/CLASS/*.JPEG")
    reference = train_dir if os.path.isdir(train_dir) else val_dir
    classes = class_folders(reference)
    if not classes:
        raise UsageError(f"{reference!r} has no class folders: put each class's images in {reference}/CLASS/")
    if reference == train_dir:
        val_classes = class_folders(val_dir)
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
