"""Validation: every image counted exactly once, whatever the number of processes."""
import time
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from .distributed import all_reduce_sum, any_rank
from .errors import UsageError
from .loop import LoopContext, report_unreadable
from .metrics import topk_correct
from .reporting import AverageMeter, Progress, test_line


@dataclass
class EvalResult:
    loss: float
    prec1: float
    prec5: float
    images: int
    unreadable: List[Tuple[str, str]]
    interrupted: bool = False


@torch.no_grad()
def evaluate(model: nn.Module, loader, loop: LoopContext, description: str = "Test") -> EvalResult:
    """Loss, Prec@1 and Prec@5 over the whole validation set.

    ``model`` must be the plain module, not the DDP wrapper: ranks hold unequal
    numbers of batches here, and DDP's forward would wait on the others.
    """
    ctx = loop.ctx
    model.eval()
    meters = {name: AverageMeter() for name in ("batch_time", "loss", "top1", "top5")}
    # Sums in float64 on the device: image counts stay exact and one all-reduce finishes the job.
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss sum, correct@1, correct@5, images
    unreadable: List[Tuple[str, str]] = []
    batches = len(loader)
    progress = Progress(batches, loop.print_freq, ctx.is_primary, description)
    interrupted = False
    end = time.perf_counter()
    for index, batch in enumerate(loader):
        report_unreadable(batch.unreadable, loop.strict_data)
        unreadable.extend(batch.unreadable)
        if len(batch):
            images, targets = loop.prepare(batch)
            with loop.autocast():
                output = model(images)
                loss = loop.criterion(output, targets)
            correct1, correct5 = topk_correct(output.float(), targets)
            n = len(batch)
            count = torch.tensor(float(n), dtype=torch.float64, device=ctx.device)
            totals += torch.stack([loss.detach().double() * n, correct1.double(), correct5.double(), count])
            meters["loss"].update(loss.item(), n)
            meters["top1"].update(100.0 * correct1.item() / n, n)
            meters["top5"].update(100.0 * correct5.item() / n, n)
        meters["batch_time"].update(time.perf_counter() - end)
        end = time.perf_counter()
        progress.step(index, test_line(index, batches, meters), {"prec@1": f"{meters['top1'].avg:.2f}"})
        # Ranks hold different numbers of batches here, so each checks its own flag; they agree below.
        if loop.stop.requested:
            interrupted = True
            break
    progress.close()
    interrupted = any_rank(interrupted, ctx)
    all_reduce_sum(totals, ctx)
    loss_sum, correct1, correct5, count = totals.tolist()
    count = int(round(count))
    if count == 0 and not interrupted:
        raise UsageError("no readable validation image: check DATA/val")
    scale = 100.0 / max(count, 1)
    return EvalResult(loss=loss_sum / max(count, 1), prec1=correct1 * scale, prec5=correct5 * scale, images=count,
                      unreadable=unreadable, interrupted=interrupted)
