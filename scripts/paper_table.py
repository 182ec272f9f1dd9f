"""The paper's Table 3 on this machine: ResNet, SE, CBAM and ECA side by side, in one command.

    python scripts/paper_table.py                                  # ResNet-50, sized for a CPU (about 2 minutes on 2 cores)
    python scripts/paper_table.py --device cuda --batch-size 64 --image-size 224 --amp bf16 --channels-last
    python scripts/paper_table.py --runs runs/resnet50 runs/se_resnet50 runs/cbam_resnet50 runs/eca_resnet50 --output table3.png

Parameters and GFLOPs are counted as ``paras_flops.py`` counts them (224 px,
binary units, the paper's convention). Training and inference images/s are
measured as ``scripts/benchmark.py model`` measures them, with its functions:
the four models in one process, one step of each per repetition in an order
that rotates, medians over the repetitions, and each model's ratio to ResNet
paired by repetition, so that drifts in the machine's load hit all four alike.
The paper's own figures (ResNet-50 on one RTX 2080Ti) stand beside ours.
``--runs`` adds the best validation Top-1 of training runs, read from their
``metrics.csv`` and matched to a row by the ``arch`` of their ``args.yaml``.
"""
import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmark import (  # noqa: E402
    AMP_DTYPES, MEMORY_FORMATS, Measurement, Setting, describe_machine, inference_step_fn, make_batch, make_setting,
    measure_round_robin, prepare, train_step_fn,
)
from engine.checkpoint import build_model, fuse  # noqa: E402
from engine.collector import objects_built_so_far_frozen  # noqa: E402
from engine.complexity import BINARY_GIGA, Complexity, count_complexity, format_binary  # noqa: E402
from engine.config import ArgumentParser, require_at_least  # noqa: E402
from engine.errors import UsageError, run_cli  # noqa: E402
from models.fused import IMPLS  # noqa: E402
from models.kernel_sizes import format_kernel_sizes  # noqa: E402

REFERENCE = "ResNet"
# Table 3's rows: label -> architecture name for a depth.
ROWS = {"ResNet": "resnet{depth}", "SE": "se_resnet{depth}", "CBAM": "cbam_resnet{depth}", "ECA": "eca_resnet{depth}"}
DEPTHS = (50, 101)
MODES = ("train", "inference")


@dataclass(frozen=True)
class PaperRow:
    """Table 3 of the paper, ResNet-50 on one RTX 2080Ti: parameters and GFLOPs in binary units, images/s, Top-1."""

    params: str
    gflops: str
    train_fps: float
    inference_fps: float
    top1: float


PAPER_RESNET50 = {
    "ResNet": PaperRow("24.37M", "3.86", 1024, 1855, 75.20),
    "SE": PaperRow("26.77M", "3.87", 759, 1620, 76.71),
    "CBAM": PaperRow("26.77M", "3.87", 472, 1213, 77.34),
    "ECA": PaperRow("24.37M", "3.86", 785, 1805, 77.48),
}
PAPER = {50: PAPER_RESNET50}


@dataclass(frozen=True)
class RunResult:
    path: str
    arch: str
    top1: float
    epochs: int


def read_run(folder: str) -> RunResult:
    """A training run's architecture (``args.yaml``) and best validation Prec@1 (``metrics.csv``)."""
    args_path, metrics_path = (os.path.join(folder, name) for name in ("args.yaml", "metrics.csv"))
    for path in (args_path, metrics_path):
        if not os.path.isfile(path):
            raise UsageError(f"--runs {folder!r} has no {os.path.basename(path)}: pass the output folder of a training run")
    with open(args_path) as handle:
        saved = yaml.safe_load(handle)
    arch = saved.get("arch") if isinstance(saved, dict) else None
    if not isinstance(arch, str):
        raise UsageError(f"--runs {folder!r}: its args.yaml names no arch")
    with open(metrics_path, newline="") as handle:
        scores = [float(row["val_prec1"]) for row in csv.DictReader(handle) if row.get("val_prec1")]
    if not scores:
        raise UsageError(f"--runs {folder!r}: its metrics.csv has no validated epoch yet")
    return RunResult(folder, arch, max(scores), len(scores))


def match_runs(folders: Sequence[str], depth: int) -> Dict[str, RunResult]:
    """Each run by the row it belongs to; a run of another architecture, or two runs of one row, is a usage error."""
    archs = {ROWS[label].format(depth=depth): label for label in ROWS}
    matched: Dict[str, RunResult] = {}
    for folder in folders:
        run = read_run(folder)
        label = archs.get(run.arch)
        if label is None:
            raise UsageError(
                f"--runs {folder!r} trained {run.arch}, which is no row of this table ({', '.join(archs)}); "
                f"{'pass --depth to compare another depth' if run.arch.endswith(('50', '101')) else 'leave it out'}"
            )
        if label in matched:
            raise UsageError(f"--runs {matched[label].path!r} and {folder!r} both trained {run.arch}: pass one of them")
        matched[label] = run
    return matched


def check_output(path: Optional[str]) -> None:
    """``--output`` needs matplotlib and a file name it can write: checked before anything is measured."""
    if path is None:
        return
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--output draws with matplotlib, which is not installed: pip install -r requirements-plot.txt "
                         "(or drop --output for the table alone)") from None
    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib.figure import Figure

    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise UsageError(f"--output {path!r}: name a file ending in one of .{', .'.join(sorted(supported))}")
    if os.path.isdir(path):
        raise UsageError(f"--output {path!r} is a folder; give a file name such as table3.png")


def measure(args: argparse.Namespace, setting: Setting, archs: Dict[str, str]) -> Dict[str, Measurement]:
    """Training and inference images/s of every row's model, interleaved in this process (benchmark.py's round robin)."""
    memory_format = MEMORY_FORMATS["channels_last" if args.channels_last else "NCHW"]
    torch.manual_seed(args.seed)
    # fuse: an --eca-impl this machine cannot run is one line, before anything is measured.
    networks = {label: fuse(build_model(arch), args.eca_impl) for label, arch in archs.items()}
    images, targets = make_batch(setting, memory_format)
    measurements = {}
    for mode in MODES:
        train = mode == "train"
        prepared = {label: prepare(model, memory_format, setting, train) for label, model in networks.items()}
        steps = {
            label: train_step_fn(model, images, targets, setting) if train else inference_step_fn(model, images, setting)
            for label, model in prepared.items()
        }
        with objects_built_so_far_frozen():
            measurements[mode] = measure_round_robin(
                steps, args.repeats, args.warmup, args.iterations, setting, reference_role=REFERENCE
            )
    return measurements


def _rate(measurement: Measurement, label: str) -> str:
    ratio = measurement.ratios.get(label)
    return f"{measurement.rates[label]:.1f} ({ratio.median:.2f}x)" if ratio else f"{measurement.rates[label]:.1f} (1x)"


def _paper_rate(paper: Optional[Dict[str, PaperRow]], label: str, field: str) -> str:
    if paper is None:
        return "-"
    value, reference = getattr(paper[label], field), getattr(paper[REFERENCE], field)
    return f"{value:.0f} ({value / reference:.2f}x)"


def format_table(
    depth: int, archs: Dict[str, str], counts: Dict[str, Complexity], measurements: Dict[str, Measurement], runs: Dict[str, RunResult]
) -> List[str]:
    """The markdown table: ours, then the paper's figures, per row."""
    paper = PAPER.get(depth)
    columns = ["model", "params", "GFLOPs", "train img/s", "inference img/s",
               "paper params", "paper GFLOPs", "paper train FPS", "paper inference FPS"]
    if runs:
        columns += ["Top-1", "paper Top-1"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for label, arch in archs.items():
        count = counts[label]
        cells = [
            f"{label} ({arch})", format_binary(count.params), f"{count.macs / BINARY_GIGA:.2f}",
            _rate(measurements["train"], label), _rate(measurements["inference"], label),
            paper[label].params if paper else "-", paper[label].gflops if paper else "-",
            _paper_rate(paper, label, "train_fps"), _paper_rate(paper, label, "inference_fps"),
        ]
        if runs:
            run = runs.get(label)
            cells += [f"{run.top1:.2f} ({run.epochs} epochs)" if run else "-", f"{paper[label].top1:.2f}" if paper else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(path: str, archs: Dict[str, str], measurements: Dict[str, Measurement], depth: int) -> None:
    """Images/s relative to ResNet, ours beside the paper's, training and inference."""
    from matplotlib.figure import Figure

    paper = PAPER.get(depth)
    labels = list(archs)
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    for axes, mode, field in zip(figure.subplots(1, 2), MODES, ("train_fps", "inference_fps")):
        ours = [measurements[mode].ratios[label].median if label != REFERENCE else 1.0 for label in labels]
        positions = range(len(labels))
        width = 0.4 if paper else 0.8
        axes.bar([p - width / 2 if paper else p for p in positions], ours, width, label="this machine")
        if paper:
            theirs = [getattr(paper[label], field) / getattr(paper[REFERENCE], field) for label in labels]
            axes.bar([p + width / 2 for p in positions], theirs, width, label="paper (2080Ti)")
        axes.set_xticks(list(positions), labels)
        axes.axhline(1.0, color="gray", linewidth=0.8)
        axes.set_title(f"{mode} images/s relative to ResNet-{depth}")
        axes.legend(loc="lower left")
    figure.savefig(path)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="The paper's Table 3 (ResNet, SE, CBAM, ECA) measured on this machine.")
    parser.add_argument("--depth", type=int, default=50, choices=DEPTHS, help="ResNet-50 (the paper's figures) or 101")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16, sized for a CPU)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square input (default 128)")
    parser.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="autocast dtype (default none)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    parser.add_argument("--eca-impl", default="auto", choices=IMPLS, help="how the ECA model runs its blocks (models.fuse_eca)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repetitions per model (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per model first")
    parser.add_argument("--iterations", type=int, default=None, help="steps per timed repetition (default: 1 on CPU, 20 on CUDA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default 0)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="DIR", help="training runs' output folders: adds a Top-1 column")
    parser.add_argument("--output", default=None, metavar="FILE.png", help="also draw the throughput ratios (needs matplotlib)")
    # What benchmark.make_setting reads and this table keeps fixed: the paper's 1000 classes, no compilation.
    parser.set_defaults(num_classes=1000, compile=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    require_at_least(args, 1, "repeats")
    if args.iterations is not None:
        require_at_least(args, 1, "iterations")
    runs = match_runs(args.runs, args.depth)
    check_output(args.output)
    setting = make_setting(args)
    if args.iterations is None:
        args.iterations = 20 if setting.device.type == "cuda" else 1
    archs = {label: name.format(depth=args.depth) for label, name in ROWS.items()}
    counts = {label: count_complexity(arch) for label, arch in archs.items()}
    measurements = measure(args, setting, archs)

    print(f"machine: {describe_machine(setting.device)}")
    print(
        f"batch {args.batch_size}, {args.image_size} px, {args.repeats} interleaved repetitions of {args.iterations} "
        f"step(s) after {args.warmup} warm-up; amp {args.amp}, channels_last {args.channels_last}, "
        f"eca-impl {args.eca_impl}; ECA kernel sizes {format_kernel_sizes(counts['ECA'].kernel_sizes)}"
    )
    print("params: binary M (2^20) and GFLOPs: thop multiply-accumulates / 2^30 at 224 px, as the paper's table; "
          "img/s: medians, (Nx): the median per-repetition ratio to ResNet")
    print()
    print("\n".join(format_table(args.depth, archs, counts, measurements, runs)))
    if args.depth not in PAPER:
        print(f"\nThe paper's figures here are ResNet-50's only; none are shown for ResNet-{args.depth}.")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        plot(args.output, archs, measurements, args.depth)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    run_cli(main)
