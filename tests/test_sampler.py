"""The order in which each process sees the data: a function of (seed, epoch), shared fairly across ranks."""
import pytest

from engine.data import SeededSampler
from engine.distributed import DistContext


def shares(size, world, shuffle, epoch=0, skip=0):
    result = []
    for rank in range(world):
        sampler = SeededSampler(size, DistContext(rank=rank, world_size=world), seed=5, shuffle=shuffle)
        sampler.set_epoch(epoch, skip)
        result.append((len(sampler), [index for index, _ in sampler]))
    return result


@pytest.mark.parametrize("size", [1, 2, 7, 61, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_training_gives_every_rank_an_equal_share_and_len_agrees(size, world):
    for skip in (0, 3):
        ranks = shares(size, world, shuffle=True, epoch=2, skip=skip)
        assert len({len(indices) for _, indices in ranks}) == 1  # unequal shares would hang DDP
        assert all(length == len(indices) for length, indices in ranks)
    assert set().union(*(set(indices) for _, indices in shares(size, world, shuffle=True))) == set(range(size))


@pytest.mark.parametrize("size", [1, 7, 61])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_counts_every_image_exactly_once(size, world):
    ranks = shares(size, world, shuffle=False)
    everything = sorted(index for _, indices in ranks for index in indices)
    assert everything == list(range(size))
    assert all(length == len(indices) for length, indices in ranks)


def test_order_depends_on_seed_and_epoch_only():
    assert shares(61, 2, True, epoch=3) == shares(61, 2, True, epoch=3)
    assert shares(61, 2, True, epoch=3) != shares(61, 2, True, epoch=4)
