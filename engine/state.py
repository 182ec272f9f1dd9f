"""A training run's checkpoint: what it holds, putting it back, the one place that writes it, and when.

The same command run twice must not destroy the first run's days of work: a new run
into a folder that holds a run's checkpoints stops before touching it, unless it
continues that run (``--resume auto``) or is told to replace it (``--overwrite``).
"""
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, List, NoReturn, Optional

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
    samples: int = 0  # positions of that epoch's order already trained, whatever the number of processes


def checkpoint_path(config: Config) -> str:
    return os.path.join(config.output_dir, CHECKPOINT)


def auto_resume_path(output_dir: str) -> str:
    """``--resume auto``: the folder's checkpoint when there is one, else '' (start afresh)."""
    path = os.path.join(output_dir, CHECKPOINT)
    return path if os.path.exists(path) else ""


def run_files(output_dir: str) -> List[str]:
    """The checkpoints of a run that ``output_dir`` holds already."""
    return [name for name in (CHECKPOINT, BEST, BEST_WEIGHTS) if os.path.exists(os.path.join(output_dir, name))]


def refuse_to_replace(output_dir: str, *, resuming: bool, overwrite: bool) -> None:
    """A new run into a folder that holds another run's checkpoints stops here, before touching anything."""
    found = run_files(output_dir)
    if found and not resuming and not overwrite:
        raise UsageError(
            f"{output_dir} holds a run already ({', '.join(found)}): continue it with --resume auto, "
            "train into another folder with --output-dir DIR, or replace it with --overwrite"
        )


def restore(parts: TrainParts, ckpt: Checkpoint, samples_per_step: int) -> ResumePoint:
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
    step = int(contents.get("batches_done") or 0)
    samples = contents.get("samples_done")
    if samples is None:  # written before samples_done was: by a run of this one's processes and batch
        samples = step * samples_per_step
    return ResumePoint(int(contents.get("epoch") or 0), step, as_float(contents.get("best_prec1")) or 0.0,
                       int(samples))


def _restore_rng(rng: dict) -> None:
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("python"):
        random.setstate((3, tuple(rng["python"]), None))


class SaveSchedule:
    """When to write the checkpoint in mid-epoch: every N steps, every M minutes, both, or never.

    A failure then loses at most that much work. Only the primary process writes,
    so only its clock counts: the ranks need not agree on the time.
    """

    def __init__(self, every_steps: Optional[int], every_minutes: Optional[float],
                 clock: Callable[[], float] = time.monotonic):
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60 if every_minutes else None
        self.clock = clock
        self.last = clock()

    def due(self, global_step: int) -> bool:
        """Whether to save after ``global_step`` steps of the whole run."""
        if self.every_steps and global_step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and self.clock() - self.last >= self.every_seconds

    def saved(self) -> None:
        self.last = self.clock()


class CheckpointSaver:
    """Writes the run's checkpoints, atomically, from the primary process only."""

    def __init__(self, *, config: Config, ctx: DistContext, parts: TrainParts, seed: int, classes: List[str]):
        self.config, self.ctx, self.parts = config, ctx, parts
        self.seed, self.classes = seed, list(classes)
        self.output_dir = config.output_dir
        self.path = checkpoint_path(config)
        self.schedule = SaveSchedule(config.save_every_steps, config.save_every_minutes)

    def prepare_folder(self) -> None:
        """Create the output folder, clear what a killed save left there, and record the resolved arguments.

        Under ``--overwrite`` the old run's checkpoints go first, so that nothing resumes it by mistake.
        """
        if not self.ctx.is_primary:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        if self.config.overwrite:
            for name in run_files(self.output_dir):
                os.remove(os.path.join(self.output_dir, name))
                logger.info("=> --overwrite: removed %s", os.path.join(self.output_dir, name))
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
        self.schedule.saved()
        if is_best:
            best = os.path.join(self.output_dir, BEST)
            atomic_copy(self.path, best)
            save_best_weights(best)

    def save_if_due(self, point: ResumePoint, global_step: int) -> None:
        """The mid-epoch save of ``--save-every-steps`` and ``--save-every-minutes``, when one is due."""
        if self.ctx.is_primary and self.schedule.due(global_step):
            self.save(point, is_best=False)

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
            "samples_done": point.samples,
            "world_size": self.ctx.world_size,
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
