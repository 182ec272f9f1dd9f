"""The order each process sees the data in: a function of (seed, epoch), shared fairly across ranks."""
import math
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import Sampler

from ..distributed import DistContext
from .dataset import sample_seed


class SeededSampler(Sampler):
    """This rank's share of the dataset as ``(index, sample_seed)`` pairs.

    Training (``shuffle=True``): one order of the whole dataset per (seed, epoch),
    whatever the number of processes; rank r takes its positions r, r + world, ...,
    repeating from the start where the last round falls short, as ``DistributedSampler``
    pads. ``done`` positions of the order were trained already (a resumed epoch,
    perhaps by another number of processes), so the ranks share out the rest.
    Evaluation (``shuffle=False``): rank r takes indices r, r + world, ... with no
    padding, so every image is counted exactly once whatever the number of processes.
    """

    def __init__(self, size: int, ctx: DistContext, seed: int, shuffle: bool):
        self.size = size
        self.rank, self.world = ctx.rank, ctx.world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.done = 0

    def set_epoch(self, epoch: int, done: int = 0) -> None:
        """Draw ``epoch``'s order, of which the first ``done`` positions are trained already."""
        self.epoch, self.done = epoch, done

    def _indices(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        # Modulo the size: the padding repeats the order from its start, even for a dataset smaller than the world.
        first = self.done + self.rank
        return [order[position % self.size] for position in range(first, first + self.world * len(self), self.world)]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index in self._indices():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        # Arithmetic, not len(self._indices()): that would draw a whole permutation on every call.
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world))
        return math.ceil(max(self.size - self.done, 0) / self.world)
