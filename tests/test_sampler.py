"""The order in which each process sees the data: a function of (seed, epoch), shared fairly across ranks."""
import pytest

from engine.data import SeededSampler
from engine.distributed import DistContext


def shares(size, world, shuffle, epoch=0, done=0):
    result = []
    for rank in range(world):
        sampler = SeededSampler(size, DistContext(rank=rank, world_size=world), seed=5, shuffle=shuffle)
        sampler.set_epoch(epoch, done)
        result.append((len(sampler), [index for index, _ in sampler]))
    return result


@pytest.mark.parametrize("size", [1, 2, 7, 61, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_training_gives_every_rank_an_equal_share_and_len_agrees(size, world):
    for done in (0, 3):
        ranks = shares(size, world, shuffle=True, epoch=2, done=done)
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


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_resumed_epoch_gives_each_rank_the_rest_of_its_share(world):
    whole = shares(61, world, shuffle=True, epoch=1)
    steps, batch = 4, 2  # four steps of two images a rank were trained before the stop
    resumed = shares(61, world, shuffle=True, epoch=1, done=steps * batch * world)
    assert [indices for _, indices in resumed] == [indices[steps * batch:] for _, indices in whole]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_an_epoch_resumed_by_another_number_of_processes_trains_every_image_once(before, after):
    size, batch, steps = 48, 2, 3
    whole = shares(size, before, shuffle=True, epoch=1)
    trained = [index for _, indices in whole for index in indices[:steps * batch]]
    rest = [index for _, indices in shares(size, after, shuffle=True, epoch=1, done=len(trained)) for index in indices]
    assert sorted(trained + rest) == list(range(size))  # 48 - 6 * before divides over every ``after`` here
