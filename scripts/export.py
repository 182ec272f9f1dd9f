"""Export a trained checkpoint for deployment: ``torch.export`` (.pt2) or ONNX, verified against eager.

    python scripts/export.py --resume model_best.pth.tar --format export --output eca_resnet50.pt2
    python scripts/export.py --resume model_best.pth.tar --format onnx --output eca_resnet50.onnx
    python scripts/export.py --resume eca_resnet50_k3557.safetensors --format export --output eca_resnet50.pt2

Both files take a float batch ``[N, 3, S, S]`` normalised with ImageNet's mean
and std (``S`` = ``--input-size``) and return logits ``[N, classes]``; the batch
dimension ``N`` is dynamic. Right after writing, the file is loaded back and run
on a random batch, and the largest absolute difference from the eager model's
logits is printed; above the tolerance the command fails with exit status 1.
ONNX needs the packages of ``requirements-export.txt``.
"""
import argparse
import logging
import os
import sys
import warnings
from typing import Callable, NoReturn, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from engine.checkpoint import load_model  # noqa: E402
from engine.config import ArgumentParser
from engine.errors import UsageError, run_cli  # noqa: E402

EXPORT_TOLERANCE = 1e-4
ONNX_TOLERANCE = 1e-3
EXIT_MISMATCH = 1
VERIFY_BATCH = 2
# A second batch size proves the batch dimension really is dynamic.
DYNAMIC_CHECK_BATCH = 3
# torch's dynamo-based ONNX exporter implements opset 18 and up; 17 goes through the TorchScript exporter.
LOWEST_DYNAMO_OPSET = 18
LOWEST_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = ArgumentParser(description="Export an ECA-Net checkpoint to torch.export (.pt2) or ONNX.")
    parser.add_argument("--resume", required=True, metavar="CKPT", help="checkpoint to export (.pth.tar or .safetensors)")
    parser.add_argument("--format", required=True, choices=("export", "onnx"), help="export: torch.export .pt2; onnx: ONNX")
    parser.add_argument("--output", required=True, metavar="FILE", help="file to write (.pt2 or .onnx)")
    parser.add_argument("-a", "--arch", choices=sorted(models.ARCHITECTURES), help="check that the checkpoint holds this architecture")
    parser.add_argument("--input-size", type=int, default=224, help="height and width of the input (default 224)")
    parser.add_argument(
        "--opset", type=int, default=LOWEST_DYNAMO_OPSET,
        help=f"ONNX opset (default {LOWEST_DYNAMO_OPSET}; {LOWEST_OPSET} uses torch's older TorchScript exporter)",
    )
    return parser.parse_args(argv)


def fail_verification(message: str) -> NoReturn:
    # Not a usage error: the export ran but its output is wrong, so a different status from run_cli's 2.
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_MISMATCH)


def random_batch(batch_size: int, input_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, input_size, input_size, generator=generator)


def max_abs_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().float() - expected.detach().float()).abs().max())


def verify(
    label: str, run_exported: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
    input_size: int, tolerance: float,
) -> None:
    """Compare the exported program with eager on random batches; fail above ``tolerance``."""
    for seed, batch_size in enumerate((VERIFY_BATCH, DYNAMIC_CHECK_BATCH)):
        images = random_batch(batch_size, input_size, seed)
        with torch.inference_mode():
            expected = model(images)
        difference = max_abs_difference(run_exported(images), expected)
        print(f"{label} batch {batch_size}: max abs diff vs eager logits {difference:.3e} (tolerance {tolerance:.0e})")
        if not difference < tolerance:
            fail_verification(
                f"{label} output differs from the eager model by {difference:.3e} at batch {batch_size} "
                f"(tolerance {tolerance:.0e}); the exported file is not trustworthy"
            )


# --- torch.export --------------------------------------------------------------------------------


def export_program(model: torch.nn.Module, input_size: int, output: str) -> None:
    example = random_batch(VERIFY_BATCH, input_size, seed=0)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, output)
    loaded = torch.export.load(output).module()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(images)

    verify("torch.export", run, model, input_size, EXPORT_TOLERANCE)


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


def export_onnx(model: torch.nn.Module, input_size: int, output: str, opset: int) -> None:
    import onnx
    import onnxruntime

    example = random_batch(VERIFY_BATCH, input_size, seed=0)
    if opset >= LOWEST_DYNAMO_OPSET:
        torch.onnx.export(
            model, (example,), output, opset_version=opset, dynamo=True, verbose=False, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    else:
        with warnings.catch_warnings():
            # Its deprecation notice and constant-folding notes say nothing about this model's correctness.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), output, opset_version=opset, dynamo=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    onnx.checker.check_model(output)
    written_opset = next(entry.version for entry in onnx.load(output).opset_import if entry.domain in ("", "ai.onnx"))
    print(f"ONNX opset {written_opset}")
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(np.asarray(logits))

    verify("ONNX", run, model, input_size, ONNX_TOLERANCE)


# --- entry point ---------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    if args.input_size < 32:
        raise UsageError(f"--input-size must be at least 32 (the network downsamples 32x), got {args.input_size}")
    if args.format == "onnx":
        if args.opset < LOWEST_OPSET:
            raise UsageError(f"--opset must be at least {LOWEST_OPSET}, got {args.opset}")
        require_onnx_packages()
    if os.path.isdir(args.output):
        raise UsageError(f"--output {args.output!r} is a folder; give a file name such as model.{_suffix(args.format)}")


def _suffix(export_format: str) -> str:
    return "pt2" if export_format == "export" else "onnx"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    check_args(args)
    model, _ = load_model(args.resume, arch=args.arch, map_location="cpu")
    # Only once the checkpoint is known to be good: bad input leaves nothing behind.
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model.eval()
    if args.format == "export":
        export_program(model, args.input_size, args.output)
    else:
        export_onnx(model, args.input_size, args.output, args.opset)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run_cli(main)
