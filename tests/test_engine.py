"""The training engine end to end: the real entry scripts as subprocesses on generated ImageFolders."""
import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script

SMALL = ["--train-crop-size", "48", "--val-resize-size", "56", "--val-crop-size", "48"]
TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]


def prec_lines(output: str):
    return re.findall(r"^ \* Prec@1 (\d+\.\d{3}) Prec@5 (\d+\.\d{3})$", output, flags=re.M)


def torchrun(*args, timeout=300):
    """Two processes under torchrun; on a timeout the whole process group goes, workers included."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """Three epochs of ECA-ResNet-18 at 48 px on the 4-class demo data."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_script(
        "main.py", "-a", "eca_resnet18", "--epochs", "3", "-b", "32", "--lr", "0.05", "--lr-scheduler", "cosine",
        "-j", "1", "-p", "2", "--seed", "0", *SMALL, "--output-dir", out, demo_data, check=True,
    )
    return out, result.stdout


@pytest.mark.slow
def test_training_learns_well_above_chance(trained):
    _, output = trained
    precs = [float(top1) for top1, _ in prec_lines(output)]
    assert len(precs) == 3
    assert max(precs) >= 60.0, output  # chance is 25% with 4 classes


@pytest.fixture(scope="module")
def best_evaluation(trained, demo_data, launch):
    """``-e --resume model_best.pth.tar`` at the run's sizes: (the Prec@1 lines, the run's best pair)."""
    out, output = trained
    result = launch("main.py", "-e", "--resume", out / "model_best.pth.tar", "-j", "1", *SMALL, demo_data)
    assert result.returncode == 0, result.stderr
    return prec_lines(result.stdout), max(prec_lines(output), key=lambda pair: float(pair[0]))


@pytest.mark.slow
def test_log_keeps_the_original_line_formats(trained):
    _, output = trained
    assert re.search(r"^Epoch: \[0\]\[0/6\]\tTime \d+\.\d{3} \(\d+\.\d{3}\)\tData .*\tLoss \d+\.\d{4} .*\tPrec@1 .*\tPrec@5 ",
                     output, flags=re.M), output
    assert "Epoch: [2][5/6]" in output
    assert "tensor(" not in output
    assert "batch 32 per process, 32 in all; lr 0.05" in output
    # Parameters in decimal millions and exactly: ECA-ResNet-18's 11,689,556 with a 4-class head.
    assert "=> eca_resnet18, ECA kernel sizes 3577, 4 classes, 11.18 million parameters (11,178,608)" in output
    assert "amp none, channels_last False, compile False, ECA impl auto; output " in output


@pytest.mark.slow
def test_run_writes_checkpoints_tensorboard_and_metrics(trained):
    out, output = trained
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "metrics.csv", "args.yaml"):
        assert (out / name).is_file(), name
    assert glob.glob(str(out / "events.out.tfevents.*"))
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert [f"{float(row['val_prec1']):.3f}" for row in rows] == [p for p, _ in prec_lines(output)]

    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    for key in ("epoch", "arch", "state_dict", "best_prec1", "optimizer", "lr_scheduler", "rng", "kernel_sizes",
                "class_names", "args", "seed"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 3 and ckpt["arch"] == "eca_resnet18"
    assert isinstance(ckpt["best_prec1"], float)
    assert ckpt["kernel_sizes"] == [3, 5, 7, 7]
    assert ckpt["class_names"] == ["n00000000_disc", "n00000001_square", "n00000002_triangle", "n00000003_stripes"]
    assert not any(key.startswith("module.") for key in ckpt["state_dict"])


@pytest.mark.slow
def test_evaluating_the_best_checkpoint_reproduces_its_prec1(trained, best_evaluation):
    out, _ = trained
    evaluated, best = best_evaluation
    assert evaluated == [best]
    assert not (out.parent / "runs").exists()


@pytest.mark.slow
def test_evaluation_defaults_to_the_sizes_the_checkpoint_was_validated_at(trained, best_evaluation, demo_data, launch):
    """Without size flags, -e --resume uses the run's 56/48, not ImageNet's 256/224, and so reproduces its Prec@1."""
    out, _ = trained
    result = launch("main.py", "-e", "--resume", out / "model_best.pth.tar", "-j", "1", demo_data)
    assert result.returncode == 0, result.stderr
    assert prec_lines(result.stdout) == [best_evaluation[1]]
    refused = launch("main.py", "-e", "--resume", out / "model_best.pth.tar", "--val-resize-size", "40", demo_data)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "main.py: error: --val-crop-size 48 is larger than --val-resize-size 40"


def save_in_original_release_format(state_dict, path, arch_tag):
    """What the authors released: legacy pickle, DataParallel prefixes, a tensor best_prec1, a wrong arch."""
    torch.save(
        {"epoch": 100, "arch": arch_tag, "state_dict": {"module." + k: v for k, v in state_dict.items()},
         "best_prec1": torch.tensor(70.92), "optimizer": {"state": {}, "param_groups": []}},
        path, _use_new_zipfile_serialization=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("with_arch", [True, False], ids=["with -a", "without -a"])
def test_release_format_checkpoint_evaluates_without_ksize(trained, best_evaluation, demo_data, tmp_path, launch,
                                                         with_arch):
    out, _ = trained
    state_dict = torch.load(out / "model_best.pth.tar", weights_only=True)["state_dict"]
    release = tmp_path / "eca_resnet18_k3577.pth.tar"
    save_in_original_release_format(state_dict, release, arch_tag="se_resnet18")
    arch = ["-a", "eca_resnet18"] if with_arch else []
    result = launch("main.py", *arch, "-e", "--resume", release, "-j", "1", *SMALL, demo_data)
    assert result.returncode == 0, result.stderr
    assert prec_lines(result.stdout) == best_evaluation[0]
    assert "se_resnet18" in result.stdout  # the wrong tag is pointed out, not trusted


@pytest.fixture
def odd_sized_val(demo_data, tmp_path):
    """The demo data with 61 validation images, which two processes cannot split evenly."""
    root = tmp_path / "odd"
    shutil.copytree(demo_data, root)
    for path in sorted(glob.glob(str(root / "val" / "*" / "*.JPEG")))[:3]:
        os.remove(path)
    return root


@pytest.mark.slow
def test_two_process_evaluation_counts_every_image_once(trained, odd_sized_val, launch):
    out, _ = trained
    args = ["main.py", "-e", "--resume", out / "model_best.pth.tar", "-j", "0", "-b", "16", *SMALL, odd_sized_val]
    single = launch(*args)
    assert single.returncode == 0, single.stderr
    double = torchrun(*args)
    assert double.returncode == 0, double.stderr
    assert prec_lines(double.stdout) == prec_lines(single.stdout)
    assert len(prec_lines(single.stdout)) == 1


@pytest.mark.slow
def test_torchrun_trains_on_the_cpu_with_gloo(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun("main.py", "-a", "eca_resnet18", "--epochs", "1", "-b", "8", "-j", "0", "-p", "1", "--seed", "3",
                      *TINY, "--output-dir", out, tiny_data)
    assert result.returncode == 0, result.stderr
    assert "2 process(es); batch 4 per process, 8 in all" in result.stdout
    assert len(prec_lines(result.stdout)) == 1
    assert (out / "checkpoint.pth.tar").is_file()


@pytest.mark.slow
def test_light_main_trains_eca_mobilenet_v2(tiny_data, tmp_path, launch):
    out = tmp_path / "mobile"
    result = launch("light_main.py", "--epochs", "1", "-b", "8", "-j", "0", *TINY, "--output-dir", out, tiny_data)
    assert result.returncode == 0, result.stderr
    assert "=> eca_mobilenet_v2, ECA kernel sizes 1,1,1,1,1,1,1,1,1,1,3,3,3,3,3,3,3, 3 classes, " in result.stdout
    assert "(exponential schedule)" in result.stdout and "lr 0.045" in result.stdout
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["arch"] == "eca_mobilenet_v2" and ckpt["kernel_sizes"] == [1] * 10 + [3] * 7


@pytest.mark.slow
def test_config_file_sets_defaults_and_flags_override_it(tiny_data, tmp_path, launch):
    config = tmp_path / "recipe.yaml"
    config.write_text("arch: eca_resnet18\nksize: '3333'\nepochs: 5\nbatch_size: 8\nlr: 0.2\nworkers: 0\n"
                      "train_crop_size: 32\nval_resize_size: 36\nval_crop_size: 32\n")
    out = tmp_path / "cfg"
    result = launch("main.py", "--config", config, "--epochs", "1", "--output-dir", out, tiny_data)
    assert result.returncode == 0, result.stderr
    assert "ECA kernel sizes 3333" in result.stdout and "lr 0.2" in result.stdout
    assert len(prec_lines(result.stdout)) == 1  # --epochs 1 beat the file's 5
    assert "epochs: 1" in (out / "args.yaml").read_text()


@pytest.mark.slow
def test_predict_names_the_classes_a_trained_demo_model_learned(trained, demo_data, launch):
    out, output = trained
    best = max(float(top1) for top1, _ in prec_lines(output))
    result = launch("scripts/predict.py", "--resume", out / "model_best.pth.tar", "--json", "--device", "cpu",
                    os.path.join(demo_data, "val"))
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert len(predictions) == 64
    right = sum(item["predictions"][0]["class"] == os.path.basename(os.path.dirname(item["image"]))
                for item in predictions)
    # predict.py decodes with PIL, the engine with libjpeg: the same images, so nearly the same accuracy.
    assert abs(100.0 * right / len(predictions) - best) <= 5.0
    assert right / len(predictions) >= 0.5


@pytest.mark.slow
def test_every_training_option_runs_together(tiny_data, tmp_path):
    out = tmp_path / "all"
    result = run_script(
        "main.py", "-a", "eca_resnet18", "--epochs", "2", "-b", "8", "-j", "0", *TINY, "--amp", "bf16",
        "--channels-last", "--model-ema", "--model-ema-steps", "1", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
        "--auto-augment", "ta_wide", "--label-smoothing", "0.1", "--clip-grad-norm", "1.0", "--warmup-epochs", "1",
        "--lr-scheduler", "cosine", "--output-dir", out, tiny_data, check=True,
    )
    assert len(prec_lines(result.stdout)) == 2
    assert result.stdout.count(" * EMA Prec@1 ") == 2
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["model_ema"] is not None and ckpt["lr_scheduler"]["kind"] == "cosine"
    for name, tensor in ckpt["state_dict"].items():
        assert torch.isfinite(tensor.float()).all(), name


@pytest.mark.slow
def test_a_terminal_gets_progress_bars_instead_of_batch_lines(tiny_data, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    # A real terminal has a size; tqdm draws nothing on a zero-column one.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    command = [sys.executable, os.path.join(ROOT, "main.py"), "-a", "eca_resnet18", "--epochs", "1", "-b", "8", "-j",
               "0", *TINY, "--output-dir", str(tmp_path / "tty"), tiny_data]
    process = subprocess.Popen(command, cwd=ROOT, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "Epoch 0:" in screen and "%|" in screen  # tqdm's bar
    assert "Epoch: [0][" not in screen  # the plain per-batch lines are for logs, not terminals
    assert " * Prec@1 " in screen  # the summary line is kept for everyone
