"""Runs that outlive their processes: --resume auto, elastic restarts, another number of processes, no run replaced.

A cluster job restarts with the command it started with, so that command must
continue the run wherever it stands, and the same command typed twice must not
destroy the first run.
"""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from torch.distributed import TCPStore
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from background import ROOT, Run, children, max_difference, torchrun_command
from engine.checkpoint import read_checkpoint
from engine.state import SaveSchedule

TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]
# tiny_data: 24 train images, so a global batch of 8 makes 3 steps an epoch.
RUN = ["-a", "eca_resnet18", "-b", "8", "--lr", "0.01", "--seed", "1", "-p", "1", "-j", "0", *TINY]
TOLERANCE = 1e-6


def refusal(out):
    return (f"main.py: error: {out} holds a run already (checkpoint.pth.tar): continue it with --resume auto, "
            "train into another folder with --output-dir DIR, or replace it with --overwrite\n")


def folder_state(folder):
    return {name: (os.stat(folder / name).st_mtime_ns, (folder / name).read_bytes()) for name in os.listdir(folder)}


def test_a_new_run_into_a_folder_that_holds_a_run_stops_before_touching_it(launch, tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth.tar").write_bytes(b"days of work")  # only its presence counts: nothing reads it
    (out / "metrics.csv").write_text("epoch,lr\n0,0.1\n")
    before = folder_state(out)
    result = launch("main.py", *RUN, "--epochs", 1, "--output-dir", out, tiny_data)
    assert (result.returncode, result.stderr) == (2, refusal(out))
    assert folder_state(out) == before


@pytest.mark.parametrize("flags, message", [
    (["--resume", "auto", "--overwrite"], "--resume continues a run and --overwrite replaces it"),
    (["-e", "--resume", "auto"], "-e --resume auto: name the checkpoint to evaluate"),
    (["--save-every-steps", "0"], "--save-every-steps must be a positive integer"),
    (["--save-every-minutes", "0"], "--save-every-minutes must be positive"),
])
def test_contradictory_or_empty_resume_and_save_flags_are_one_line(launch, tiny_data, tmp_path, flags, message):
    result = launch("main.py", *RUN, *flags, "--output-dir", tmp_path / "run", tiny_data)
    assert result.returncode == 2 and result.stderr.startswith(f"main.py: error: {message}"), result.stderr
    assert not (tmp_path / "run").exists()


def epochs_in_csv(out):
    with open(out / "metrics.csv") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def curve_steps(out, tag="val/prec1"):
    events = EventAccumulator(str(out))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


@pytest.mark.slow
def test_resume_auto_starts_afresh_then_continues_the_curves_and_rows_without_repeating_them(launch, tiny_data,
                                                                                             tmp_path):
    out = tmp_path / "run"
    first = launch("main.py", *RUN, "--epochs", 1, "--resume", "auto", "--output-dir", out, tiny_data)
    assert first.returncode == 0, first.stderr
    assert f"=> --resume auto: no {out / 'checkpoint.pth.tar'} yet, starting afresh" in first.stdout
    after_epoch_0 = tmp_path / "after_epoch_0.pth.tar"
    shutil.copy(out / "checkpoint.pth.tar", after_epoch_0)
    again = launch("main.py", *RUN, "--epochs", 2, "--resume", "auto", "--output-dir", out, tiny_data)
    assert again.returncode == 0, again.stderr
    assert f"=> resumed '{out / 'checkpoint.pth.tar'}' at epoch 1, batch 0" in again.stdout
    # An older checkpoint of the same folder: epoch 1 is trained again, and its row and points replaced.
    older = launch("main.py", *RUN, "--epochs", 2, "--resume", after_epoch_0, "--output-dir", out, tiny_data)
    assert older.returncode == 0, older.stderr
    assert epochs_in_csv(out) == [0, 1]
    assert curve_steps(out) == [0, 1]
    assert curve_steps(out, "train/loss") == [0, 1]


@pytest.mark.slow
def test_overwrite_replaces_the_folders_run_and_its_curves(launch, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert launch("main.py", *RUN, "--epochs", 2, "--output-dir", out, tiny_data).returncode == 0
    refused = launch("main.py", *RUN, "--epochs", 1, "--seed", 2, "--output-dir", out, tiny_data)
    assert refused.returncode == 2
    replaced = launch("main.py", *RUN, "--epochs", 1, "--seed", 2, "--overwrite", "--output-dir", out, tiny_data)
    assert replaced.returncode == 0, replaced.stderr
    assert f"=> --overwrite: removed {out / 'checkpoint.pth.tar'}" in replaced.stdout
    ckpt = read_checkpoint(str(out / "checkpoint.pth.tar")).contents
    assert (ckpt["seed"], ckpt["epoch"]) == (2, 1)
    assert read_checkpoint(str(out / "model_best.pth.tar")).contents["seed"] == 2
    assert epochs_in_csv(out) == [0]
    assert curve_steps(out) == [0]  # the first run's epoch 1 is hidden, its epoch 0 replaced


def test_mid_epoch_saves_come_every_n_steps_or_every_m_minutes_after_the_last():
    assert [step for step in range(1, 10) if SaveSchedule(3, None).due(step)] == [3, 6, 9]
    assert not any(SaveSchedule(None, None).due(step) for step in range(1, 100))
    now = {"seconds": 0.0}
    timed = SaveSchedule(None, 2, clock=lambda: now["seconds"])

    def due_at(seconds):
        now["seconds"] = seconds
        due = timed.due(global_step=1)
        if due:
            timed.saved()
        return due

    assert [due_at(seconds) for seconds in (60, 119, 120, 150, 239, 250)] == [False, False, True, False, False, True]


# --- elastic restarts: a rank killed in mid-epoch, torchrun restarts the group, it resumes by itself ---


ELASTIC = [*RUN, "--epochs", "3", "--dist-timeout", "0.5", "--resume", "auto", "--save-every-steps", "2"]


def resumed_at(output):
    """(epoch, batch) of each ``=> resumed`` line."""
    return [(int(epoch), int(batch)) for epoch, batch in re.findall(r"=> resumed '.*' at epoch (\d+), batch (\d+)",
                                                                     output)]


@pytest.mark.slow
def test_a_rank_killed_in_mid_epoch_is_restarted_and_the_run_ends_as_if_never_killed(tiny_data, tmp_path, runs):
    launcher = ["--max-restarts", "3"]
    reference = runs(command=torchrun_command(*ELASTIC, "--output-dir", tmp_path / "reference", tiny_data,
                                              launcher=launcher))
    assert reference.finish(timeout=300) == 0, reference.output
    killed = runs(command=torchrun_command(*ELASTIC, "--output-dir", tmp_path / "killed", tiny_data,
                                           launcher=launcher))
    killed.wait_for_line("Epoch: [1][1/3]")  # global step 5: the save after step 4 is written
    os.kill(children(killed.process.pid)[1], signal.SIGKILL)
    assert killed.finish(timeout=400) == 0, killed.output

    assert resumed_at(reference.output) == []
    [point] = resumed_at(killed.output)
    assert point >= (1, 1), killed.output  # from the last save, not from the start
    final = read_checkpoint(str(tmp_path / "killed" / "checkpoint.pth.tar"))
    expected = read_checkpoint(str(tmp_path / "reference" / "checkpoint.pth.tar"))
    assert final.contents["epoch"] == 3
    assert max_difference(final.state_dict, expected.state_dict) <= TOLERANCE
    assert epochs_in_csv(tmp_path / "killed") == [0, 1, 2]


def as_torchrun_starts(rank, attempt, store_port):
    """The environment torchrun gives process ``rank`` of a 2-process group on its ``attempt``-th start."""
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store_port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": str(attempt), "TORCHELASTIC_MAX_RESTARTS": "3"}


@pytest.mark.slow
def test_a_restarted_group_keeps_clear_of_the_dead_groups_keys_in_torchruns_store(tiny_data, tmp_path, runs):
    # torchrun keeps one store for the whole job, and each restarted group joins through it. Here the test
    # is torchrun: it hosts the store, and starts the second group's rank 1 late. Had that group shared the
    # first group's keys, its rank 0 would dial the first group's rank 1, which has exited, and fail.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def start(rank, attempt):
        command = [sys.executable, os.path.join(ROOT, "main.py"), *RUN, "--epochs", "1", "--dist-timeout", "1",
                   "--output-dir", tmp_path / f"attempt{attempt}", tiny_data]
        return runs(command=[str(part) for part in command], env=as_torchrun_starts(rank, attempt, store.port))

    first = [start(rank, attempt=0) for rank in (0, 1)]
    assert [run.finish(timeout=180) for run in first] == [0, 0], first[0].output + first[1].output
    rank0 = start(0, attempt=1)
    try:
        rank0.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    assert rank0.process.poll() is None, rank0.output  # waiting for its own group's rank 1, not failed
    rank1 = start(1, attempt=1)
    assert (rank0.finish(timeout=180), rank1.finish(timeout=180)) == (0, 0), rank0.output + rank1.output
    assert "Epoch 0 done" in rank0.output


# --- resumed by another number of processes: every image of the epoch trained once ---------------------


def trained_samples(output):
    """{epoch: [dataset index, ...]} from the ``--log-samples`` lines of every rank."""
    trained = {}
    for epoch, indices in re.findall(r"^samples: epoch (\d+) step \d+ rank \d+ trained \[([\d, ]*)\]$", output,
                                     flags=re.M):
        trained.setdefault(int(epoch), []).extend(int(index) for index in indices.split(","))
    return trained


@pytest.fixture(scope="module")
def stopped_by_two_processes(tiny_data, tmp_path_factory):
    """Two processes (4 images each a step) stopped by SIGTERM in epoch 1, and what each step trained."""
    out = tmp_path_factory.mktemp("two") / "run"
    run = Run(torchrun_command(*RUN, "--epochs", 2, "--log-samples", "--output-dir", out, tiny_data))
    try:
        run.wait_for_line("Epoch: [1][0/3]")
        run.send(signal.SIGTERM)
        assert run.finish(timeout=120) != 0
    finally:
        if run.process.poll() is None:
            run.kill_all()
    assert run.output.count("stopped by SIGTERM at epoch 1, batch") == 2, run.output
    return out, trained_samples(run.output)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [8, 4])
def test_one_process_resumes_two_processes_epoch_training_every_image_once(stopped_by_two_processes, launch,
                                                                            tiny_data, tmp_path, batch):
    stopped, before = stopped_by_two_processes
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    saved = read_checkpoint(str(out / "checkpoint.pth.tar")).contents
    assert (saved["epoch"], saved["world_size"]) == (1, 2) and 0 < saved["samples_done"] < 24

    resumed = launch("main.py", *RUN, "-b", batch, "--epochs", 2, "--log-samples", "--resume", "auto",
                     "--output-dir", out, tiny_data)
    assert resumed.returncode == 0, resumed.stderr
    after = trained_samples(resumed.stdout)
    assert sorted(before[0]) == list(range(24))
    assert sorted(before[1] + after[1]) == list(range(24))  # epoch 1: each image once, across both runs
    assert len(before[1]) == saved["samples_done"]
    step = saved["samples_done"] // batch
    assert f"at epoch 1, batch {step}" in resumed.stdout
    if batch != 8:  # another global batch: the step count in the epoch changes, and it is said
        assert f"=> the checkpoint's run of 2 process(es) trained {saved['samples_done']} images of epoch 1" \
            in resumed.stdout
    assert read_checkpoint(str(out / "checkpoint.pth.tar")).contents["epoch"] == 2
