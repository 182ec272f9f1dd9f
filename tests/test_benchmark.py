"""scripts/benchmark.py runs end to end and prints what docs/performance.md quotes.

These check the output's shape and the summary arithmetic, never a speed: timings
on a shared machine belong in the benchmark's printout, not in an assertion.
"""
import re

import pytest
import torch

from benchmark import REFERENCE_ROLE, describe_allocator, format_profile, summarise

RATIO = r"\d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)"


def test_paired_ratios_compare_each_repetition_with_its_own_reference():
    # Repetition 2 is slow for everyone alike (a load spike); paired ratios ignore it.
    seconds = {REFERENCE_ROLE: [1.0, 3.0, 1.0], "project": [1.25, 3.75, 1.25]}
    measurement = summarise(seconds, images_per_repetition=10)
    assert measurement.rates == {REFERENCE_ROLE: 10.0, "project": 8.0}
    assert measurement.ratios["project"].median == pytest.approx(0.8)
    assert measurement.ratios["project"].low == pytest.approx(0.8)
    assert measurement.ratios["project"].high == pytest.approx(0.8)
    assert REFERENCE_ROLE not in measurement.ratios


def test_quartiles_stay_within_the_measured_ratios():
    seconds = {REFERENCE_ROLE: [1.0, 1.0], "project": [1.0, 2.0]}
    ratio = summarise(seconds, images_per_repetition=1).ratios["project"]
    assert 0.5 <= ratio.low <= ratio.median <= ratio.high <= 1.0


def test_allocator_settings_are_named_with_the_figures():
    assert describe_allocator({"HOME": "/root", "OMP_NUM_THREADS": "2"}) == "system default"
    environ = {"MALLOC_TRIM_THRESHOLD_": "4294967296", "LD_PRELOAD": "libjemalloc.so.2", "PATH": "/bin"}
    assert describe_allocator(environ) == "LD_PRELOAD=libjemalloc.so.2 MALLOC_TRIM_THRESHOLD_=4294967296"


@pytest.mark.slow
def test_model_benchmark_prints_every_mode_and_format_with_ratios(launch):
    result = launch(
        "scripts/benchmark.py", "model", "-a", "eca_resnet18", "--batch-size", "2", "--image-size", "32",
        "--repeats", "2", "--warmup", "1", "--control", timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^machine: CPU .*, allocator: \S", result.stdout, re.MULTILINE)
    rows = [line for line in result.stdout.splitlines() if line.startswith("eca_resnet18")]
    assert [row.split()[1:3] for row in rows] == [
        ["train", "NCHW"], ["train", "channels_last"], ["inference", "NCHW"], ["inference", "channels_last"]
    ]
    for row in rows:
        for role in ("project", "original", "control"):
            assert re.search(rf"{role}/tv {RATIO}", row), row


def test_loader_benchmark_ends_with_the_projects_rate(launch, tiny_data):
    result = launch(
        "scripts/benchmark.py", "loader", tiny_data, "-j", "1", "-b", "4", "--batches", "2", "--warmup", "1",
        "--repeats", "1", "--crop-size", "32", timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"original .* img/s", result.stdout)
    assert re.search(r"\d+(\.\d+)? img/s\s*$", result.stdout.strip().splitlines()[-1])


def test_model_benchmark_refuses_bad_arguments_in_one_line(launch):
    result = launch("scripts/benchmark.py", "model", "-a", "resnet51")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "resnet51" in result.stderr


@pytest.mark.slow
def test_profile_lists_operators_for_every_model(launch):
    result = launch(
        "scripts/benchmark.py", "profile", "-a", "eca_resnet18", "--batch-size", "2", "--image-size", "32",
        "--warmup", "1", "--steps", "1", "--modes", "train", "--formats", "NCHW", "--top", "1000", timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("operator"))
    assert header.split()[-3:] == ["project", "original", "torchvision"]
    table = lines[lines.index(header) + 1 :]
    assert table[-1].startswith("total")
    totals = [float(value) for value in table[-1].split()[1:]]
    assert len(totals) == 3 and all(total > 0 for total in totals)
    # The ECA layers' own work shows up: ops torchvision's ResNet-18 does not run at all.
    # (All operators are listed: on a busy machine timing noise can outrank them in a short list.)
    assert any(line.startswith("ECA") or "addcmul" in line for line in table[:-1])
    if not torch.cuda.is_available():  # the profiler's failed CUDA probe is not reported as an error
        assert "gpuGetDeviceCount" not in result.stderr


def test_profile_table_lists_the_largest_differences_first_then_totals():
    profiles = {
        "project": {"conv": 10.0, "eca": 3.0, "relu": 1.0},
        "original": {"conv": 10.0, "mul": 5.0, "relu": 1.0},
        REFERENCE_ROLE: {"conv": 9.5, "relu": 1.2},
    }
    lines = format_profile(profiles, top=2)
    assert lines[0].split()[-3:] == ["project", "original", REFERENCE_ROLE]
    assert [line.split()[0] for line in lines[1:]] == ["eca", "conv", "total"]
    assert [float(value) for value in lines[-1].split()[1:]] == [14.0, 16.0, 10.7]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["model", "-a", "eca_resnet18", "--ksize", "35x7"], "'x' is not an integer"),
        (["profile", "-a", "eca_mobilenet_v2", "--ksize", "4"], "not a positive odd integer"),
        (["model", "-a", "eca_resnet18", "--eca-impl", "fast"], "invalid choice: 'fast'"),
    ],
)
def test_bad_kernel_sizes_are_one_line_not_a_traceback(launch, arguments, message):
    result = launch("scripts/benchmark.py", *arguments, "--batch-size", "2", "--image-size", "32")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["model", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["model", "--repeats", "0"], "--repeats must be a positive integer"),
        (["model", "--device", "foo"], "--device 'foo' is not a device"),
        (["profile", "--steps", "0"], "--steps must be a positive integer"),
    ],
)
def test_bad_numbers_and_devices_are_one_line(launch, arguments, message):
    result = launch("scripts/benchmark.py", *arguments)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"benchmark.py: error: {message}")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["-b", "0"], "--batch-size must be a positive integer"),
        (["--batches", "0"], "--batches must be a positive integer"),
        (["-b", "100000"], "is more than the"),
    ],
)
def test_loader_refuses_batches_it_could_never_deliver(launch, tiny_data, arguments, message):
    result = launch("scripts/benchmark.py", "loader", tiny_data, *arguments, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
