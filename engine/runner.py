"""The whole run, top to bottom: parse, resolve, start the processes; in each, data, model, resume, the loop.

``main.py`` and ``light_main.py`` call :func:`main` with their recipe name;
nothing else differs between them.
"""
import contextlib
import dataclasses
import functools
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from models.kernel_sizes import format_kernel_sizes

from .checkpoint import Checkpoint, build_model, fuse, model_from_checkpoint, read_checkpoint
from .collector import objects_built_so_far_frozen
from .config import RESUME_AUTO, Config, default_output_dir, parse_args, resolve_config
from .data import (
    BatchMixer, BatchPreparer, SeededImageFolder, SeededSampler, TrainTransform, ValTransform, build_loader,
    check_data_root, default_workers, list_samples, out_of_shared_memory, shared_memory_advice,
)
from .distributed import (
    DistContext, init_distributed, is_lost_peer, one_line, should_spawn, shutdown, visible_gpus,
)
from .errors import Interrupted, JobFailed, UsageError, report_and_exit
from .evaluate import evaluate
from .loop import LoopContext
from .preemption import StopRequest
from .reporting import MetricsWriter, report_epoch, setup_logging, summary_line
from .schedule import LRSchedule
from .state import CheckpointSaver, ResumePoint, auto_resume_path, checkpoint_path, refuse_to_replace, restore
from .train import TrainParts, train_one_epoch
from .transfer import freeze_backbone, initialize_from, parameter_groups, read_init_checkpoint

logger = logging.getLogger("eca")


@dataclass(frozen=True)
class RunInputs:
    """What a process reads before it starts: the class names of DATA and the ``--resume`` file."""

    classes: List[str]
    checkpoint: Optional[Checkpoint]


def read_inputs(args) -> RunInputs:
    """Check DATA and read ``--resume``, each once per process: bad ones fail here, before anything starts."""
    classes = check_data_root(args.data, need_train=not args.evaluate)
    path = args.resume
    if path == RESUME_AUTO:
        path = auto_resume_path(args.output_dir or default_output_dir(args.arch, args.action))
    return RunInputs(classes, read_checkpoint(path) if path else None)


def main(recipe: str, argv: Optional[Sequence[str]] = None) -> None:
    """Parse, read the inputs, resolve the config; then run this process, or spawn one per visible GPU."""
    args = parse_args(recipe, argv)
    inputs = read_inputs(args)
    spawn = should_spawn(args)
    # Processes spawned here meet on a free local port, unless the flags name a rendezvous (several nodes).
    local = spawn and args.dist_url is None and args.world_size <= 1
    config = resolve_config(args, inputs.checkpoint, dist_url=f"tcp://127.0.0.1:{free_port()}" if local else None)
    if not config.evaluate:
        refuse_to_replace(config.output_dir, resuming=inputs.checkpoint is not None, overwrite=config.overwrite)
    if not spawn:
        run(config, inputs)
        return
    setup_logging(is_primary=True)
    logger.info("=> %d GPUs visible: starting one DDP process per GPU", visible_gpus())
    try:
        mp.spawn(_spawned_process, args=(config,), nprocs=visible_gpus(), join=True)
    except mp.ProcessExitedException as error:
        raise SystemExit(error.exit_code or 1) from None


def _spawned_process(index: int, config: Config) -> None:
    report_and_exit(lambda: run(config, read_inputs(config), spawned_index=index))


def run(config: Config, inputs: RunInputs, spawned_index: Optional[int] = None) -> None:
    """One process of the job: data, model and resume state, then the epochs with their checkpoints (or ``-e``)."""
    ctx = init_distributed(config, spawned_index)
    setup_logging(ctx.is_primary, samples=config.log_samples)
    with job_failures_in_one_line(config, ctx), StopRequest() as stop:
        ckpt, classes = inputs.checkpoint, inputs.classes
        if config.resume == RESUME_AUTO and ckpt is None:
            logger.info("=> --resume auto: no %s yet, starting afresh", checkpoint_path(config))
        check_class_names(ckpt, classes)
        num_classes = resolve_num_classes(config, classes)
        batch_size = per_process_batch(config, ctx)
        seed = agree_on_seed(config, ckpt, ctx)
        seed_everything(seed)
        model = create_model(config, ckpt, num_classes)
        fuse(model, config.eca_impl)
        loop = LoopContext(
            ctx=ctx, prepare=BatchPreparer(ctx.device, config.channels_last),
            criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing).to(ctx.device),
            autocast=autocast_for(config.amp, ctx.device), stop=stop,
            print_freq=config.print_freq, strict_data=config.strict_data,
        )
        val_loader = make_loader(config, loop, "val", classes=classes, batch_size=batch_size, seed=seed)
        if config.evaluate:
            evaluate_only(config, model, val_loader, loop, has_weights=ckpt is not None or bool(config.init_from))
            return

        train_loader = make_loader(config, loop, "train", classes=classes, batch_size=batch_size, seed=seed)
        steps_per_epoch = len(train_loader)
        parts = build_train_parts(config, model, ctx=ctx, steps_per_epoch=steps_per_epoch, seed=seed,
                                  num_classes=num_classes)
        point = resume_point(config, parts, ckpt, samples_per_step=batch_size * ctx.world_size)
        saver = CheckpointSaver(config=config, ctx=ctx, parts=parts, seed=seed, classes=classes)
        saver.prepare_folder()
        log_header(config, ctx, model=parts.model_without_ddp, batch_size=batch_size, classes=classes,
                   train_images=len(train_loader.dataset), val_images=len(val_loader.dataset))
        metrics = MetricsWriter(config.output_dir, tensorboard=config.tensorboard, first_epoch=point.epoch,
                                enabled=ctx.is_primary)
        with metrics, objects_built_so_far_frozen():
            for epoch in range(point.epoch, config.epochs):
                trained = None  # an epoch resumed after its last batch only validates
                if point.step < steps_per_epoch:
                    trained = train_one_epoch(
                        parts, train_loader, loop, epoch=epoch, start_step=point.step, start_samples=point.samples,
                        after_step=lambda steps, samples: saver.save_if_due(
                            dataclasses.replace(point, step=steps, samples=samples),
                            global_step=epoch * steps_per_epoch + steps),
                    )
                    point = dataclasses.replace(point, step=trained.steps_done, samples=trained.samples_done)
                    if trained.interrupted:
                        saver.save_and_stop(point, stop, f"at epoch {epoch}, batch {trained.steps_done}")
                val = evaluate(parts.model_without_ddp, val_loader, loop)
                if val.interrupted:
                    saver.save_and_stop(dataclasses.replace(point, step=steps_per_epoch), stop,
                                        f"while validating epoch {epoch}")
                logger.info(summary_line(val.prec1, val.prec5))
                ema_val = None
                if parts.ema is not None:
                    ema_val = evaluate(parts.ema.module, val_loader, loop, description="Test (EMA)")
                    logger.info(" * EMA Prec@1 %.3f Prec@5 %.3f", ema_val.prec1, ema_val.prec5)
                is_best = val.prec1 > point.best_prec1
                point = ResumePoint(epoch + 1, 0, max(val.prec1, point.best_prec1))
                saver.save(point, is_best)
                report_epoch(metrics, epoch, lr=parts.schedule.lr(epoch), train=trained, val=val, ema=ema_val)


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes this machine spawns to meet at."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def job_failures_in_one_line(config: Config, ctx: DistContext) -> Iterator[None]:
    """Shared memory run out, or a rank lost: one line with the way back instead of a traceback per rank."""
    checkpoint = checkpoint_path(config)
    # Under --resume auto the same command continues the run: torchrun --max-restarts and requeued jobs do that.
    again = ("the same command continues from the last save (--resume auto)" if config.resume == RESUME_AUTO
             else f"restart the job with --resume {checkpoint}")
    try:
        yield
    except RuntimeError as error:
        if out_of_shared_memory(error):
            resume = f"; then {again}" if os.path.exists(checkpoint) else ""
            raise JobFailed(f"{shared_memory_advice()}{resume} (ECA_DEBUG=1 shows the traceback)") from error
        # A rank that died or hung is a fault of the job, not a bug here.
        if not (ctx.distributed and is_lost_peer(error)):
            raise
        raise JobFailed(
            f"rank {ctx.rank}: another process of the job died or stopped answering ({one_line(error)}); "
            f"{again} (ECA_DEBUG=1 shows the traceback)"
        ) from error
    finally:
        shutdown(ctx)


def per_process_batch(config: Config, ctx: DistContext) -> int:
    """``-b`` is one machine's batch, as in the original: its processes share it."""
    if config.batch_size % ctx.local_world_size:
        raise UsageError(
            f"-b {config.batch_size} does not divide over the {ctx.local_world_size} processes of this machine: "
            f"use a multiple of {ctx.local_world_size}"
        )
    return config.batch_size // ctx.local_world_size


def agree_on_seed(config: Config, ckpt: Optional[Checkpoint], ctx: DistContext) -> int:
    """``--seed``, else the resumed run's, else a fresh one; every rank must use the same."""
    if config.seed is not None:
        return config.seed
    if ckpt is not None and ckpt.contents.get("seed") is not None:
        return int(ckpt.contents["seed"])
    seed = torch.tensor([int.from_bytes(os.urandom(4), "little")], dtype=torch.int64)
    if ctx.distributed:
        torch.distributed.broadcast(seed.to(ctx.device), src=0)
    return int(seed.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- data ----------------------------------------------------------------------------------------


def check_class_names(ckpt: Optional[Checkpoint], classes: Sequence[str]) -> None:
    names = ckpt.contents.get("class_names") if ckpt is not None else None
    if names and list(names) != list(classes):
        raise UsageError(
            f"{ckpt.path!r} was trained on other classes than DATA's ({len(names)} vs {len(classes)} folders, "
            "or other names): evaluate on the same classes, or fine-tune with --init-from"
        )


def resolve_num_classes(config: Config, classes: Sequence[str]) -> int:
    if config.num_classes is None:
        return len(classes)
    if config.num_classes < len(classes):
        raise UsageError(f"--num-classes {config.num_classes} is less than the {len(classes)} class folders of DATA")
    return config.num_classes


def make_loader(config: Config, loop: LoopContext, split: str, *, classes, batch_size: int, seed: int) -> DataLoader:
    """The loader of ``DATA/split``: shuffled and augmented for ``train``, in order for ``val``."""
    train = split == "train"
    samples = list_samples(os.path.join(config.data, split), classes)
    transform = (TrainTransform(config.train_crop_size, config.auto_augment) if train
                 else ValTransform(config.val_resize_size, config.val_crop_size))
    sampler = SeededSampler(len(samples), loop.ctx, seed, shuffle=train)
    return build_loader(
        SeededImageFolder(samples, transform), sampler, batch_size=batch_size,
        workers=default_workers(loop.ctx) if config.workers is None else config.workers, ctx=loop.ctx,
        drop_last=train and len(sampler) > batch_size, prepare=loop.prepare,
    )


# --- model ---------------------------------------------------------------------------------------


def create_model(config: Config, ckpt: Optional[Checkpoint], num_classes: int) -> nn.Module:
    """The run's model: the ``--resume`` file's, or a new one (from ``--init-from`` where given)."""
    if ckpt is not None:
        return model_from_checkpoint(config.arch, ckpt, k_size=config.ksize, num_classes=num_classes)
    k_size, init = config.ksize, None
    if config.init_from:
        init, k_size = read_init_checkpoint(config.init_from, config.arch, config.ksize)
    model = build_model(config.arch, k_size, num_classes)
    if init is not None:
        for line in initialize_from(model, config.arch, config.init_from, init).lines():
            logger.info(line)
    return model


def autocast_for(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


def evaluate_only(config: Config, model: nn.Module, val_loader: DataLoader, loop: LoopContext, *,
                  has_weights: bool) -> None:
    """``-e``: one validation, ending in the original's `` * Prec@1 ... Prec@5 ...`` line."""
    if not has_weights:
        logger.warning("warning: -e without --resume evaluates randomly initialised weights")
    model.to(loop.ctx.device, memory_format=memory_format(config))
    with objects_built_so_far_frozen():
        result = evaluate(model, val_loader, loop)
    if result.interrupted:
        stop = loop.stop.signal_name
        raise Interrupted(f"stopped by {stop} during evaluation", signal_name=stop)
    logger.info(summary_line(result.prec1, result.prec5))


def build_train_parts(config: Config, model: nn.Module, *, ctx: DistContext, steps_per_epoch: int, seed: int,
                      num_classes: int) -> TrainParts:
    """Optimizer, schedule, scaler, EMA and the model as the step calls it (on the device, DDP, compiled)."""
    frozen = freeze_backbone(config.arch, model) if config.freeze_backbone else []
    groups = parameter_groups(config.arch, model, config.backbone_lr_scale)
    plain = model.to(ctx.device, memory_format=memory_format(config))
    if config.sync_bn and ctx.distributed:
        plain = nn.SyncBatchNorm.convert_sync_batchnorm(plain)
    elif config.sync_bn:
        logger.warning("warning: --sync-bn has no effect with a single process")
    step_model = plain
    if ctx.distributed:
        step_model = DistributedDataParallel(plain, device_ids=[ctx.device.index] if ctx.is_cuda else None)
    if config.compile:
        step_model = torch.compile(step_model)
    ema = None
    if config.model_ema:
        decay = config.model_ema_decay ** config.model_ema_steps  # the decay is given per step, applied every N steps
        ema = AveragedModel(plain, device=ctx.device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return TrainParts(
        model=step_model,
        model_without_ddp=plain,
        optimizer=torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay),
        schedule=LRSchedule(
            base_lr=config.lr, kind=config.lr_scheduler, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
            step_size=config.lr_step_size, gamma=config.lr_gamma, warmup_epochs=config.warmup_epochs,
            min_lr=config.lr_min,
        ),
        scaler=torch.amp.GradScaler(ctx.device.type) if config.amp == "fp16" else None,
        mixer=BatchMixer(num_classes, config.mixup_alpha, config.cutmix_alpha),
        ema=ema,
        ema_steps=config.model_ema_steps,
        clip_grad_norm=config.clip_grad_norm,
        frozen_norms=frozen,
        seed=seed,
    )


def resume_point(config: Config, parts: TrainParts, ckpt: Optional[Checkpoint], *,
                 samples_per_step: int) -> ResumePoint:
    """Where training starts: the ``--resume`` file's epoch and batch (its state restored), or ``--start-epoch``.

    ``samples_per_step`` is this run's global batch. A file from a run of another number of
    processes (or another batch) goes on after the images of the epoch that run trained.
    """
    point = restore(parts, ckpt, samples_per_step) if ckpt is not None else ResumePoint()
    if config.start_epoch is not None:
        point = dataclasses.replace(point, epoch=config.start_epoch, step=0, samples=0)
    if ckpt is not None and point.samples != point.step * samples_per_step:
        logger.info("=> the checkpoint's run of %s process(es) trained %d images of epoch %d; this run of %d images a "
                    "step goes on from there (not bit for bit as that run would have)",
                    ckpt.contents.get("world_size"), point.samples, point.epoch, samples_per_step)
        point = dataclasses.replace(point, step=point.samples // samples_per_step)
    if ckpt is not None:
        logger.info("=> resumed %r at epoch %d, batch %d (best Prec@1 %.3f)", ckpt.path, point.epoch, point.step,
                    point.best_prec1)
    return point


def log_header(config: Config, ctx: DistContext, *, model: nn.Module, batch_size: int, classes: Sequence[str],
               train_images: int, val_images: int) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("=> %s, ECA kernel sizes %s, %d classes, %.2f million parameters (%s)", config.arch,
                format_kernel_sizes(model.kernel_sizes), len(classes), parameters / 1e6, f"{parameters:,}")
    # CPU results depend on the intra-op thread count (the order of float sums), so the header says it.
    count = torch.get_num_threads()
    threads = f" ({count} thread{'s' if count > 1 else ''})" if ctx.device.type == "cpu" else ""
    logger.info("=> device %s%s, %d process(es); batch %d per process, %d in all; lr %g (%s schedule)",
                ctx.device, threads, ctx.world_size, batch_size, batch_size * ctx.world_size, config.lr,
                config.lr_scheduler)
    logger.info("=> %d train / %d val images; amp %s, channels_last %s, compile %s, ECA impl %s; output %s",
                train_images, val_images, config.amp, config.channels_last, config.compile, config.eca_impl,
                config.output_dir)
