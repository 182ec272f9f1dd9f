"""The order each process sees the data in: a function of (seed, epoch), shared fairly across ranks."""
import math
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import Sampler

from ..distributed import DistContext
from .dataset import sample_seed


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
