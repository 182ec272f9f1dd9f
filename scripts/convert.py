"""Convert a checkpoint to safetensors to share its weights without pickle, or back to the release's format.

    python scripts/convert.py eca_resnet50_k3557.pth.tar eca_resnet50_k3557.safetensors
    python scripts/convert.py runs/eca_resnet50/model_best.pth.tar eca_resnet50_flowers.safetensors
    python scripts/convert.py --to pth eca_resnet50_k3557.safetensors eca_resnet50_k3557.pth.tar

IN is any file the project's loader reads: a released ``.pth.tar``, a run's
checkpoint, a torchvision reference-script checkpoint, a bare state_dict (DDP's
``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes are dropped), or a
``.safetensors`` file. The safetensors file holds the plain state_dict and, as
metadata, the architecture, kernel sizes and class count (read from the
tensors), the class names, image sizes, best Prec@1 and epoch where IN has
them, and IN's sha256 and file name.

``--to pth`` writes the release's format: ``torch.save`` of ``{epoch, arch,
state_dict, best_prec1}`` in the legacy serialization that PyTorch before 1.6
reads, with the state_dict's names prefixed ``module.`` as the released files
are, since the original's ``main.py`` loads them into a ``DataParallel`` model
(this project's loader drops the prefix). An unknown epoch is 0 and an unknown
best Prec@1 is 0.0, as a new run of the original starts; ``kernel_sizes``,
``num_classes``, ``class_names`` and ``args`` (the image sizes) follow where
known. It holds no optimizer state: resuming it in the original's ``main.py``,
which loads one unconditionally, fails; this project's ``--resume`` starts a
fresh optimizer and says so.

OUT is never overwritten unless ``--overwrite`` is given.
"""
import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.checkpoint import Checkpoint, atomic_save, describe, read_checkpoint, save_weights_file  # noqa: E402
from engine.config import ArgumentParser  # noqa: E402
from engine.errors import UsageError, run_cli  # noqa: E402
from engine.weights_file import SUFFIX  # noqa: E402
from models.kernel_sizes import format_kernel_sizes  # noqa: E402

# DataParallel's name for the wrapped model, which the original's main.py always builds.
RELEASE_PREFIX = "module."


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Convert an ECA-Net checkpoint to safetensors, or back to the release format.")
    parser.add_argument("input", metavar="IN", help="checkpoint to read (.pth.tar, a state_dict, or .safetensors)")
    parser.add_argument("output", metavar="OUT", help=f"file to write: OUT{SUFFIX}, or with --to pth a .pth.tar")
    parser.add_argument("--to", choices=("safetensors", "pth"), default="safetensors",
                        help="safetensors (default), or pth for the release's .pth.tar format")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, before reading anything, an OUT that would be lost or that names the wrong format."""
    wants_safetensors = args.to == "safetensors"
    if args.output.endswith(SUFFIX) != wants_safetensors:
        fix = (f"name it OUT{SUFFIX}" if wants_safetensors
               else f"name it e.g. OUT.pth.tar, or drop --to pth to write {SUFFIX}")
        raise UsageError(f"OUT {args.output!r} does not match --to {args.to}: {fix}")
    if os.path.isdir(args.output):
        raise UsageError(f"OUT {args.output!r} is a folder; give a file name")
    if os.path.exists(args.output):
        if os.path.exists(args.input) and os.path.samefile(args.input, args.output):
            raise UsageError(f"IN and OUT are the same file {args.output!r}: write to another name")
        if not args.overwrite:
            raise UsageError(f"OUT {args.output!r} exists: pass --overwrite to replace it, or choose another name")


def release_checkpoint(ckpt: Checkpoint, described: Dict[str, Any]) -> Dict[str, Any]:
    """The release's dict for ``ckpt``: its keys, ``module.`` names, and ``described`` where known."""
    release: Dict[str, Any] = {"epoch": int(described.get("epoch", 0))}
    if described.get("arch"):
        release["arch"] = described["arch"]
    release["state_dict"] = {RELEASE_PREFIX + key: value for key, value in ckpt.state_dict.items()}
    release["best_prec1"] = float(described.get("best_prec1", 0.0))
    for key in ("kernel_sizes", "num_classes", "class_names", "args"):
        if described.get(key) is not None:
            release[key] = described[key]
    return release


def summary(described: Dict[str, Any]) -> str:
    if not described.get("arch"):
        return "weights of no one architecture here (another network's, or tensors two architectures share)"
    parts = [described["arch"], f"kernel sizes {format_kernel_sizes(described.get('kernel_sizes') or ())}",
             f"{described['num_classes']} classes"]
    if described.get("best_prec1") is not None:
        parts.append(f"best Prec@1 {described['best_prec1']:.3f}")
    return ", ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    check_paths(args)
    ckpt = read_checkpoint(args.input)
    if args.to == "safetensors":
        described = save_weights_file(ckpt, args.output)
    else:
        described = describe(ckpt)
        atomic_save(release_checkpoint(ckpt, described), args.output, legacy_format=True)
    print(f"wrote {args.output} ({len(ckpt.state_dict)} tensors; {summary(described)}; "
          f"{os.path.getsize(args.output) / 2**20:.1f} MiB) from {args.input}")


if __name__ == "__main__":
    run_cli(main)
