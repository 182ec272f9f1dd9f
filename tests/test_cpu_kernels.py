"""The CPU implementation's pieces against their definitions, and its backwards against numerical derivatives."""
import pytest
import torch
import torch.nn.functional as F

from models import eca_resnet18, fuse_eca
from models.fused.cpu import ECAGateFunction, ECANormGateFunction, ECAResidualReLUFunction
from models.fused.cpu_ops import (
    batch_statistics, channel_means, channel_taps, gate_logits, pair_reductions, shifted_channel_conv, spatial_dot,
)

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def make_input(shape, layout="nchw", dtype=torch.float64, seed=0, requires_grad=False) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("channels", [37, 3, 1])  # kernels wider than the channels see zero padding only
def test_shifted_channel_conv_equals_conv1d(k, dtype, channels):
    means = torch.randn(4, channels, dtype=dtype)
    weight = torch.randn(1, 1, k, dtype=dtype)
    expected = F.conv1d(means.unsqueeze(1), weight, padding=(k - 1) // 2).squeeze(1)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(shifted_channel_conv(means, channel_taps(weight)), expected, rtol=tolerance, atol=tolerance)
    pooled = shifted_channel_conv(means[..., None, None], channel_taps(weight))  # how inference calls it
    torch.testing.assert_close(pooled, expected[..., None, None], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gate_logits_match_pool_and_conv1d(layout):
    x = make_input((3, 40, 7, 6), layout, dtype=torch.float32, seed=11)
    weight = torch.randn(1, 1, 5)
    pooled = F.adaptive_avg_pool2d(x, 1)
    expected = F.conv1d(pooled.squeeze(-1).transpose(-1, -2), weight, padding=2).transpose(-1, -2).flatten(1)
    means, logits = gate_logits(x, weight)
    torch.testing.assert_close(means, pooled.flatten(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(channel_means(x, keepdim=True), pooled, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_dot_equals_product_sum(dtype, layout):
    a, b = (make_input((3, 40, 7, 6), layout, dtype=dtype, seed=seed) for seed in (31, 32))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(spatial_dot(a, b), (a * b).sum((2, 3)), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pair_reductions_match_their_definition(layout):
    grad, x = (make_input((3, 5, 6, 7), layout, seed=seed) for seed in (51, 52))
    mean, invstd = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    totals, dots = pair_reductions(grad, x, mean, invstd, scratch=torch.empty_like(x))
    torch.testing.assert_close(totals, grad.sum((2, 3)), rtol=1e-12, atol=1e-12)
    normalised = (x - mean[:, None, None]) * invstd[:, None, None]
    torch.testing.assert_close(dots, (grad * normalised).sum((2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    "scale,shift", [(1.0, 0.0), (1.0, 4.0), (0.01, 100.0), (0.0, 5.0)], ids=["centred", "offset", "ill-conditioned", "constant"]
)
def test_batch_statistics_match_float64(layout, scale, shift):
    """float32 statistics as close as BatchNorm's own, channels far off zero included (the Welford fallback)."""
    x = make_input((8, 16, 12, 12), layout, dtype=torch.float32, seed=50) * scale + shift
    pair_sums, mean, var = batch_statistics(x)
    exact = x.double()
    torch.testing.assert_close(pair_sums.double(), exact.sum((2, 3)), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(mean.double(), exact.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), exact.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_gate_function_backward_gradcheck(k, layout, residual):
    shape = (2, 7, 5, 4)
    x = make_input(shape, layout, seed=7, requires_grad=True)
    shortcut = make_input(shape, layout, seed=8, requires_grad=True) if residual else None
    weight = torch.randn(1, 1, k, dtype=torch.float64, requires_grad=True)
    gate = lambda x, s, w: ECAGateFunction.apply(x, s, w, False)  # noqa: E731
    assert torch.autograd.gradcheck(gate, (x, shortcut, weight), fast_mode=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gate_function_reusing_its_input_gives_the_same_gradients(layout):
    x, shortcut, grad_out = (make_input((2, 24, 7, 6), layout, dtype=torch.float32, seed=s) for s in (33, 34, 35))
    weight = torch.randn(1, 1, 5, requires_grad=True)
    grads = []
    for reuse_input in (False, True):
        leaf = x.clone().requires_grad_(True)
        weight.grad = None
        ECAGateFunction.apply(leaf * 1, shortcut, weight, reuse_input).backward(grad_out)
        grads.append((leaf.grad, weight.grad))
    for plain, reused in zip(*grads, strict=True):
        torch.testing.assert_close(reused, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_residual_relu_function_backward_gradcheck(k, layout):
    x = make_input((2, 6, 4, 3), layout, seed=9, requires_grad=True)
    shortcut = make_input((2, 6, 4, 3), layout, seed=10, requires_grad=True)
    weight = torch.randn(1, 1, k, dtype=torch.float64, requires_grad=True)
    # The Function writes over its input: hand it a fresh temporary on every call, as a block does.
    residual_relu = lambda x, s, w: ECAResidualReLUFunction.apply(x * 1, s, w)  # noqa: E731
    assert torch.autograd.gradcheck(residual_relu, (x, shortcut, weight), fast_mode=True)


@pytest.mark.parametrize("end", ["add_relu", "add", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_norm_gate_function_backward_gradcheck(k, layout, end):
    x = make_input((3, 6, 4, 3), layout, seed=11, requires_grad=True)
    shortcut = make_input((3, 6, 4, 3), layout, seed=12, requires_grad=True) if end != "plain" else None
    weight = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = (torch.rand(6, dtype=torch.float64) - 0.5).requires_grad_(True)
    eca_weight = torch.randn(1, 1, k, dtype=torch.float64, requires_grad=True)

    def block_end(x, shortcut, weight, bias, eca_weight):
        running_mean, running_var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
        return ECANormGateFunction.apply(x, shortcut, weight, bias, eca_weight, running_mean, running_var, 0.1, 1e-5,
                                         end == "add_relu")

    assert torch.autograd.gradcheck(block_end, (x, shortcut, weight, bias, eca_weight), fast_mode=True)


def test_second_backward_through_a_spent_input_is_refused_in_words():
    leaf = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = ECAGateFunction.apply(leaf * 1, None, torch.randn(1, 1, 3), True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True.*impl='reference'"):
        out.sum().backward()


def test_folded_block_refuses_one_value_per_channel_as_batch_norm_does():
    block = fuse_eca(eca_resnet18(num_classes=10), "cpu").layer4[0].train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 256, 2, 2))
