"""Triton kernels of the fused ECA block end, ``act(eca(batch_norm(x)) + shortcut)``, and of its backward.

A feature map ``[B, C, H, W]`` is addressed as ``[B, C, H * W]`` through three
strides (sample, channel, flattened position), which covers NCHW and
channels_last alike; every tensor passes its own. A program owns one sample and
a block of channels and walks the whole map, so whatever it needs per (sample,
channel) pair it computes once. Per-pair buffers ``[B, C]`` and per-channel
ones ``[C]`` are contiguous float32, and every sum is taken in float32.

Forward: :func:`pair_moments_kernel` (one read of ``x``), :func:`channel_statistics_kernel`
(on ``[B, C]``), :func:`gate_apply_kernel` (one read of ``x`` and the shortcut, one write).
Backward: :func:`grad_moments_kernel` (one read), :func:`grad_channel_kernel`
(on ``[B, C]``), :func:`grad_input_kernel` (one read, one write).
"""
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _pair_block(C, BLOCK_C: tl.constexpr):
    """This program's sample, its block of channels and their mask."""
    channel_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    channels = (pid % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid // channel_blocks, channels, channels < C


@triton.jit
def _map_offsets(sample, channels, positions, stride_b, stride_c, stride_hw):
    """Element offsets of a ``[BLOCK_C, BLOCK_HW]`` tile, in 64 bits: a feature map may exceed 2**31 elements."""
    return (
        sample.to(tl.int64) * stride_b
        + channels[:, None].to(tl.int64) * stride_c
        + positions[None, :].to(tl.int64) * stride_hw
    )


@triton.jit
def _statistics(channels, mask, mean_ptr, var_ptr, eps):
    """A block of channels' BatchNorm mean and ``1 / sqrt(var + eps)``."""
    mean = tl.load(mean_ptr + channels, mask=mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + channels, mask=mask, other=1.0).to(tl.float32)
    return mean, tl.rsqrt(var + eps)


@triton.jit
def _affine(channels, mask, var_ptr, weight_ptr, bias_ptr, eps):
    """BatchNorm per channel as ``y = scale * (x - mean) + bias``: returns invstd, scale, bias (0 where masked)."""
    invstd = tl.rsqrt(tl.load(var_ptr + channels, mask=mask, other=1.0).to(tl.float32) + eps)
    scale = tl.load(weight_ptr + channels, mask=mask, other=0.0).to(tl.float32) * invstd
    return invstd, scale, tl.load(bias_ptr + channels, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _batch_tile(start, B, channels, channel_mask, C, BLOCK_B: tl.constexpr):
    """Offsets into a ``[B, C]`` buffer of the ``[BLOCK_B, BLOCK_C]`` tile of pairs from sample ``start``, and its mask."""
    samples = start + tl.arange(0, BLOCK_B)
    return samples[:, None] * C + channels[None, :], (samples < B)[:, None] & channel_mask[None, :]


@triton.jit
def pair_moments_kernel(
    x_ptr, pair_mean_ptr, pair_m2_ptr, C, HW, stride_b, stride_c, stride_hw,
    WITH_M2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (sample, channel): the mean over the map of ``x - pivot`` and, ``WITH_M2``, its sum of squared deviations.

    The pivot is the channel's first value (sample 0, position 0), a value of
    the channel's own distribution: means of ``x - pivot`` are of the order of
    its spread, so the means' deviations from the batch mean, which ECA needs,
    keep float32's digits even where the mean is far from zero. Each tile's own
    mean and deviations are merged into the running ones (Chan et al.'s
    pairwise update): no sum of squares of raw values is ever formed.
    """
    sample, channels, channel_mask = _pair_block(C, BLOCK_C)
    pivot = tl.load(x_ptr + channels.to(tl.int64) * stride_c, mask=channel_mask, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    seen = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        positions = start + tl.arange(0, BLOCK_HW)
        in_map = positions < HW
        mask = channel_mask[:, None] & in_map[None, :]
        offsets = _map_offsets(sample, channels, positions, stride_b, stride_c, stride_hw)
        values = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        values = tl.where(mask, values - pivot[:, None], 0.0)
        count = tl.sum(in_map.to(tl.float32), axis=0)
        tile_mean = tl.sum(values, axis=1) / count
        total = seen + count
        delta = tile_mean - mean
        mean += delta * (count / total)
        if WITH_M2:
            deviations = tl.where(mask, values - tile_mean[:, None], 0.0)
            m2 += tl.sum(deviations * deviations, axis=1) + delta * delta * (seen * count / total)
        seen = total
    pairs = sample * C + channels
    tl.store(pair_mean_ptr + pairs, mean, mask=channel_mask)
    if WITH_M2:
        tl.store(pair_m2_ptr + pairs, m2, mask=channel_mask)


@triton.jit
def channel_statistics_kernel(
    x_ptr, pair_ptr, pair_m2_ptr, running_mean_ptr, running_var_ptr, mean_ptr, var_ptr, B, C, HW, stride_c,
    BATCH_STATS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BatchNorm's mean and variance (written to ``mean_ptr`` / ``var_ptr``), and each pair mean's deviation from the mean.

    ``pair_ptr`` holds the pair means of ``x - pivot`` (:func:`pair_moments_kernel`)
    and is overwritten with ``mean(x) - mean`` per pair. With ``BATCH_STATS``
    the batch mean and biased variance are merged from the pair moments;
    otherwise they are the running statistics.
    """
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    pivot = tl.load(x_ptr + channels.to(tl.int64) * stride_c, mask=channel_mask, other=0.0).to(tl.float32)
    if BATCH_STATS:
        total = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, B, BLOCK_B):
            pairs, mask = _batch_tile(start, B, channels, channel_mask, C, BLOCK_B)
            total += tl.sum(tl.load(pair_ptr + pairs, mask=mask, other=0.0), axis=0)
        shifted_mean = total / B
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, B, BLOCK_B):
            pairs, mask = _batch_tile(start, B, channels, channel_mask, C, BLOCK_B)
            deviations = tl.where(mask, tl.load(pair_ptr + pairs, mask=mask, other=0.0) - shifted_mean[None, :], 0.0)
            m2 += tl.sum(tl.load(pair_m2_ptr + pairs, mask=mask, other=0.0) + HW * deviations * deviations, axis=0)
            tl.store(pair_ptr + pairs, deviations, mask=mask)
        mean = pivot + shifted_mean
        var = m2 / (B * HW)
    else:
        mean = tl.load(running_mean_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
        var = tl.load(running_var_ptr + channels, mask=channel_mask, other=1.0).to(tl.float32)
        offset = pivot - mean
        for start in range(0, B, BLOCK_B):
            pairs, mask = _batch_tile(start, B, channels, channel_mask, C, BLOCK_B)
            shifted = tl.load(pair_ptr + pairs, mask=mask, other=0.0)
            tl.store(pair_ptr + pairs, shifted + offset[None, :], mask=mask)
    tl.store(mean_ptr + channels, mean, mask=channel_mask)
    tl.store(var_ptr + channels, var, mask=channel_mask)


@triton.jit
def gate_apply_kernel(
    x_ptr, shortcut_ptr, out_ptr, pair_deviation_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, taps_ptr, gate_ptr,
    C, HW, eps,
    x_stride_b, x_stride_c, x_stride_hw, s_stride_b, s_stride_c, s_stride_hw, o_stride_b, o_stride_c, o_stride_hw,
    K: tl.constexpr, HAS_SHORTCUT: tl.constexpr, RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """ECA's gate from the channel means of ``y = norm(x)``, then ``act(y * gate (+ shortcut))`` over the map.

    The mean of ``y`` over a map is ``scale * (mean(x) - mean) + bias``, so the
    gate needs no pass over ``y``: the k-tap correlation reads the neighbours'
    pair deviations (zero beyond either end), and ``y * gate`` is one
    multiply-add on ``x - mean``.
    """
    sample, channels, channel_mask = _pair_block(C, BLOCK_C)
    logits = tl.zeros([BLOCK_C], tl.float32)
    for tap in tl.static_range(K):
        neighbours = channels + (tap - (K - 1) // 2)
        valid = (neighbours >= 0) & (neighbours < C)
        _, scale, bias = _affine(neighbours, valid, var_ptr, weight_ptr, bias_ptr, eps)
        deviation = tl.load(pair_deviation_ptr + sample * C + neighbours, mask=valid, other=0.0)
        logits += tl.load(taps_ptr + tap).to(tl.float32) * (scale * deviation + bias)
    gate = tl.sigmoid(logits)
    tl.store(gate_ptr + sample * C + channels, gate, mask=channel_mask)
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)
    _, scale, bias = _affine(channels, channel_mask, var_ptr, weight_ptr, bias_ptr, eps)
    gain = scale * gate
    offset = bias * gate
    for start in range(0, HW, BLOCK_HW):
        positions = start + tl.arange(0, BLOCK_HW)
        mask = channel_mask[:, None] & (positions < HW)[None, :]
        x_offsets = _map_offsets(sample, channels, positions, x_stride_b, x_stride_c, x_stride_hw)
        values = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        result = (values - mean[:, None]) * gain[:, None] + offset[:, None]
        if HAS_SHORTCUT:
            s_offsets = _map_offsets(sample, channels, positions, s_stride_b, s_stride_c, s_stride_hw)
            result += tl.load(shortcut_ptr + s_offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            result = tl.maximum(result, 0.0)
        o_offsets = _map_offsets(sample, channels, positions, o_stride_b, o_stride_c, o_stride_hw)
        tl.store(out_ptr + o_offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(grad_ptr, out_ptr, sample, channels, positions, mask, g_stride_b, g_stride_c, g_stride_hw,
                 o_stride_b, o_stride_c, o_stride_hw, RELU: tl.constexpr):
    """The incoming gradient of a tile in float32, through the ReLU (zero where the output is not positive)."""
    g_offsets = _map_offsets(sample, channels, positions, g_stride_b, g_stride_c, g_stride_hw)
    grad = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        o_offsets = _map_offsets(sample, channels, positions, o_stride_b, o_stride_c, o_stride_hw)
        grad = tl.where(tl.load(out_ptr + o_offsets, mask=mask, other=0.0) > 0, grad, 0.0)
    return grad


@triton.jit
def grad_moments_kernel(
    grad_ptr, out_ptr, x_ptr, g_ptr, mean_ptr, var_ptr, sum_g_ptr, sum_gxh_ptr, C, HW, eps,
    g_stride_b, g_stride_c, g_stride_hw, o_stride_b, o_stride_c, o_stride_hw,
    x_stride_b, x_stride_c, x_stride_hw, w_stride_b, w_stride_c, w_stride_hw,
    RELU: tl.constexpr, WRITE_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (sample, channel): ``sum(g)`` and ``sum(g * x_hat)``, ``g`` the gradient through the ReLU.

    These are all the backward reads of the map: BatchNorm's weight and bias
    gradients and ECA's gate gradient are combinations of them. With
    ``WRITE_G``, ``g`` is also written (the shortcut's gradient, strides ``w_*``).
    """
    sample, channels, channel_mask = _pair_block(C, BLOCK_C)
    mean, invstd = _statistics(channels, channel_mask, mean_ptr, var_ptr, eps)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gxh = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        positions = start + tl.arange(0, BLOCK_HW)
        mask = channel_mask[:, None] & (positions < HW)[None, :]
        grad = _masked_grad(grad_ptr, out_ptr, sample, channels, positions, mask, g_stride_b, g_stride_c, g_stride_hw,
                            o_stride_b, o_stride_c, o_stride_hw, RELU)
        if WRITE_G:
            w_offsets = _map_offsets(sample, channels, positions, w_stride_b, w_stride_c, w_stride_hw)
            tl.store(g_ptr + w_offsets, grad.to(g_ptr.dtype.element_ty), mask=mask)
        x_offsets = _map_offsets(sample, channels, positions, x_stride_b, x_stride_c, x_stride_hw)
        x_hat = (tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * invstd[:, None]
        sum_g += tl.sum(grad, axis=1)
        sum_gxh += tl.sum(grad * x_hat, axis=1)
    pairs = sample * C + channels
    tl.store(sum_g_ptr + pairs, sum_g, mask=channel_mask)
    tl.store(sum_gxh_ptr + pairs, sum_gxh, mask=channel_mask)


@triton.jit
def _logit_grad(sum_g_ptr, sum_gxh_ptr, gate_ptr, weight_ptr, bias_ptr, samples, channels, mask, C):
    """The gradient of ECA's logits on a ``[BLOCK_B, BLOCK_C]`` tile of pairs (0 where masked).

    The gate's gradient is ``sum(g * y) = weight * sum(g * x_hat) + bias * sum(g)``.
    """
    pairs = samples[:, None] * C + channels[None, :]
    weight = tl.load(weight_ptr + channels, mask=channels < C, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channels, mask=channels < C, other=0.0).to(tl.float32)
    sum_g = tl.load(sum_g_ptr + pairs, mask=mask, other=0.0)
    sum_gxh = tl.load(sum_gxh_ptr + pairs, mask=mask, other=0.0)
    gate = tl.load(gate_ptr + pairs, mask=mask, other=0.0)
    return (weight[None, :] * sum_gxh + bias[None, :] * sum_g) * gate * (1.0 - gate)


@triton.jit
def grad_channel_kernel(
    sum_g_ptr, sum_gxh_ptr, gate_ptr, pair_deviation_ptr, var_ptr, weight_ptr, bias_ptr, taps_ptr,
    grad_mean_ptr, grad_weight_ptr, grad_bias_ptr, grad_taps_ptr, B, C, eps,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """On ``[B, C]``: the gradient of ECA's channel means, BatchNorm's weight and bias gradients, the taps' partial sums.

    The gradient of the mean of channel ``c`` gathers the logit gradients of the
    channels whose window holds it, ``c - (tap - (K - 1) // 2)``, each through
    its tap. The gradient reaching ``y`` is ``g * gate + grad_mean / HW``; its
    per-channel sums with 1 and with ``x_hat`` are BatchNorm's bias and weight
    gradients. This program's share of the taps' gradient goes to row
    ``program_id`` of ``grad_taps_ptr`` (``[programs, BLOCK_K]``), summed by the caller.
    """
    pid = tl.program_id(0)
    channels = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    invstd, _, _ = _affine(channels, channel_mask, var_ptr, weight_ptr, bias_ptr, eps)
    tap_index = tl.arange(0, BLOCK_K)
    grad_bias = tl.zeros([BLOCK_C], tl.float32)
    grad_weight = tl.zeros([BLOCK_C], tl.float32)
    grad_taps = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, B, BLOCK_B):
        samples = start + tl.arange(0, BLOCK_B)
        sample_mask = samples < B
        mask = sample_mask[:, None] & channel_mask[None, :]
        own_logit_grad = _logit_grad(sum_g_ptr, sum_gxh_ptr, gate_ptr, weight_ptr, bias_ptr, samples, channels, mask, C)
        grad_mean = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        for tap in tl.static_range(K):
            tap_weight = tl.load(taps_ptr + tap).to(tl.float32)
            shift = tap - (K - 1) // 2
            sources = channels - shift
            source_mask = sample_mask[:, None] & ((sources >= 0) & (sources < C))[None, :]
            grad_mean += tap_weight * _logit_grad(
                sum_g_ptr, sum_gxh_ptr, gate_ptr, weight_ptr, bias_ptr, samples, sources, source_mask, C
            )
            # This tap multiplies the mean of channel c + shift into the logit of channel c.
            neighbours = channels + shift
            valid = (neighbours >= 0) & (neighbours < C)
            neighbour_mask = sample_mask[:, None] & valid[None, :]
            _, scale, bias = _affine(neighbours, valid, var_ptr, weight_ptr, bias_ptr, eps)
            deviation = tl.load(pair_deviation_ptr + samples[:, None] * C + neighbours[None, :], mask=neighbour_mask,
                                other=0.0)
            eca_mean = tl.where(neighbour_mask, scale[None, :] * deviation + bias[None, :], 0.0)
            share = tl.sum(tl.sum(own_logit_grad * eca_mean, axis=1), axis=0)
            grad_taps += tl.where(tap_index == tap, share, 0.0)
        pairs = samples[:, None] * C + channels[None, :]
        tl.store(grad_mean_ptr + pairs, grad_mean, mask=mask)
        gate = tl.load(gate_ptr + pairs, mask=mask, other=0.0)
        mean_x_hat = tl.load(pair_deviation_ptr + pairs, mask=mask, other=0.0) * invstd[None, :]
        grad_mean = tl.where(mask, grad_mean, 0.0)
        grad_bias += tl.sum(gate * tl.load(sum_g_ptr + pairs, mask=mask, other=0.0) + grad_mean, axis=0)
        grad_weight += tl.sum(gate * tl.load(sum_gxh_ptr + pairs, mask=mask, other=0.0) + grad_mean * mean_x_hat, axis=0)
    tl.store(grad_weight_ptr + channels, grad_weight, mask=channel_mask)
    tl.store(grad_bias_ptr + channels, grad_bias, mask=channel_mask)
    tl.store(grad_taps_ptr + pid * BLOCK_K + tap_index, grad_taps)


@triton.jit
def grad_input_kernel(
    grad_ptr, out_ptr, x_ptr, dx_ptr, gate_ptr, grad_mean_ptr, mean_ptr, var_ptr, weight_ptr,
    grad_weight_ptr, grad_bias_ptr, B, C, HW, eps,
    g_stride_b, g_stride_c, g_stride_hw, o_stride_b, o_stride_c, o_stride_hw,
    x_stride_b, x_stride_c, x_stride_hw, d_stride_b, d_stride_c, d_stride_hw,
    RELU: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """``dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with ``dy = g * gate + grad_mean / HW``.

    Means over the batch and the map, from the weight and bias gradients; with
    running statistics (not ``BATCH_STATS``) they are constants and ``dx = scale * dy``.
    Per pair that is ``gain * g + x_hat_coefficient * x_hat + constant``: one read of ``g``
    (and ``x``), one write.
    """
    sample, channels, channel_mask = _pair_block(C, BLOCK_C)
    mean, invstd = _statistics(channels, channel_mask, mean_ptr, var_ptr, eps)
    scale = tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) * invstd
    pairs = sample * C + channels
    gain = scale * tl.load(gate_ptr + pairs, mask=channel_mask, other=0.0)
    constant = scale * tl.load(grad_mean_ptr + pairs, mask=channel_mask, other=0.0) / HW
    if BATCH_STATS:
        count = B * HW
        constant -= scale * tl.load(grad_bias_ptr + channels, mask=channel_mask, other=0.0) / count
        x_hat_coefficient = -scale * tl.load(grad_weight_ptr + channels, mask=channel_mask, other=0.0) / count
    for start in range(0, HW, BLOCK_HW):
        positions = start + tl.arange(0, BLOCK_HW)
        mask = channel_mask[:, None] & (positions < HW)[None, :]
        grad = _masked_grad(grad_ptr, out_ptr, sample, channels, positions, mask, g_stride_b, g_stride_c, g_stride_hw,
                            o_stride_b, o_stride_c, o_stride_hw, RELU)
        dx = gain[:, None] * grad + constant[:, None]
        if BATCH_STATS:
            x_offsets = _map_offsets(sample, channels, positions, x_stride_b, x_stride_c, x_stride_hw)
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
            dx += x_hat_coefficient[:, None] * ((x - mean[:, None]) * invstd[:, None])
        d_offsets = _map_offsets(sample, channels, positions, d_stride_b, d_stride_c, d_stride_hw)
        tl.store(dx_ptr + d_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def running_stats_kernel(
    running_mean_ptr, running_var_ptr, batches_ptr, mean_ptr, var_ptr, C, momentum, unbias,
    CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``nn.BatchNorm2d``'s running statistics after a batch: blend in its mean and unbiased variance.

    The factor is ``momentum``, or with ``CUMULATIVE`` (``momentum=None``) one
    over the batch count, which the caller has already incremented.
    """
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = channels < C
    factor = momentum
    if CUMULATIVE:
        factor = 1.0 / tl.load(batches_ptr).to(tl.float32)
    running_mean = tl.load(running_mean_ptr + channels, mask=mask, other=0.0).to(tl.float32)
    running_var = tl.load(running_var_ptr + channels, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + channels, mask=mask, other=0.0)
    var = tl.load(var_ptr + channels, mask=mask, other=0.0) * unbias
    tl.store(running_mean_ptr + channels, factor * mean + (1.0 - factor) * running_mean, mask=mask)
    tl.store(running_var_ptr + channels, factor * var + (1.0 - factor) * running_var, mask=mask)


# Whether triton.jit made interpreted functions (TRITON_INTERPRET=1 when triton was first imported).
INTERPRETED = isinstance(pair_moments_kernel, InterpretedFunction)
