"""Keep Python's cyclic garbage collector off the objects a run builds once.

A training step creates and drops thousands of small Python objects (tensors,
autograd nodes, the contexts of custom autograd functions), so the collector
runs every few steps, and each of its full collections walks every tracked
object still alive: the model, the optimizer state and, for ImageNet, the 1.28
million (path, class) samples. Measured on a 2-core CPU, 30 extra ``[B, C]``
operations per ResNet-50 block cost 23 ms per training step with the collector
as it is and nothing once set-up's objects were frozen: the cost was the
collections, not the operations. Frozen objects are only left out of the
collector's walks (``gc.freeze``); objects the loop creates are collected as
usual. Forked loader workers also keep from writing to (and so copying) the
pages of frozen objects.
"""
import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def objects_built_so_far_frozen() -> Iterator[None]:
    """Freeze every object alive now for the duration: what set-up built is never walked again."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
