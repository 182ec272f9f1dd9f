"""The ECA layer: Efficient Channel Attention (Wang et al., CVPR 2020).

Each channel is re-weighted by a gate computed from the global average of its
own feature map and of its k neighbours in channel order, through one shared
1-D kernel of k numbers. No dimensionality reduction, k parameters in total.

The layer adds almost no arithmetic; what it costs is passes over the feature
map. The implementation below keeps those to the minimum:

* forward: one read for the channel means, one read-read-write for
  ``x * gate + shortcut`` (a single ``addcmul``); a ResNet block's end,
  ``relu(x * gate + shortcut)``, is written over the block's BatchNorm output
  and keeps no extra feature map for the backward
  (:class:`ECAResidualReLUFunction`);
* backward (training, eager): hand-written autograd functions that fold the
  mean's gradient (a per-channel constant) into the same ``addcmul`` that
  applies the gate to the incoming gradient, instead of materialising an
  expanded, divided copy and adding it in a further pass, and take the
  per-channel ``sum(grad * x)`` without writing the product
  (:func:`spatial_dot`); in a ResNet block the last BatchNorm's backward and
  ECA's share their reductions (one read of the gradient for both on NCHW),
  and in the forward ECA's channel sums give BatchNorm its batch mean
  (:class:`ECANormGateFunction`);
* the k-tap convolution across channels runs on the ``[B, C]`` means (in
  inference on the pooled ``[B, C, 1, 1]`` itself, and the sigmoid in place)
  as a product and in-place adds on shifted slices, avoiding ``Conv1d``'s
  large fixed cost per call.

That is the CPU's arithmetic, where passes over memory are the cost. On a GPU
the passes are cheap and what ECA costs is the number of kernels launched, so
there the layer runs the fewest operators: one ``Conv1d`` call for the channel
correlation, and autograd's own backward, whose nodes are C++ (a Python
``autograd.Function`` costs more host time than the launches it would save).

In float64 every forward operation rounds exactly as the original module
(``AdaptiveAvgPool2d`` -> ``Conv1d`` -> ``Sigmoid`` -> ``x * y`` -> ``+ shortcut``),
so float64 logits are bit-identical to the original release's models.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["eca_layer", "adaptive_kernel_size", "gate_logits", "launch_bound", "channel_taps", "shifted_channel_conv", "channel_means", "apply_gate", "spatial_dot", "pair_reductions", "batch_statistics", "normalise_batch", "ECAGateFunction", "ECAResidualReLUFunction", "ECANormGateFunction"]


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
    means = channel_means(x)
    if launch_bound(x):
        padding = (weight.shape[-1] - 1) // 2
        return means, F.conv1d(means.unsqueeze(1), weight, padding=padding).squeeze(1)
    return means, shifted_channel_conv(means, channel_taps(weight))


def channel_means(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The mean of every (sample, channel) map, ``[B, C]``, or ``[B, C, 1, 1]`` with ``keepdim``.

    On the CPU a channels_last tensor is averaged by pooling over the whole map,
    whose kernel runs along the contiguous channels (about a third less time in
    a ResNet-50 inference step than the generic reduction over H and W); NCHW
    maps and GPUs take the reduction that ``AdaptiveAvgPool2d(1)`` dispatches to.
    """
    if x.is_contiguous() or launch_bound(x):
        return x.mean((2, 3), keepdim=keepdim)
    pooled = F.avg_pool2d(x, x.shape[2:])
    return pooled if keepdim else pooled.flatten(1)


def launch_bound(x: torch.Tensor) -> bool:
    """Whether ECA's cost on ``x``'s device is kernel launches (GPUs) rather than passes over memory (the CPU)."""
    return not x.is_cpu


def _reference_gate_logits(x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # float64 is the reference precision, where logits must equal the original's
    # to the last bit on every backend: the original's own operations, down to
    # the strides of Conv1d's input, which select kernels that round differently
    # (a channels_last input pools to a channels_last [B, C, 1, 1], for one).
    pooled = F.adaptive_avg_pool2d(x, 1)
    sequence = pooled.squeeze(-1).transpose(-1, -2)  # [B, 1, C]
    logits = F.conv1d(sequence, weight, padding=(weight.shape[-1] - 1) // 2)
    return pooled.flatten(1), logits.transpose(-1, -2).flatten(1)


def channel_taps(weight: torch.Tensor) -> List[float]:
    """The ``[1, 1, k]`` Conv1d kernel as k Python numbers, to scale slices by without indexing a tensor."""
    return weight.tolist()[0][0]


def shifted_channel_conv(means: torch.Tensor, taps: Sequence[float]) -> torch.Tensor:
    """The zero-padded channel correlation as k multiply-adds on shifted slices of ``means`` ``[B, C]`` (or ``[B, C, 1, 1]``).

    A few tiny operations of two kinds instead of one costly ``Conv1d`` call:
    on the CPU what a tiny operation costs is mostly the first call of its kind
    after a large kernel has evicted the dispatcher's code and data from the
    caches, so the kinds are kept to a product and an in-place add.
    """
    channels = means.shape[1]
    half = (len(taps) - 1) // 2
    out = means * taps[half]
    for offset in range(1, min(half, channels - 1) + 1):
        out[:, :-offset].add_(means[:, offset:], alpha=taps[half + offset])
        out[:, offset:].add_(means[:, :-offset], alpha=taps[half - offset])
    return out


def channel_conv_input_grad(grad: torch.Tensor, taps: Sequence[float]) -> torch.Tensor:
    """Gradient of the channel correlation w.r.t. its input: the same correlation with the kernel reversed."""
    return shifted_channel_conv(grad, taps[::-1])


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


def spatial_dot(a: torch.Tensor, b: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(a * b).sum((2, 3))``, shaped ``[B, C]``, without writing the product where that is possible.

    On contiguous NCHW CPU tensors this is :func:`pair_reductions` with mean 0
    and invstd 1. Elsewhere the product is written, into ``scratch`` when given
    (a spent tensor of the same shape), and summed.
    """
    if _fused_dot_applies(a, b):
        pairs = a.shape[0] * a.shape[1]
        return pair_reductions(a, b, a.new_zeros(pairs), a.new_ones(pairs), per_channel=False)[1]
    return torch.mul(a, b, out=scratch).sum((2, 3))


def pair_reductions(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    per_channel: bool = True,
    scratch: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) pair: ``sum(grad)`` and ``sum(grad * (x - mean) * invstd)`` over the map, ``[B, C]`` each.

    BatchNorm's backward kernel, asked for its weight and bias gradients only,
    computes exactly these per channel in one vectorised read of both tensors
    and writes nothing else. Viewing a contiguous ``[B, C, H, W]`` as
    ``[1, B * C, H, W]`` makes its channels our pairs. A channels_last tensor
    cannot be viewed so; there ``grad * x`` is written (into ``scratch``, a
    spent tensor of the same shape and layout, when given) and summed, which
    costs less than one kernel call per sample. ``mean`` and ``invstd`` are per
    channel (``[C]``), or already per pair (``[B * C]``) with ``per_channel=False``.
    """
    batch, channels, height, width = x.shape
    if not (x.is_contiguous() and grad.is_contiguous()):
        totals = grad.sum((2, 3))
        dots = torch.mul(grad, x, out=scratch).sum((2, 3))
        if not per_channel:
            mean, invstd = mean.view(batch, channels), invstd.view(batch, channels)
        # sum(grad * (x - mean)) = sum(grad * x) - mean * sum(grad)
        return totals, dots.addcmul_(totals, mean, value=-1).mul_(invstd)
    if per_channel:
        mean, invstd = mean.repeat(batch), invstd.repeat(batch)
    as_pairs = (1, batch * channels, height, width)
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        grad.view(as_pairs), x.view(as_pairs), None, None, None, mean, invstd, True, 0.0, [False, True, True]
    )
    return total.view(batch, channels), dot.view(batch, channels)


def _fused_dot_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device.type == "cpu"
        and a.dtype in (torch.float32, torch.float64)
        and a.dtype == b.dtype
        and a.is_contiguous()
        and b.is_contiguous()
    )


class ECAGateFunction(torch.autograd.Function):
    """``x * sigmoid(conv(mean(x))) (+ shortcut)`` with a backward of two passes over the feature map.

    Autograd's own backward for the plain formulation writes ``grad * x``, a
    broadcast copy of the mean's gradient divided by H*W, ``grad * gate``, and
    their sum: four full-size tensors. Here the per-channel ``sum(grad * x)`` is
    read without writing the product (see :func:`spatial_dot`), and the part of
    the input gradient that flows through the mean (a per-channel constant) is
    added inside the ``addcmul`` that applies the gate: the backward reads the
    feature map twice and writes it once.

    With ``reuse_input=True`` the caller hands over ``x`` as a temporary that
    nothing else reads (a block's BatchNorm output, as torchvision's blocks
    add their residual into it in place): the backward then writes the input
    gradient over ``x`` once it is spent, instead of into a fresh allocation,
    which on the CPU costs page faults worth a full pass over memory.

    Both backwards are first-order only (``once_differentiable``): the gate is
    computed without a graph, so differentiating them again (``create_graph=True``,
    as gradient penalties do) raises instead of returning wrong second derivatives.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, shortcut: Optional[torch.Tensor], weight: torch.Tensor, reuse_input: bool = False
    ) -> torch.Tensor:
        means, logits = gate_logits(x, weight)
        gate = _gate(logits)
        ctx.save_for_backward(x, means, gate, weight)
        ctx.has_shortcut = shortcut is not None
        ctx.reuse_input = reuse_input
        ctx.input_spent = False
        return apply_gate(x, gate, shortcut)

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_out: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], None]:
        if ctx.input_spent:
            raise RuntimeError(
                "eca_layer: this graph's ECA backward already ran and reused its saved input; "
                "backward through it again (retain_graph=True) needs the layer called with reuse_input=False"
            )
        x, means, gate, weight = ctx.saved_tensors
        needs_x, needs_shortcut, needs_weight = ctx.needs_input_grad[:3]
        spent_x = x if ctx.reuse_input else None
        ctx.input_spent = spent_x is not None
        grad_x = grad_weight = None
        if needs_x or needs_weight:
            grad_gate = spatial_dot(grad_out, x, scratch=spent_x)
            grad_logit = torch.ops.aten.sigmoid_backward(grad_gate, gate.flatten(1))
            if needs_weight:
                grad_weight = channel_conv_weight_grad(grad_logit, means, weight.shape[-1])
            if needs_x:
                spatial_size = x.shape[2] * x.shape[3]
                grad_means = channel_conv_input_grad(grad_logit, channel_taps(weight)) / spatial_size
                grad_x = torch.addcmul(grad_means[..., None, None], grad_out, gate, out=spent_x)
        grad_shortcut = grad_out if ctx.has_shortcut and needs_shortcut else None
        return grad_x, grad_shortcut, grad_weight, None


def _gate_in_place(x: torch.Tensor, gate: torch.Tensor, shortcut: Optional[torch.Tensor]) -> torch.Tensor:
    """``x * gate (+ shortcut)`` written over ``x``, in one pass where the dtype allows."""
    if shortcut is None:
        return x.mul_(gate)
    if x.dtype == torch.float64:
        # Multiply, then add: the original's two roundings (see apply_gate).
        return x.mul_(gate).add_(shortcut)
    return torch.addcmul(shortcut, x, gate, out=x)


def _residual_relu_(x: torch.Tensor, gate: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """``relu(x * gate + shortcut)`` written over ``x``."""
    return _gate_in_place(x, gate, shortcut).relu_()


def recovers_gated_input(x: torch.Tensor) -> bool:
    """Whether ``out - shortcut`` gives back ``x * gate`` closely enough for the weight gradient.

    It does to the rounding of ``out``, relative to the shortcut's magnitude:
    fine in float32/float64, too coarse in half precision, where
    :class:`ECAGateFunction` keeps ``x`` instead.
    """
    return x.dtype in (torch.float32, torch.float64)


class ECAResidualReLUFunction(torch.autograd.Function):
    """``relu(x * gate + shortcut)`` in place over ``x``: the end of a residual block, saving nothing new.

    :class:`ECAGateFunction` must keep ``x`` for the backward, so its output
    needs a fresh tensor, one more feature map alive per block until the
    backward; on the CPU fresh memory is paid in page faults, the largest cost
    that ECA adds to a ResNet-50 training step. This version writes the output
    over ``x`` (as torchvision's blocks add their residual into the BatchNorm
    output) and saves only tensors the network keeps anyway: the output, which
    the next block's convolution saves, and the shortcut, which this block's
    first convolution saves. Where the ReLU passed its input, ``x * gate`` is
    ``out - shortcut``; where it did not, the gradient is zero and ``x`` does
    not matter. So the per-channel ``sum(grad * x) * gate`` that the gate's
    gradient needs is ``sum(grad' * out) - sum(grad' * shortcut)`` with
    ``grad'`` the gradient through the ReLU, and no division by the gate.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        means, logits = gate_logits(x, weight)
        gate = _gate(logits)
        out = _residual_relu_(x, gate, shortcut)
        ctx.mark_dirty(x)
        ctx.save_for_backward(out, shortcut, means, gate, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, shortcut, means, gate, weight = ctx.saved_tensors
        grad_sum = torch.ops.aten.threshold_backward(grad_out, out, 0)
        if _fused_dot_applies(grad_sum, out) and _fused_dot_applies(grad_sum, shortcut):
            gated_dot = spatial_dot(grad_sum, out) - spatial_dot(grad_sum, shortcut)
            scratch = None
        else:
            # The products must be written here; they go into the buffer that grad_x takes next.
            scratch = torch.sub(out, shortcut).mul_(grad_sum)
            gated_dot = scratch.sum((2, 3))
        # d sigmoid = gate * (1 - gate), and gated_dot already carries the gate.
        grad_logit = gated_dot * (1 - gate.flatten(1))
        grad_weight = channel_conv_weight_grad(grad_logit, means, weight.shape[-1])
        grad_means = channel_conv_input_grad(grad_logit, channel_taps(weight)) / (out.shape[2] * out.shape[3])
        grad_x = torch.addcmul(grad_means[..., None, None], grad_sum, gate, out=scratch)
        return grad_x, grad_sum, grad_weight


class ECANormGateFunction(torch.autograd.Function):
    """``relu(eca(batch_norm(x)) + shortcut)`` in training: a block's end from its last convolution.

    The shortcut (``None``) and the ReLU (``relu=False``) are optional:
    ResNet blocks take both, MobileNetV2's linear bottlenecks neither or the
    shortcut alone.

    Folding the block's last BatchNorm (batch statistics) into the layer lets
    one backward serve both. BatchNorm's own backward reduces ``grad`` and
    ``grad * x_hat`` per channel and then writes the input gradient; ECA's needs
    ``sum(grad * y)`` per (sample, channel). The per-pair sums give all of these
    at once (the per-channel ones are their sums over the batch, and
    ``y = weight * x_hat + bias``), so the backward takes every reduction from
    the gradient and the convolution output at once (:func:`pair_reductions`:
    one read of both on NCHW) and writes the input gradient as
    ``a * grad + b * x + c`` with per-(sample, channel) coefficients in two
    passes. In the forward, ECA's channel means of ``x`` also give BatchNorm
    its batch mean on NCHW (:func:`normalise_batch`), running statistics are
    updated as ``nn.BatchNorm2d`` updates them, and ``relu(y * gate + shortcut)``
    is written over ``y``.

    Saved for the backward: the convolution output (BatchNorm keeps it too), the
    block output with the ReLU (which the next convolution keeps) and ``[B, C]``
    vectors.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        shortcut: torch.Tensor,
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor,
        eca_weight: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        momentum: float,
        eps: float,
        relu: bool = True,
    ) -> torch.Tensor:
        y, mean, invstd, pair_means = normalise_batch(x, norm_weight, norm_bias, running_mean, running_var, momentum, eps)
        # The channel means of y, from those of x: y is x normalised and scaled per channel.
        normalised_means = (pair_means - mean) * invstd
        means = torch.addcmul(norm_bias, normalised_means, norm_weight)
        taps = channel_taps(eca_weight)
        gate = torch.sigmoid(shifted_channel_conv(means, taps))
        out = _gate_in_place(y, gate[..., None, None], shortcut)
        if relu:
            out.relu_()
        ctx.has_shortcut = shortcut is not None
        ctx.relu = relu
        ctx.taps = taps  # the saved kernel's version check guards them too
        # Without the ReLU the output is not needed: nothing is masked.
        ctx.save_for_backward(
            x, out if relu else None, norm_weight, norm_bias, eca_weight, mean, invstd, normalised_means, means, gate
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, out, norm_weight, norm_bias, eca_weight, mean, invstd, normalised_means, means, gate = ctx.saved_tensors
        batch, _, height, width = x.shape
        spatial_size = height * width
        count = batch * spatial_size
        grad_sum = torch.ops.aten.threshold_backward(grad_out, out, 0) if ctx.relu else grad_out
        grad_x = torch.empty_like(x)
        grad_total, grad_dot_normalised = pair_reductions(grad_sum, x, mean, invstd, scratch=grad_x)
        # sum(grad * y) per pair, y = weight * x_hat + bias: what the gate's gradient needs.
        grad_gate = torch.addcmul(norm_bias * grad_total, norm_weight, grad_dot_normalised)
        grad_logit = torch.ops.aten.sigmoid_backward(grad_gate, gate)
        grad_eca_weight = channel_conv_weight_grad(grad_logit, means, eca_weight.shape[-1])
        grad_means = channel_conv_input_grad(grad_logit, ctx.taps)
        # The gradient reaching y is gate * grad + grad_means / (H * W) per pair; BatchNorm's
        # weight and bias gradients are its per-channel sums with x_hat and with 1.
        grad_norm_bias = torch.addcmul(grad_means, gate, grad_total).sum(0)
        grad_norm_weight = torch.addcmul(gate * grad_dot_normalised, grad_means, normalised_means).sum(0)
        # BatchNorm's input gradient, scale * (grad_y - grad_bias / n - x_hat * grad_weight / n),
        # as a * grad - b * x / n + c per pair, x_hat = (x - mean) * invstd, with
        # b = scale * invstd * grad_weight and c = scale * (grad_means - grad_bias / B) / (H * W) + b * mean / n.
        scale = norm_weight * invstd
        x_coef = (scale * invstd).mul_(grad_norm_weight)
        centred = torch.sub(grad_means, grad_norm_bias, alpha=1 / batch)
        constant = torch.addcmul(x_coef * mean / count, scale, centred, value=1 / spatial_size)
        torch.addcmul(constant[..., None, None], grad_sum, (scale * gate)[..., None, None], out=grad_x)
        grad_x.addcmul_(x, x_coef[:, None, None], value=-1 / count)
        grad_shortcut = grad_sum if ctx.has_shortcut else None
        return grad_x, grad_shortcut, grad_norm_weight, grad_norm_bias, grad_eca_weight, None, None, None, None, None


def normalise_batch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm in training, ``(y, mean, invstd)`` as ``torch.native_batch_norm`` returns them, and ``x``'s :func:`channel_means`.

    BatchNorm's CPU kernel is fast on channels_last tensors; on contiguous
    (NCHW) ones its statistics cost ten times a read, so there they come from
    :func:`batch_statistics` and the kernel only normalises.
    """
    if not x.is_contiguous():
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        return y, mean, invstd, channel_means(x)
    pair_sums, mean, var = batch_statistics(x)
    y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
    update_running_statistics(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return y, mean, var.add_(eps).rsqrt_(), pair_sums / (x.shape[2] * x.shape[3])


# Beyond this (mean / std)^2 the variance from sums loses too many float32 digits (see batch_statistics).
WELL_CONDITIONED = 25.0


def batch_statistics(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample, channel) sums ``[B, C]``, and per channel the batch mean and biased variance ``[C]``.

    BatchNorm's own CPU kernel takes the statistics of a contiguous (NCHW)
    tensor with a Welford reduction about ten times slower than a plain read
    of it. Here the pair sums (which ECA needs anyway) give the mean, and one
    more read, BatchNorm's backward kernel asked for ``sum(x * (x - mean))``
    per channel, gives the centred second moment. That identity subtracts
    ``mean * sum(x - mean)``, whose rounding grows as ``(mean / std)^2`` float
    roundings: where a channel's mean exceeds five standard deviations, the
    statistics are taken again with a Welford reduction (``torch.var_mean``).
    """
    count = x.numel() // x.shape[1]
    pair_sums = x.sum((2, 3))
    sums = pair_sums.sum(0)
    mean = sums / count
    ones = torch.ones_like(mean)
    dot = torch.ops.aten.native_batch_norm_backward(x, x, None, None, None, mean, ones, True, 0.0, [False, True, False])[1]
    # sum((x - mean)^2) = sum(x * (x - mean)) - mean * sum(x - mean); the last sum is zero but for rounding.
    var = torch.addcmul(dot, mean, torch.sub(sums, mean, alpha=count), value=-1).div_(count)
    # mean^2 > WELL_CONDITIONED * var anywhere, a non-positive var included
    if torch.addcmul(var, mean, mean, value=-1 / WELL_CONDITIONED).min().item() < 0:
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    return pair_sums, mean, var


def update_running_statistics(
    running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, count: int, momentum: float
) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in a training step: the variance enters unbiased."""
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(var * (count / max(count - 1, 1)), momentum)


def folds_batch_norm(x: torch.Tensor, norm: nn.Module) -> bool:
    """Whether :class:`ECANormGateFunction` can stand in for ``norm`` and the block's end.

    Eager float32 training on the CPU, where passes over memory are the cost,
    with a plain ``BatchNorm2d`` using batch statistics; anything else
    (evaluation, frozen or synchronised BatchNorm, other dtypes or devices)
    calls ``norm`` itself.
    """
    return (
        type(norm) is nn.BatchNorm2d
        and norm.training
        and norm.track_running_stats
        and norm.affine
        and torch.is_grad_enabled()
        and not launch_bound(x)
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.numel() > x.shape[1]  # one value per channel: BatchNorm itself raises
        and not _tracing()
    )


def _momentum_of_step(norm: nn.BatchNorm2d) -> float:
    """Count the batch and return this step's running-average factor, as ``nn.BatchNorm2d.forward`` does."""
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


def _tracing() -> bool:
    """True while a graph is being captured, where the plain ops export and compile best.

    ONNX export is covered: its TorchScript exporter traces, its dynamo one exports.
    """
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
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

    def _inference_gate(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`gate` outside autograd and graph capture.

        On the CPU the correlation and the sigmoid run on the pooled
        ``[B, C, 1, 1]`` itself, the sigmoid in place: no reshapes, no fresh
        gate. In a running network each tiny operator costs about 10 us, so the
        three saved are worth about 0.5 ms of a ResNet-50 inference step.
        """
        if x.dtype == torch.float64 or launch_bound(x):
            return self.gate(x)
        means = channel_means(x, keepdim=True)
        return shifted_channel_conv(means, channel_taps(self.conv.weight)).sigmoid_()

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

    def forward_add_relu(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """``relu(self(x) + shortcut)``, written over ``x``: how a ResNet block ends.

        ``x`` must be the caller's own temporary (a block's last BatchNorm
        output); it is overwritten in training and inference alike.
        """
        if _tracing():
            return F.relu(apply_gate(x, self.gate(x), shortcut))
        if not torch.is_grad_enabled():
            return _residual_relu_(x, self._inference_gate(x), shortcut)
        if launch_bound(x):
            # Autograd's backward of plain ops; the fresh output can take the ReLU in place.
            return apply_gate(x, self.gate(x), shortcut).relu_()
        weight = self.conv.weight
        if recovers_gated_input(x):
            return ECAResidualReLUFunction.apply(x, shortcut, weight)
        return ECAGateFunction.apply(x, shortcut, weight, True).relu_()

    def forward_norm_add_relu(self, x: torch.Tensor, norm: nn.Module, shortcut: torch.Tensor) -> torch.Tensor:
        """``self.forward_add_relu(norm(x), shortcut)``, with ``norm`` folded in where it pays.

        ``x`` is the block's last convolution output, ``norm`` its BatchNorm. In
        CPU training the two backwards become one (:class:`ECANormGateFunction`);
        elsewhere ``norm`` is called as usual (its forward hooks run only then).
        """
        if not folds_batch_norm(x, norm):
            return self.forward_add_relu(norm(x), shortcut)
        return self._folded(x, norm, shortcut, relu=True)

    def forward_norm(self, x: torch.Tensor, norm: nn.Module, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``self(norm(x)) (+ shortcut)``, with ``norm`` folded in where it pays (see :meth:`forward_norm_add_relu`).

        ``norm(x)`` is a temporary nothing else reads, so inference writes the result over it.
        """
        if folds_batch_norm(x, norm):
            return self._folded(x, norm, shortcut, relu=False)
        if shortcut is None:
            return self(norm(x), reuse_input=True)
        return self.forward_add(norm(x), shortcut, reuse_input=True)

    def _folded(self, x: torch.Tensor, norm: nn.BatchNorm2d, shortcut: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        momentum = _momentum_of_step(norm)
        return ECANormGateFunction.apply(
            x, shortcut, norm.weight, norm.bias, self.conv.weight, norm.running_mean, norm.running_var, momentum, norm.eps, relu
        )

    def _gated(self, x: torch.Tensor, shortcut: Optional[torch.Tensor], reuse_input: bool = False) -> torch.Tensor:
        weight = self.conv.weight
        if _tracing() or (launch_bound(x) and torch.is_grad_enabled()):
            # Graph capture: plain out-of-place ops that compilers and exporters understand;
            # GPU training: autograd's own backward of them, the fewest launches.
            return apply_gate(x, self.gate(x), shortcut)
        if torch.is_grad_enabled():
            return ECAGateFunction.apply(x, shortcut, weight, reuse_input)
        gate = self._inference_gate(x)
        if not reuse_input:
            return apply_gate(x, gate, shortcut)
        return _gate_in_place(x, gate, shortcut)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k_size={self.k_size}"
