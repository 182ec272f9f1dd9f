"""The DataLoader and its worker processes: how many, their signals, their exit, their shared memory."""
import atexit
import multiprocessing
import os
import shutil
import signal
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..distributed import DistContext
from .batches import BatchPreparer, Collate
from .dataset import SeededImageFolder
from .sampler import SeededSampler

PREFETCHED_BATCHES = 4  # per loader worker


def build_loader(
    dataset: SeededImageFolder,
    sampler: SeededSampler,
    *,
    batch_size: int,
    workers: int,
    ctx: DistContext,
    drop_last: bool,
    prepare: Optional[BatchPreparer] = None,
) -> DataLoader:
    """The loader of ``dataset``, its batches ready for ``prepare`` (uint8 as decoded without one)."""
    if workers > 0:
        # Runs before multiprocessing's own exit handler (atexit is last in, first out).
        atexit.register(kill_loader_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(prepare.worker_normalise if prepare is not None else None),
        pin_memory=ctx.is_cuda,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCHED_BATCHES if workers > 0 else None,
        # Our own generator keeps the loader from drawing on the global RNG the model's dropout uses.
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )


def default_workers(ctx: DistContext) -> int:
    """The machine's CPUs over its processes, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(ctx.local_world_size, 1)))


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
    traceback, so their persistent workers ignore multiprocessing's SIGTERM at
    exit and the join would hang for ever. Daemonic children are never meant to
    outlive the main process, so killing them loses nothing.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def out_of_shared_memory(error: BaseException) -> bool:
    """Whether ``error`` is a loader worker failing for want of shared memory (allocating, or by SIGBUS)."""
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
