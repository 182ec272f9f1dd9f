"""Parameters and FLOPs of an ECA model, in the original README's units and in decimal ones.

    python paras_flops.py -a eca_resnet50 --ksize 3557
    python paras_flops.py --all

The counting itself lives in engine/complexity.py.
"""
import argparse
from typing import Optional, Sequence

from engine.complexity import README_TABLE, count_complexity, format_report, format_table
from engine.config import ArgumentParser
from engine.errors import UsageError, run_cli
from models import ARCHITECTURES


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Count parameters and FLOPs (thop multiply-accumulates) of an ECA model, "
        "in binary units (2^20, 2^30, as the original README) and decimal ones."
    )
    parser.add_argument("-a", "--arch", default=None, choices=sorted(ARCHITECTURES), help="default: eca_resnet50")
    parser.add_argument(
        "--ksize",
        default=None,
        help="ECA kernel sizes: one digit per stage (3557), comma-separated (3,5,5,7), one odd integer "
        "for all, or 'adaptive'; default: those of the released checkpoint",
    )
    parser.add_argument("--input-size", type=positive_int, default=224, help="side of the square input (default 224)")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument(
        "--all", action="store_true", help="every architecture with its released kernel sizes, next to the README"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.all:
        if args.ksize is not None or args.arch is not None:
            raise UsageError("--all counts every model with its released kernel sizes; drop -a and --ksize")
        rows = [
            (row, count_complexity(row.arch, row.k_size, args.input_size, args.num_classes)) for row in README_TABLE
        ]
        print(format_table(rows))
        return
    arch = args.arch or "eca_resnet50"
    print(format_report(count_complexity(arch, args.ksize, args.input_size, args.num_classes)))


if __name__ == "__main__":
    run_cli(main)
