"""One epoch of training, with everything decided once at set-up (AMP, EMA, mixing, clipping)."""
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .data.batches import BatchMixer
from .distributed import any_rank
from .errors import UsageError
from .loop import LoopContext, report_unreadable
from .metrics import topk_correct
from .reporting import AverageMeter, Progress, train_line
from .schedule import LRSchedule

# ``--log-samples``: every rank says which images each of its steps trained (see reporting.setup_logging).
samples_log = logging.getLogger("eca.samples")


@dataclass(kw_only=True)
class TrainParts:
    """The objects a training step uses, built once at set-up."""

    model: nn.Module  # what the step calls: DDP-wrapped and/or compiled
    model_without_ddp: nn.Module  # what is saved and evaluated
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: Optional[torch.amp.GradScaler]  # fp16 only
    mixer: BatchMixer
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None
    ema_steps: int = 32
    clip_grad_norm: Optional[float] = None
    frozen_norms: List[nn.Module] = field(default_factory=list)  # stay in eval mode (linear probing)
    seed: int = 0


@dataclass
class EpochResult:
    loss: float
    prec1: float
    prec5: float
    images: int
    seconds: float
    steps_done: int  # batches of this epoch finished, counting those before a resume
    samples_done: int  # positions of the epoch's order trained, by all ranks, counting those before a resume
    unreadable: List[Tuple[str, str]]
    interrupted: bool = False

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def set_learning_rate(optimizer: torch.optim.Optimizer, schedule: LRSchedule, epoch: int, step: int) -> float:
    factor = schedule.factor(epoch, step)
    for group in optimizer.param_groups:
        group["lr"] = schedule.base_lr * factor * group.get("lr_scale", 1.0)
    return schedule.base_lr * factor


def _backward_and_step(parts: TrainParts, loss: torch.Tensor) -> None:
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        if parts.clip_grad_norm is not None:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad_norm)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        loss.backward()
        if parts.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad_norm)
        parts.optimizer.step()


def train_one_epoch(parts: TrainParts, loader, loop: LoopContext, *, epoch: int, start_step: int = 0,
                    start_samples: int = 0,
                    after_step: Optional[Callable[[int, int], None]] = None) -> EpochResult:
    """Train ``epoch`` on from batch ``start_step``, the first ``start_samples`` of its order trained already.

    Stops early (``interrupted``) when a stop is requested; otherwise calls
    ``after_step(steps_done, samples_done)`` after every step (a mid-epoch save, say).
    """
    ctx = loop.ctx
    parts.model.train()
    for module in parts.frozen_norms:
        module.eval()
    loader.sampler.set_epoch(epoch, done=start_samples)
    samples_per_step = loader.batch_size * ctx.world_size
    steps_per_epoch = parts.schedule.steps_per_epoch
    meters = {name: AverageMeter() for name in ("batch_time", "data_time", "loss", "top1", "top5")}
    unreadable: List[Tuple[str, str]] = []
    progress = Progress(steps_per_epoch, loop.print_freq, ctx.is_primary, f"Epoch {epoch}", start=start_step)
    steps_done = start_step
    interrupted = False
    started = end = time.perf_counter()
    for step, batch in enumerate(loader, start=start_step):
        meters["data_time"].update(time.perf_counter() - end)
        report_unreadable(batch.unreadable, loop.strict_data)
        unreadable.extend(batch.unreadable)
        if len(batch) == 0:
            if ctx.distributed:
                raise UsageError(f"every image of a batch was unreadable ({batch.unreadable[:2]}...): clean DATA/train")
            steps_done = step + 1
            continue
        set_learning_rate(parts.optimizer, parts.schedule, epoch, step)
        images, targets = loop.prepare(batch)
        soft_targets = targets
        if parts.mixer.enabled:
            images, soft_targets = parts.mixer(images, targets, seed=parts.seed * 7_919 + epoch * 1_000_003 + step)
        with loop.autocast():
            output = parts.model(images)
            loss = loop.criterion(output, soft_targets)
        _backward_and_step(parts, loss)
        global_step = epoch * steps_per_epoch + step + 1
        if parts.ema is not None and global_step % parts.ema_steps == 0:
            parts.ema.update_parameters(parts.model_without_ddp)

        n = len(batch)
        correct1, correct5 = topk_correct(output.detach().float(), targets)
        meters["loss"].update(loss.item(), n)
        meters["top1"].update(100.0 * correct1.item() / n, n)
        meters["top5"].update(100.0 * correct5.item() / n, n)
        meters["batch_time"].update(time.perf_counter() - end)
        progress.step(step, train_line(epoch, step, steps_per_epoch, meters), {"loss": f"{meters['loss'].avg:.3f}"})
        samples_log.debug("samples: epoch %d step %d rank %d trained %s", epoch, step, ctx.rank, batch.indices)
        end = time.perf_counter()
        steps_done = step + 1
        if any_rank(loop.stop.requested, ctx):
            interrupted = True
            break
        if after_step is not None:
            after_step(steps_done, samples_done(start_step, start_samples, steps_done, samples_per_step))
    progress.close()
    return EpochResult(
        loss=meters["loss"].avg, prec1=meters["top1"].avg, prec5=meters["top5"].avg, images=meters["loss"].count,
        seconds=time.perf_counter() - started, steps_done=steps_done,
        samples_done=samples_done(start_step, start_samples, steps_done, samples_per_step),
        unreadable=unreadable, interrupted=interrupted,
    )


def samples_done(start_step: int, start_samples: int, steps_done: int, samples_per_step: int) -> int:
    """Positions of the epoch's order trained after ``steps_done`` steps: each step takes a batch from every rank."""
    return start_samples + (steps_done - start_step) * samples_per_step
