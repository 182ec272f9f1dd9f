"""Export a trained checkpoint for deployment: ``torch.export`` (.pt2) or ONNX, verified against eager.

    python scripts/export.py --resume model_best.pth.tar --format export --output eca_resnet50.pt2
    python scripts/export.py --resume model_best.pth.tar --format onnx --output eca_resnet50.onnx --dynamic-size
    python scripts/export.py --resume eca_resnet50_k3557.safetensors --format export --output eca_resnet50.pt2

Both files take a float batch ``[N, 3, S, S]`` normalised with ImageNet's mean
and std (``S``: ``--input-size``, by default the checkpoint's validation crop)
and return logits ``[N, classes]``; the batch dimension ``N`` is dynamic, and
with ``--dynamic-size`` the height and width too. Right after writing, the file
is loaded back and run on random batches, and the largest absolute difference
from the eager model's logits is printed; above the tolerance the command fails
with exit status 1. ONNX needs the packages of ``requirements-export.txt``.
"""
import argparse
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, List, NoReturn, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from models.fused import IMPLS as ECA_IMPLS  # noqa: E402
from engine.checkpoint import fuse, load_model  # noqa: E402
from engine.config import ArgumentParser  # noqa: E402
from engine.data import DEFAULT_CROP_SIZE, saved_size  # noqa: E402
from engine.errors import UsageError, run_cli  # noqa: E402

EXPORT_TOLERANCE = 1e-4
ONNX_TOLERANCE = 1e-3
EXIT_MISMATCH = 1
VERIFY_BATCH = 2
# A second batch size proves the batch dimension really is dynamic; with --dynamic-size, a second
# image size (taller and wider by different amounts) proves height and width are.
DYNAMIC_CHECK_BATCH = 3
DYNAMIC_CHECK_GROWTH = (32, 64)
SMALLEST_INPUT = 32  # the networks downsample 32x
# torch's dynamo-based ONNX exporter implements opset 18 and up; 17 goes through the TorchScript exporter.
LOWEST_DYNAMO_OPSET = 18
LOWEST_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Export an ECA-Net checkpoint to torch.export (.pt2) or ONNX.")
    parser.add_argument("--resume", required=True, metavar="CKPT", help="checkpoint to export (.pth.tar or .safetensors)")
    parser.add_argument("--format", required=True, choices=("export", "onnx"), help="export: torch.export .pt2; onnx: ONNX")
    parser.add_argument("--output", required=True, metavar="FILE", help="file to write (.pt2 or .onnx)")
    parser.add_argument("-a", "--arch", choices=sorted(models.ARCHITECTURES), help="check that the checkpoint holds this architecture")
    parser.add_argument("--input-size", type=int, default=None,
                        help="height and width of the input (default: the checkpoint's validation crop, else 224)")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="export with dynamic height and width too, not only a dynamic batch")
    parser.add_argument(
        "--opset", type=int, default=LOWEST_DYNAMO_OPSET,
        help=f"ONNX opset (default {LOWEST_DYNAMO_OPSET}; {LOWEST_OPSET} uses torch's older TorchScript exporter)",
    )
    parser.add_argument("--eca-impl", choices=ECA_IMPLS, default="auto",
                        help="ECA block implementation to export (default auto: plain ops under graph capture)")
    return parser


def fail_verification(message: str) -> NoReturn:
    # Not a usage error: the export ran but its output is wrong, so a different status from run_cli's 2.
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_MISMATCH)


@dataclass(frozen=True)
class InputSpec:
    """The example input's size, and whether the exported file leaves its height and width free."""

    size: int
    dynamic_size: bool

    def example(self) -> torch.Tensor:
        return random_batch(VERIFY_BATCH, self.size, self.size, seed=0)

    def checks(self) -> List[Tuple[int, int, int]]:
        """(batch, height, width) of the batches the exported file is verified on."""
        shapes = [(VERIFY_BATCH, self.size, self.size), (DYNAMIC_CHECK_BATCH, self.size, self.size)]
        if self.dynamic_size:
            grow_h, grow_w = DYNAMIC_CHECK_GROWTH
            shapes.append((DYNAMIC_CHECK_BATCH, self.size + grow_h, self.size + grow_w))
        return shapes

    def dynamic_shapes(self) -> tuple:
        """torch.export's dynamic dimensions of the input; height and width as the model's code allows them."""
        dims = {0: torch.export.Dim("batch", min=1)}
        if self.dynamic_size:
            dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
        return (dims,)

    def dynamic_axes(self) -> dict:
        """The same for the TorchScript ONNX exporter (opset 17)."""
        axes = {0: "batch", 2: "height", 3: "width"} if self.dynamic_size else {0: "batch"}
        return {INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}}


def random_batch(batch_size: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, height, width, generator=generator)


def max_abs_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().float() - expected.detach().float()).abs().max())


def verify(label: str, run_exported: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
           inputs: InputSpec, *, tolerance: float) -> None:
    """Compare the exported program with eager on random batches; fail above ``tolerance``."""
    for seed, (batch_size, height, width) in enumerate(inputs.checks()):
        images = random_batch(batch_size, height, width, seed)
        with torch.inference_mode():
            expected = model(images)
        difference = max_abs_difference(run_exported(images), expected)
        shape = f"batch {batch_size} at {height}x{width}"
        print(f"{label} {shape}: max abs diff vs eager logits {difference:.3e} (tolerance {tolerance:.0e})")
        if not difference < tolerance:
            fail_verification(
                f"{label} output differs from the eager model by {difference:.3e} at {shape} "
                f"(tolerance {tolerance:.0e}); the exported file is not trustworthy"
            )


# --- torch.export --------------------------------------------------------------------------------


def export_program(model: torch.nn.Module, inputs: InputSpec, output: str) -> None:
    program = torch.export.export(model, (inputs.example(),), dynamic_shapes=inputs.dynamic_shapes())
    torch.export.save(program, output)
    loaded = torch.export.load(output).module()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(images)

    verify("torch.export", run, model, inputs, tolerance=EXPORT_TOLERANCE)


# --- ONNX ----------------------------------------------------------------------------------------


def require_onnx_packages() -> None:
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if not _importable(name)]
    if missing:
        raise UsageError(
            f"ONNX export needs {', '.join(missing)}, which is not installed: pip install -r requirements-export.txt"
        )


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def export_onnx(model: torch.nn.Module, inputs: InputSpec, output: str, opset: int) -> None:
    import onnx
    import onnxruntime

    example = inputs.example()
    if opset >= LOWEST_DYNAMO_OPSET:
        torch.onnx.export(
            model, (example,), output, opset_version=opset, dynamo=True, verbose=False, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=inputs.dynamic_shapes(),
        )
    else:
        with warnings.catch_warnings():
            # Its deprecation notice and constant-folding notes say nothing about this model's correctness.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), output, opset_version=opset, dynamo=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes=inputs.dynamic_axes(),
            )
    onnx.checker.check_model(output)
    written_opset = next(entry.version for entry in onnx.load(output).opset_import if entry.domain in ("", "ai.onnx"))
    print(f"ONNX opset {written_opset}")
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(np.asarray(logits))

    verify("ONNX", run, model, inputs, tolerance=ONNX_TOLERANCE)


# --- entry point ---------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    if args.input_size is not None:
        check_input_size(args.input_size, "--input-size")
    if args.format == "onnx":
        if args.opset < LOWEST_OPSET:
            raise UsageError(f"--opset must be at least {LOWEST_OPSET}, got {args.opset}")
        require_onnx_packages()
    if os.path.isdir(args.output):
        raise UsageError(f"--output {args.output!r} is a folder; give a file name such as model.{_suffix(args.format)}")


def check_input_size(size: int, source: str) -> None:
    if size < SMALLEST_INPUT:
        raise UsageError(f"{source} must be at least {SMALLEST_INPUT} (the network downsamples 32x), got {size}; "
                         "pass a larger --input-size")


def _suffix(export_format: str) -> str:
    return "pt2" if export_format == "export" else "onnx"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    check_args(args)
    model, checkpoint = load_model(args.resume, arch=args.arch, map_location="cpu")
    # By default, as predict.py and -e do: the size the model was validated at during training.
    saved = saved_size(checkpoint.contents, "val_crop_size")
    size = args.input_size or saved or DEFAULT_CROP_SIZE
    source = "--input-size" if args.input_size else ("the checkpoint's validation crop" if saved else "ImageNet's crop")
    check_input_size(size, source)
    inputs = InputSpec(size, args.dynamic_size)
    fuse(model, args.eca_impl)
    model.eval()
    free = "batch, height and width" if inputs.dynamic_size else "batch"
    print(f"input [N, 3, {size}, {size}] ({source}); dynamic: {free}")
    # Only once the checkpoint is known to be good: bad input leaves nothing behind.
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.format == "export":
        export_program(model, inputs, args.output)
    else:
        export_onnx(model, inputs, args.output, args.opset)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run_cli(main)
