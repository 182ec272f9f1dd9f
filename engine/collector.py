"""Keep Python's cyclic garbage collector off the objects a run builds once.

A training step makes and drops thousands of small Python objects, so the
collector runs every few steps, and each full collection walks every tracked
object still alive: the model, the optimizer state and, for ImageNet, 1.28
million (path, class) samples. Frozen objects (``gc.freeze``) are left out of
those walks; what the loop creates is collected as usual. Forked loader workers
also keep from writing to, and so copying, the pages of frozen objects.
docs/performance.md has what the walks cost.
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
