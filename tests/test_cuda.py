"""The CUDA paths, run where a GPU is present (skipped elsewhere, CI included).

The rest of the suite runs on the CPU; these check on a GPU what only a GPU
exercises: the fused ECA layer's backward without the CPU's fused dot product,
autocast, pinned non-blocking batches normalised on the device, NCCL set-up,
and the entry scripts end to end.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from models import ARCHITECTURES
from models.eca_module import eca_layer
from original_models import original_model
from test_eca_fused import paired_layers, residual_relu_backward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def cuda_tensor(shape, memory_format, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to("cuda", dtype).contiguous(memory_format=memory_format)


def layer_pair(channels, k, dtype, seed=0):
    """The project's layer and the original's on the GPU, with the same seeded kernel."""
    return tuple(layer.cuda() for layer in paired_layers(channels, k, dtype, seed))


@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_block_end_matches_plain_formulation_on_cuda(k, dtype, format_name):
    memory_format = MEMORY_FORMATS[format_name]
    shape = (4, 32, 7, 6)
    x, shortcut, grad_out = (cuda_tensor(shape, memory_format, dtype, seed) for seed in (1, 2, 3))
    fused, plain = layer_pair(32, k, dtype)
    got = residual_relu_backward(fused, x, shortcut, grad_out)
    expected = residual_relu_backward(plain, x, shortcut, grad_out)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(("output", "grad x", "grad shortcut", "grad kernel"), got, expected):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)
    assert got[0].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("format_name", list(MEMORY_FORMATS))
def test_block_end_in_bfloat16_is_as_accurate_as_the_original(format_name, seed):
    """bf16 against the float64 formulation of the same inputs, away from the ReLU's kink.

    Where the pre-activation is within bf16's rounding of zero, the two sides
    may take opposite ReLU branches; the gradients are compared elsewhere. The
    kernel's gradient sums many cancelling terms, so its bf16 error is held to
    the original formulation's own bf16 error rather than to a fixed fraction.
    """
    memory_format = MEMORY_FORMATS[format_name]
    shape = (4, 64, 14, 14)
    x, shortcut, grad_out = (cuda_tensor(shape, memory_format, torch.bfloat16, seed + i) for i in (1, 2, 3))
    fused, plain = layer_pair(64, 5, torch.bfloat16, seed)
    got = residual_relu_backward(fused, x, shortcut, grad_out)
    original = residual_relu_backward(plain, x, shortcut, grad_out)
    plain = plain.double()
    expected = residual_relu_backward(plain, x.double(), shortcut.double(), grad_out.double())
    away_from_kink = (plain(x.double()) + shortcut.double()).abs() > 0.1
    torch.testing.assert_close(got[0].double(), expected[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(got[1:3], expected[1:3]):
        torch.testing.assert_close(a.double()[away_from_kink], b[away_from_kink], rtol=3e-2, atol=3e-2)
    kernel_error = (got[3].double() - expected[3]).norm()
    original_error = (original[3].double() - expected[3]).norm()
    assert kernel_error <= 2 * original_error + 0.01 * expected[3].norm()


@pytest.mark.parametrize("residual", [False, True])
def test_fused_layer_gradcheck_on_cuda(residual):
    layer = eca_layer(16, 5).to("cuda", torch.float64)
    x = cuda_tensor((2, 16, 5, 4), torch.contiguous_format, torch.float64, 1).requires_grad_(True)
    shortcut = cuda_tensor((2, 16, 5, 4), torch.contiguous_format, torch.float64, 2).requires_grad_(True)
    if residual:
        assert torch.autograd.gradcheck(lambda a, b: layer.forward_add(a, b), (x, shortcut))
    else:
        assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_models_on_cuda_match_the_original_formulation(arch):
    torch.manual_seed(0)
    project = ARCHITECTURES[arch](num_classes=10)
    kernels = getattr(project, "kernel_sizes", None)
    original = original_model(arch, kernels, num_classes=10) if kernels else original_model(arch, num_classes=10)
    original.load_state_dict(project.state_dict())
    images = cuda_tensor((4, 3, 64, 64), torch.channels_last, torch.float64, 7)
    results = []
    for model in (project, original):
        model = model.to("cuda", torch.float64, memory_format=torch.channels_last).train()
        torch.manual_seed(1)  # MobileNetV2's dropout draws the same mask for both
        logits = model(images)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    for grad, expected in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-9)


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
