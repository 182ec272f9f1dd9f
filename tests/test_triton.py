"""The Triton ECA block end against the plain modules, on the CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so every
check runs in one subprocess (this file run as a script, which prints each
check's outcome as JSON) and each test here reports one check. To run checks
by hand: ``TRITON_INTERPRET=1 python tests/test_triton.py [NAME ...]``.

The reference is the plain modules in float64 (``BatchNorm2d``, the paper's
ECA layer, add, ReLU) on deep copies of the same modules. ``tests/test_cuda.py``
runs the same cases on a GPU.
"""
import collections
import copy
import json
import os
import subprocess
import sys
import traceback
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.eca_module import eca_layer  # noqa: E402
from models.fused.dispatch import reference_block_end  # noqa: E402

MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
RELATIVE_TOLERANCE = 1e-4

# name -> the block end's settings. Together they cover both layouts, odd, even and 1x1 maps,
# maps longer than one tile, channel blocks whose taps reach across program boundaries,
# k = 1..9 (and k beyond C), training and evaluation, and each block kind's end:
# ResNet (shortcut and ReLU), residual MobileNetV2 (shortcut), plain MobileNetV2 (neither).
RESNET = dict(shortcut=True, relu=True)
MOBILENET_RESIDUAL = dict(shortcut=True, relu=False)
MOBILENET = dict(shortcut=False, relu=False)
BLOCK_END_CASES: Dict[str, dict] = {
    "resnet-k3-nchw-odd-train": dict(shape=(2, 8, 5, 7), k=3, layout="nchw", train=True, **RESNET),
    "resnet-k3-cl-odd-train": dict(shape=(2, 8, 5, 7), k=3, layout="channels_last", train=True, **RESNET),
    "resnet-k5-nchw-even-eval": dict(shape=(3, 16, 4, 6), k=5, layout="nchw", train=False, **RESNET),
    "resnet-k5-cl-even-eval": dict(shape=(3, 16, 4, 6), k=5, layout="channels_last", train=False, **RESNET),
    "resnet-k1-cl-odd-train": dict(shape=(2, 12, 3, 5), k=1, layout="channels_last", train=True, **RESNET),
    "resnet-k7-nchw-1x1-train": dict(shape=(4, 10, 1, 1), k=7, layout="nchw", train=True, **RESNET),
    "resnet-k3-cl-1x1-eval": dict(shape=(4, 10, 1, 1), k=3, layout="channels_last", train=False, **RESNET),
    "resnet-k5-nchw-40-channels-train": dict(shape=(3, 40, 5, 7), k=5, layout="nchw", train=True, **RESNET),
    "resnet-k9-cl-40-channels-train": dict(shape=(3, 40, 3, 3), k=9, layout="channels_last", train=True, **RESNET),
    "resnet-k3-nchw-long-map-train": dict(shape=(2, 4, 33, 35), k=3, layout="nchw", train=True, **RESNET),
    "resnet-k3-cl-long-map-train": dict(shape=(2, 4, 33, 35), k=3, layout="channels_last", train=True, **RESNET),
    "mobilenet-residual-k7-cl-odd-train": dict(shape=(2, 8, 5, 5), k=7, layout="channels_last", train=True,
                                               **MOBILENET_RESIDUAL),
    "mobilenet-residual-k7-nchw-even-eval": dict(shape=(2, 8, 4, 4), k=7, layout="nchw", train=False,
                                                 **MOBILENET_RESIDUAL),
    "mobilenet-k9-nchw-odd-train-c6": dict(shape=(2, 6, 3, 5), k=9, layout="nchw", train=True, **MOBILENET),
    "mobilenet-k9-cl-even-eval": dict(shape=(2, 12, 4, 2), k=9, layout="channels_last", train=False, **MOBILENET),
    "mobilenet-k1-nchw-even-eval": dict(shape=(2, 8, 2, 4), k=1, layout="nchw", train=False, **MOBILENET),
    "mobilenet-k3-cl-column-map-train": dict(shape=(3, 8, 5, 1), k=3, layout="channels_last", train=True,
                                             **MOBILENET),
    "relu-without-shortcut-k3-nchw-train": dict(shape=(2, 8, 3, 4), k=3, layout="nchw", train=True,
                                                shortcut=False, relu=True),
    "shortcut-and-gradient-in-the-other-layout": dict(shape=(2, 8, 3, 5), k=5, layout="channels_last", train=True,
                                                      other_layouts=True, **RESNET),
    "mean-far-from-zero-train": dict(shape=(2, 8, 6, 6), k=3, layout="nchw", train=True, offset=3000.0, **RESNET),
    "momentum-none-two-steps": dict(shape=(2, 8, 3, 3), k=3, layout="channels_last", train=True, steps=2,
                                    norm_options=dict(momentum=None), **RESNET),
    "momentum-0.3-two-steps": dict(shape=(2, 8, 3, 3), k=5, layout="nchw", train=True, steps=2,
                                   norm_options=dict(momentum=0.3), **MOBILENET_RESIDUAL),
    "no-affine-no-running-stats-train": dict(shape=(2, 8, 3, 3), k=3, layout="nchw", train=True,
                                             norm_options=dict(affine=False, track_running_stats=False), **RESNET),
    "one-sample-eval": dict(shape=(1, 8, 3, 5), k=3, layout="nchw", train=False, **RESNET),
    "no-running-stats-eval-uses-the-batch": dict(shape=(2, 8, 3, 3), k=3, layout="channels_last", train=False,
                                                 norm_options=dict(track_running_stats=False), **MOBILENET),
}


def randomised_modules(channels: int, k: int, seed: int, **norm_options) -> Tuple[nn.BatchNorm2d, nn.Module]:
    """A BatchNorm and an ECA layer with every parameter and buffer drawn from ``seed`` (not the defaults)."""
    generator = torch.Generator().manual_seed(seed)
    norm, eca = nn.BatchNorm2d(channels, **norm_options), eca_layer(channels, k)
    with torch.no_grad():
        eca.conv.weight.copy_(torch.randn(1, 1, k, generator=generator))
        if norm.affine:
            norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(channels, generator=generator) * 0.5)
        if norm.track_running_stats:
            norm.running_mean.copy_(torch.randn(channels, generator=generator))
            norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return norm, eca


def assert_relatively_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within ``RELATIVE_TOLERANCE`` of the largest expected magnitude, element by element."""
    scale = expected.abs().max().item()
    tolerance = RELATIVE_TOLERANCE * scale
    error = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert error <= tolerance, f"{what}: off by {error:.3g}, more than {RELATIVE_TOLERANCE} of {scale:.3g}"


def block_end_matches_plain(shape, k, layout, train, shortcut, relu, other_layouts=False, offset=0.0, steps=1,
                            norm_options=None, device="cpu", seed=0) -> None:
    """Forward, every gradient and BatchNorm's buffers of ``block_end`` against the float64 plain formulation."""
    from models.fused.triton import block_end

    norm, eca = randomised_modules(shape[1], k, seed, **(norm_options or {}))
    norm, eca = norm.to(device).train(train), eca.to(device)
    plain_norm, plain_eca = copy.deepcopy(norm).double(), copy.deepcopy(eca).double()
    memory_format = MEMORY_FORMATS[layout]
    other_format = MEMORY_FORMATS["nchw" if layout == "channels_last" else "channels_last"]
    for step in range(steps):
        generator = torch.Generator().manual_seed(seed + 1 + step)
        draws = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
        x = (draws[0] * 2 + offset).to(device, torch.float32).contiguous(memory_format=memory_format)
        residual = draws[1].to(device, torch.float32)
        residual = residual.contiguous(memory_format=other_format if other_layouts else memory_format)
        grad_out = draws[2].to(device, torch.float32).contiguous(memory_format=other_format if other_layouts else
                                                                 memory_format)
        inputs = [x.requires_grad_()] + ([residual.requires_grad_()] if shortcut else [])
        plain_inputs = [t.detach().double().requires_grad_() for t in inputs]
        out = block_end(inputs[0], norm, eca, inputs[1] if shortcut else None, relu)
        expected = reference_block_end(plain_inputs[0], plain_norm, plain_eca, plain_inputs[1] if shortcut else None, relu)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=memory_format), "output layout"
        assert_relatively_close(out, expected, f"step {step} output")
        named = [(f"{owner}.{n}", p) for owner, module in (("norm", norm), ("eca", eca))
                 for n, p in module.named_parameters()]
        plain_parameters = [*plain_norm.parameters(), *plain_eca.parameters()]
        got = torch.autograd.grad(out, inputs + [p for _, p in named], grad_out)
        wanted = torch.autograd.grad(expected, plain_inputs + plain_parameters, grad_out.double())
        names = ["x", "shortcut"][: len(inputs)] + [n for n, _ in named]
        for name, a, b in zip(names, got, wanted):
            assert_relatively_close(a, b, f"step {step} gradient of {name}")
        for (name, buffer), plain_buffer in zip(norm.named_buffers(), plain_norm.buffers()):
            if buffer.is_floating_point():
                assert_relatively_close(buffer, plain_buffer, f"step {step} {name}")
            else:
                assert torch.equal(buffer.cpu(), plain_buffer.cpu()), f"step {step} {name}: {buffer} != {plain_buffer}"


class Block(nn.Module):
    """A block's end around :func:`block_end`, for compile and export."""

    def __init__(self, channels: int, k: int, seed: int = 0):
        super().__init__()
        self.norm, self.eca = randomised_modules(channels, k, seed)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        from models.fused.triton import block_end

        return block_end(x, self.norm, self.eca, shortcut, relu=True)


def compiled_training_matches_eager(device: str = "cpu", backend: str = "aot_eager", shape=(2, 8, 5, 5)) -> None:
    """``torch.compile(fullgraph=True)`` (no graph break) trains a block as eager does, buffers included.

    Under the interpreter ``aot_eager`` runs AOTAutograd's graphs, the custom
    ops in them (Inductor works too, at ten times the compile time; the fake
    kernels' agreement with the real ones is :func:`ops_pass_opcheck`'s);
    on a GPU Inductor itself is tested.
    """
    torch._dynamo.reset()
    eager = Block(shape[1], 3).to(device)
    compiled_block = copy.deepcopy(eager)
    compiled = torch.compile(compiled_block, backend=backend, fullgraph=True)
    generator = torch.Generator().manual_seed(5)
    for step in range(2):
        x, shortcut = (torch.randn(shape, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
                       for _ in range(2))
        results = []
        for model in (eager, compiled):
            inputs = [x.clone().requires_grad_(), shortcut.clone().requires_grad_()]
            out = model(*inputs)
            out.square().sum().backward()
            results.append([out, *(t.grad for t in inputs)])
        for what, a, b in zip(("output", "grad x", "grad shortcut"), *results):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"step {step} {what}")
    for (name, a), b in zip(eager.named_parameters(), compiled_block.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6, msg=f"gradient of {name}")
    for (name, a), b in zip(eager.named_buffers(), compiled_block.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def export_records_the_ops() -> None:
    """``torch.export`` keeps ``eca::block_end`` (and in training the buffer update) as ops, and runs them."""
    block = Block(8, 5)
    x, shortcut = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    for training, expected_ops in ((True, {"eca.block_end", "eca.update_running_stats"}), (False, {"eca.block_end"})):
        block.train(training)
        exported = torch.export.export(block, (x, shortcut))
        called = {str(node.target).rsplit(".", 1)[0] for node in exported.graph.nodes if node.op == "call_function"}
        assert expected_ops <= called, f"training={training}: the exported graph calls {sorted(called)}"
        reference = copy.deepcopy(block)
        torch.testing.assert_close(exported.module()(x, shortcut), reference(x, shortcut), rtol=1e-6, atol=1e-6)


def ops_pass_opcheck() -> None:
    """``torch.library.opcheck``: schemas, autograd registration, fake kernels (shapes, strides, dtypes) and AOTAutograd."""
    import models.fused.triton  # noqa: F401  (registers the eca:: ops)

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 3, 5, generator=generator).contiguous(memory_format=torch.channels_last).requires_grad_()
    shortcut = torch.randn(2, 8, 3, 5, generator=generator).requires_grad_()
    weight, bias = (torch.rand(8, generator=generator) + 0.5).requires_grad_(), torch.randn(8).requires_grad_()
    taps = torch.randn(1, 1, 3, generator=generator).requires_grad_()
    running = (torch.randn(8, generator=generator), torch.rand(8, generator=generator) + 0.5)
    training = (x, shortcut, weight, bias, taps, None, None, 1e-5, True)
    for args in (training, (x, None, weight, bias, taps, *running, 1e-5, False)):
        torch.library.opcheck(torch.ops.eca.block_end.default, args)
    out, mean, var, pair_deviation, gate = torch.ops.eca.block_end(*training)
    detached = [t.detach() for t in (x, out, weight, bias, taps)]
    grad = torch.randn(2, 8, 3, 5, generator=generator)
    torch.library.opcheck(torch.ops.eca.block_end_backward.default,
                          (grad, *detached, mean, var, pair_deviation, gate, 1e-5, True, True, True))
    torch.library.opcheck(torch.ops.eca.update_running_stats.default,
                          (*running, torch.tensor(1), mean, var, None, x.numel() // 8))


def one_value_per_channel_is_refused_as_batch_norm_refuses_it() -> None:
    from models.fused.triton import block_end

    norm, eca = randomised_modules(4, 3, 0)
    x = torch.randn(1, 4, 1, 1)
    for call in (lambda: norm(x), lambda: block_end(x, norm, eca, None, False)):
        try:
            call()
        except ValueError as error:
            assert "Expected more than 1 value per channel when training" in str(error)
        else:
            raise AssertionError("a batch of one value per channel was accepted")


def other_norms_are_refused() -> None:
    """SyncBatchNorm's statistics span processes: folding it would be silently wrong, so it is refused in words."""
    from models.fused.triton import block_end

    _, eca = randomised_modules(4, 3, 0)
    try:
        block_end(torch.randn(2, 4, 3, 3), nn.SyncBatchNorm(4), eca, None, True)
    except TypeError as error:
        assert "SyncBatchNorm" in str(error) and "\n" not in str(error), str(error)
    else:
        raise AssertionError("a SyncBatchNorm was folded")


CHECKS: Dict[str, Callable[[], None]] = {
    **{name: (lambda case=case: block_end_matches_plain(**case)) for name, case in BLOCK_END_CASES.items()},
    "compiled-training-matches-eager": compiled_training_matches_eager,
    "export-records-the-ops": export_records_the_ops,
    "ops-pass-opcheck": ops_pass_opcheck,
    "one-value-per-channel-is-refused": one_value_per_channel_is_refused_as_batch_norm_refuses_it,
    "other-norms-are-refused": other_norms_are_refused,
}


class CallCounter(TorchDispatchMode):
    """Counts the operators that reach the dispatcher, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def network_step(model: nn.Module, x: torch.Tensor, mode: str, backward: bool):
    """Output, gradients (with ``backward``) and floating buffers after one step on ``x``, and the operators run.

    ``mode``: ``train`` (batch statistics) or ``frozen`` (BatchNorm in eval
    mode, as in fine-tuning). The loss is a fixed random projection of the
    output, drawn in float64, so that networks of either precision are
    differentiated along the same direction.
    """
    model.train(mode == "train").zero_grad(set_to_none=True)
    counter = CallCounter()
    with counter, torch.set_grad_enabled(backward):
        out = model(x)
        if backward:
            projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
            (out * projection.to(out.device, out.dtype)).sum().backward()
    tensors = {"output": out.detach()}
    if backward:
        tensors.update({f"gradient of {n}": p.grad for n, p in model.named_parameters()})
    tensors.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return tensors, counter.counts


def relative_norm_error(result: torch.Tensor, expected: torch.Tensor, name: str, state: Dict[str, torch.Tensor]) -> float:
    """``|result - expected| / |expected|``; a running mean's error is measured against its channel's spread."""
    error = result.double() - expected
    if name.endswith("running_mean"):
        return (error / state[name.replace("running_mean", "running_var")].sqrt()).norm().item() / error.numel() ** 0.5
    return (error.norm() / expected.norm().clamp_min(1e-30)).item()


# The ECA blocks of each network: one eca::block_end each.
ECA_BLOCKS = {"eca_resnet18": 8, "eca_mobilenet_v2": 17}


def network_is_as_accurate_as_the_plain_one(arch: str, layout: str, mode: str, backward: bool, size: int,
                                            seed: int = 0, device: str = "cpu", batch: int = 2) -> None:
    """A step of a whole small network fused with ``impl="triton"``, held to the plain network in float64.

    Every output, gradient and buffer may be off by twice the plain float32
    network's error, plus 1e-4 (a running mean's error counts in its channel's
    standard deviations). Where BatchNorm takes batch statistics over few values
    (MobileNetV2's last 2 x 2 maps here), a gradient's rounding grows with every
    layer it passes, and two float32 computations of the step, each right to
    the last digits, can end far apart by chance: MobileNetV2 is therefore held
    to the plain network forward with batch statistics and for its gradients
    with BatchNorm frozen; its block ends' gradients with batch statistics are
    checked block by block (``mobilenet-*`` in ``BLOCK_END_CASES``).
    """
    import models
    from models import fuse_eca

    torch.manual_seed(seed)
    exact = models.ARCHITECTURES[arch](num_classes=10)
    if hasattr(exact, "classifier"):
        exact.classifier[0].p = 0.0  # dropout would draw different masks
    exact = exact.to(device, torch.float64, memory_format=MEMORY_FORMATS[layout])
    plain = copy.deepcopy(exact).float()
    fused = fuse_eca(copy.deepcopy(plain), impl="triton")
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    x = x.to(device).contiguous(memory_format=MEMORY_FORMATS[layout])
    expected, _ = network_step(exact, x, mode, backward)
    reference, _ = network_step(plain, x.float(), mode, backward)
    got, calls = network_step(fused, x.float(), mode, backward)
    assert calls["eca::block_end"] == ECA_BLOCKS[arch], dict(calls)
    assert calls["eca::block_end_backward"] == (ECA_BLOCKS[arch] if backward else 0), dict(calls)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        error, plain_error = (relative_norm_error(t[name], tensor, name, expected) for t in (got, reference))
        assert error <= 2 * plain_error + 1e-4, f"{name}: off by {error:.3g}, the plain network by {plain_error:.3g}"


# End to end: under the interpreter tens of seconds each.
SLOW_CHECKS: Dict[str, Callable[[], None]] = {
    f"{arch}-{layout}-{mode}-{'step' if backward else 'forward'}": (
        lambda args=(arch, layout, mode, backward, size): network_is_as_accurate_as_the_plain_one(*args)
    )
    for arch, layout, mode, backward, size in (
        ("eca_resnet18", "channels_last", "train", True, 64),
        ("eca_mobilenet_v2", "nchw", "train", False, 64),
        ("eca_mobilenet_v2", "nchw", "frozen", True, 32),
    )
}


def run_checks(names) -> Dict[str, Optional[str]]:
    """Each check's failure, as the last lines of its traceback, or None where it passed."""
    outcomes = {}
    for name in names:
        try:
            {**CHECKS, **SLOW_CHECKS}[name]()
            outcomes[name] = None
        except Exception:  # every failure is reported, with its traceback, by the test of that check
            outcomes[name] = "".join(traceback.format_exc().splitlines(keepends=True)[-12:])
    return outcomes


def run_interpreted(names) -> Dict[str, Optional[str]]:
    """Run the named checks in one subprocess under Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *names], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, f"the interpreted checks did not run:\n{result.stdout}\n{result.stderr}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def interpreted_outcomes() -> Dict[str, Optional[str]]:
    return run_interpreted(list(CHECKS))


@pytest.fixture(scope="module")
def slow_interpreted_outcomes() -> Dict[str, Optional[str]]:
    return run_interpreted(list(SLOW_CHECKS))


def assert_passed(name: str, outcomes: Dict[str, Optional[str]]) -> None:
    assert name in outcomes, f"{name} did not run"
    assert outcomes[name] is None, outcomes[name]


@pytest.mark.parametrize("name", list(CHECKS))
def test_under_the_interpreter(name, interpreted_outcomes):
    assert_passed(name, interpreted_outcomes)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CHECKS))
def test_whole_network_under_the_interpreter(name, slow_interpreted_outcomes):
    assert_passed(name, slow_interpreted_outcomes)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs a process without the interpreter")
def test_cpu_tensors_without_the_interpreter_get_one_line_saying_what_to_do():
    pytest.importorskip("triton")
    from models.fused.triton import block_end, unavailable_reason

    reason = unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "\n" not in reason
    norm, eca = randomised_modules(4, 3, 0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        block_end(torch.randn(2, 4, 3, 3), norm, eca, None, True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: these checks run the Triton kernels under the interpreter")
    print(json.dumps(run_checks(sys.argv[1:] or list(CHECKS))))
