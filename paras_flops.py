"""Parameters and FLOPs of a model, in the original README's units and in decimal ones.

    python paras_flops.py -a eca_resnet50 --ksize 3557
    python paras_flops.py -a cbam_resnet50
    python paras_flops.py --all

``--all`` prints the released ECA models beside the original README's figures,
then the paper's Table 3 networks (ResNet-50, SENet, CBAM, ECA-Net) beside the
paper's figures, then every other comparison network.

The counting itself lives in engine/complexity.py.
"""
import argparse
from typing import Optional, Sequence

from engine.complexity import PAPER_TABLE3, README_TABLE, count_complexity, format_report, format_table
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
        description="Count parameters and FLOPs (thop multiply-accumulates) of a model, "
        "in binary units (2^20, 2^30, as the original README) and decimal ones."
    )
    parser.add_argument("-a", "--arch", default=None, choices=sorted(ARCHITECTURES), help="default: eca_resnet50")
    parser.add_argument(
        "--ksize",
        default=None,
        help="ECA kernel sizes (ECA architectures only): one digit per stage (3557), comma-separated (3,5,5,7), "
        "one odd integer for all, or 'adaptive'; default: those of the released checkpoint",
    )
    parser.add_argument("--input-size", type=positive_int, default=224, help="side of the square input (default 224)")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument(
        "--all", action="store_true",
        help="every architecture with its default kernel sizes, next to the README's and the paper's Table 3 figures"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.all:
        if args.ksize is not None or args.arch is not None:
            raise UsageError("--all counts every model with its released kernel sizes; drop -a and --ksize")
        def count(arch, k_size=None):
            return count_complexity(arch, k_size, args.input_size, args.num_classes)

        print(format_table([(row, count(row.arch, row.k_size)) for row in README_TABLE], source="README"))
        published = {row.arch for row in README_TABLE + PAPER_TABLE3}
        others = [(None, count(arch)) for arch in ARCHITECTURES if arch not in published]
        print()
        print(format_table([(row, count(row.arch, row.k_size)) for row in PAPER_TABLE3] + others, source="paper"))
        return
    arch = args.arch or "eca_resnet50"
    print(format_report(count_complexity(arch, args.ksize, args.input_size, args.num_classes)))


if __name__ == "__main__":
    run_cli(main)
