"""Which implementation runs a block end: the one place that looks at device, dtype, grad mode and capture.

A block end is ``relu?(eca(norm(x)) (+ shortcut))``, with ``x`` the block's
last convolution output. Every implementation takes ``(x, norm, eca, shortcut, relu)``.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu, gpu

IMPLS = ("auto", "reference", "cpu", "triton")
CPU_DTYPES = {"auto": (torch.float32,), "cpu": (torch.float32, torch.float64)}
BlockEnd = Callable[[torch.Tensor, nn.Module, nn.Module, Optional[torch.Tensor], bool], torch.Tensor]


def reference_block_end(x: torch.Tensor, norm: nn.Module, eca: nn.Module, shortcut: Optional[torch.Tensor],
                        relu: bool) -> torch.Tensor:
    """The plain modules, in the paper's order."""
    out = eca(norm(x))
    if shortcut is not None:
        out = out + shortcut
    return F.relu(out) if relu else out


def block_end(x: torch.Tensor, norm: nn.Module, eca: nn.Module, shortcut: Optional[torch.Tensor], relu: bool,
              impl: str) -> torch.Tensor:
    return select(impl, x, norm)(x, norm, eca, shortcut, relu)


def select(impl: str, x: torch.Tensor, norm: nn.Module) -> BlockEnd:
    """The implementation for this call.

    - ``reference``: the plain modules, always.
    - ``triton``: the registered custom ops, which graph capture keeps whole; ONNX and TorchScript get plain ops.
    - ``cpu``: the CPU autograd Functions in eager mode, for float32 (and float64, to test them against
      the reference); graph capture and other dtypes get plain ops (the Functions read kernel taps as
      Python numbers, which capture cannot trace).
    - ``auto``: ``cpu`` on float32 CPU tensors, so float64 stays bit-identical to the original; on
      GPUs the fewest eager kernels (``gpu``), as the Triton kernels have not yet been measured
      faster there (docs/performance.md).
    """
    if impl == "reference":
        return reference_block_end
    if impl == "triton":
        return reference_block_end if onnx_or_torchscript() else triton_block_end()
    if impl not in ("auto", "cpu"):
        raise ValueError(f"unknown ECA implementation {impl!r}: choose one of {', '.join(IMPLS)}")
    if capturing():
        return reference_block_end
    if impl == "auto" and not x.is_cpu:
        return gpu.block_end if torch.is_grad_enabled() else gpu.inference_block_end
    if x.dtype not in CPU_DTYPES[impl]:
        return reference_block_end
    if not torch.is_grad_enabled():
        return cpu.inference_block_end
    if folds_batch_norm(x, norm):
        return cpu.folded_block_end
    return cpu.gated_block_end


def folds_batch_norm(x: torch.Tensor, norm: nn.Module) -> bool:
    """Whether the folded Function can stand in for ``norm``: a plain BatchNorm2d using batch statistics."""
    return (
        type(norm) is nn.BatchNorm2d
        and norm.training
        and norm.track_running_stats
        and norm.affine
        and x.dim() == 4
        and x.numel() > x.shape[1]  # one value per channel: BatchNorm itself raises
    )


def capturing() -> bool:
    """True while torch.compile, torch.export or TorchScript captures a graph."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or onnx_or_torchscript()


def onnx_or_torchscript() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()


def triton_block_end() -> BlockEnd:
    from . import triton as triton_impl  # imports triton: only for those who ask for it

    reason = triton_impl.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"--eca-impl triton cannot run here: {reason}; use --eca-impl auto")
    return triton_impl.block_end


def check_impl(impl: str) -> None:
    """Refuse an unknown or unusable ``impl`` at set-up, in one line, rather than at the first step."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ECA implementation {impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "triton":
        triton_block_end()
