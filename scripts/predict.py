"""Classify images with a trained checkpoint: the top-k classes and their probabilities.

    python scripts/predict.py --resume runs/eca_resnet50_demo/model_best.pth.tar photo.jpg
    python scripts/predict.py --resume eca_resnet50_k3557.pth.tar --class-names imagenet_classes.txt -b 64 photos/
    python scripts/predict.py --resume model_best.pth.tar --json photos/ > predictions.json
    python scripts/predict.py --resume eca_resnet50_k3557.safetensors photo.jpg

Images are preprocessed as in validation (shorter side resized, centre crop,
ImageNet mean and std). Class names come from ``--class-names`` (a text file,
one name per line in class-index order) or from the checkpoint's
``class_names``; without either, class indices are printed.
"""
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import models  # noqa: E402
from models.fused import IMPLS as ECA_IMPLS  # noqa: E402
from engine.checkpoint import fuse, load_model  # noqa: E402
from engine.config import ArgumentParser  # noqa: E402
from engine.distributed import resolve_device  # noqa: E402
from engine.data import (  # noqa: E402
    IMAGE_EXTENSIONS,
    BatchPreparer,
    ValTransform,
    decode_rgb,
    evaluation_sizes,
    image_files,
)
from engine.errors import UsageError, run_cli  # noqa: E402


@dataclass
class Prediction:
    image: str
    indices: List[int]
    probabilities: List[float]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Top-k classes of images, from a trained ECA-Net checkpoint.")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched recursively")
    parser.add_argument("--resume", required=True, metavar="CKPT", help="checkpoint to predict with (.pth.tar or .safetensors)")
    parser.add_argument("-a", "--arch", choices=sorted(models.ARCHITECTURES), help="check that the checkpoint holds this architecture")
    parser.add_argument("--class-names", metavar="FILE", help="text file with one class name per line, in class-index order")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    parser.add_argument("--resize-size", type=int, default=None, help="shorter side before cropping (default 256, or the checkpoint's)")
    parser.add_argument("--crop-size", type=int, default=None, help="centre crop (default 224, or the checkpoint's)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--eca-impl", choices=ECA_IMPLS, default="auto",
                        help="ECA block implementation (default auto: the fastest for the device)")
    return parser


# --- inputs ------------------------------------------------------------------------------------


def collect_images(paths: Sequence[str]) -> List[str]:
    """Files as given, and every image under each folder (recursively, sorted)."""
    images: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = image_files(path)
            if not found:
                raise UsageError(f"folder {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            images.extend(found)
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise UsageError(f"image or folder {path!r} does not exist")
    return images


def read_class_names(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            names = [line.strip() for line in handle]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read class names from {path!r}: {error}") from None
    # Trailing blank lines are common at the end of such files; blank lines elsewhere would shift indices.
    while names and not names[-1]:
        names.pop()
    return names


def resolve_class_names(names_file: Optional[str], contents: Mapping[str, Any], num_classes: int) -> Optional[List[str]]:
    """Names from the file, else from the checkpoint, else None (indices are shown)."""
    if names_file:
        names = read_class_names(names_file)
        if len(names) != num_classes:
            raise UsageError(
                f"{names_file!r} has {len(names)} class names but the model has {num_classes} classes"
            )
        return names
    names = contents.get("class_names")
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return list(names)
    if names is not None:
        print(f"warning: the checkpoint's class_names do not fit its {num_classes} classes; showing indices", file=sys.stderr)
    return None


# --- prediction --------------------------------------------------------------------------------


class Preprocess:
    """The evaluation pipeline's own decoding and geometry (resize the shorter side, centre crop), as uint8."""

    def __init__(self, resize_size: int, crop_size: int):
        self.geometry = ValTransform(resize_size, crop_size)

    def __call__(self, path: str) -> torch.Tensor:
        return self.geometry(decode_rgb(path))


def load_batches(
    paths: Sequence[str], preprocess: Preprocess, batch_size: int
) -> Iterator[Tuple[List[str], torch.Tensor]]:
    """uint8 batches of readable images; an unreadable one is skipped with a warning naming it."""
    names: List[str] = []
    tensors: List[torch.Tensor] = []
    for path in paths:
        try:
            tensors.append(preprocess(path))
        except ValueError as error:  # what decode_rgb raises for a file that is not a readable image
            if len(paths) == 1:
                raise UsageError(f"cannot read image {path!r}: {error}") from None
            print(f"warning: skipping {path!r}: not a readable image ({error})", file=sys.stderr)
            continue
        names.append(path)
        if len(names) == batch_size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)


@torch.inference_mode()
def predict(
    model: torch.nn.Module, batches: Iterator[Tuple[List[str], torch.Tensor]], device: torch.device, topk: int
) -> Iterator[Prediction]:
    normalise = BatchPreparer(device, channels_last=False).images
    for names, images in batches:
        probabilities = torch.softmax(model(normalise(images)).float(), dim=1)
        top_probabilities, top_indices = probabilities.topk(topk, dim=1)
        for name, indices, values in zip(names, top_indices.tolist(), top_probabilities.tolist()):
            yield Prediction(image=name, indices=indices, probabilities=values)


# --- output ------------------------------------------------------------------------------------


def as_record(prediction: Prediction, class_names: Optional[List[str]]) -> Dict[str, Any]:
    return {
        "image": prediction.image,
        "predictions": [
            {"class": class_names[index] if class_names else None, "index": index, "probability": probability}
            for index, probability in zip(prediction.indices, prediction.probabilities)
        ],
    }


def format_text(prediction: Prediction, class_names: Optional[List[str]]) -> str:
    labels = [class_names[i] if class_names else str(i) for i in prediction.indices]
    width = max(len(label) for label in labels)
    lines = [prediction.image]
    for rank, (label, probability) in enumerate(zip(labels, prediction.probabilities), start=1):
        lines.append(f"  {rank}. {label:<{width}}  {probability:.4f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.batch_size < 1:
        raise UsageError(f"-b/--batch-size must be at least 1, got {args.batch_size}")
    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1, got {args.topk}")
    device = resolve_device(args.device)
    paths = collect_images(args.images)

    model, checkpoint = load_model(args.resume, arch=args.arch, map_location="cpu")
    fuse(model, args.eca_impl)
    model.eval().to(device)
    num_classes = model.num_classes
    class_names = resolve_class_names(args.class_names, checkpoint.contents, num_classes)
    resize_size, crop_size = evaluation_sizes(args.resize_size, args.crop_size, checkpoint.contents)

    batches = load_batches(paths, Preprocess(resize_size, crop_size), args.batch_size)
    records = []
    for prediction in predict(model, batches, device, min(args.topk, num_classes)):
        records.append(as_record(prediction, class_names))
        if not args.json:
            print(format_text(prediction, class_names), flush=True)
    if not records:
        raise UsageError(f"none of the {len(paths)} images could be read")
    if args.json:
        print(json.dumps(records, indent=2))


if __name__ == "__main__":
    run_cli(main)
