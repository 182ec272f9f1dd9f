"""Bad input, bad data and hostile files, done for real against the entry scripts.

Bad input must end in one line naming the problem and the fix, a non-zero exit,
no traceback, and nothing written. Unreadable images must not stop a run (unless
--strict-data). A checkpoint whose pickle would run code must be refused without
the code running.

Each bad-input case runs the real entry script in a fresh process, most of them
forked from conftest's launcher (torch imported already); a few cases also run
cold to show the two agree.
"""
import csv
import glob
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

import models
from conftest import ROOT, run_script
from engine.checkpoint import read_checkpoint

TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]
FAST = ["-a", "eca_resnet18", "--epochs", "1", "-b", "8", "-j", "0", "--seed", "1", "-p", "1", *TINY]


def assert_fails_cleanly(result, *fragments):
    """Non-zero exit, no traceback, and one error line on stderr that says each of ``fragments``."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def snapshot(folder):
    """Every file under ``folder`` with a digest of its bytes (None if the folder does not exist)."""
    if not os.path.exists(folder):
        return None
    files = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return files


# --- files to feed the scripts -------------------------------------------------------------------


def save_eca_checkpoint(path, arch="eca_resnet18", num_classes=3, **contents):
    """A checkpoint in this project's format (kernel sizes: the released ones, 3577 for ResNet-18)."""
    torch.manual_seed(0)
    model = models.ARCHITECTURES[arch](num_classes=num_classes)
    torch.save({"epoch": 1, "arch": arch, "state_dict": model.state_dict(), "best_prec1": 0.0, **contents}, path)
    return str(path)


class RunsCode:
    """Unpickling this creates ``marker``: a stand-in for any code a downloaded file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def save_malicious_checkpoint(path, marker):
    """A real ECA-ResNet-18 checkpoint that also carries a payload."""
    torch.manual_seed(0)
    state = models.eca_resnet18(num_classes=3).state_dict()
    torch.save({"epoch": 1, "arch": "eca_resnet18", "state_dict": state, "best_prec1": RunsCode(marker)}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and other files of every kind a user could pass by mistake."""
    root = tmp_path_factory.mktemp("files")
    made = {
        "missing": str(root / "no_such.pth.tar"),
        "random bytes": str(root / "random.pth.tar"),
        "a text file": str(root / "notes.pth.tar"),
        "an empty file": str(root / "empty.pth.tar"),
        "a folder": str(root / "folder.pth.tar"),
        "ECA-ResNet-18": save_eca_checkpoint(root / "eca_resnet18.pth.tar"),
    }
    (root / "random.pth.tar").write_bytes(os.urandom(4096))
    (root / "notes.pth.tar").write_text("epoch: 3\nthese are my notes, not a checkpoint\n")
    # pickle.dump instead of torch.save, in a protocol torch.load warns about.
    made["a plain pickle"] = str(root / "pickled.pth.tar")
    with open(made["a plain pickle"], "wb") as handle:
        pickle.dump({"epoch": 3, "state_dict": {"fc.bias": [0.0, 1.0]}}, handle, protocol=4)
    (root / "empty.pth.tar").write_bytes(b"")
    (root / "folder.pth.tar").mkdir()
    # What a writer that is not atomic leaves behind when it is killed mid-write.
    whole = (root / "eca_resnet18.pth.tar").read_bytes()
    (root / "truncated.pth.tar").write_bytes(whole[: len(whole) // 2])
    made["a truncated checkpoint"] = str(root / "truncated.pth.tar")
    return made


@pytest.fixture(scope="module")
def malicious(tmp_path_factory):
    """A checkpoint whose pickle creates a folder when loaded unsafely; returns (path, marker)."""
    root = tmp_path_factory.mktemp("malicious")
    # The payload is live: loading a twin of the file unsafely does create its marker.
    twin_marker = str(root / "twin_ran")
    twin = save_malicious_checkpoint(root / "twin.pth.tar", twin_marker)
    torch.load(twin, weights_only=False)
    assert os.path.isdir(twin_marker)
    marker = str(root / "payload_ran")
    return save_malicious_checkpoint(root / "eca_resnet18.pth.tar", marker), marker


def copy_data(source, destination, drop=(), rename_val_class=False, empty_class=False):
    shutil.copytree(source, destination)
    for part in drop:
        shutil.rmtree(os.path.join(destination, part))
    if rename_val_class:
        val = os.path.join(destination, "val")
        first = sorted(os.listdir(val))[0]
        os.rename(os.path.join(val, first), os.path.join(val, first + "_renamed"))
    if empty_class:
        for split in ("train", "val"):
            os.makedirs(os.path.join(destination, split, "zz_empty"))
    return destination


def a_file(source, destination):
    open(destination, "w").close()
    return destination


def no_class_folders(source, destination):
    for split in ("train", "val"):
        os.makedirs(os.path.join(destination, split))
    return destination


BAD_DATA = {
    # case: (how to make it from good data, extra flags, what the message must say)
    "missing": (lambda src, dst: dst, [], ["does not exist"]),
    "a file": (a_file, [], ["is not a folder"]),
    "without train/": (lambda src, dst: copy_data(src, dst, drop=["train"]), [], ["no train/"]),
    "without val/": (lambda src, dst: copy_data(src, dst, drop=["val"]), [], ["no val/"]),
    "without val/, evaluating": (lambda src, dst: copy_data(src, dst, drop=["val"]), ["-e"], ["no val/"]),
    "without class folders": (no_class_folders, [], ["no class folders"]),
    "with an empty class": (lambda src, dst: copy_data(src, dst, empty_class=True), [], ["zz_empty", "has no images"]),
    "with val/ classes other than train/'s": (
        lambda src, dst: copy_data(src, dst, rename_val_class=True), [], ["different class folders", "_renamed"]),
}


# --- bad input: one clear line, non-zero exit, no traceback, nothing written ---------------------


@pytest.mark.parametrize("script", ["main.py", "light_main.py"])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_folder_is_refused_before_anything_is_written(launch, tiny_data, tmp_path, case, script):
    make, flags, says = BAD_DATA[case]
    data = make(tiny_data, str(tmp_path / "DATA"))
    out = tmp_path / "out"
    arch = ["-a", "eca_resnet18"] if script == "main.py" else ["-a", "eca_mobilenet_v2"]
    result = launch(script, *FAST, *arch, *flags, "--output-dir", out, data)
    assert_fails_cleanly(result, *says)
    assert not out.exists()


BAD_FLAGS = {
    "--ksize with a letter": (["--ksize", "35x7"], ["--ksize"]),
    "--ksize with too few stages": (["--ksize", "355"], ["--ksize"]),
    "--ksize with an even size": (["--ksize", "3547"], ["--ksize"]),
    "an unknown -a": (["-a", "eca_resnet19"], ["eca_resnet19"]),
    "-b 0": (["-b", "0"], ["--batch-size"]),
    "a missing --config": (["--config", "{missing}"], ["does not exist"]),
    "a --config that is not YAML": (["--config", "{not_yaml}"], ["not valid YAML"]),
    "a --config with unknown keys": (["--config", "{unknown_keys}"], ["unknown keys", "learning_rat"]),
    "a --config that is a list": (["--config", "{a_list}"], ["mapping"]),
    # Each of these used to train with nonsense, end in a traceback, or hang on a ZeroDivisionError.
    "a negative --momentum": (["--momentum", "-1"], ["--momentum"]),
    "a negative --wd": (["--wd", "-1"], ["--weight-decay"]),
    "a negative --start-epoch": (["--start-epoch", "-1"], ["--start-epoch"]),
    "--model-ema-steps 0": (["--model-ema", "--model-ema-steps", "0"], ["--model-ema-steps"]),
    "a negative --lr-gamma": (["--lr-gamma", "-1"], ["--lr-gamma"]),
    "--lr-step-size 0": (["--lr-step-size", "0"], ["--lr-step-size"]),
    "--model-ema-decay above 1": (["--model-ema-decay", "2"], ["--model-ema-decay"]),
    "a negative --clip-grad-norm": (["--clip-grad-norm", "-1"], ["--clip-grad-norm"]),
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    (root / "not_yaml.yaml").write_text("arch: eca_resnet18\nepochs: [1, 2\n")
    (root / "unknown_keys.yaml").write_text("arch: eca_resnet18\nlearning_rat: 0.1\n")
    (root / "a_list.yaml").write_text("- arch\n- eca_resnet18\n")
    return {"missing": str(root / "missing.yaml"), "not_yaml": str(root / "not_yaml.yaml"),
            "unknown_keys": str(root / "unknown_keys.yaml"), "a_list": str(root / "a_list.yaml")}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_or_config_is_refused_before_anything_is_written(launch, tiny_data, tmp_path, configs, case):
    flags, says = BAD_FLAGS[case]
    flags = [flag.format(**configs) for flag in flags]
    out = tmp_path / "out"
    result = launch("main.py", *FAST, *flags, "--output-dir", out, tiny_data)
    assert_fails_cleanly(result, *says)
    assert not out.exists()


BAD_CHECKPOINTS = {
    # file: what the message must say
    "missing": ["does not exist"],
    "a folder": ["not a file"],
    "random bytes": ["not a PyTorch checkpoint"],
    "a text file": ["not a PyTorch checkpoint"],
    "an empty file": ["not a PyTorch checkpoint", "empty"],
    "a plain pickle": ["not a PyTorch checkpoint", "torch.save"],
    "a truncated checkpoint": ["not a PyTorch checkpoint"],
}
CHECKPOINT_FLAGS = {"--resume": ["--resume"], "--init-from": ["--init-from"], "-e --resume": ["-e", "--resume"]}


@pytest.mark.parametrize("how", list(CHECKPOINT_FLAGS))
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_file_that_is_not_a_checkpoint_is_refused(launch, tiny_data, tmp_path, files, case, how):
    out = tmp_path / "out"
    result = launch("main.py", *FAST, *CHECKPOINT_FLAGS[how], files[case], "--output-dir", out, tiny_data)
    assert_fails_cleanly(result, repr(files[case]), *BAD_CHECKPOINTS[case])
    assert not out.exists()


@pytest.mark.parametrize("how", list(CHECKPOINT_FLAGS))
def test_checkpoint_of_another_architecture_is_refused_naming_the_right_one(launch, tiny_data, tmp_path, files, how):
    out = tmp_path / "out"
    before = snapshot(os.path.dirname(files["ECA-ResNet-18"]))
    result = launch("main.py", *FAST, "-a", "eca_resnet50", *CHECKPOINT_FLAGS[how], files["ECA-ResNet-18"],
                    "--output-dir", out, tiny_data)
    assert_fails_cleanly(result, "eca_resnet18", "-a eca_resnet18")
    assert not out.exists()
    assert snapshot(os.path.dirname(files["ECA-ResNet-18"])) == before


@pytest.mark.parametrize("how", list(CHECKPOINT_FLAGS))
def test_checkpoint_with_other_kernel_sizes_than_ksize_is_refused(launch, tiny_data, tmp_path, files, how):
    # The file has the released ECA-ResNet-18 sizes, 3577.
    out = tmp_path / "out"
    result = launch("main.py", *FAST, "--ksize", "3333", *CHECKPOINT_FLAGS[how], files["ECA-ResNet-18"],
                    "--output-dir", out, tiny_data)
    assert_fails_cleanly(result, "--ksize", "3577")
    assert not out.exists()


@pytest.fixture
def existing_run(tmp_path, files):
    """An output folder holding a previous run's checkpoints."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        shutil.copy(files["ECA-ResNet-18"], run / name)
    (run / "metrics.csv").write_text("epoch,val_prec1\n0,33.3\n")
    return str(run)


@pytest.mark.parametrize("case", ["bad DATA", "bad --ksize against the resumed file", "bad --config",
                                  "--init-from another architecture"])
def test_bad_input_leaves_an_existing_run_folder_byte_for_byte(launch, tiny_data, tmp_path, configs, files,
                                                             existing_run, case):
    checkpoint = os.path.join(existing_run, "checkpoint.pth.tar")
    flags = {
        "bad DATA": [str(tmp_path / "missing")],
        "bad --ksize against the resumed file": ["--ksize", "5555", "--resume", checkpoint, tiny_data],
        "bad --config": ["--config", configs["not_yaml"], tiny_data],
        "--init-from another architecture": ["-a", "eca_resnet34", "--init-from", checkpoint, tiny_data],
    }[case]
    before = snapshot(existing_run)
    result = launch("main.py", *FAST, "--output-dir", existing_run, *flags)
    assert_fails_cleanly(result)
    assert snapshot(existing_run) == before


def triton_refusal():
    """Why fuse_eca refuses the Triton kernels here, or None where they run."""
    try:
        models.fuse_eca(models.eca_resnet18(), impl="triton")
    except RuntimeError as error:
        return str(error)
    return None


@pytest.mark.parametrize("script", ["main.py", "scripts/predict.py", "scripts/export.py"])
def test_an_eca_impl_this_machine_cannot_run_is_refused_in_one_line(launch, tiny_data, tmp_path, files, script):
    reason = triton_refusal()
    if reason is None:
        pytest.skip("the Triton kernels run here")
    out = tmp_path / "out"
    image = sorted(glob.glob(os.path.join(tiny_data, "val", "*", "*")))[0]
    args = {
        "main.py": [*FAST, "--output-dir", out, tiny_data],
        "scripts/predict.py": ["--resume", files["ECA-ResNet-18"], image],
        "scripts/export.py": ["--resume", files["ECA-ResNet-18"], "--format", "export", "--output", out / "m.pt2"],
    }[script]
    result = launch(script, *args, "--eca-impl", "triton")
    assert_fails_cleanly(result, reason)
    assert result.returncode == 2 and not out.exists()


# --- scripts other than main.py ------------------------------------------------------------------

SCRIPT_CASES = {
    "paras_flops.py with a malformed --ksize": ("paras_flops.py", ["-a", "eca_resnet18", "--ksize", "35x7"], "--ksize"),
    "paras_flops.py with an unknown -a": ("paras_flops.py", ["-a", "eca_resnet19"], "eca_resnet19"),
    "paras_flops.py with --all and -a": ("paras_flops.py", ["--all", "-a", "eca_resnet18"], "drop -a"),
    "loader_benchmark.py run directly on a missing DATA": ("scripts/loader_benchmark.py", ["{out}"], "no class folders"),
    "make_demo_data.py with a zero width": ("scripts/make_demo_data.py", ["{out}/demo", "--width", "0"], "--width"),
    "make_demo_data.py under a file": ("scripts/make_demo_data.py", ["{image}/demo"], "cannot write"),
    "predict.py with a missing checkpoint": ("scripts/predict.py", ["--resume", "{missing}", "{image}"], "does not exist"),
    "predict.py with random bytes": ("scripts/predict.py", ["--resume", "{random bytes}", "{image}"], "not a PyTorch"),
    "export.py with a missing checkpoint": (
        "scripts/export.py", ["--resume", "{missing}", "--format", "onnx", "--output", "{out}/model.onnx"],
        "does not exist"),
}


@pytest.mark.parametrize("script, args, says", SCRIPT_CASES.values(), ids=SCRIPT_CASES.keys())
def test_other_scripts_refuse_bad_input_in_one_line(launch, tiny_data, tmp_path, files, script, args, says):
    if not os.path.exists(os.path.join(ROOT, script)):
        pytest.skip(f"{script} does not exist yet")
    image = sorted(glob.glob(os.path.join(tiny_data, "val", "*", "*")))[0]
    out = tmp_path / "out"
    args = [arg.format(**files, image=image, out=out) if "{" in arg else arg for arg in args]
    result = launch(script, *args)
    assert_fails_cleanly(result, says)
    assert not out.exists()


def test_a_cold_start_fails_the_same_way(launch, tmp_path):
    """The forked launcher changes nothing: a case run in a brand-new interpreter fails alike, to the byte."""
    args = ["--ksize", "35x7", tmp_path / "missing", "--output-dir", tmp_path / "out"]
    cold = run_script("light_main.py", *args, env={"ECA_DEBUG": ""}, timeout=120)
    assert_fails_cleanly(cold, "--ksize")
    forked = launch("light_main.py", *args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert not (tmp_path / "out").exists()


def test_debug_switch_shows_the_traceback_behind_a_usage_error(launch, tiny_data, tmp_path):
    result = launch("main.py", *FAST, "--ksize", "35x7", "--output-dir", tmp_path / "out", tiny_data,
                    env={"ECA_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UsageError" in result.stderr


# --- security: a checkpoint that would run code is refused, and its code never runs --------------


MALICIOUS_RUNS = {
    "--resume": ("main.py", ["--resume", "{path}", "{data}"]),
    "--init-from": ("main.py", ["--init-from", "{path}", "{data}"]),
    "-e --resume": ("main.py", ["-e", "--resume", "{path}", "{data}"]),
    "light_main.py -e --resume": ("light_main.py", ["-e", "--resume", "{path}", "{data}"]),
    "predict.py": ("scripts/predict.py", ["--resume", "{path}", "{image}"]),
    "export.py": ("scripts/export.py", ["--resume", "{path}", "--format", "onnx", "--output", "{tmp}/m.onnx"]),
}


@pytest.mark.parametrize("script, args", MALICIOUS_RUNS.values(), ids=MALICIOUS_RUNS.keys())
def test_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_never_runs(launch, tiny_data, tmp_path,
                                                                           malicious, script, args):
    if not os.path.exists(os.path.join(ROOT, script)):
        pytest.skip(f"{script} does not exist yet")
    path, marker = malicious
    image = sorted(glob.glob(os.path.join(tiny_data, "val", "*", "*")))[0]
    args = [a.format(path=path, data=tiny_data, image=image, tmp=tmp_path) for a in args]
    if script.endswith("main.py"):
        args = [*FAST[2:], *args, "--output-dir", str(tmp_path / "out")]  # no -a: the file decides
    result = launch(script, *args)
    assert_fails_cleanly(result, "refused", "could run code")
    assert not os.path.exists(marker)
    assert os.listdir(tmp_path) == []


def test_no_eval_exec_or_unsafe_yaml_in_the_engine_and_scripts():
    sources = glob.glob(os.path.join(ROOT, "engine", "*.py")) + glob.glob(os.path.join(ROOT, "*.py")) + \
        glob.glob(os.path.join(ROOT, "scripts", "*.py"))
    unsafe = re.compile(r"(?<![.\w])(eval|exec)\(|yaml\.(load|unsafe_load|full_load)\(|pickle\.loads?\(|weights_only\s*=\s*False")
    found = [f"{os.path.relpath(p, ROOT)}:{n}: {line.strip()}" for p in sources
             for n, line in enumerate(open(p), 1) if unsafe.search(line) and not line.lstrip().startswith("#")]
    assert found == []


def test_every_torch_load_in_the_engine_and_scripts_is_weights_only():
    sources = glob.glob(os.path.join(ROOT, "engine", "*.py")) + glob.glob(os.path.join(ROOT, "*.py")) + \
        glob.glob(os.path.join(ROOT, "scripts", "*.py")) + glob.glob(os.path.join(ROOT, "models", "*.py"))
    calls = [(p, line) for p in sources for line in open(p) if "torch.load(" in line and not line.lstrip().startswith("#")]
    assert calls, "expected at least the engine's own torch.load"
    assert [(os.path.relpath(p, ROOT), line.strip()) for p, line in calls if "weights_only=True" not in line] == []


# --- bad data: training goes on ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_with_unreadable_images(tiny_data, tmp_path_factory):
    """tiny_data plus, in train/, an empty file, a truncated JPEG and a text file named .JPEG (and one in val/).

    27 training images and -b 9 keep every batch full, so the epoch visits every file.
    """
    root = str(tmp_path_factory.mktemp("unreadable") / "DATA")
    shutil.copytree(tiny_data, root)
    first_class = sorted(os.listdir(os.path.join(root, "train")))[0]
    folder = os.path.join(root, "train", first_class)
    good = sorted(glob.glob(os.path.join(folder, "*")))[0]
    with open(good, "rb") as handle:
        jpeg = handle.read()
    bad = {
        os.path.join(folder, "zero_bytes.JPEG"): b"",
        os.path.join(folder, "truncated.JPEG"): jpeg[: len(jpeg) // 2],
        os.path.join(folder, "text.JPEG"): b"<html>404 Not Found</html>\n",
        os.path.join(root, "val", first_class, "val_zero_bytes.JPEG"): b"",
    }
    for path, data in bad.items():
        with open(path, "wb") as handle:
            handle.write(data)
    return root, sorted(bad)


def skipped_files(output):
    return set(re.findall(r"skipped unreadable image (\S+)", output))


@pytest.mark.slow
def test_unreadable_images_are_skipped_named_and_counted(data_with_unreadable_images, tmp_path):
    data, bad = data_with_unreadable_images
    out = tmp_path / "out"
    result = run_script("main.py", *FAST, "-b", "9", "--output-dir", out, data, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    skipped = skipped_files(output)
    # A truncated JPEG may still decode (as PIL would load it); the others cannot.
    must_skip = {p for p in bad if "truncated" not in p}
    assert must_skip <= skipped <= set(bad), output
    assert ".cpp:" not in output  # reasons a user can read, not the decoder's source paths
    counts = [int(n) for n in re.findall(r"Epoch \d+ done: .*, (\d+) unreadable images skipped", output)]
    assert counts == [len(skipped)], output
    with open(out / "metrics.csv") as handle:
        assert [row["unreadable_images"] for row in csv.DictReader(handle)] == [str(len(skipped))]
    assert read_checkpoint(str(out / "checkpoint.pth.tar")).epoch == 1


@pytest.mark.parametrize("how", [["-e", "--resume", "{ckpt}"], []], ids=["evaluating", "training"])
def test_strict_data_makes_an_unreadable_image_fatal_in_one_line(data_with_unreadable_images, tmp_path, files,
                                                                 launch, how):
    data, bad = data_with_unreadable_images
    ckpt = save_eca_checkpoint(tmp_path / "ckpt.pth.tar")
    args = [a.format(ckpt=ckpt) for a in how]
    result = launch("main.py", *FAST, "-b", "9", "--strict-data", *args, "--output-dir", tmp_path / "out", data)
    assert_fails_cleanly(result, "unreadable image", "--strict-data")
    named = re.search(r"unreadable image '([^']+)'", result.stderr).group(1)
    assert named in bad


def can_mount_a_private_tmpfs() -> bool:
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not can_mount_a_private_tmpfs(), reason="needs unshare and mount (root) for a small /dev/shm")
def test_loader_workers_out_of_shared_memory_is_one_line_saying_how_to_fix_it(tiny_data, tmp_path):
    """A container's default /dev/shm (64 MiB) is too small for ImageNet batches: say so, not a worker traceback."""
    command = " ".join([
        "mount -t tmpfs -o size=128k tmpfs /dev/shm &&",  # one 8-image batch of 32 px floats is 96 KiB
        "exec", sys.executable, os.path.join(ROOT, "main.py"),
        *[a for a in FAST if a not in ("-j", "0")], "-j", "2", "--output-dir", str(tmp_path / "out"), tiny_data,
    ])
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert_fails_cleanly(result, "ran out of shared memory", "/dev/shm", "--shm-size", "smaller -j or -b")


def test_an_unexpected_error_with_loader_workers_exits_instead_of_hanging(tmp_path, tiny_data):
    """Workers ignore SIGTERM (preemption must reach the main process first), so exit has to kill them."""
    script = tmp_path / "bug_in_step.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from engine.data import SeededImageFolder, SeededSampler, ValTransform, build_loader, check_data_root, list_samples\n"
        "from engine.distributed import DistContext\n"
        f"classes = check_data_root({tiny_data!r}, need_train=True)\n"
        f"dataset = SeededImageFolder(list_samples({tiny_data!r} + '/val', classes), ValTransform(36, 32))\n"
        "context = DistContext()\n"
        "sampler = SeededSampler(len(dataset), context, 0, shuffle=False)\n"
        "loader = build_loader(dataset, sampler, batch_size=2, workers=1, ctx=context, drop_last=False)\n"
        "for batch in loader:\n"
        "    raise ZeroDivisionError('a bug in the training step')\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ZeroDivisionError: a bug in the training step" in result.stderr
