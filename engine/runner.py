"""The whole run: processes, data, model, resume, the epoch loop, checkpoints and reports.

``main.py`` and ``light_main.py`` call :func:`main` with their recipe name;
nothing else differs between them.
"""
import argparse
import contextlib
import functools
import logging
import os
import random
import re
import socket
from dataclasses import dataclass
from typing import List, NoReturn, Optional, Sequence

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.kernel_sizes import format_kernel_sizes

from .checkpoint import (
    Checkpoint, as_float, atomic_copy, atomic_save, build_model, identify_architecture, model_from_checkpoint,
    read_checkpoint, remove_dead_writes, save_best_weights,
)
from .collector import objects_built_so_far_frozen
from .config import default_output_dir, dump_yaml, parse_args, resolve_image_sizes, serialisable_args
from .data import (
    BatchMixer, BatchPreparer, SeededImageFolder, SeededSampler, TrainTransform, ValTransform, build_loader,
    check_data_root, default_workers, list_samples, out_of_shared_memory, shared_memory_advice,
)
from .distributed import (
    DistContext, barrier, init_distributed, is_lost_peer, should_spawn, shutdown, visible_gpus,
)
from .errors import Interrupted, JobFailed, UsageError, report_and_exit
from .evaluate import EvalResult, evaluate
from .preemption import StopRequest
from .reporting import MetricsWriter, setup_logging, summary_line
from .schedule import LRSchedule
from .train import EpochResult, TrainParts, train_one_epoch
from .transfer import freeze_backbone, initialize_from, parameter_groups, read_init_checkpoint

logger = logging.getLogger("eca")


@dataclass
class ResumePoint:
    epoch: int = 0  # the epoch to run next (the original's checkpoint["epoch"])
    step: int = 0  # batches of that epoch already trained
    best_prec1: float = 0.0


# --- entry ---------------------------------------------------------------------------------------


def main(recipe: str, argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(recipe, argv)
    # Fail on bad paths here, once, before any process or folder is started.
    check_data_root(args.data, need_train=not args.evaluate)
    ckpt = read_checkpoint(args.resume) if args.resume else None
    resolve_image_sizes(args, ckpt.contents if ckpt is not None else {})
    if should_spawn(args):
        logger.info("=> %d GPUs visible: starting one DDP process per GPU", visible_gpus())
        if args.dist_url is None and args.world_size <= 1:
            args.dist_url = f"tcp://127.0.0.1:{free_port()}"
        try:
            mp.spawn(_spawned_process, args=(args,), nprocs=visible_gpus(), join=True)
        except mp.ProcessExitedException as error:
            raise SystemExit(error.exit_code or 1) from None
        return
    run_process(args, ckpt=ckpt)


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes this machine spawns to meet at."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawned_process(index: int, args) -> None:
    report_and_exit(functools.partial(run_process, args, index))


def run_process(args, spawned_index: Optional[int] = None, ckpt: Optional[Checkpoint] = None) -> None:
    """One process of the job; ``ckpt`` is the ``--resume`` file when the caller has read it already."""
    ctx = init_distributed(args, spawned_index)
    setup_logging(ctx.is_primary)
    try:
        run(args, ctx, ckpt)
    except RuntimeError as error:
        checkpoint = os.path.join(args.output_dir or default_output_dir(args), "checkpoint.pth.tar")
        if out_of_shared_memory(error):
            resume = f"; then restart with --resume {checkpoint}" if os.path.exists(checkpoint) else ""
            raise JobFailed(f"{shared_memory_advice()}{resume} (ECA_DEBUG=1 shows the traceback)") from error
        # A rank that died or hung is a fault of the job, not a bug here: one line per rank, not a traceback each.
        if not (ctx.distributed and is_lost_peer(error)):
            raise
        reason = re.sub(r"\[[^\]]*\.(?:cc|cpp):\d+\] ", "", " ".join(str(error).split()))[:300]  # no source paths
        raise JobFailed(
            f"rank {ctx.rank}: another process of the job died or stopped answering ({reason}); "
            f"restart the job with --resume {checkpoint} (ECA_DEBUG=1 shows the traceback)"
        ) from error
    finally:
        shutdown(ctx)


# --- set-up --------------------------------------------------------------------------------------


def per_process_batch(args, ctx: DistContext) -> int:
    """``-b`` is one machine's batch, as in the original: its processes share it."""
    if args.batch_size % ctx.local_world_size:
        raise UsageError(
            f"-b {args.batch_size} does not divide over the {ctx.local_world_size} processes of this machine: "
            f"use a multiple of {ctx.local_world_size}"
        )
    return args.batch_size // ctx.local_world_size


def agree_on_seed(args, ckpt: Optional[Checkpoint], ctx: DistContext) -> int:
    """``--seed``, else the resumed run's, else a fresh one; every rank must use the same."""
    if args.seed is not None:
        return args.seed
    if ckpt is not None and ckpt.contents.get("seed") is not None:
        return int(ckpt.contents["seed"])
    seed = torch.tensor([int.from_bytes(os.urandom(4), "little")], dtype=torch.int64)
    if ctx.distributed:
        torch.distributed.broadcast(seed.to(ctx.device), src=0)
    return int(seed.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_num_classes(args, classes: Sequence[str]) -> int:
    if args.num_classes is None:
        return len(classes)
    if args.num_classes < len(classes):
        raise UsageError(f"--num-classes {args.num_classes} is less than the {len(classes)} class folders of DATA")
    return args.num_classes


def create_model(args, ckpt: Optional[Checkpoint], num_classes: int) -> nn.Module:
    """The run's model: the ``--resume`` file's, or a new one (from ``--init-from`` where given)."""
    if ckpt is not None:
        if args.arch is None:
            args.arch = identify_architecture(ckpt.state_dict)
            if args.arch is None:
                raise UsageError(f"{args.resume!r} holds no known ECA architecture's weights")
        return model_from_checkpoint(args.arch, ckpt, k_size=args.ksize, num_classes=num_classes)
    k_size, init = args.ksize, None
    if args.init_from:
        init, k_size = read_init_checkpoint(args.init_from, args.arch, args.ksize)
    model = build_model(args.arch, k_size, num_classes)
    if init is not None:
        report = initialize_from(model, args.arch, args.init_from, init)
        for line in report.lines():
            logger.info(line)
    return model


def check_class_names(ckpt: Optional[Checkpoint], classes: Sequence[str]) -> None:
    names = ckpt.contents.get("class_names") if ckpt is not None else None
    if names and list(names) != list(classes):
        raise UsageError(
            f"{ckpt.path!r} was trained on other classes than DATA's ({len(names)} vs {len(classes)} folders, "
            "or other names): evaluate on the same classes, or fine-tune with --init-from"
        )


def autocast_for(args, device: torch.device):
    if args.amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def prepare_model(model: nn.Module, args, ctx: DistContext):
    """Device, memory format, SyncBN, DDP, compile: returns (model for the step, plain model)."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=memory_format)
    if args.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        logger.warning("warning: --sync-bn has no effect with a single process")
    plain = model
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.is_cuda else None)
    if args.compile:
        model = torch.compile(model)
    return model, plain


def make_loader(args, ctx, split: str, classes, batch: int, seed: int, train: bool, prepare: BatchPreparer):
    samples = list_samples(os.path.join(args.data, split), classes)
    transform = (TrainTransform(args.train_crop_size, args.auto_augment) if train
                 else ValTransform(args.val_resize_size, args.val_crop_size))
    dataset = SeededImageFolder(samples, transform)
    sampler = SeededSampler(len(dataset), ctx, seed, shuffle=train)
    workers = default_workers(ctx) if args.workers is None else args.workers
    drop_last = train and len(sampler) > batch
    loader = build_loader(dataset, sampler, batch, workers, ctx, drop_last=drop_last, normalise=prepare.worker_normalise)
    return loader, sampler


def header(args, ctx, model, batch, classes, train_images, val_images, output_dir) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("=> %s, ECA kernel sizes %s, %d classes, %.2fM parameters", args.arch,
                format_kernel_sizes(model.kernel_sizes),
                len(classes), parameters / 1e6)
    logger.info("=> device %s, %d process(es); batch %d per process, %d in all; lr %g (%s schedule)",
                ctx.device, ctx.world_size, batch, batch * ctx.world_size, args.lr, args.lr_scheduler)
    logger.info("=> %d train / %d val images; amp %s, channels_last %s, compile %s; output %s",
                train_images, val_images, args.amp, args.channels_last, args.compile, output_dir)


# --- checkpoints ---------------------------------------------------------------------------------


def restore(parts: TrainParts, ckpt: Checkpoint) -> ResumePoint:
    """Put back everything the file holds; the original's release files hold less, which is said."""
    if ckpt.holds_weights_only:
        logger.warning("warning: %s holds weights only: optimizer and schedule state are not in the file, so training "
                       "starts from its weights with a fresh optimizer, at epoch 0 unless --start-epoch", ckpt.path)
        return ResumePoint()
    contents = ckpt.contents
    point = ResumePoint(int(contents.get("epoch") or 0), int(contents.get("batches_done") or 0),
                        as_float(contents.get("best_prec1")) or 0.0)
    if contents.get("optimizer"):
        try:
            parts.optimizer.load_state_dict(contents["optimizer"])
        except (ValueError, KeyError) as error:
            raise UsageError(f"the optimizer state of {ckpt.path!r} does not fit this run ({error})") from None
    missing = [key for key in ("optimizer", "rng") if not contents.get(key)]
    if parts.scaler is not None:
        if contents.get("scaler"):
            parts.scaler.load_state_dict(contents["scaler"])
        else:
            missing.append("scaler")
    if parts.ema is not None:
        if contents.get("model_ema"):
            parts.ema.load_state_dict(contents["model_ema"])
        else:
            missing.append("model_ema")
    if missing:
        logger.warning("warning: %s has no %s state: those start afresh", ckpt.path, ", ".join(missing))
    return point


def restore_rng(ckpt: Checkpoint) -> None:
    rng = ckpt.contents.get("rng") or {}
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("python"):
        random.setstate((3, tuple(rng["python"]), None))


# --- the run -------------------------------------------------------------------------------------


def run(args, ctx: DistContext, ckpt: Optional[Checkpoint] = None) -> None:
    classes = check_data_root(args.data, need_train=not args.evaluate)
    num_classes = resolve_num_classes(args, classes)
    batch = per_process_batch(args, ctx)
    if ckpt is None and args.resume:
        ckpt = read_checkpoint(args.resume)
    check_class_names(ckpt, classes)
    seed = agree_on_seed(args, ckpt, ctx)
    seed_everything(seed)
    model = create_model(args, ckpt, num_classes)
    autocast = autocast_for(args, ctx.device)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing).to(ctx.device)
    prepare = BatchPreparer(ctx.device, args.channels_last)
    val_loader, _ = make_loader(args, ctx, "val", classes, batch, seed, train=False, prepare=prepare)

    with StopRequest() as stop:
        if args.evaluate:
            if ckpt is None and not args.init_from:
                logger.warning("warning: -e without --resume evaluates randomly initialised weights")
            model, plain = prepare_model(model, args, ctx)
            with objects_built_so_far_frozen():
                result = evaluate(plain, val_loader, prepare, criterion, ctx, autocast, args.print_freq,
                                  args.strict_data, stop, logger)
            if result.interrupted:
                raise Interrupted(f"stopped by {stop.signal_name} during evaluation", signal_name=stop.signal_name)
            logger.info(summary_line(result.prec1, result.prec5))
            return
        train(args, ctx, model, ckpt, classes, num_classes, batch, seed, autocast, criterion, prepare, val_loader, stop)


def build_parts(args, ctx, model, steps_per_epoch, seed, autocast, criterion, prepare, num_classes) -> TrainParts:
    frozen = freeze_backbone(args.arch, model) if args.freeze_backbone else []
    groups = parameter_groups(args.arch, model, args.backbone_lr_scale)
    step_model, plain = prepare_model(model, args, ctx)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    schedule = LRSchedule(args.lr, args.lr_scheduler, args.epochs, steps_per_epoch, args.lr_step_size,
                          args.lr_gamma, args.warmup_epochs, args.lr_min)
    scaler = torch.amp.GradScaler(ctx.device.type) if args.amp == "fp16" else None
    ema = None
    if args.model_ema:
        decay = args.model_ema_decay ** args.model_ema_steps  # the decay is given per step, applied every N steps
        ema = AveragedModel(plain, device=ctx.device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return TrainParts(step_model, plain, optimizer, criterion, schedule, autocast, scaler, prepare,
                      BatchMixer(num_classes, args.mixup_alpha, args.cutmix_alpha), ema, args.model_ema_steps,
                      args.clip_grad_norm, frozen, seed)


def train(args, ctx, model, ckpt, classes, num_classes, batch, seed, autocast, criterion, prepare, val_loader, stop):
    train_loader, train_sampler = make_loader(args, ctx, "train", classes, batch, seed, train=True, prepare=prepare)
    parts = build_parts(args, ctx, model, len(train_loader), seed, autocast, criterion, prepare, num_classes)
    point = restore(parts, ckpt) if ckpt is not None else ResumePoint()
    if args.start_epoch is not None:
        point.epoch, point.step = args.start_epoch, 0
    if ckpt is not None:
        restore_rng(ckpt)
        logger.info("=> resumed %r at epoch %d, batch %d (best Prec@1 %.3f)", args.resume, point.epoch, point.step,
                    point.best_prec1)
    output_dir = args.output_dir or default_output_dir(args)
    if ctx.is_primary:
        prepare_output_dir(args, output_dir)
    header(args, ctx, parts.model_without_ddp, batch, classes, len(train_loader.dataset), len(val_loader.dataset), output_dir)
    metrics = MetricsWriter(output_dir, args.tensorboard, point.epoch) if ctx.is_primary else None
    run = TrainingRun(args, ctx, parts, point, seed, list(classes), output_dir, stop, train_loader, train_sampler,
                      val_loader, metrics)
    try:
        with objects_built_so_far_frozen():
            run.run_epochs()
    finally:
        if metrics is not None:
            metrics.close()


def prepare_output_dir(args, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "model_best.safetensors"):
        for dead in remove_dead_writes(os.path.join(output_dir, name)):
            logger.info("=> removed %s, left by a run killed while saving", dead)
    with open(os.path.join(output_dir, "args.yaml"), "w") as handle:
        handle.write(dump_yaml(serialisable_args(args)))


@dataclass
class TrainingRun:
    """What a training run carries from epoch to epoch, and the loop over epochs."""

    args: argparse.Namespace
    ctx: DistContext
    parts: TrainParts
    point: ResumePoint
    seed: int
    classes: List[str]
    output_dir: str
    stop: StopRequest
    train_loader: DataLoader
    train_sampler: SeededSampler
    val_loader: DataLoader
    metrics: Optional[MetricsWriter]

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.output_dir, "checkpoint.pth.tar")

    def run_epochs(self) -> None:
        steps_per_epoch = len(self.train_loader)
        for epoch in range(self.point.epoch, self.args.epochs):
            train_result = None
            if self.point.step < steps_per_epoch:
                train_result = train_one_epoch(self.parts, self.train_loader, self.train_sampler, epoch,
                                               self.point.step, self.ctx, self.stop, self.args.print_freq,
                                               self.args.strict_data, logger)
                if train_result.interrupted:
                    self.stop_and_save(epoch, train_result.steps_done, f"at epoch {epoch}, batch {train_result.steps_done}")
            val = self.validate(self.parts.model_without_ddp, "Test")
            if val.interrupted:
                self.stop_and_save(epoch, steps_per_epoch, f"while validating epoch {epoch}")
            logger.info(summary_line(val.prec1, val.prec5))
            ema_val = None
            if self.parts.ema is not None:
                ema_val = self.validate(self.parts.ema.module, "Test (EMA)")
                logger.info(" * EMA Prec@1 %.3f Prec@5 %.3f", ema_val.prec1, ema_val.prec5)
            is_best = val.prec1 > self.point.best_prec1
            self.point.best_prec1 = max(val.prec1, self.point.best_prec1)
            self.point.epoch, self.point.step = epoch + 1, 0
            self.save(is_best)
            if self.metrics is not None:
                record_epoch(self.metrics, epoch, self.parts, train_result, val, ema_val)

    def validate(self, model: nn.Module, description: str) -> EvalResult:
        parts = self.parts
        return evaluate(model, self.val_loader, parts.prepare, parts.criterion, self.ctx, parts.autocast,
                        self.args.print_freq, self.args.strict_data, self.stop, logger, description=description)

    def stop_and_save(self, epoch: int, steps_done: int, where: str) -> NoReturn:
        """Save where the run stands (mid-epoch if need be) and end it with the command to resume."""
        self.point.epoch, self.point.step = epoch, steps_done
        self.save(is_best=False)
        barrier(self.ctx)
        raise Interrupted(
            f"stopped by {self.stop.signal_name or 'a signal'} {where}; saved {self.checkpoint_path}: "
            f"continue with --resume {self.checkpoint_path}",
            signal_name=self.stop.signal_name,
        )

    def save(self, is_best: bool) -> None:
        if not self.ctx.is_primary:
            return
        atomic_save(self.state(), self.checkpoint_path)
        if is_best:
            best = os.path.join(self.output_dir, "model_best.pth.tar")
            atomic_copy(self.checkpoint_path, best)
            save_best_weights(best)

    def state(self) -> dict:
        """The checkpoint: the original's keys, then everything an exact resume needs."""
        parts, model = self.parts, self.parts.model_without_ddp
        return {
            "epoch": self.point.epoch,
            "batches_done": self.point.step,
            "arch": self.args.arch,
            "state_dict": model.state_dict(),
            "best_prec1": float(self.point.best_prec1),
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
            "args": serialisable_args(self.args),
        }


def record_epoch(metrics: MetricsWriter, epoch: int, parts: TrainParts, train_result: Optional[EpochResult],
                 val: EvalResult, ema_val: Optional[EvalResult]) -> None:
    lr = parts.schedule.lr(epoch, 0)
    unreadable = len(val.unreadable) + (len(train_result.unreadable) if train_result else 0)
    row = {"epoch": epoch, "lr": lr, "val_loss": val.loss, "val_prec1": val.prec1, "val_prec5": val.prec5,
           "unreadable_images": unreadable}
    if train_result is not None:
        row.update(train_loss=train_result.loss, train_prec1=train_result.prec1, train_prec5=train_result.prec5,
                   images_per_sec=round(train_result.images_per_sec, 2), epoch_seconds=round(train_result.seconds, 2))
        metrics.add_scalars({"train/loss": train_result.loss, "train/prec1": train_result.prec1,
                             "train/prec5": train_result.prec5, "train/lr": lr,
                             "train/images_per_sec": train_result.images_per_sec}, epoch)
    if ema_val is not None:
        row.update(ema_prec1=ema_val.prec1, ema_prec5=ema_val.prec5)
        metrics.add_scalars({"val_ema/prec1": ema_val.prec1, "val_ema/prec5": ema_val.prec5}, epoch)
    metrics.add_scalars({"val/loss": val.loss, "val/prec1": val.prec1, "val/prec5": val.prec5}, epoch)
    metrics.add_epoch(row)
    summary = f"Epoch {epoch} done: lr {lr:.4g}, val Prec@1 {val.prec1:.3f}"
    if train_result is not None:
        summary += f", train loss {train_result.loss:.4f}, {train_result.images_per_sec:.1f} images/s"
    summary += f", {unreadable} unreadable images skipped"
    logger.info(summary)
