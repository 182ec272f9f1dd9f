"""Throughput benchmarks, one subcommand per part of the system.

``model``: images/s of the project's model (its ECA blocks fused by
``models.fuse_eca`` with ``--eca-impl``), of the plain model with the same
weights (for ECA models, the original release's formulation) and of the
matching torchvision model (the same network without attention),
for training steps and inference, NCHW and channels_last. The models are
measured round-robin in one process (one step of each per repetition, starting
from a different model each time), so that drifts in machine load hit them
alike. Images/s are medians over the repetitions; each ratio to torchvision is
the median of the per-repetition ratios (each model against the torchvision
step of the same repetition), with its interquartile range. ``--control`` adds
a second torchvision model with the same weights: its ratio, ideally 1, shows
how far the machine's noise alone moves a ratio.

    python scripts/benchmark.py model -a eca_resnet50 --batch-size 16 --image-size 128

``loader``: images/s of the project's input pipeline and of the original's
(``loader_benchmark.py``), batches ready for the model on the device.

    python scripts/benchmark.py loader data/bench -j 2 -b 32 --batches 12

``profile``: torch.profiler's self time per operator for the same models and
settings as ``model``, the operators where the project's model and
torchvision's differ most first: where ECA's cost goes.

    python scripts/benchmark.py profile -a eca_resnet50 --modes train --formats NCHW

On a CUDA machine the same commands time the GPU (``--amp`` and ``--compile``
apply there and on the CPU alike).

To add a subcommand: write ``add_<name>_arguments(parser)`` and ``run_<name>(args)``
and register them in :data:`SUBCOMMANDS`.
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from engine.config import ArgumentParser, require_at_least  # noqa: E402
from engine.distributed import resolve_device  # noqa: E402
from engine.checkpoint import build_model, fuse  # noqa: E402
from engine.collector import objects_built_so_far_frozen  # noqa: E402
from engine.errors import UsageError, run_cli  # noqa: E402
from models import ARCHITECTURES, PLAIN_COUNTERPARTS  # noqa: E402
from models.fused import IMPLS  # noqa: E402
from loader_benchmark import add_loader_arguments, run_loader  # noqa: E402

# Every architecture's network without attention carries the name of torchvision's model.
TORCHVISION_COUNTERPART = PLAIN_COUNTERPARTS
REFERENCE_ROLE = "torchvision"
CONTROL_ROLE = "control"
MEMORY_FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setting:
    """What every model in one round-robin measurement is run with."""

    device: torch.device
    batch_size: int
    image_size: int
    num_classes: int
    amp_dtype: Optional[torch.dtype]
    compile: bool


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(setting: Setting) -> ContextManager:
    if setting.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=setting.device.type, dtype=setting.amp_dtype)


@dataclass(frozen=True)
class Ratio:
    """A model's throughput over torchvision's: median and quartiles of the per-repetition ratios."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class Measurement:
    """Median images/s of every model, and every model's :class:`Ratio` to torchvision."""

    rates: Dict[str, float]
    ratios: Dict[str, Ratio]


def summarise(
    seconds: Dict[str, List[float]], images_per_repetition: int, reference_role: str = REFERENCE_ROLE
) -> Measurement:
    """Rates, and ratios to ``reference_role`` paired by repetition, from the seconds each model took in each."""
    rates = {role: images_per_repetition / statistics.median(values) for role, values in seconds.items()}
    ratios = {}
    for role, values in seconds.items():
        if role == reference_role:
            continue
        paired = [reference / own for reference, own in zip(seconds[reference_role], values, strict=True)]
        low, median, high = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        # The default (exclusive) method extrapolates from fewer than three values, below zero even.
        low, high = max(low, min(paired)), min(high, max(paired))
        ratios[role] = Ratio(median=median, low=low, high=high)
    return Measurement(rates=rates, ratios=ratios)


def build_models(
    arch: str, k_size: Optional[str], num_classes: int, eca_impl: str, control: bool = False
) -> Dict[str, nn.Module]:
    """The project's model (fused by ``eca_impl``), the plain one with the same weights, and torchvision's.

    The plain model is the original release's formulation. With ``control``,
    also a second torchvision model with the first one's weights.
    """
    original = build_model(arch, k_size, num_classes)
    project = fuse(build_model(arch, k_size, num_classes), eca_impl)
    project.load_state_dict(original.state_dict())
    reference = getattr(torchvision.models, TORCHVISION_COUNTERPART[arch])(num_classes=num_classes)
    models = {"project": project, "original": original, REFERENCE_ROLE: reference}
    if control:
        models[CONTROL_ROLE] = getattr(torchvision.models, TORCHVISION_COUNTERPART[arch])(num_classes=num_classes)
        models[CONTROL_ROLE].load_state_dict(reference.state_dict())
    return models


def prepare(model: nn.Module, memory_format: torch.memory_format, setting: Setting, train: bool) -> nn.Module:
    model = model.to(setting.device, memory_format=memory_format).train(train)
    return torch.compile(model) if setting.compile else model


def make_batch(setting: Setting, memory_format: torch.memory_format) -> Tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(setting.batch_size, 3, setting.image_size, setting.image_size, device=setting.device)
    targets = torch.randint(0, setting.num_classes, (setting.batch_size,), device=setting.device)
    return images.contiguous(memory_format=memory_format), targets


def train_step_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, setting: Setting) -> Callable[[], None]:
    """One SGD step as the training recipe takes it (momentum, weight decay), loss scaling for fp16."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(setting.device.type, enabled=setting.amp_dtype is torch.float16)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(setting):
            loss = criterion(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def inference_step_fn(model: nn.Module, images: torch.Tensor, setting: Setting) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(setting):
            model(images)

    return step


def time_once(step: Callable[[], None], iterations: int, device: torch.device) -> float:
    """Seconds for ``iterations`` calls of ``step``, queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    synchronize(device)
    return time.perf_counter() - start


def measure_round_robin(
    steps: Dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    iterations: int,
    setting: Setting,
    reference_role: str = REFERENCE_ROLE,
) -> Measurement:
    """Every step timed once per repetition, interleaved; the starting step rotates each repetition."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            time_once(steps[name], iterations, setting.device)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(time_once(steps[name], iterations, setting.device))
    return summarise(seconds, iterations * setting.batch_size, reference_role)


def build_steps(
    arch: str,
    k_size: Optional[str],
    mode: str,
    format_name: str,
    *,
    setting: Setting,
    seed: int,
    eca_impl: str,
    control: bool = False,
) -> Dict[str, Callable[[], None]]:
    """One step function per model (project, original, torchvision[, control]) for a mode and memory format."""
    memory_format = MEMORY_FORMATS[format_name]
    train = mode == "train"
    torch.manual_seed(seed)
    models = {
        role: prepare(model, memory_format, setting, train)
        for role, model in build_models(arch, k_size, setting.num_classes, eca_impl=eca_impl, control=control).items()
    }
    images, targets = make_batch(setting, memory_format)
    return {
        role: train_step_fn(model, images, targets, setting) if train else inference_step_fn(model, images, setting)
        for role, model in models.items()
    }


def measure_setting(
    arch: str, k_size: Optional[str], mode: str, format_name: str, setting: Setting, args: argparse.Namespace
) -> Measurement:
    """Images/s of the models for one mode (train/inference) and memory format."""
    steps = build_steps(arch, k_size, mode, format_name, setting=setting, seed=args.seed, eca_impl=args.eca_impl,
                        control=args.control)
    # As the training engine runs its loop (engine.collector).
    with objects_built_so_far_frozen():
        return measure_round_robin(steps, args.repeats, args.warmup, args.iterations, setting)


def profile_steps(
    steps: Dict[str, Callable[[], None]], warmup: int, profiled_steps: int, on_gpu: bool
) -> Dict[str, Dict[str, float]]:
    """Self time in ms per step of every operator, per model, from torch.profiler (GPU time on a GPU).

    Like the timing, the profile interleaves the models (one profiled step of
    each per round, the first model rotating), so that no model pays alone for
    a cold start or a load spike.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    totals: Dict[str, Dict[str, float]] = {name: {} for name in names}
    for round_index in range(profiled_steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with torch.profiler.profile(activities=activities) as profiler:
                steps[name]()
                synchronize(torch.device("cuda") if on_gpu else torch.device("cpu"))
            for event in profiler.key_averages():
                self_time = event.self_device_time_total if on_gpu else event.self_cpu_time_total
                totals[name][event.key] = totals[name].get(event.key, 0.0) + self_time / profiled_steps / 1e3
    return totals


def format_profile(profiles: Dict[str, Dict[str, float]], top: int) -> List[str]:
    """The operators whose time differs most between the project's model and torchvision's, then totals."""
    roles = list(profiles)
    operators = set().union(*profiles.values())

    def time_of(role: str, operator: str) -> float:
        return profiles[role].get(operator, 0.0)

    def extra(operator: str) -> float:
        return abs(time_of("project", operator) - time_of(REFERENCE_ROLE, operator))

    header = f"{'operator (self time, ms per step)':<48}" + "".join(f"{role:>13}" for role in roles)
    lines = [header]
    for operator in sorted(operators, key=extra, reverse=True)[:top]:
        lines.append(f"{operator[:47]:<48}" + "".join(f"{time_of(role, operator):13.2f}" for role in roles))
    lines.append(f"{'total':<48}" + "".join(f"{sum(profiles[role].values()):13.2f}" for role in roles))
    return lines


def format_result(arch: str, mode: str, format_name: str, measurement: Measurement) -> str:
    rates = "  ".join(f"{role} {rate:8.2f}" for role, rate in measurement.rates.items())
    ratios = "  ".join(f"{role}/tv {ratio}" for role, ratio in measurement.ratios.items())
    return f"{arch:<16} {mode:<9} {format_name:<13} {rates}  img/s   {ratios}"


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, OMP_NUM_THREADS {threads}), "
        f"torch {torch.__version__}, allocator: {describe_allocator(os.environ)}"
    )


def describe_allocator(environ: Mapping[str, str]) -> str:
    """The settings that decide whether freed memory goes back to the OS, or "system default".

    On the CPU a fresh feature map is paid in page faults unless the allocator
    keeps freed memory, and what a page fault costs varies with the (virtual)
    machine's state: these belong next to every CPU figure.
    """
    settings = sorted(
        f"{name}={value}"
        for name, value in environ.items()
        if name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD")
    )
    return " ".join(settings) if settings else "system default"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """What the models are and how they run: shared by ``model`` and ``profile``."""
    parser.add_argument("-a", "--arch", default="eca_resnet50", choices=sorted(ARCHITECTURES), metavar="ARCH",
                        help="the project's architecture; torchvision's counterpart is measured beside it")
    parser.add_argument("--ksize", default=None, help="ECA kernel sizes (e.g. 3557); the architecture's default if omitted")
    parser.add_argument("--eca-impl", default="auto", choices=IMPLS, help="how the project's model runs its ECA blocks (models.fuse_eca)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square random input, in pixels")
    parser.add_argument("--num-classes", type=int, default=1000, help="outputs of every model's classifier")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions per model first")
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"],
                        help="training steps (SGD) and/or inference steps")
    parser.add_argument("--formats", nargs="+", default=list(MEMORY_FORMATS), choices=list(MEMORY_FORMATS),
                        help="memory formats of the models and their input")
    parser.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model first")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batch")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run a second torchvision model with the same weights: its ratio shows the noise floor",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per model (the median is reported)")
    parser.add_argument(
        "--iterations", type=int, default=None, help="steps per timed repetition (default: 1 on CPU, 20 on CUDA)"
    )


def make_setting(args: argparse.Namespace) -> Setting:
    require_at_least(args, 1, "batch_size", "image_size", "num_classes")
    require_at_least(args, 0, "warmup")
    device = resolve_device(args.device)
    if device.type == "cuda":
        # Let cuDNN pick its fastest kernels for every model alike, as a training run would.
        torch.backends.cudnn.benchmark = True
    return Setting(
        device=device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        num_classes=args.num_classes,
        amp_dtype=AMP_DTYPES[args.amp],
        compile=args.compile,
    )


def run_model(args: argparse.Namespace) -> int:
    """Images/s of the project's model vs the original formulation vs torchvision, train and inference."""
    setting = make_setting(args)
    require_at_least(args, 1, "repeats")
    if args.iterations is not None:
        require_at_least(args, 1, "iterations")
    if args.iterations is None:
        args.iterations = 20 if setting.device.type == "cuda" else 1
    print(f"machine: {describe_machine(setting.device)}")
    print(
        f"batch {args.batch_size}, {args.image_size} px, {args.repeats} interleaved repetitions of "
        f"{args.iterations} step(s) after {args.warmup} warm-up; images/s: medians; X/tv: median "
        f"(interquartile range) of the per-repetition ratios; amp {args.amp}, compile {args.compile}, "
        f"eca-impl {args.eca_impl}"
    )
    for mode in args.modes:
        for format_name in args.formats:
            measurement = measure_setting(args.arch, args.ksize, mode, format_name, setting, args)
            print(format_result(args.arch, mode, format_name, measurement), flush=True)
    return 0


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="profiled steps per model (after --warmup)")
    parser.add_argument("--top", type=int, default=15, help="operators listed, those that differ most first")


def run_profile(args: argparse.Namespace) -> int:
    """torch.profiler self time per operator: where the project's model spends more or less than torchvision's."""
    setting = make_setting(args)
    require_at_least(args, 1, "steps", "top")
    if not torch.cuda.is_available():
        # Without a GPU the profiler's CUDA probe fails and logs an ERROR line that reads like a
        # failure of the run; its library's log level is raised there (a level the user set is kept).
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    print(f"machine: {describe_machine(setting.device)}")
    print(f"batch {args.batch_size}, {args.image_size} px, {args.steps} profiled step(s) after {args.warmup} warm-up")
    for mode in args.modes:
        for format_name in args.formats:
            steps = build_steps(args.arch, args.ksize, mode, format_name, setting=setting, seed=args.seed,
                                eca_impl=args.eca_impl, control=args.control)
            print(f"\n{args.arch} {mode} {format_name}")
            with objects_built_so_far_frozen():
                profiles = profile_steps(steps, args.warmup, args.steps, setting.device.type == "cuda")
            print("\n".join(format_profile(profiles, args.top)), flush=True)
    return 0


# Subcommand name -> (argument declaration, runner).
SUBCOMMANDS: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "model": (add_model_arguments, run_model),
    "loader": (add_loader_arguments, run_loader),
    "profile": (add_profile_arguments, run_profile),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, runner) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=(runner.__doc__ or "").strip() or None)
        add_arguments(subparser)
        subparser.set_defaults(runner=runner)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.runner(args)


if __name__ == "__main__":
    run_cli(main)
