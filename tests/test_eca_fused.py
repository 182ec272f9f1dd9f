"""The fused ECA layer against the plain formulation and the original release's models.

float64 forward results must be bit-identical to the original (released
checkpoints must give the original's numbers); gradients may differ by rounding
only, and the hand-written backward must agree with numerical differentiation.
"""
import copy
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import ARCHITECTURES
from models.eca_module import (
    ECAGateFunction,
    ECANormGateFunction,
    ECAResidualReLUFunction,
    batch_statistics,
    channel_taps,
    eca_layer,
    gate_logits,
    pair_reductions,
    shifted_channel_conv,
    spatial_dot,
)
from original_models import OriginalECALayer, original_model

KERNEL_SIZES = (1, 3, 5, 7, 9)
SPATIAL_SIZES = ((7, 7), (8, 6))  # odd and even
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
RESNET_KERNELS = (3, 5, 5, 7)


def make_input(shape, memory_format, dtype=torch.float64, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).contiguous(memory_format=memory_format)


def paired_layers(channels: int, k: int, dtype=torch.float64, seed: Optional[int] = None):
    """The project's layer and the original's with the same random kernel (drawn from ``seed`` when given)."""
    fused = eca_layer(channels, k).to(dtype)
    with torch.no_grad():
        if seed is None:
            fused.conv.weight.normal_(0, 1)
        else:
            fused.conv.weight.copy_(torch.randn(1, 1, k, generator=torch.Generator().manual_seed(seed)))
    plain = OriginalECALayer(channels, k).to(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def block_inputs(format_name: str, spatial, seed: int):
    """A float64 block output, shortcut and incoming gradient, ``[3, 24, *spatial]``, from seeds seed..seed+2."""
    shape = (3, 24, *spatial)
    return tuple(make_input(shape, MEMORY_FORMATS[format_name], seed=seed + i) for i in range(3))


def run_layer(layer, x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(layer, eca_layer):
        return layer(x) if shortcut is None else layer.forward_add(x, shortcut)
    out = layer(x)
    return out if shortcut is None else out + shortcut


def forward_backward(layer, x, shortcut, grad_out):
    x = x.detach().requires_grad_(True)
    shortcut = None if shortcut is None else shortcut.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = run_layer(layer, x, shortcut)
    out.backward(grad_out)
    return out.detach(), x.grad, None if shortcut is None else shortcut.grad, layer.conv.weight.grad


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("spatial", SPATIAL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_fused_layer_matches_plain_formulation(k, format_name, spatial, residual):
    memory_format = MEMORY_FORMATS[format_name]
    x, shortcut, grad_out = block_inputs(format_name, spatial, seed=1)
    shortcut = shortcut if residual else None
    fused, plain = paired_layers(24, k)

    out, grad_x, grad_shortcut, grad_weight = forward_backward(fused, x, shortcut, grad_out)
    ref_out, ref_grad_x, ref_grad_shortcut, ref_grad_weight = forward_backward(plain, x, shortcut, grad_out)

    assert torch.equal(out, ref_out)
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_weight, ref_grad_weight, rtol=1e-12, atol=1e-12)
    if residual:
        torch.testing.assert_close(grad_shortcut, ref_grad_shortcut, rtol=0, atol=0)
    with torch.no_grad():  # the inference path uses plain ops, not the autograd.Function
        assert torch.equal(run_layer(fused, x, shortcut), ref_out)


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_fused_layer_float32_close_to_plain(k, format_name):
    memory_format = MEMORY_FORMATS[format_name]
    shape = (2, 64, 9, 10)
    x = make_input(shape, memory_format, dtype=torch.float32, seed=4)
    shortcut = make_input(shape, memory_format, dtype=torch.float32, seed=5)
    grad_out = make_input(shape, memory_format, dtype=torch.float32, seed=6)
    fused, plain = paired_layers(64, k, dtype=torch.float32)
    results = forward_backward(fused, x, shortcut, grad_out)
    references = forward_backward(plain, x, shortcut, grad_out)
    for result, reference in zip(results, references):
        torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: the gate from the pooled [B, C, 1, 1], in place
        torch.testing.assert_close(fused.forward_add(x, shortcut), references[0], rtol=1e-5, atol=1e-5)
        block_end = fused.forward_add_relu(x.clone(), shortcut)
    torch.testing.assert_close(block_end, references[0].relu(), rtol=1e-5, atol=1e-5)
    assert block_end.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", KERNEL_SIZES)
@pytest.mark.parametrize("channels", [37, 3, 1])  # kernels wider than the channels see zero padding only
def test_shifted_channel_conv_equals_conv1d(k, dtype, channels):
    means = torch.randn(4, channels, dtype=dtype)
    weight = torch.randn(1, 1, k, dtype=dtype)
    expected = F.conv1d(means.unsqueeze(1), weight, padding=(k - 1) // 2).squeeze(1)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    result = shifted_channel_conv(means, channel_taps(weight))
    torch.testing.assert_close(result, expected, rtol=tolerance, atol=tolerance)
    pooled_shape = shifted_channel_conv(means[..., None, None], channel_taps(weight))  # how inference calls it
    torch.testing.assert_close(pooled_shape, expected[..., None, None], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
def test_gate_logits_match_pool_and_conv1d(format_name, dtype):
    x = make_input((3, 40, 7, 6), MEMORY_FORMATS[format_name], dtype=dtype, seed=11)
    weight = torch.randn(1, 1, 5, dtype=dtype)
    pooled = F.adaptive_avg_pool2d(x, 1)
    expected = F.conv1d(pooled.squeeze(-1).transpose(-1, -2), weight, padding=2).transpose(-1, -2).flatten(1)
    means, logits = gate_logits(x, weight)
    if dtype == torch.float64:  # the original's own operations, to the last bit
        assert torch.equal(means, pooled.flatten(1))
        assert torch.equal(logits, expected)
    else:
        torch.testing.assert_close(means, pooled.flatten(1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("k", (1, 3, 5))
def test_custom_backward_gradcheck(k, format_name, residual):
    memory_format = MEMORY_FORMATS[format_name]
    shape = (2, 7, 5, 4)
    x = make_input(shape, memory_format, seed=7).requires_grad_(True)
    shortcut = make_input(shape, memory_format, seed=8).requires_grad_(True) if residual else None
    weight = torch.randn(1, 1, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ECAGateFunction.apply, (x, shortcut, weight))


def test_layer_state_dict_and_api_unchanged():
    layer = eca_layer(256, 5)
    assert list(layer.state_dict()) == ["conv.weight"]
    assert [name for name, _ in layer.named_parameters()] == ["conv.weight"]
    assert layer.conv.weight.shape == (1, 1, 5)
    assert isinstance(layer.avg_pool, nn.AdaptiveAvgPool2d) and isinstance(layer.sigmoid, nn.Sigmoid)
    assert (layer.channels, layer.k_size) == (256, 5)
    x = torch.randn(2, 256, 4, 4)
    assert layer.gate(x).shape == (2, 256, 1, 1)


def randomise_floating_state(model: nn.Module, seed: int = 0) -> None:
    """Every floating tensor of the state_dict random, at scales that keep activations finite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                values = torch.rand(tensor.shape, generator=generator) + 0.5
            elif tensor.dim() == 1:  # BN affine and running mean, biases
                values = torch.rand(tensor.shape, generator=generator) * 0.5 + (0.5 if "weight" in name else -0.25)
            else:
                fan_in = max(1, tensor[0].numel())
                values = torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)
            tensor.copy_(values)


ARCH_CASES = [(arch, RESNET_KERNELS) for arch in ARCHITECTURES if arch.startswith("eca_resnet")]
ARCH_CASES.append(("eca_mobilenet_v2", None))


def paired_models(arch: str, kernels):
    project = ARCHITECTURES[arch]() if kernels is None else ARCHITECTURES[arch](k_size=kernels)
    original = original_model(arch) if kernels is None else original_model(arch, kernels)
    randomise_floating_state(project)
    original.load_state_dict(project.state_dict())
    return project.double().eval(), original.double().eval()


@pytest.mark.parametrize("arch,kernels", ARCH_CASES, ids=[arch for arch, _ in ARCH_CASES])
def test_float64_logits_bit_identical_to_original(arch, kernels):
    project, original = paired_models(arch, kernels)
    x = make_input((2, 3, 64, 64), torch.contiguous_format, seed=9)
    with torch.no_grad():
        expected = original(x)
        assert torch.isfinite(expected).all() and expected.abs().max() > 0
        assert torch.equal(project(x), expected)
    # With gradients on, the autograd.Function path runs; it must round the same way.
    assert torch.equal(project(x), expected)


@pytest.mark.parametrize("arch,kernels", [("eca_resnet18", RESNET_KERNELS), ("eca_resnet50", RESNET_KERNELS)])
def test_training_forward_and_gradients_match_original(arch, kernels):
    project, original = paired_models(arch, kernels)
    project.train()
    original.train()
    x = make_input((2, 3, 64, 64), torch.channels_last, seed=10)
    out = project(x)
    expected = original(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    original_params = dict(original.named_parameters())
    for name, param in project.named_parameters():
        reference = original_params[name].grad
        # Every ECA kernel must receive a gradient: DDP with find_unused_parameters=False relies on it.
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, reference, rtol=1e-9, atol=1e-12 * reference.abs().max().item())


def test_torch_export_sees_plain_ops():
    block = ARCHITECTURES["eca_resnet18"](num_classes=10).layer1[0].train()
    x = torch.randn(2, 64, 8, 8)
    exported = torch.export.export(block, (x,))
    code = exported.graph_module.code
    assert "addcmul" in code and "conv1d" not in code
    torch.testing.assert_close(exported.module()(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a cold inductor compile takes about a minute on a 2-core CPU
def test_compiled_model_matches_eager():
    model = ARCHITECTURES["eca_resnet18"](num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_of_a_block():
    pytest.importorskip("onnxscript")
    block = ARCHITECTURES["eca_resnet50"](num_classes=10).layer1[0].eval()
    program = torch.onnx.export(block, (torch.randn(1, 64, 8, 8),), dynamo=True, verbose=False)
    op_types = {node.op_type for node in program.model_proto.graph.node}
    assert {"ReduceMean", "Sigmoid"} <= op_types


def test_ddp_sees_every_eca_kernel_gradient(tmp_path):
    distributed = torch.distributed
    if not distributed.is_available() or distributed.is_initialized():
        pytest.skip("needs a fresh single-process gloo group")
    store = distributed.FileStore(str(tmp_path / "store"), 1)
    distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = ARCHITECTURES["eca_resnet18"](num_classes=10)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        ddp(torch.randn(2, 3, 32, 32)).sum().backward()
        kernels = [module.conv.weight for module in model.modules() if isinstance(module, eca_layer)]
        assert kernels and all(kernel.grad is not None for kernel in kernels)
    finally:
        distributed.destroy_process_group()


# ---------------------------------------------------------------- the end of a residual block


def residual_relu_backward(layer, x, shortcut, grad_out):
    """relu(layer(x) + shortcut) forward and backward; ``x`` enters as a non-leaf temporary, as in a block."""
    x_leaf = x.detach().clone().requires_grad_(True)
    shortcut = shortcut.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    temporary = x_leaf * 1
    if isinstance(layer, eca_layer):
        out = layer.forward_add_relu(temporary, shortcut)
    else:
        out = torch.relu(layer(temporary) + shortcut)
    out.backward(grad_out)
    return out.detach(), x_leaf.grad, shortcut.grad, layer.conv.weight.grad


@pytest.mark.parametrize("spatial", SPATIAL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_residual_relu_matches_plain_formulation(k, format_name, spatial):
    memory_format = MEMORY_FORMATS[format_name]
    x, shortcut, grad_out = block_inputs(format_name, spatial, seed=21)
    fused, plain = paired_layers(24, k)

    out, grad_x, grad_shortcut, grad_weight = residual_relu_backward(fused, x, shortcut, grad_out)
    ref_out, ref_grad_x, ref_grad_shortcut, ref_grad_weight = residual_relu_backward(plain, x, shortcut, grad_out)

    assert torch.equal(out, ref_out)
    assert out.is_contiguous(memory_format=memory_format)
    assert (out == 0).any() and (out > 0).any()  # both sides of the ReLU are exercised
    assert torch.equal(grad_shortcut, ref_grad_shortcut)
    # x * gate is recovered as out - shortcut: equal up to the rounding of out.
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_weight, ref_grad_weight, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(fused.forward_add_relu(x.clone(), shortcut), ref_out)


def gradcheck_inputs(format_name: str, seed: int):
    """A small float64 block output and shortcut, both requiring gradients, in the given layout."""
    shape = (2, 7, 5, 4)
    memory_format = MEMORY_FORMATS[format_name]
    return tuple(make_input(shape, memory_format, seed=seed + i).requires_grad_(True) for i in range(2))


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("k", (1, 3, 5))
def test_residual_relu_backward_gradcheck(k, format_name):
    x, shortcut = gradcheck_inputs(format_name, seed=24)
    weight = torch.randn(1, 1, k, dtype=torch.float64, requires_grad=True)

    def residual_relu(x, shortcut, weight):
        # The function writes over its first input, which must not be gradcheck's leaf.
        return ECAResidualReLUFunction.apply(x.clone(), shortcut, weight)

    assert torch.autograd.gradcheck(residual_relu, (x, shortcut, weight))


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
def test_residual_relu_writes_over_its_input(format_name):
    layer = eca_layer(16, 3)
    x = make_input((2, 16, 6, 6), MEMORY_FORMATS[format_name], dtype=torch.float32, seed=26)
    shortcut = make_input((2, 16, 6, 6), MEMORY_FORMATS[format_name], dtype=torch.float32, seed=27)
    expected = torch.relu(layer(x) + shortcut)
    for grad_enabled in (False, True):
        temporary = x.clone().requires_grad_(grad_enabled) * 1 if grad_enabled else x.clone()
        with torch.set_grad_enabled(grad_enabled):
            out = layer.forward_add_relu(temporary, shortcut)
        assert out.data_ptr() == temporary.data_ptr()
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_residual_relu_in_half_precision_keeps_the_input():
    """bfloat16 cannot recover x * gate as out - shortcut; that path saves x instead."""
    fused, plain = paired_layers(32, 3, dtype=torch.float32)
    shape = (2, 32, 6, 6)
    x = make_input(shape, torch.contiguous_format, dtype=torch.float32, seed=28)
    # Away from the ReLU's kink, where bfloat16 rounding would flip single elements.
    shortcut = make_input(shape, torch.contiguous_format, dtype=torch.float32, seed=29).abs() + 4
    grad_out = make_input(shape, torch.contiguous_format, dtype=torch.float32, seed=30)
    reference = residual_relu_backward(plain, x, shortcut, grad_out)
    fused = fused.to(torch.bfloat16)
    results = residual_relu_backward(fused, x.bfloat16(), shortcut.bfloat16(), grad_out.bfloat16())
    for result, expected in zip(results, reference, strict=True):
        torch.testing.assert_close(result.float(), expected, rtol=0.05, atol=0.05)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages that a training forward pass keeps for the backward."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eca_resnet_saves_no_more_activations_than_torchvision(arch):
    """The ECA layer closes each block in place: beyond torchvision's block it keeps the
    [B, C] means and gates, and the shortcut where a block computes one (its input is kept anyway)."""
    import torchvision

    x = torch.randn(2, 3, 64, 64)
    eca = ARCHITECTURES[f"eca_{arch}"](num_classes=10).train()
    reference = getattr(torchvision.models, arch)(num_classes=10).train()
    shortcut_bytes = []
    for module in eca.modules():
        if getattr(module, "downsample", None) is not None:
            module.downsample.register_forward_hook(
                lambda module, inputs, output: shortcut_bytes.append(output.numel() * output.element_size())
            )
    eca_bytes = saved_activation_bytes(eca, x)
    reference_bytes = saved_activation_bytes(reference, x)
    blocks = sum(1 for module in eca.modules() if isinstance(module, eca_layer))
    gate_bytes = blocks * 2 * x.shape[0] * 2048 * 4  # means and gate, float32, at most 2048 channels
    assert shortcut_bytes
    assert reference_bytes <= eca_bytes <= reference_bytes + sum(shortcut_bytes) + gate_bytes


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_dot_equals_product_sum(dtype, format_name):
    a = make_input((3, 40, 7, 6), MEMORY_FORMATS[format_name], dtype=dtype, seed=31)
    b = make_input((3, 40, 7, 6), MEMORY_FORMATS[format_name], dtype=dtype, seed=32)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(spatial_dot(a, b), (a * b).sum((2, 3)), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
def test_reused_input_gives_the_same_gradients(format_name):
    """reuse_input=True lets the backward write over the block's temporary; the gradients must not change."""
    memory_format = MEMORY_FORMATS[format_name]
    layer = eca_layer(24, 5)
    shape = (2, 24, 7, 6)
    x = make_input(shape, memory_format, dtype=torch.float32, seed=33)
    shortcut = make_input(shape, memory_format, dtype=torch.float32, seed=34)
    grad_out = make_input(shape, memory_format, dtype=torch.float32, seed=35)
    grads = []
    for reuse_input in (False, True):
        leaf = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer.forward_add(leaf * 1, shortcut, reuse_input=reuse_input).backward(grad_out)
        grads.append((leaf.grad, layer.conv.weight.grad))
    for plain, reused in zip(*grads, strict=True):
        torch.testing.assert_close(reused, plain, rtol=1e-6, atol=1e-6)


def test_second_backward_through_a_reused_input_is_refused_in_words():
    layer = eca_layer(8, 3)
    leaf = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = layer.forward_add(leaf * 1, torch.randn(2, 8, 4, 4), reuse_input=True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reuse_input=False"):
        out.sum().backward()
    plain = layer.forward_add(leaf * 1, torch.randn(2, 8, 4, 4), reuse_input=False)
    plain.sum().backward(retain_graph=True)
    plain.sum().backward()  # without reuse the graph can be walked twice


@pytest.mark.parametrize("arch", ["eca_resnet18", "eca_mobilenet_v2"])
def test_second_derivatives_are_refused_not_wrong(arch):
    """The hand-written backwards are first-order; create_graph=True must fail loudly, not mislead."""
    model = ARCHITECTURES[arch](num_classes=4)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.square().sum().backward()


# ---------------------------------------------------------------- BatchNorm folded into the block's end


# How a block ends after ECA: ResNet's add and ReLU, MobileNetV2's add alone, or nothing.
BLOCK_ENDS = {"add_relu": (True, True), "add": (True, False), "plain": (False, False)}


def norm_block_end(norm: nn.BatchNorm2d, layer, x, shortcut, grad_out, folded: bool, end: str = "add_relu"):
    """relu(eca(norm(x)) + shortcut) (or the given ``end``) forward and backward; every input's and parameter's gradient."""
    has_shortcut, relu = BLOCK_ENDS[end]
    x = x.detach().clone().requires_grad_(True)
    shortcut = shortcut.detach().clone().requires_grad_(True) if has_shortcut else None
    norm.zero_grad(set_to_none=True)
    layer.zero_grad(set_to_none=True)
    if folded:
        out = ECANormGateFunction.apply(
            x, shortcut, norm.weight, norm.bias, layer.conv.weight, norm.running_mean, norm.running_var,
            norm.momentum, norm.eps, relu,
        )
    else:
        out = layer(norm(x))
        out = out + shortcut if has_shortcut else out
        out = torch.relu(out) if relu else out
    out.backward(grad_out)
    shortcut_grad = shortcut.grad if has_shortcut else None
    grads = (x.grad, shortcut_grad, norm.weight.grad, norm.bias.grad, layer.conv.weight.grad)
    return out.detach(), grads, (norm.running_mean.clone(), norm.running_var.clone())


def paired_norms(channels: int, dtype=torch.float64):
    norm = nn.BatchNorm2d(channels).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_(0, 0.5)
        norm.running_mean.normal_(0, 1)
        norm.running_var.uniform_(0.5, 2)
    twin = copy.deepcopy(norm)
    return norm, twin


@pytest.mark.parametrize("end", list(BLOCK_ENDS))
@pytest.mark.parametrize("spatial", SPATIAL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_folded_batch_norm_matches_plain_formulation(k, format_name, spatial, end):
    memory_format = MEMORY_FORMATS[format_name]
    x, shortcut, grad_out = block_inputs(format_name, spatial, seed=41)
    x = x * 3 + 1  # statistics far from 0 and 1
    fused, plain = paired_layers(24, k)
    norm, plain_norm = paired_norms(24)

    out, grads, stats = norm_block_end(norm, fused, x, shortcut, grad_out, folded=True, end=end)
    ref_out, ref_grads, ref_stats = norm_block_end(plain_norm, plain, x, shortcut, grad_out, folded=False, end=end)

    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=memory_format)
    if BLOCK_ENDS[end][1]:
        assert (out == 0).any() and (out > 0).any()
    names = ("x", "shortcut", "norm weight", "norm bias", "eca kernel")
    for name, grad, reference in zip(names, grads, ref_grads, strict=True):
        if reference is None:
            assert grad is None, name
            continue
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-11, msg=name)
    assert grads[0].is_contiguous(memory_format=memory_format)
    for value, reference in zip(stats, ref_stats, strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("end", list(BLOCK_ENDS))
@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("k", (1, 3, 5))
def test_folded_batch_norm_backward_gradcheck(k, format_name, end):
    has_shortcut, relu = BLOCK_ENDS[end]
    x, shortcut = gradcheck_inputs(format_name, seed=44)
    norm_weight = torch.randn(7, dtype=torch.float64, requires_grad=True)
    norm_bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    eca_weight = torch.randn(1, 1, k, dtype=torch.float64, requires_grad=True)

    def block_end(x, norm_weight, norm_bias, eca_weight, *shortcut):
        running_mean, running_var = torch.zeros(7, dtype=torch.float64), torch.ones(7, dtype=torch.float64)
        return ECANormGateFunction.apply(
            x, *(shortcut or (None,)), norm_weight, norm_bias, eca_weight, running_mean, running_var, 0.1, 1e-5, relu
        )

    inputs = (x, norm_weight, norm_bias, eca_weight) + ((shortcut,) if has_shortcut else ())
    assert torch.autograd.gradcheck(block_end, inputs)


# A block, the BatchNorm it folds, and its input shape: ResNet's bottleneck, MobileNetV2's blocks without and with residual.
FOLDING_BLOCKS = {
    "resnet50_bottleneck": (lambda: ARCHITECTURES["eca_resnet50"](num_classes=10).layer1[1], lambda b: b.bn3, (2, 256, 8, 8)),
    "mobilenet_v2_plain": (lambda: ARCHITECTURES["eca_mobilenet_v2"](num_classes=10).features[1], lambda b: b.conv[2], (2, 32, 8, 8)),
    "mobilenet_v2_residual": (lambda: ARCHITECTURES["eca_mobilenet_v2"](num_classes=10).features[3], lambda b: b.conv[3], (2, 24, 8, 8)),
}


@pytest.mark.parametrize("block_name", list(FOLDING_BLOCKS))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_block_with_folded_norm_trains_like_its_batch_norm(momentum, block_name):
    """A float32 training block folds its BatchNorm; statistics, counter and results follow nn.BatchNorm2d."""
    make_block, norm_of, shape = FOLDING_BLOCKS[block_name]
    torch.manual_seed(0)
    block = make_block().train()
    norm_of(block).momentum = momentum
    twin = copy.deepcopy(block)
    for step in range(3):
        x = torch.randn(shape) * (step + 1)
        out = block(x)
        assert type(out.grad_fn).__name__ == "ECANormGateFunctionBackward"
        with torch.no_grad():  # the block's own BatchNorm, then the layer's inference path
            expected = twin(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        norm, twin_norm = norm_of(block), norm_of(twin)
        torch.testing.assert_close(norm.running_mean, twin_norm.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.running_var, twin_norm.running_var, rtol=1e-5, atol=1e-6)
        assert norm.num_batches_tracked.item() == twin_norm.num_batches_tracked.item() == step + 1


def test_batch_norm_is_called_where_folding_does_not_apply():
    """Evaluation, frozen BatchNorm, float64 and a BatchNorm subclass run the block's own BatchNorm."""

    class CustomBatchNorm(nn.BatchNorm2d):
        pass

    block = ARCHITECTURES["eca_resnet18"](num_classes=10).layer1[0]
    calls = []
    block.bn2.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 64, 8, 8)
    block.train()(x)
    assert not calls  # folded: the hook does not run
    block.eval()(x)
    block.train()
    block.bn2.eval()(x)  # frozen statistics
    block.bn2.train()
    block.double()(x.double())
    assert len(calls) == 3
    block.float().bn2 = CustomBatchNorm(64)
    out = block(x)
    assert type(out.grad_fn).__name__ != "ECANormGateFunctionBackward"


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize(
    "scale,shift", [(1.0, 0.0), (1.0, 4.0), (0.01, 100.0), (0.0, 5.0)], ids=["centred", "offset", "ill-conditioned", "constant"]
)
def test_batch_statistics_match_float64_reference(format_name, scale, shift):
    """float32 statistics as close as BatchNorm's own, including channels far off zero (the Welford fallback)."""
    x = make_input((8, 16, 12, 12), MEMORY_FORMATS[format_name], dtype=torch.float32, seed=50) * scale + shift
    pair_sums, mean, var = batch_statistics(x)
    reference = x.double()
    torch.testing.assert_close(pair_sums.double(), reference.sum((2, 3)), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(mean.double(), reference.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), reference.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
def test_pair_reductions_match_their_definition(format_name):
    memory_format = MEMORY_FORMATS[format_name]
    grad, x = (make_input((3, 5, 6, 7), memory_format, seed=seed) for seed in (51, 52))
    mean, invstd = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    scratch = torch.empty_like(x)
    totals, dots = pair_reductions(grad, x, mean, invstd, scratch=scratch)
    torch.testing.assert_close(totals, grad.sum((2, 3)), rtol=1e-12, atol=1e-12)
    normalised = (x - mean[:, None, None]) * invstd[:, None, None]
    torch.testing.assert_close(dots, (grad * normalised).sum((2, 3)), rtol=1e-12, atol=1e-12)


def test_folded_block_refuses_one_value_per_channel_as_batch_norm_does():
    block = ARCHITECTURES["eca_resnet18"](num_classes=10).layer4[0].train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 256, 2, 2))
