"""The ECA layer: Efficient Channel Attention (Wang et al., CVPR 2020).

Each channel is re-weighted by a gate computed from the global average of its
own feature map and of its k neighbours in channel order, through one shared
1-D kernel of k numbers. No dimensionality reduction, k parameters in total.

The layer adds almost no arithmetic; what it costs is passes over the feature
map. The implementation below keeps those to the minimum:

* forward: one read for the channel means, one read-read-write for
  ``x * gate + shortcut`` (a single ``addcmul``);
* backward (training, eager): a hand-written :class:`torch.autograd.Function`
  that folds the mean's gradient (a per-channel constant) into the same
  ``addcmul`` that applies the gate to the incoming gradient, instead of
  materialising an expanded, divided copy and adding it in a further pass;
* the k-tap convolution across channels runs on a ``[B, C]`` matrix as k
  shifted multiply-adds, avoiding ``Conv1d``'s large fixed cost per call.

In float64 every forward operation rounds exactly as the original module
(``AdaptiveAvgPool2d`` -> ``Conv1d`` -> ``Sigmoid`` -> ``x * y`` -> ``+ shortcut``),
so float64 logits are bit-identical to the original release's models.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["eca_layer", "adaptive_kernel_size", "gate_logits", "shifted_channel_conv", "apply_gate", "ECAGateFunction"]


def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's Eq. 12: the odd kernel size nearest to (log2(C) + b) / gamma."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Channel means of ``x`` and the k-tap correlation across them, both ``[B, C]``.

    ``weight`` is the ``Conv1d`` kernel ``[1, 1, k]``.
    """
    if x.dtype == torch.float64:
        return _reference_gate_logits(x, weight)
    # AdaptiveAvgPool2d(1) dispatches to this very reduction; taking it as [B, C]
    # skips the [B, C, 1, 1] -> [B, 1, C] reshaping that Conv1d needs.
    means = x.mean((2, 3))
    return means, shifted_channel_conv(means, weight)


def _reference_gate_logits(x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # float64 is the reference precision, where logits must equal the original's
    # to the last bit on every backend: the original's own operations, down to
    # the strides of Conv1d's input, which select kernels that round differently
    # (a channels_last input pools to a channels_last [B, C, 1, 1], for one).
    pooled = F.adaptive_avg_pool2d(x, 1)
    sequence = pooled.squeeze(-1).transpose(-1, -2)  # [B, 1, C]
    logits = F.conv1d(sequence, weight, padding=(weight.shape[-1] - 1) // 2)
    return pooled.flatten(1), logits.transpose(-1, -2).flatten(1)


def shifted_channel_conv(means: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The channel correlation as k shifted multiply-adds: a few tiny ops instead of one costly Conv1d call."""
    taps = weight.reshape(-1)
    k = taps.shape[0]
    channels = means.shape[-1]
    padded = F.pad(means, ((k - 1) // 2, (k - 1) // 2))
    out = padded[:, :channels] * taps[0]
    for j in range(1, k):
        out = torch.addcmul(out, padded[:, j : j + channels], taps[j])
    return out


def channel_conv_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gradient of the channel correlation w.r.t. its input: the same correlation with the kernel reversed."""
    return shifted_channel_conv(grad, weight.reshape(-1).flip(0))


def channel_conv_weight_grad(grad: torch.Tensor, means: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of the channel correlation w.r.t. its ``[1, 1, k]`` kernel."""
    channels = means.shape[-1]
    padded = F.pad(means, ((k - 1) // 2, (k - 1) // 2))
    # Tap j sees the input shifted by j. A broadcast product over a [B, k, C]
    # view is a single tiny op; einsum would route it through a costlier bmm.
    windows = padded.unfold(1, channels, 1)
    return (windows * grad.unsqueeze(1)).sum((0, 2)).reshape(1, 1, k)


def apply_gate(x: torch.Tensor, gate: torch.Tensor, shortcut: Optional[torch.Tensor]) -> torch.Tensor:
    """``x * gate (+ shortcut)`` with ``gate`` shaped ``[B, C, 1, 1]``."""
    if shortcut is None:
        return x * gate
    if x.dtype == torch.float64:
        # addcmul fuses multiply and add (one rounding); the original rounds the
        # product first, and float64 logits must match it to the last bit.
        return x * gate + shortcut
    return torch.addcmul(shortcut, x, gate)


def _gate(logits: torch.Tensor) -> torch.Tensor:
    """Weights in (0, 1) shaped ``[B, C, 1, 1]`` to broadcast over the feature map."""
    return torch.sigmoid(logits)[..., None, None]


class ECAGateFunction(torch.autograd.Function):
    """``x * sigmoid(conv(mean(x))) (+ shortcut)`` with a backward of two passes over the feature map.

    Autograd's own backward for the plain formulation writes ``grad * x``, a
    broadcast copy of the mean's gradient divided by H*W, ``grad * gate``, and
    their sum: four full-size tensors. Here the per-channel part of the input
    gradient (through the mean) is added inside the ``addcmul`` that applies the
    gate, so the backward reads the feature map twice and writes it once.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, shortcut: Optional[torch.Tensor], weight: torch.Tensor
    ) -> torch.Tensor:
        means, logits = gate_logits(x, weight)
        gate = _gate(logits)
        ctx.save_for_backward(x, means, gate, weight)
        ctx.has_shortcut = shortcut is not None
        return apply_gate(x, gate, shortcut)

    @staticmethod
    def backward(
        ctx, grad_out: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, means, gate, weight = ctx.saved_tensors
        needs_x, needs_shortcut, needs_weight = ctx.needs_input_grad
        grad_x = grad_weight = None
        if needs_x or needs_weight:
            product = grad_out * x
            grad_gate = product.sum((2, 3))
            grad_logit = torch.ops.aten.sigmoid_backward(grad_gate, gate.flatten(1))
            if needs_weight:
                grad_weight = channel_conv_weight_grad(grad_logit, means, weight.shape[-1])
            if needs_x:
                spatial_size = x.shape[2] * x.shape[3]
                grad_means = channel_conv_input_grad(grad_logit, weight) / spatial_size
                # The product is spent: its memory takes grad_x, sparing a fresh full-size allocation.
                grad_x = torch.addcmul(grad_means[..., None, None], grad_out, gate, out=product)
        grad_shortcut = grad_out if ctx.has_shortcut and needs_shortcut else None
        return grad_x, grad_shortcut, grad_weight


def _tracing() -> bool:
    """True while a graph is being captured, where the plain ops export and compile best."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


class eca_layer(nn.Module):
    """Efficient Channel Attention over ``channel`` channels with a k-tap kernel.

    Attribute names (``avg_pool``, ``conv``, ``sigmoid``) and the single
    parameter ``conv.weight`` of shape ``[1, 1, k]`` are those of the original
    release, so its checkpoints load unchanged. The submodules describe the
    computation and hold the parameter; ``forward`` calls the fused functions
    above rather than the modules, which is where the time goes.
    """

    def __init__(self, channel: int, k_size: int = 3):
        super().__init__()
        if k_size < 1 or k_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd integer, got {k_size}")
        self.channels = channel
        self.k_size = k_size
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel weights in (0, 1), shaped ``[B, C, 1, 1]`` to broadcast over ``x``."""
        return _gate(gate_logits(x, self.conv.weight)[1])

    def forward(self, x: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        """``x * gate``; with ``reuse_input=True`` inference may write it over ``x`` (see :meth:`forward_add`)."""
        return self._gated(x, None, reuse_input)

    def forward_add(self, x: torch.Tensor, shortcut: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        """``self(x) + shortcut`` in one pass over memory, as residual blocks need it.

        ``reuse_input=True`` lets inference write the result over ``x`` (a block
        passes its own temporary): on the CPU a fresh feature-map allocation
        costs page faults worth several percent of the whole network.
        """
        return self._gated(x, shortcut, reuse_input)

    def _gated(self, x: torch.Tensor, shortcut: Optional[torch.Tensor], reuse_input: bool = False) -> torch.Tensor:
        weight = self.conv.weight
        if _tracing():
            # Graph capture: plain out-of-place ops that compilers and exporters understand.
            return apply_gate(x, self.gate(x), shortcut)
        if torch.is_grad_enabled():
            return ECAGateFunction.apply(x, shortcut, weight)
        gate = self.gate(x)
        if not reuse_input:
            return apply_gate(x, gate, shortcut)
        if shortcut is None:
            return x.mul_(gate)
        if x.dtype == torch.float64:
            # Multiply, then add: the original's two roundings (see apply_gate).
            return x.mul_(gate).add_(shortcut)
        return torch.addcmul(shortcut, x, gate, out=x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k_size={self.k_size}"
