"""Faults, done for real: SIGTERM/SIGINT, kill -9 while training and while saving, DDP ranks that stop or die.

Nothing may be lost: a stopped run leaves a checkpoint that --resume continues
to the same weights as a run never stopped, and a killed one leaves the
previous checkpoint intact and loadable.
"""
import glob
import hashlib
import os
import signal
import time

import pytest

from background import Run, children, max_difference, torchrun_command
from conftest import ROOT
from engine.checkpoint import read_checkpoint
from make_demo_data import make_demo_dataset

TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]
# 48 train images at -b 8: 6 steps an epoch; 48 val images: 6 validation batches.
STEPS = 6
RESNET = ["-a", "eca_resnet18", "--epochs", "2", "-b", "8", "--seed", "1", "-p", "1", *TINY]
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume_data"))
    make_demo_dataset(root, num_classes=3, train_per_class=16, val_per_class=16)
    return root


def momentum(ckpt):
    return {str(k): v["momentum_buffer"] for k, v in ckpt.contents["optimizer"]["state"].items()}


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def temporary_files(folder):
    return glob.glob(os.path.join(str(folder), "*.tmp"))


# --- SIGTERM / SIGINT: stop at a step boundary, save, resume exactly -----------------------------


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The reference: the same run, never stopped (no loader workers)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run = Run.script("main.py", *RESNET, "-j", "0", "--output-dir", out, data)
    assert run.finish(timeout=600) == 0, run.output
    return out


STOPS = {
    # moment: (line to wait for, signal, workers before the stop, workers after it)
    "SIGTERM mid-epoch 0": (f"Epoch: [0][1/{STEPS}]", signal.SIGTERM, 2, 1),
    "SIGINT mid-epoch 0": (f"Epoch: [0][2/{STEPS}]", signal.SIGINT, 1, 0),
    "SIGTERM while validating epoch 0": ("Test: [1/", signal.SIGTERM, 0, 2),
    "SIGTERM mid-epoch 1": (f"Epoch: [1][3/{STEPS}]", signal.SIGTERM, 0, 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(STOPS))
def test_stopped_run_saves_exits_nonzero_and_resumes_to_identical_weights(uninterrupted, data, tmp_path, runs, moment):
    line, signum, workers, workers_after = STOPS[moment]
    out = tmp_path / "out"
    run = runs("main.py", *RESNET, "-j", workers, "--output-dir", out, data)
    run.wait_for_line(line)
    sent = run.send(signum)
    returncode = run.finish()
    stopped_after = time.monotonic() - sent

    assert returncode == 128 + signum, run.output
    assert stopped_after < 20, f"took {stopped_after:.1f}s to stop"
    assert "Traceback" not in run.output, run.output
    assert f"--resume {out / 'checkpoint.pth.tar'}" in run.output
    saved = read_checkpoint(str(out / "checkpoint.pth.tar")).contents
    stopped_at = saved["epoch"] * STEPS + saved["batches_done"]
    assert 0 < stopped_at < 2 * STEPS, (saved["epoch"], saved["batches_done"])

    resumed = runs("main.py", *RESNET, "-j", workers_after, "--output-dir", out, "--resume", out / "checkpoint.pth.tar",
                   data)
    assert resumed.finish() == 0, resumed.output
    assert f"=> resumed '{out / 'checkpoint.pth.tar'}' at epoch {saved['epoch']}, batch {saved['batches_done']}" \
        in resumed.output
    reference = read_checkpoint(str(uninterrupted / "checkpoint.pth.tar"))
    final = read_checkpoint(str(out / "checkpoint.pth.tar"))
    assert max_difference(final.state_dict, reference.state_dict) <= TOLERANCE
    assert max_difference(momentum(final), momentum(reference)) <= TOLERANCE
    assert final.contents["best_prec1"] == pytest.approx(reference.contents["best_prec1"], abs=1e-9)


MOBILENET = ["-a", "eca_mobilenet_v2", "--epochs", "2", "-b", "8", "--seed", "3", "-p", "1", "--model-ema",
             "--model-ema-steps", "2", "--lr", "0.01", *TINY]


@pytest.mark.slow
def test_mobilenet_with_dropout_and_ema_resumes_to_identical_weights(data, tmp_path, runs):
    """Dropout draws on the global RNG and the EMA is state of its own: both must survive a stop."""
    reference = runs("light_main.py", *MOBILENET, "-j", "0", "--output-dir", tmp_path / "a", data)
    stopped = runs("light_main.py", *MOBILENET, "-j", "2", "--output-dir", tmp_path / "b", data)
    stopped.wait_for_line(f"Epoch: [0][2/{STEPS}]")
    stopped.send(signal.SIGTERM)
    assert stopped.finish() == 128 + signal.SIGTERM, stopped.output
    assert reference.finish() == 0, reference.output
    resumed = runs("light_main.py", *MOBILENET, "-j", "1", "--output-dir", tmp_path / "b",
                   "--resume", tmp_path / "b" / "checkpoint.pth.tar", data)
    assert resumed.finish() == 0, resumed.output

    a = read_checkpoint(str(tmp_path / "a" / "checkpoint.pth.tar")).contents
    b = read_checkpoint(str(tmp_path / "b" / "checkpoint.pth.tar")).contents
    assert max_difference(a["state_dict"], b["state_dict"]) <= TOLERANCE
    assert max_difference(a["model_ema"], b["model_ema"]) <= TOLERANCE
    assert a["model_ema"]["n_averaged"].item() == b["model_ema"]["n_averaged"].item() > 0


# --- kill -9: the previous checkpoint survives, whatever the moment ------------------------------


def checkpoint_writes(folder, name="checkpoint.pth.tar"):
    return glob.glob(os.path.join(str(folder), f"{name}.*.tmp"))


KILLS = {
    # moment: what to wait for once the first checkpoint exists
    "while checkpoint.pth.tar is being rewritten": lambda out: checkpoint_writes(out),
    "while model_best.pth.tar is being copied": lambda out: checkpoint_writes(out, "model_best.pth.tar"),
    "0.3 s after the first checkpoint": None,
    "1.1 s after the first checkpoint": None,
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILLS))
def test_kill_9_leaves_the_previous_checkpoint_intact_and_loadable(data, tmp_path, runs, moment):
    out = tmp_path / "out"
    checkpoint = out / "checkpoint.pth.tar"
    run = runs("main.py", *RESNET, "--epochs", "6", "-j", "0", "--output-dir", out, data)
    run.wait_for(checkpoint.exists, "first checkpoint")
    if KILLS[moment] is not None:
        # The second epoch's save: the file being replaced is a complete, loadable checkpoint.
        run.wait_for(lambda: not checkpoint_writes(out, "model_best.pth.tar"), "the first save to end")
        first = digest(checkpoint)
        run.wait_for(lambda: KILLS[moment](out), moment)
    else:
        time.sleep(float(moment.split()[0]))
        first = None
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL

    ckpt = read_checkpoint(str(checkpoint))
    assert ckpt.contents["epoch"] >= 1 and set(ckpt.contents) >= {"state_dict", "optimizer", "rng", "batches_done"}
    if moment == "while checkpoint.pth.tar is being rewritten":
        assert digest(checkpoint) == first  # the write in progress did not touch it
    if (out / "model_best.pth.tar").exists():
        read_checkpoint(str(out / "model_best.pth.tar"))


@pytest.mark.slow
def test_resume_after_kill_9_mid_save_continues_and_clears_the_dead_write(data, tmp_path, runs):
    out = tmp_path / "out"
    checkpoint = out / "checkpoint.pth.tar"
    run = runs("main.py", *RESNET, "-j", "0", "--output-dir", out, data)
    run.wait_for(lambda: checkpoint.exists() and checkpoint_writes(out, "model_best.pth.tar"), "the first best copy")
    run.send(signal.SIGKILL)
    run.finish()
    assert temporary_files(out), "the kill was meant to leave a half-written file behind"

    resumed = runs("main.py", *RESNET, "-j", "0", "--output-dir", out, "--resume", checkpoint, data)
    assert resumed.finish() == 0, resumed.output
    assert read_checkpoint(str(checkpoint)).epoch == 2
    assert temporary_files(out) == []


# --- DDP on the CPU: every rank stops, a dead rank ends the job ----------------------------------


DDP = [*RESNET, "-j", "0", "--dist-timeout", "1"]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_with_a_checkpoint(data, tmp_path, runs):
    out = tmp_path / "out"
    run = runs(command=torchrun_command(*DDP, "--output-dir", out, data))
    run.wait_for_line(f"Epoch: [0][1/{STEPS}]")  # 24 images a rank at 4 a batch
    sent = run.send(signal.SIGTERM)
    returncode = run.finish(timeout=120)
    assert returncode != 0, run.output
    assert time.monotonic() - sent < 60
    assert run.output.count("stopped by SIGTERM") == 2, run.output  # both ranks stopped themselves
    ckpt = read_checkpoint(str(out / "checkpoint.pth.tar")).contents
    assert ckpt["epoch"] == 0 and 0 < ckpt["batches_done"] < STEPS


RANK_FAULTS = {
    # fault: (signal to one rank, seconds the job may take to end)
    "a rank killed with SIGKILL": (signal.SIGKILL, 60),
    # A stopped process keeps its sockets open: only the 15 s --dist-timeout ends the wait, then torchrun
    # gives the stopped rank 30 s before its SIGKILL.
    "a rank that hangs (SIGSTOP)": (signal.SIGSTOP, 120),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(RANK_FAULTS))
def test_a_rank_that_dies_or_hangs_ends_the_job_with_a_message(data, tmp_path, runs, fault):
    signum, bound = RANK_FAULTS[fault]
    out = tmp_path / "out"
    run = runs(command=torchrun_command(*DDP, "--epochs", "50", "--dist-timeout", "0.25", "--output-dir", out, data))
    run.wait_for_line(f"Epoch: [0][1/{STEPS}]")
    ranks = children(run.process.pid)
    assert len(ranks) == 2
    struck = time.monotonic()
    os.kill(ranks[1], signum)
    returncode = run.finish(timeout=bound + 60)
    assert returncode != 0
    assert time.monotonic() - struck < bound
    assert "main.py: error: rank 0: another process of the job died or stopped answering" in run.output, run.output
    assert f"--resume {out / 'checkpoint.pth.tar'}" in run.output
    assert "[rank0]: Traceback" not in run.output


@pytest.mark.slow
def test_batch_that_does_not_divide_over_the_ranks_is_refused_before_anything_is_written(data, tmp_path, runs):
    out = tmp_path / "out"
    run = runs(command=torchrun_command(*DDP, "-b", "7", "--output-dir", out, data))
    assert run.finish(timeout=150) != 0
    assert "-b 7 does not divide over the 2 processes of this machine: use a multiple of 2" in run.output
    assert 'File "' + os.path.join(ROOT, "engine") not in run.output  # torchrun's own report aside, no traceback
    assert not out.exists()
