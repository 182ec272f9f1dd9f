"""The ``loader`` subcommand of ``scripts/benchmark.py``: the project's input pipeline against the original's.

Both pipelines deliver what a training step consumes, batches of normalised
float images on the training device, from the same JPEGs with the same number
of workers:

* original: ``ImageFolder`` + PIL + ``RandomResizedCrop(224)`` + flip +
  ``ToTensor`` + ``Normalize`` in the workers, float batches to the device;
* project: the engine's own loader (``engine.data``): uint8 decoding and
  augmentation in the workers, per-sample seeds, conversion and normalisation
  once, on a GPU on the device, training on the CPU in the workers
  (:class:`engine.data.BatchPreparer`).

The two are measured alternately, several times each, with fresh workers every
time; a measurement skips the first batches (worker start-up) and the figure
is the median images/s.

    python scripts/make_demo_data.py data/bench --width 500 --height 375 --train-per-class 150
    python scripts/benchmark.py loader data/bench -j 2 -b 32 --batches 12

(``python scripts/loader_benchmark.py DATA ...`` runs the same.)
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from engine.config import ArgumentParser, require_at_least  # noqa: E402
from engine.data import (  # noqa: E402
    IMAGENET_MEAN, IMAGENET_STD, BatchPreparer, SeededImageFolder, SeededSampler, TrainTransform, build_loader,
    list_samples,
)
from engine.distributed import DistContext, resolve_device  # noqa: E402
from engine.errors import UsageError, run_cli  # noqa: E402

PIPELINES = ("project", "original")


def original_loader(root: str, crop: int, batch: int, workers: int, pin_memory: bool) -> DataLoader:
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    dataset = datasets.ImageFolder(
        root,
        transforms.Compose(
            [transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
        ),
    )
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin_memory)


def project_loader(root: str, crop: int, batch: int, workers: int, ctx: DistContext,
                   prepare: BatchPreparer) -> DataLoader:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    dataset = SeededImageFolder(list_samples(root, classes), TrainTransform(crop))
    sampler = SeededSampler(len(dataset), ctx, seed=0, shuffle=True)
    return build_loader(dataset, sampler, batch_size=batch, workers=workers, ctx=ctx, drop_last=True, prepare=prepare)


def device_batches(pipeline: str, loader: DataLoader, prepare: BatchPreparer) -> Iterator[torch.Tensor]:
    """Endless normalised float batches on ``prepare.device``, epoch after epoch."""
    epoch = 0
    while True:
        if pipeline == "project":
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                yield prepare(batch)[0]
        else:
            for images, _ in loader:
                yield images.to(prepare.device, non_blocking=True)
        epoch += 1


def time_pipeline(make_loader: Callable[[], DataLoader], pipeline: str, batches: int, warmup: int,
                  prepare: BatchPreparer) -> float:
    loader = make_loader()
    stream = device_batches(pipeline, loader, prepare)
    device = prepare.device
    for _ in range(warmup):
        next(stream)
    images = 0
    started = time.perf_counter()
    for _ in range(batches):
        images += next(stream).shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    del stream, loader  # workers go with the loader: every measurement starts afresh
    return images / elapsed


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="ImageFolder root (DATA/train is used when present)")
    parser.add_argument("-j", "--workers", type=int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="batches skipped per measurement (worker start-up)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each pipeline, alternating")
    parser.add_argument("--crop-size", type=int, default=224, help="RandomResizedCrop output size (default 224)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run_loader(args: argparse.Namespace) -> int:
    """Images/s of the project's and the original's input pipelines on the same JPEGs."""
    root = os.path.join(args.data, "train") if os.path.isdir(os.path.join(args.data, "train")) else args.data
    if not os.path.isdir(root) or not any(entry.is_dir() for entry in os.scandir(root)):
        raise UsageError(f"{args.data!r} holds no class folders: pass an ImageFolder root (or one with train/)")
    require_at_least(args, 1, "batch_size", "batches", "repeats", "crop_size")
    require_at_least(args, 0, "workers", "warmup")
    images = len(list_samples(root, sorted(entry.name for entry in os.scandir(root) if entry.is_dir())))
    if args.batch_size > images:
        # Full batches only: a larger batch than the dataset would never yield one.
        raise UsageError(f"-b {args.batch_size} is more than the {images} images of {root!r}: use a smaller batch")
    device = resolve_device(args.device)
    ctx = DistContext(device=device)
    prepare = BatchPreparer(device, channels_last=False)  # as the training engine prepares an NCHW model's batches
    makers: Dict[str, Callable[[], DataLoader]] = {
        "project": lambda: project_loader(root, args.crop_size, args.batch_size, args.workers, ctx, prepare),
        "original": lambda: original_loader(root, args.crop_size, args.batch_size, args.workers, device.type == "cuda"),
    }
    rates: Dict[str, List[float]] = {name: [] for name in PIPELINES}
    for repeat in range(args.repeats):
        order = PIPELINES if repeat % 2 == 0 else PIPELINES[::-1]
        for name in order:
            rates[name].append(time_pipeline(makers[name], name, args.batches, args.warmup, prepare))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"input pipeline: {root}, {args.workers} workers, batch {args.batch_size}, crop {args.crop_size}, "
          f"normalised float batches on {device}; median of {args.repeats} x {args.batches} batches")
    print(f"original pipeline (PIL + ToTensor + Normalize in the workers): {medians['original']:.1f} img/s")
    print(f"ratio project / original: {medians['project'] / medians['original']:.2f}x")
    where = "in the workers" if prepare.worker_normalise is not None else f"on {device.type}"
    print(f"project pipeline (uint8 decoding and augmentation in the workers, normalised {where}): "
          f"{medians['project']:.1f} img/s")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_loader_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_loader(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
