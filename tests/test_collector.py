"""The run's set-up objects are kept out of the garbage collector's walks, and only for the run."""
import gc

from engine.collector import objects_built_so_far_frozen


class Node:
    def __init__(self):
        self.partner = None


def test_objects_built_before_are_frozen_and_released_after():
    built_before = [Node() for _ in range(1000)]
    frozen_before = gc.get_freeze_count()
    with objects_built_so_far_frozen():
        assert gc.get_freeze_count() >= frozen_before + len(built_before)
    assert gc.get_freeze_count() == 0


def test_cycles_made_inside_are_still_collected():
    collected = []
    with objects_built_so_far_frozen():
        first, second = Node(), Node()
        first.partner, second.partner = second, first
        gc.callbacks.append(lambda phase, info: collected.append(info["collected"]) if phase == "stop" else None)
        try:
            del first, second
            gc.collect()
        finally:
            gc.callbacks.pop()
    assert sum(collected) >= 2
