"""The reductions and channel arithmetic the CPU block ends are built from.

On the CPU a block end's cost is passes over the feature map, so each helper
reads a map as few times as it can and writes nothing it need not.
docs/performance.md has the measurements behind each choice.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Beyond this (mean / std)^2 the variance from sums loses too many float32 digits (see batch_statistics).
WELL_CONDITIONED = 25.0


def channel_means(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The mean of every (sample, channel) map, ``[B, C]``, or ``[B, C, 1, 1]`` with ``keepdim``.

    A channels_last map is averaged by pooling over the whole map, whose CPU
    kernel runs along the contiguous channels, faster than the generic reduction.
    """
    if x.is_contiguous():
        return x.mean((2, 3), keepdim=keepdim)
    pooled = F.avg_pool2d(x, x.shape[2:])
    return pooled if keepdim else pooled.flatten(1)


def channel_taps(weight: torch.Tensor) -> List[float]:
    """The ``[1, 1, k]`` Conv1d kernel as k Python numbers, to scale slices by without indexing a tensor."""
    return weight.tolist()[0][0]


def shifted_channel_conv(means: torch.Tensor, taps: Sequence[float]) -> torch.Tensor:
    """The zero-padded k-tap correlation across channels of ``[B, C]`` (or ``[B, C, 1, 1]``) means.

    A product and in-place adds on shifted slices: a few tiny operators of two
    kinds instead of one ``Conv1d`` call, whose fixed cost is far larger here.
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
    # Tap j sees the input shifted by j: one broadcast product over a [B, k, C] view (einsum would go through bmm).
    windows = padded.unfold(1, channels, 1)
    return (windows * grad.unsqueeze(1)).sum((0, 2)).reshape(1, 1, k)


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Channel means of ``x`` and the k-tap correlation across them, both ``[B, C]``."""
    means = channel_means(x)
    return means, shifted_channel_conv(means, channel_taps(weight))


def gate_in_place(x: torch.Tensor, gate: torch.Tensor, shortcut: Optional[torch.Tensor]) -> torch.Tensor:
    """``x * gate (+ shortcut)`` written over ``x`` in one pass; ``gate`` is ``[B, C, 1, 1]``."""
    if shortcut is None:
        return x.mul_(gate)
    return torch.addcmul(shortcut, x, gate, out=x)


def spatial_dot(a: torch.Tensor, b: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(a * b).sum((2, 3))``, ``[B, C]``, without writing the product where the layout allows.

    Elsewhere the product is written, into ``scratch`` (a spent tensor of the same shape) when given.
    """
    if reads_pairs_in_one_pass(a, b):
        pairs = a.shape[0] * a.shape[1]
        return pair_reductions(a, b, a.new_zeros(pairs), a.new_ones(pairs), per_channel=False)[1]
    return torch.mul(a, b, out=scratch).sum((2, 3))


def reads_pairs_in_one_pass(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`pair_reductions` can view ``a`` and ``b`` as ``[1, B * C, H, W]`` for BatchNorm's kernel."""
    return (
        a.device.type == "cpu"
        and a.dtype in (torch.float32, torch.float64)
        and a.dtype == b.dtype
        and a.is_contiguous()
        and b.is_contiguous()
    )


def pair_reductions(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    per_channel: bool = True,
    scratch: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel): ``sum(grad)`` and ``sum(grad * (x - mean) * invstd)`` over the map, ``[B, C]`` each.

    BatchNorm's backward kernel, asked for its weight and bias gradients only,
    computes exactly these per channel in one read of both tensors; viewing a
    contiguous ``[B, C, H, W]`` as ``[1, B * C, H, W]`` makes its channels our
    pairs. A channels_last map cannot be viewed so: there ``grad * x`` is
    written (into ``scratch`` when given) and summed. ``mean`` and ``invstd``
    are per channel ``[C]``, or per pair ``[B * C]`` with ``per_channel=False``.
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


def batch_statistics(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample, channel) sums ``[B, C]``, and per channel the batch mean and biased variance ``[C]``.

    BatchNorm's CPU kernel reduces an NCHW map with a Welford loop several times
    slower than a plain read. Here the pair sums (which ECA needs anyway) give
    the mean, and BatchNorm's backward kernel asked for ``sum(x * (x - mean))``
    gives the centred second moment. That identity loses digits as
    ``(mean / std)^2`` grows: past :data:`WELL_CONDITIONED` the statistics are
    taken again with ``torch.var_mean``.
    """
    count = x.numel() // x.shape[1]
    pair_sums = x.sum((2, 3))
    sums = pair_sums.sum(0)
    mean = sums / count
    ones = torch.ones_like(mean)
    dot = torch.ops.aten.native_batch_norm_backward(x, x, None, None, None, mean, ones, True, 0.0, [False, True, False])[1]
    # sum((x - mean)^2) = sum(x * (x - mean)) - mean * sum(x - mean); the last sum is zero but for rounding.
    var = torch.addcmul(dot, mean, torch.sub(sums, mean, alpha=count), value=-1).div_(count)
    if torch.addcmul(var, mean, mean, value=-1 / WELL_CONDITIONED).min().item() < 0:
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    return pair_sums, mean, var


def normalise_batch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm in training: ``(y, mean, invstd)`` as ``torch.native_batch_norm`` gives them, and ``x``'s channel means.

    BatchNorm's own kernel is fast on channels_last maps; on NCHW ones the
    statistics come from :func:`batch_statistics` and the kernel only normalises.
    """
    if not x.is_contiguous():
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        return y, mean, invstd, channel_means(x)
    pair_sums, mean, var = batch_statistics(x)
    y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
    update_running_statistics(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return y, mean, var.add_(eps).rsqrt_(), pair_sums / (x.shape[2] * x.shape[3])


def update_running_statistics(
    running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, count: int, momentum: float
) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in a training step: the variance enters unbiased."""
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(var * (count / max(count - 1, 1)), momentum)
