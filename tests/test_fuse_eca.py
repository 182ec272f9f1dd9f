"""``models.fuse_eca``: every implementation against the plain models, and the plain models against the original.

The plain models are the reference. In float64 they give the original
release's formulation bit for bit; every ``impl`` must then give the plain
model's forward, every gradient and the BatchNorm buffers: to rounding in
float64 over whole networks, and within 1e-5 relative in float32 block by block.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import fuse_eca
from models.fused import dispatch
from conftest import RELEASED_ARCHS
from original_formulation import original_forward

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# train: batch statistics; frozen: BatchNorm in eval mode with autograd on (fine-tuning); inference: no autograd.
MODES = ("train", "frozen", "inference")
FUSED_ARCHS = ("eca_resnet18", "eca_resnet50", "eca_mobilenet_v2")


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating tensor of the state_dict random, at scales that keep activations finite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                values = torch.rand(tensor.shape, generator=generator) + 0.5
            elif tensor.dim() == 1:
                values = torch.rand(tensor.shape, generator=generator) * 0.5 + (0.5 if "weight" in name else -0.25)
            else:
                values = torch.randn(tensor.shape, generator=generator) / math.sqrt(max(1, tensor[0].numel()))
            tensor.copy_(values)
    return model


def make_model(arch: str, dtype=torch.float64, layout="nchw") -> nn.Module:
    model = randomise(models.ARCHITECTURES[arch](num_classes=10))
    if hasattr(model, "classifier"):
        model.classifier[0].p = 0.0  # dropout would draw different masks in the two runs
    return model.to(dtype=dtype, memory_format=LAYOUTS[layout])


def make_input(shape, layout="nchw", dtype=torch.float64, seed=0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=LAYOUTS[layout])


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    result, expected = result.double(), expected.double()
    return ((result - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run(module: nn.Module, mode: str, *inputs: torch.Tensor):
    """Forward (and backward of a fixed random projection of the output, unless ``inference``)."""
    module.train(mode == "train")
    leaves = [x.detach().clone().requires_grad_(mode != "inference") for x in inputs]
    module.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(mode != "inference"):
        out = module(*leaves)
        if mode != "inference":
            # Drawn in float64 and cast, so that float32 and float64 runs project the output alike.
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
            weights = weights.to(out.device, out.dtype)
            (out * weights).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads.update({f"input{i}": leaf.grad for i, leaf in enumerate(leaves)})
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    return out.detach(), grads, buffers


def assert_matches(result, expected, tolerance: float) -> None:
    (out, grads, buffers), (ref_out, ref_grads, ref_buffers) = result, expected
    assert relative_error(out, ref_out) <= tolerance
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        if grad is None:
            assert grads[name] is None, name
            continue
        # Every ECA kernel gets a gradient: DDP with find_unused_parameters=False relies on it.
        assert grads[name] is not None, name
        assert relative_error(grads[name], grad) <= tolerance, name
    for name, buffer in ref_buffers.items():
        if buffer.is_floating_point():
            assert relative_error(buffers[name], buffer) <= tolerance, name
        else:
            assert torch.equal(buffers[name], buffer), name


# ---------------------------------------------------------------- the reference


# The deeper ResNets repeat ResNet-50's blocks: they run with the slow tests.
ORIGINAL_ARCHS = [pytest.param(arch, marks=pytest.mark.slow if arch in ("eca_resnet101", "eca_resnet152") else [])
                  for arch in RELEASED_ARCHS]


@pytest.mark.parametrize("arch", ORIGINAL_ARCHS)
def test_plain_models_give_the_original_formulation_bit_for_bit_in_float64(arch):
    model = make_model(arch)
    x = make_input((2, 3, 33, 31), seed=9)
    with torch.no_grad():
        expected = original_forward(model.eval(), x)
        assert torch.isfinite(expected).all() and expected.abs().max() > 0
        assert torch.equal(model(x), expected)
        # auto leaves float64 on the plain ops, so released checkpoints give the original's numbers
        assert torch.equal(fuse_eca(model, "auto")(x), expected)


@pytest.mark.parametrize("arch", ["eca_resnet18", "eca_mobilenet_v2"])
def test_plain_training_step_is_the_original_formulation(arch):
    # channels_last: float64 depthwise convolutions are slow on NCHW CPU tensors
    model = make_model(arch, layout="channels_last").train()
    twin = copy.deepcopy(model)
    x = make_input((2, 3, 24, 24), "channels_last", seed=10)
    assert torch.equal(model(x), original_forward(twin, x, training=True))
    for (name, buffer), twin_buffer in zip(model.named_buffers(), twin.buffers()):
        if buffer.is_floating_point():  # the functional form keeps no batch counter
            assert torch.equal(buffer, twin_buffer), name


# ---------------------------------------------------------------- whole models


# float64 convolutions are slow on the CPU: the deeper networks run with the slow tests.
WHOLE_MODEL_ARCHS = [pytest.param(arch, marks=[] if arch == "eca_resnet18" else pytest.mark.slow) for arch in FUSED_ARCHS]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", WHOLE_MODEL_ARCHS)
def test_cpu_impl_matches_the_reference_model_in_float64(arch, layout, mode):
    plain = make_model(arch, layout=layout)
    fused = fuse_eca(copy.deepcopy(plain), "cpu")
    x = make_input((2, 3, 48, 48), layout, seed=11)
    assert_matches(run(fused, mode, x), run(plain, mode, x), tolerance=1e-9)


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", WHOLE_MODEL_ARCHS)
def test_auto_impl_forward_is_as_accurate_as_the_reference_in_float32(arch, layout, mode):
    """Whole float32 networks: the fused forward rounds no worse than the plain one.

    Their gradients are compared block by block below: through a whole random network a
    float32 rounding of 1e-6 in one block's input can move an earlier block's input
    gradient by 1e-2, for the plain float64 model as much as for any implementation.
    """
    exact = make_model(arch, layout=layout)
    plain = copy.deepcopy(exact).float()
    fused = fuse_eca(copy.deepcopy(plain), "auto")
    x = make_input((2, 3, 48, 48), layout, seed=12)
    exact_out, _, exact_buffers = run(exact, mode, x)
    fused_out, _, fused_buffers = run(fused, mode, x.float())
    plain_out, _, plain_buffers = run(plain, mode, x.float())
    assert relative_error(fused_out, exact_out) <= 2 * relative_error(plain_out, exact_out) + 1e-6
    for name, buffer in exact_buffers.items():
        if buffer.is_floating_point():
            limit = 2 * relative_error(plain_buffers[name], buffer) + 1e-6
            assert relative_error(fused_buffers[name], buffer) <= limit, name


# ---------------------------------------------------------------- block ends in float32


def block_cases():
    resnet18 = models.eca_resnet18(num_classes=10, k_size=3)
    resnet50 = models.eca_resnet50(num_classes=10, k_size=3)
    mobilenet = models.eca_mobilenet_v2(num_classes=10, k_size=3)
    return {
        "basic": (resnet18.layer1[0], 64),
        "basic_downsample": (resnet18.layer2[0], 64),
        "bottleneck": (resnet50.layer1[1], 256),
        "bottleneck_downsample": (resnet50.layer1[0], 64),
        "inverted_residual": (mobilenet.features[3], 24),
        "inverted_linear": (mobilenet.features[2], 16),
        "inverted_no_expansion": (mobilenet.features[1], 32),
    }


BLOCKS = block_cases()


def set_kernel_size(block: nn.Module, k: int) -> None:
    for module in block.modules():
        if isinstance(module, models.eca_layer):
            module.k_size = k
            module.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)


# Odd and even maps for one block of each network; the odd map for every block.
BLOCK_MAPS = [(name, (7, 5)) for name in BLOCKS] + [("basic_downsample", (8, 8)), ("inverted_residual", (8, 8))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("block_name, spatial", BLOCK_MAPS, ids=[f"{n}-{h}x{w}" for n, (h, w) in BLOCK_MAPS])
def test_cpu_block_end_matches_the_reference_in_float32(block_name, spatial, layout, mode):
    template, channels = BLOCKS[block_name]
    plain = randomise(copy.deepcopy(template), seed=1).to(memory_format=LAYOUTS[layout])
    fused = fuse_eca(copy.deepcopy(plain), "cpu")
    x = make_input((4, channels, *spatial), layout, dtype=torch.float32, seed=13)
    for step in range(2):  # the second step sees the first one's running statistics
        assert_matches(run(fused, mode, x * (step + 1)), run(plain, mode, x * (step + 1)), tolerance=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("block_name", ["bottleneck", "inverted_residual"])
def test_cpu_block_end_matches_the_reference_for_every_kernel_size(block_name, k):
    template, channels = BLOCKS[block_name]
    plain = copy.deepcopy(template)
    set_kernel_size(plain, k)
    plain = randomise(plain, seed=k)
    fused = fuse_eca(copy.deepcopy(plain), "cpu")
    x = make_input((4, channels, 6, 6), dtype=torch.float32, seed=k)
    assert_matches(run(fused, "train", x), run(plain, "train", x), tolerance=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_folded_batch_norm_tracks_statistics_as_batch_norm_does(momentum):
    template, channels = BLOCKS["bottleneck"]
    plain = copy.deepcopy(template)
    plain.bn3.momentum = momentum
    fused = fuse_eca(copy.deepcopy(plain), "cpu")
    for step in range(3):
        x = make_input((2, channels, 5, 5), dtype=torch.float32, seed=20 + step) * (step + 1) + step
        assert end_function(copy.deepcopy(fused).train(), x) == "ECANormGateFunctionBackward"
        fused_out, _, fused_buffers = run(fused, "train", x)
        plain_out, _, plain_buffers = run(plain, "train", x)
        assert fused_buffers["bn3.num_batches_tracked"].item() == step + 1
        for name in ("bn3.running_mean", "bn3.running_var"):
            assert relative_error(fused_buffers[name], plain_buffers[name]) <= 1e-6, name


# ---------------------------------------------------------------- the door and the dispatcher


def end_function(block: nn.Module, x: torch.Tensor) -> str:
    """The autograd node that closes ``block(x)``: which implementation ran."""
    return type(block(x).grad_fn).__name__


def test_dispatcher_picks_by_mode_dtype_and_capture():
    block = fuse_eca(copy.deepcopy(BLOCKS["basic"][0]), "auto").train()
    x = torch.randn(2, 64, 6, 6)
    assert end_function(block, x) == "ECANormGateFunctionBackward"
    block.bn2.eval()
    assert end_function(block, x) == "ECAResidualReLUFunctionBackward"
    block.bn2.train()
    block.double()
    assert end_function(block, x.double()) == "ReluBackward0"  # auto keeps float64 on the plain ops
    block.float()
    block.bn2 = nn.SyncBatchNorm(64)
    assert end_function(block, x) == "ECAResidualReLUFunctionBackward"  # SyncBatchNorm runs as it is


def test_fuse_eca_works_in_place_and_reference_restores_the_plain_blocks():
    model = models.eca_resnet18(num_classes=10)
    plain_types = [type(m) for m in model.modules()]
    assert fuse_eca(model, "cpu") is model
    assert type(model.layer1[0]).__name__ == "FusedBasicBlock"
    assert fuse_eca(model, "auto").layer1[0].impl == "auto"
    assert [type(m) for m in fuse_eca(model, "reference").modules()] == plain_types


@pytest.mark.parametrize("arch", ["resnet18", "se_resnet18", "eca_ns_resnet50", "cbam_resnet50", "mobilenet_v2"])
def test_fuse_eca_leaves_models_without_eca_layers_unchanged(arch):
    model = models.ARCHITECTURES[arch](num_classes=3).eval()
    before = copy.deepcopy(model)
    assert fuse_eca(model, "cpu") is model
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), before(x))


def test_fused_model_loads_a_plain_state_dict_strictly_and_survives_deepcopy():
    plain = randomise(models.eca_mobilenet_v2(num_classes=10))
    fused = fuse_eca(models.eca_mobilenet_v2(num_classes=10), "cpu")
    fused.load_state_dict(plain.state_dict(), strict=True)
    twin = copy.deepcopy(fused)  # what EMA's AveragedModel does
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)


def test_unknown_impl_is_refused_in_one_line():
    with pytest.raises(ValueError, match="choose one of auto, reference, cpu, triton"):
        fuse_eca(models.eca_resnet18(), "fast")


def test_triton_impl_without_a_usable_triton_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("Triton can run here")
    with pytest.raises(RuntimeError, match="--eca-impl triton cannot run here: .*; use --eca-impl auto"):
        fuse_eca(models.eca_resnet18(), "triton")


def test_torch_export_sees_the_plain_ops():
    block = fuse_eca(copy.deepcopy(BLOCKS["basic"][0]), "auto").train()
    x = torch.randn(2, 64, 8, 8)
    exported = torch.export.export(block, (x,))
    code = exported.graph_module.code
    assert "conv1d" in code and "sigmoid" in code and "Function" not in code
    torch.testing.assert_close(exported.module()(x), copy.deepcopy(block)(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_of_a_fused_block_sees_the_plain_ops():
    pytest.importorskip("onnxscript")
    block = fuse_eca(copy.deepcopy(BLOCKS["bottleneck"][0]), "auto").eval()
    program = torch.onnx.export(block, (torch.randn(1, 256, 8, 8),), dynamo=True, verbose=False)
    op_types = {node.op_type for node in program.model_proto.graph.node}
    assert {"ReduceMean", "Sigmoid", "Conv"} <= op_types or {"GlobalAveragePool", "Sigmoid"} <= op_types


@pytest.mark.slow  # a cold inductor compile takes about a minute on a 2-core CPU
def test_compiled_fused_model_matches_eager():
    model = fuse_eca(models.eca_resnet18(num_classes=10), "auto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)


def test_ddp_sees_every_eca_kernel_gradient(tmp_path):
    distributed = torch.distributed
    if not distributed.is_available() or distributed.is_initialized():
        pytest.skip("needs a fresh single-process gloo group")
    store = distributed.FileStore(str(tmp_path / "store"), 1)
    distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = fuse_eca(models.eca_resnet18(num_classes=10), "auto")
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        ddp(torch.randn(2, 3, 32, 32)).sum().backward()
        kernels = [module.conv.weight for module in model.modules() if isinstance(module, models.eca_layer)]
        assert len(kernels) == 8 and all(kernel.grad is not None for kernel in kernels)
    finally:
        distributed.destroy_process_group()


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages that a training forward pass keeps for the backward."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


def test_fused_resnet50_saves_no_more_activations_than_torchvision():
    """The fused end writes over BatchNorm's output: beyond torchvision's block only ``[B, C]`` vectors are kept."""
    import torchvision

    x = torch.randn(2, 3, 64, 64)
    fused = fuse_eca(models.eca_resnet50(num_classes=10), "auto").train()
    reference = torchvision.models.resnet50(num_classes=10).train()
    blocks = sum(1 for module in fused.modules() if isinstance(module, models.eca_layer))
    vector_bytes = blocks * 6 * x.shape[0] * 2048 * 4  # a few float32 [B, C] vectors per block
    assert saved_activation_bytes(reference, x) <= saved_activation_bytes(fused, x)
    assert saved_activation_bytes(fused, x) <= saved_activation_bytes(reference, x) + vector_bytes


@pytest.mark.parametrize("arch", ["eca_resnet18", "eca_mobilenet_v2"])
def test_second_derivatives_are_refused_not_wrong(arch):
    """The hand-written backwards are first-order; create_graph=True must fail loudly, not mislead."""
    model = fuse_eca(models.ARCHITECTURES[arch](num_classes=4), "cpu")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.square().sum().backward()


def test_reference_impl_supports_second_derivatives():
    model = fuse_eca(models.eca_resnet18(num_classes=4), "reference")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dispatcher_is_the_only_place_that_reads_the_device_or_grad_mode():
    import inspect

    import models.eca_mobilenetv2
    import models.eca_module
    import models.eca_resnet
    import models.fused.blocks
    import models.fused.cpu

    for module in (models.eca_module, models.eca_resnet, models.eca_mobilenetv2, models.fused.blocks, models.fused.cpu):
        source = inspect.getsource(module)
        for decision in ("is_grad_enabled", "is_compiling", "is_exporting", ".is_cpu", ".is_cuda", "device.type"):
            assert decision not in source, (module.__name__, decision)
    assert "is_grad_enabled" in inspect.getsource(dispatch)


def test_plain_ops_formulation_of_the_reference_block_end():
    norm, eca = nn.BatchNorm2d(8).eval(), models.eca_layer(8, 3)
    x, shortcut = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    expected = F.relu(eca(norm(x)) + shortcut)
    assert torch.equal(dispatch.reference_block_end(x, norm, eca, shortcut, relu=True), expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("block_name", ["bottleneck_downsample", "inverted_residual", "inverted_linear"])
def test_gpu_block_end_matches_the_reference(block_name, layout, training):
    """What ``auto`` runs on CUDA tensors, checked here on CPU tensors (and on a GPU in test_cuda.py)."""
    from models.fused import gpu

    template, channels = BLOCKS[block_name]
    block = randomise(copy.deepcopy(template), seed=2).to(memory_format=LAYOUTS[layout]).train(training)
    x = make_input((4, channels, 6, 5), layout, dtype=torch.float32, seed=21)
    with torch.no_grad():  # the last convolution's output: the block end's input
        if hasattr(block, "conv3"):
            norm, eca, relu = block.bn3, block.eca, True
            y = block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))))
            shortcut = block.downsample(x)
        else:
            norm, eca, relu = block.conv[-2], block.conv[-1], False
            y = block.conv[:-2](x)
            shortcut = x if block.use_res_connect else None
    twin = copy.deepcopy(norm), copy.deepcopy(eca)
    function = gpu.block_end if training else gpu.inference_block_end
    with torch.set_grad_enabled(training):
        got = function(y, norm, eca, shortcut, relu)
        expected = dispatch.reference_block_end(y, *twin, shortcut, relu)
    assert relative_error(got.detach(), expected.detach()) <= 1e-6
    if training:
        got.sum().backward()
        expected.sum().backward()
        assert relative_error(eca.conv.weight.grad, twin[1].conv.weight.grad) <= 1e-5
        assert relative_error(norm.running_var, twin[0].running_var) <= 1e-6
