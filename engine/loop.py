"""What every pass over a loader shares, training or validation: set up once, passed as one object."""
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence, Tuple

from torch import nn

from .data.batches import BatchPreparer
from .distributed import DistContext
from .errors import UsageError
from .preemption import StopRequest

logger = logging.getLogger("eca")


@dataclass(frozen=True, kw_only=True)
class LoopContext:
    ctx: DistContext
    prepare: BatchPreparer  # loader batch -> normalised images and targets on the device
    criterion: nn.Module
    autocast: Callable[[], ContextManager]  # a null context without --amp
    stop: StopRequest
    print_freq: int
    strict_data: bool


def report_unreadable(unreadable: Sequence[Tuple[str, str]], strict: bool) -> None:
    """Warn about each image a batch left out, or stop at the first under ``--strict-data``."""
    for path, reason in unreadable:
        if strict:
            raise UsageError(
                f"unreadable image {path!r} ({reason}): replace or remove it, or run without --strict-data to skip such files"
            )
        logger.warning("warning: skipped unreadable image %s (%s)", path, reason)
