"""The CUDA paths, run where a GPU is present (skipped elsewhere, CI included).

The rest of the suite runs on the CPU; these check on a GPU what only a GPU
exercises: every ECA implementation on CUDA tensors against the reference,
the Triton block end compiled for the GPU (``tests/test_triton.py`` runs it
under the interpreter), autocast, pinned non-blocking batches normalised on
the device, NCCL set-up, and the entry scripts end to end.
"""
import contextlib
import copy
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import RELEASED_ARCHS, ROOT, run_script
from models import fuse_eca
from models.fused.dispatch import reference_block_end
from original_formulation import original_forward
from test_fuse_eca import BLOCKS, assert_matches, make_model, randomise, relative_error, run
from test_triton import BLOCK_END_CASES, block_end_matches_plain, compiled_training_matches_eager
from test_triton import network_is_as_accurate_as_the_plain_one, randomised_modules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def cuda_tensor(shape, layout, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to("cuda", dtype)
    return x.contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("arch", RELEASED_ARCHS)
def test_plain_models_on_cuda_give_the_original_formulation(arch):
    model = make_model(arch).cuda().eval()
    x = cuda_tensor((2, 3, 64, 64), "channels_last", torch.float64, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original_forward(model, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["auto", "cpu"])
@pytest.mark.parametrize("mode", ["train", "frozen", "inference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ["eca_resnet18", "eca_resnet50", "eca_mobilenet_v2"])
def test_fused_models_on_cuda_match_the_reference(arch, layout, mode, impl):
    plain = make_model(arch, layout=layout).cuda()
    fused = fuse_eca(make_model(arch, layout=layout).cuda(), impl)
    x = cuda_tensor((2, 3, 64, 64), layout, torch.float64, 8)
    assert_matches(run(fused, mode, x), run(plain, mode, x), tolerance=1e-9)


@pytest.mark.parametrize("impl", ["auto", "cpu", "triton"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("block_name", list(BLOCKS))
def test_fused_block_ends_on_cuda_in_float32(block_name, layout, impl):
    template, channels = BLOCKS[block_name]
    plain = randomise(copy.deepcopy(template)).cuda().to(memory_format=LAYOUTS[layout])
    fused = fuse_eca(copy.deepcopy(plain), impl)
    x = cuda_tensor((4, channels, 8, 8), layout, torch.float32, 9)
    assert_matches(run(fused, "train", x), run(plain, "train", x), tolerance=1e-5)


@pytest.mark.parametrize("impl", ["auto", "triton"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_model_under_bf16_autocast_is_as_close_as_the_reference(layout, impl):
    exact = make_model("eca_resnet50", layout=layout).cuda()
    plain = make_model("eca_resnet50", dtype=torch.float32, layout=layout).cuda()
    fused = fuse_eca(make_model("eca_resnet50", dtype=torch.float32, layout=layout).cuda(), impl)
    x = cuda_tensor((4, 3, 64, 64), layout, torch.float64, 10)
    with torch.no_grad():
        expected = exact.eval()(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, reference = fused.eval()(x.float()), plain.eval()(x.float())
    assert relative_error(got, expected) <= 2 * relative_error(reference, expected) + 1e-3


def prec1(output):
    return [float(value) for value in re.findall(r"^ \* Prec@1 (\d+\.\d{3})", output, flags=re.M)]


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_main_trains_and_evaluates_on_the_gpu(tiny_data, tmp_path, amp):
    out = tmp_path / "run"
    train = run_script("main.py", "-a", "eca_resnet18", "--epochs", "2", "-b", "8", "-j", "2", "--seed", "0",
                       "--amp", amp, "--channels-last", *TINY, "--output-dir", out, tiny_data, check=True)
    assert "cuda" in train.stdout + train.stderr
    assert len(prec1(train.stdout)) == 2
    evaluation = run_script("main.py", "-e", "--resume", out / "model_best.pth.tar", "-j", "2", "--amp", amp,
                            "--channels-last", *TINY, tiny_data, check=True)
    assert prec1(evaluation.stdout) == [max(prec1(train.stdout))]
    # A GPU checkpoint evaluates on the CPU too.
    on_cpu = run_script("main.py", "-e", "--resume", out / "model_best.pth.tar", "--device", "cpu", "-j", "1",
                        *TINY, tiny_data, check=True)
    assert len(prec1(on_cpu.stdout)) == 1


@pytest.mark.slow
def test_light_main_trains_on_the_gpu(tiny_data, tmp_path):
    result = run_script("light_main.py", "--epochs", "1", "-b", "8", "-j", "2", "--amp", "bf16", "--channels-last",
                        *TINY, "--output-dir", tmp_path / "run", tiny_data, check=True)
    assert len(prec1(result.stdout)) == 1


@pytest.mark.slow
def test_torchrun_trains_over_nccl(tiny_data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               os.path.join(ROOT, "main.py"), "-a", "eca_resnet18", "--epochs", "1", "-b", "8", "-j", "1", *TINY,
               "--output-dir", str(tmp_path / "run"), tiny_data]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(prec1(result.stdout)) == 1


@pytest.mark.slow
def test_gpu_flag_and_compile(tiny_data, tmp_path):
    result = run_script("main.py", "-a", "eca_resnet18", "--gpu", "0", "--compile", "--epochs", "1", "-b", "8",
                        "-j", "1", *TINY, "--output-dir", tmp_path / "run", tiny_data, check=True)
    assert len(prec1(result.stdout)) == 1


def test_a_gpu_gets_uint8_batches_and_normalises_them_on_the_device():
    from engine.data import IMAGENET_MEAN, IMAGENET_STD, BatchPreparer, Batch

    prepare = BatchPreparer(torch.device("cuda"), channels_last=True)
    assert prepare.worker_normalise is None  # the workers send uint8, a quarter of the bytes
    images = torch.randint(0, 256, (4, 3, 9, 11), dtype=torch.uint8).pin_memory()
    prepared, targets = prepare(Batch(images, torch.arange(4), []))
    assert prepared.is_cuda and prepared.dtype == torch.float32 and targets.is_cuda
    assert prepared.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(prepared.cpu().double(), (images.double() / 255 - mean) / std, rtol=0, atol=1e-6)


# The Triton block end (models/fused/triton.py), compiled for the GPU: the interpreter's cases, then
# maps of the sizes ResNets and MobileNetV2 have at 224 px, which span many tiles and programs.
TRITON_GPU_SHAPES = {
    "resnet50-layer1": ((4, 256, 56, 56), 3),
    "resnet50-layer3": ((8, 1024, 14, 14), 5),
    "resnet50-layer4": ((16, 2048, 7, 7), 7),
    "resnet18-layer1": ((8, 64, 56, 56), 3),
    "mobilenet-160": ((16, 160, 7, 7), 3),
}


@pytest.mark.parametrize("name", list(BLOCK_END_CASES))
def test_triton_block_end_matches_plain_formulation_on_cuda(name):
    block_end_matches_plain(**BLOCK_END_CASES[name], device="cuda")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(TRITON_GPU_SHAPES))
def test_triton_block_end_on_network_sized_maps(name, layout, train):
    shape, k = TRITON_GPU_SHAPES[name]
    block_end_matches_plain(shape=shape, k=k, layout=layout, train=train, shortcut=True, relu=True, device="cuda")


def half_precision_block_end(block_end, x, norm, eca, shortcut, grad_out, dtype=None):
    """Output and every gradient of one block end, run under autocast to ``dtype`` where given."""
    inputs = [x.detach().clone().requires_grad_(), shortcut.detach().clone().requires_grad_()]
    with torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext():
        out = block_end(inputs[0], norm, eca, inputs[1], True)
    grads = torch.autograd.grad(out, [*inputs, *norm.parameters(), *eca.parameters()], grad_out)
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_block_end_under_autocast_is_as_accurate_as_the_plain_modules(dtype, layout, seed):
    """bf16 / fp16 maps with float32 parameters, accumulated in float32, written in the maps' dtype.

    Both the kernels and the plain modules under autocast are held to the
    float64 formulation of the same rounded inputs; the kernels' error, output
    and gradients alike, may be at most twice the plain modules' (they round
    less: one float32 computation, one rounding of the result).
    """
    from models.fused.triton import block_end

    shape = (8, 64, 14, 14)
    x, shortcut, grad_out = (cuda_tensor(shape, layout, dtype, seed * 3 + i) for i in range(3))
    norm, eca = (module.cuda() for module in randomised_modules(64, 5, seed))
    plain_norm, plain_eca = copy.deepcopy(norm), copy.deepcopy(eca)
    exact_norm, exact_eca = copy.deepcopy(norm).double(), copy.deepcopy(eca).double()
    got = half_precision_block_end(block_end, x, norm, eca, shortcut, grad_out, dtype)
    plain = half_precision_block_end(reference_block_end, x, plain_norm, plain_eca, shortcut, grad_out, dtype)
    exact = half_precision_block_end(reference_block_end, x.double(), exact_norm, exact_eca, shortcut.double(),
                                     grad_out.double())
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=LAYOUTS[layout])
    names = ["output", "grad x", "grad shortcut", "grad weight", "grad bias", "grad kernel"]
    for name, a, b, reference in zip(names, got, plain, exact):
        error, plain_error = (a.double() - reference).norm(), (b.double() - reference).norm()
        assert error <= 2 * plain_error + 1e-3 * reference.norm(), f"{name}: {error:.3g} against the plain {plain_error:.3g}"
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buffer, exact_buffer = getattr(norm, name), getattr(exact_norm, name)
        torch.testing.assert_close(buffer.to(exact_buffer.dtype), exact_buffer, rtol=1e-2, atol=1e-2, msg=name)


def test_triton_block_end_compiles_whole_with_inductor():
    compiled_training_matches_eager(device="cuda", backend="inductor", shape=(8, 64, 14, 14))


@pytest.mark.parametrize("mode", ["train", "frozen"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ["eca_resnet18", "eca_resnet50", "eca_mobilenet_v2"])
def test_triton_networks_train_as_accurately_as_the_plain_ones_on_cuda(arch, layout, mode):
    """Whole networks at 96 px, batch 8: BatchNorm sees enough values that gradients stay well conditioned."""
    network_is_as_accurate_as_the_plain_one(arch, layout, mode, backward=True, size=96, device="cuda", batch=8)

