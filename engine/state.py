"""A training run's checkpoint: what it holds, putting it back, and the one place that writes it."""
import logging
import os
import random
from dataclasses import dataclass
from typing import List, NoReturn

import torch

from .checkpoint import Checkpoint, as_float, atomic_copy, atomic_save, remove_dead_writes, save_best_weights
from .config import Config, dump_yaml, serialisable_args
from .distributed import DistContext, barrier
from .errors import Interrupted, UsageError
from .preemption import StopRequest
from .train import TrainParts

logger = logging.getLogger("eca")

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
BEST_WEIGHTS = "model_best.safetensors"  # the best weights without pickle, beside BEST


@dataclass(frozen=True)
class ResumePoint:
    epoch: int = 0  # the epoch to run next (the original's checkpoint["epoch"])
    step: int = 0  # batches of that epoch already trained
    best_prec1: float = 0.0


def checkpoint_path(config: Config) -> str:
    return os.path.join(config.output_dir, CHECKPOINT)


def restore(parts: TrainParts, ckpt: Checkpoint) -> ResumePoint:
    """Put back everything ``ckpt`` holds; the original's release files hold less, which is said."""
    if ckpt.holds_weights_only:
        logger.warning("warning: %s holds weights only: optimizer and schedule state are not in the file, so training "
                       "starts from its weights with a fresh optimizer, at epoch 0 unless --start-epoch", ckpt.path)
        return ResumePoint()
    contents = ckpt.contents
    if contents.get("optimizer"):
        try:
            parts.optimizer.load_state_dict(contents["optimizer"])
        except (ValueError, KeyError) as error:
            raise UsageError(f"the optimizer state of {ckpt.path!r} does not fit this run ({error})") from None
    missing = [key for key in ("optimizer", "rng") if not contents.get(key)]
    for key, part in (("scaler", parts.scaler), ("model_ema", parts.ema)):
        if part is not None and contents.get(key):
            part.load_state_dict(contents[key])
        elif part is not None:
            missing.append(key)
    if missing:
        logger.warning("warning: %s has no %s state: those start afresh", ckpt.path, ", ".join(missing))
    _restore_rng(contents.get("rng") or {})
    return ResumePoint(int(contents.get("epoch") or 0), int(contents.get("batches_done") or 0),
                       as_float(contents.get("best_prec1")) or 0.0)


def _restore_rng(rng: dict) -> None:
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("python"):
        random.setstate((3, tuple(rng["python"]), None))


class CheckpointSaver:
    """Writes the run's checkpoints, atomically, from the primary process only."""

    def __init__(self, *, config: Config, ctx: DistContext, parts: TrainParts, seed: int, classes: List[str]):
        self.config, self.ctx, self.parts = config, ctx, parts
        self.seed, self.classes = seed, list(classes)
        self.output_dir = config.output_dir
        self.path = checkpoint_path(config)

    def prepare_folder(self) -> None:
        """Create the output folder, clear what a killed save left there, and record the resolved arguments."""
        if not self.ctx.is_primary:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        for name in (CHECKPOINT, BEST, BEST_WEIGHTS):
            for dead in remove_dead_writes(os.path.join(self.output_dir, name)):
                logger.info("=> removed %s, left by a run killed while saving", dead)
        with open(os.path.join(self.output_dir, "args.yaml"), "w") as handle:
            handle.write(dump_yaml(serialisable_args(self.config)))

    def save(self, point: ResumePoint, is_best: bool) -> None:
        """The run at ``point`` to checkpoint.pth.tar; when best, to model_best.pth.tar and .safetensors too."""
        if not self.ctx.is_primary:
            return
        atomic_save(self.state(point), self.path)
        if is_best:
            best = os.path.join(self.output_dir, BEST)
            atomic_copy(self.path, best)
            save_best_weights(best)

    def save_and_stop(self, point: ResumePoint, stop: StopRequest, where: str) -> NoReturn:
        """Save where the run stands (mid-epoch if need be) and end it with the command to resume."""
        self.save(point, is_best=False)
        barrier(self.ctx)
        raise Interrupted(
            f"stopped by {stop.signal_name or 'a signal'} {where}; saved {self.path}: continue with --resume {self.path}",
            signal_name=stop.signal_name,
        )

    def state(self, point: ResumePoint) -> dict:
        """The checkpoint: the original's keys, then everything an exact resume needs."""
        parts, model = self.parts, self.parts.model_without_ddp
        return {
            "epoch": point.epoch,
            "batches_done": point.step,
            "arch": self.config.arch,
            "state_dict": model.state_dict(),
            "best_prec1": float(point.best_prec1),
            "optimizer": parts.optimizer.state_dict(),
            "lr_scheduler": parts.schedule.describe(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "model_ema": parts.ema.state_dict() if parts.ema is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1]),
            },
            "seed": self.seed,
            "kernel_sizes": list(model.kernel_sizes),
            "class_names": self.classes,
            "num_classes": model.num_classes,
            "args": serialisable_args(self.config),
        }
