"""The CPU block end: ``relu?(eca(norm(x)) (+ shortcut))`` as hand-written autograd Functions.

Where the CPU's time goes is passes over memory, not arithmetic, so these
Functions fold BatchNorm into ECA where they can, write over temporaries, and
keep reductions to one read (``cpu_ops``). ``dispatch`` decides when each runs.
Each entry function takes ``(x, norm, eca, shortcut, relu)``: ``x`` the last
convolution's output, ``norm`` its BatchNorm, ``eca`` the block's ``eca_layer``.
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .cpu_ops import (
    channel_conv_input_grad, channel_conv_weight_grad, channel_means, channel_taps, gate_in_place, gate_logits,
    normalise_batch, pair_reductions, reads_pairs_in_one_pass, shifted_channel_conv, spatial_dot,
)


def folded_block_end(x: torch.Tensor, norm: nn.BatchNorm2d, eca: nn.Module, shortcut: Optional[torch.Tensor],
                     relu: bool) -> torch.Tensor:
    """Training with batch statistics: BatchNorm and ECA in one Function, buffers updated as BatchNorm2d does."""
    norm.num_batches_tracked.add_(1)
    momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return ECANormGateFunction.apply(x, shortcut, norm.weight, norm.bias, eca.conv.weight, norm.running_mean,
                                     norm.running_var, momentum, norm.eps, relu)


def gated_block_end(x: torch.Tensor, norm: nn.Module, eca: nn.Module, shortcut: Optional[torch.Tensor],
                    relu: bool) -> torch.Tensor:
    """Training with BatchNorm as it is (frozen, synchronised, ...): ``norm`` runs, then the ECA Function."""
    y = norm(x)
    if relu and shortcut is not None:
        return ECAResidualReLUFunction.apply(y, shortcut, eca.conv.weight)
    out = ECAGateFunction.apply(y, shortcut, eca.conv.weight, True)
    return out.relu_() if relu else out


def inference_block_end(x: torch.Tensor, norm: nn.Module, eca: nn.Module, shortcut: Optional[torch.Tensor],
                        relu: bool) -> torch.Tensor:
    """No autograd: the gate is computed on the pooled ``[B, C, 1, 1]`` and applied over BatchNorm's output."""
    y = norm(x)
    gate = shifted_channel_conv(channel_means(y, keepdim=True), channel_taps(eca.conv.weight)).sigmoid_()
    out = gate_in_place(y, gate, shortcut)
    return out.relu_() if relu else out


class ECAGateFunction(torch.autograd.Function):
    """``x * sigmoid(conv(mean(x))) (+ shortcut)`` whose backward reads the map twice and writes it once.

    Autograd's backward of the plain ops writes four full-size tensors. Here
    ``sum(grad * x)`` is read without writing the product, and the gradient
    through the mean (a per-channel constant) joins the ``addcmul`` that
    applies the gate. With ``reuse_input`` the caller hands over ``x`` as a
    temporary nothing else reads (a block's BatchNorm output), and the input
    gradient is written over it once it is spent.
    First-order only: ``create_graph=True`` raises rather than giving wrong second derivatives.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: Optional[torch.Tensor], weight: torch.Tensor,
                reuse_input: bool) -> torch.Tensor:
        means, logits = gate_logits(x, weight)
        gate = torch.sigmoid(logits)[..., None, None]
        ctx.save_for_backward(x, means, gate, weight)
        ctx.has_shortcut = shortcut is not None
        ctx.reuse_input = reuse_input
        ctx.input_spent = False
        return x * gate if shortcut is None else torch.addcmul(shortcut, x, gate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if ctx.input_spent:
            raise RuntimeError(
                "ECA block end (cpu): this graph's backward already ran and wrote over its saved input; "
                "to run backward through it twice (retain_graph=True), fuse_eca(model, impl='reference')"
            )
        x, means, gate, weight = ctx.saved_tensors
        needs_x, needs_shortcut, needs_weight = ctx.needs_input_grad[:3]
        spent_x = x if ctx.reuse_input else None
        ctx.input_spent = ctx.reuse_input
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


class ECAResidualReLUFunction(torch.autograd.Function):
    """``relu(x * gate + shortcut)`` written over ``x``, saving only tensors the network keeps anyway.

    Saving ``x`` would keep one more feature map alive per block, and fresh
    memory costs the CPU page faults. Where the ReLU passed, ``x * gate`` is
    ``out - shortcut``; where it did not, the gradient is zero. So the gate's
    gradient needs only the output (which the next convolution saves) and the
    shortcut (which this block's first convolution saves).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        means, logits = gate_logits(x, weight)
        gate = torch.sigmoid(logits)[..., None, None]
        out = gate_in_place(x, gate, shortcut).relu_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(out, shortcut, means, gate, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, shortcut, means, gate, weight = ctx.saved_tensors
        grad_sum = torch.ops.aten.threshold_backward(grad_out, out, 0)
        if reads_pairs_in_one_pass(grad_sum, out) and reads_pairs_in_one_pass(grad_sum, shortcut):
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
    """``relu?(eca(batch_norm(x)) (+ shortcut))`` in training, from the block's last convolution output ``x``.

    BatchNorm's backward needs ``sum(grad)`` and ``sum(grad * x_hat)`` per
    channel, ECA's ``sum(grad * y)`` per (sample, channel): the per-pair sums
    give all three, so one backward serves both, reading the gradient and
    ``x`` once on NCHW and writing the input gradient as ``a * grad + b * x + c``
    with per-pair coefficients. In the forward, ECA's channel means of ``x``
    give BatchNorm its batch mean, and the output is written over BatchNorm's.
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
        out = gate_in_place(y, gate[..., None, None], shortcut)
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
