"""scripts/predict.py and scripts/export.py, on checkpoints written here in the engine's and the release's formats."""
import json
import os
import re
import sys

import pytest
import torch
from torch import nn

import export
import models
import predict
from conftest import run_main, run_script
from engine.data import evaluation_sizes
from engine.checkpoint import load_model
from engine.errors import UsageError

CLASS_NAMES = ["cat", "dog", "eel"]
CROP_SIZE = 64


def _model_favouring(class_index: int) -> nn.Module:
    """An ECA-ResNet-18 whose logits ignore the image and always rank ``class_index`` first."""
    model = models.eca_resnet18(num_classes=len(CLASS_NAMES))
    nn.init.zeros_(model.fc.weight)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))
        model.fc.bias[class_index] = 3.0
    return model


def _engine_checkpoint(model: nn.Module, path: str, **extra) -> str:
    contents = {
        "epoch": 3,
        "arch": "eca_resnet18",
        "state_dict": model.state_dict(),
        "best_prec1": 50.0,
        "optimizer": {"state": {}, "param_groups": []},
        "lr_scheduler": {},
        "scaler": None,
        "model_ema": None,
        "rng": {},
        "kernel_sizes": list(model.kernel_sizes),
        "class_names": CLASS_NAMES,
        "args": {"arch": "eca_resnet18", "val_resize_size": 73, "val_crop_size": CROP_SIZE},
    }
    contents.update(extra)
    torch.save(contents, path)
    return path


def _release_checkpoint(model: nn.Module, path: str) -> str:
    # As the original release: DataParallel prefixes, a tensor best_prec1, legacy serialization, no class names.
    contents = {
        "epoch": 100,
        "arch": "eca_resnet18",
        "state_dict": {"module." + key: value for key, value in model.state_dict().items()},
        "best_prec1": torch.tensor(70.9),
        "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(contents, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def dog_checkpoint(tmp_path_factory):
    return _engine_checkpoint(_model_favouring(1), str(tmp_path_factory.mktemp("ckpt") / "model_best.pth.tar"))


@pytest.fixture(scope="module")
def val_images(tiny_data):
    folder = os.path.join(tiny_data, "val")
    return sorted(
        os.path.join(directory, name) for directory, _, names in os.walk(folder) for name in names
    )


def _predict_json(capsys, *argv) -> list:
    status, out, err = run_main(predict.main, capsys, *argv, "--json", "--device", "cpu")
    assert status == 0, err
    return json.loads(out)


# --- predict.py ----------------------------------------------------------------------------------


def test_predict_names_the_class(capsys, dog_checkpoint, val_images):
    status, out, err = run_main(predict.main, capsys, "--resume", dog_checkpoint, val_images[0], "--device", "cpu")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == val_images[0]
    # Three classes, so top-5 shows all three, best first.
    assert [line.split()[:2] for line in lines[1:]] == [["1.", "dog"], ["2.", "eel"], ["3.", "cat"]]


def test_predict_folder_in_batches_as_json(capsys, dog_checkpoint, tiny_data, val_images):
    records = _predict_json(capsys, "--resume", dog_checkpoint, os.path.join(tiny_data, "val"), "-b", 5, "--topk", 2)
    assert [record["image"] for record in records] == val_images
    for record in records:
        assert set(record) == {"image", "predictions"}
        assert len(record["predictions"]) == 2
        best, second = record["predictions"]
        assert set(best) == {"class", "index", "probability"}
        assert (best["class"], best["index"]) == ("dog", 1)
        assert second["class"] == "eel"
        assert 1.0 > best["probability"] > second["probability"] > 0.0


def test_release_checkpoint_takes_names_from_a_file(capsys, tmp_path, val_images):
    checkpoint = _release_checkpoint(_model_favouring(2), str(tmp_path / "eca_resnet18_k3577.pth.tar"))
    names = tmp_path / "classes.txt"
    names.write_text("apple\nbanana\ncherry\n\n")
    records = _predict_json(capsys, "--resume", checkpoint, "--class-names", names, "--crop-size", CROP_SIZE, val_images[0])
    assert records[0]["predictions"][0] == {"class": "cherry", "index": 2, "probability": pytest.approx(0.8, abs=0.1)}

    records = _predict_json(capsys, "--resume", checkpoint, "--crop-size", CROP_SIZE, val_images[0])
    assert [(p["class"], p["index"]) for p in records[0]["predictions"]] == [(None, 2), (None, 1), (None, 0)]


def test_unreadable_image_among_many_is_skipped_with_a_warning(capsys, tmp_path, dog_checkpoint, val_images):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    status, out, err = run_main(predict.main, capsys, "--resume", dog_checkpoint, val_images[0], broken, val_images[1], "--json")
    assert status == 0
    assert [record["image"] for record in json.loads(out)] == val_images[:2]
    assert "warning" in err and str(broken) in err


def test_class_names_file_of_the_wrong_length_is_refused(tmp_path, dog_checkpoint, val_images):
    names = tmp_path / "classes.txt"
    names.write_text("one\ntwo\n")
    with pytest.raises(UsageError, match="2 class names but the model has 3"):
        predict.main(["--resume", dog_checkpoint, "--class-names", str(names), val_images[0]])


def test_wrong_architecture_is_named(dog_checkpoint, val_images):
    with pytest.raises(UsageError, match="run with -a eca_resnet18"):
        predict.main(["--resume", dog_checkpoint, "-a", "eca_resnet50", val_images[0]])


@pytest.mark.parametrize(
    "resize_size, crop_size, saved_args, expected",
    [
        (None, None, {}, (256, 224)),
        (None, None, {"val_resize_size": 73, "val_crop_size": 64}, (73, 64)),
        (None, None, {"val_crop_size": 112}, (128, 112)),
        (None, 112, {}, (128, 112)),
        (300, 288, {"val_resize_size": 73, "val_crop_size": 64}, (300, 288)),
        (None, 112, {"val_resize_size": 73, "val_crop_size": 64}, (128, 112)),  # a crop alone keeps 256/224
    ],
)
def test_validation_sizes(resize_size, crop_size, saved_args, expected):
    assert evaluation_sizes(resize_size, crop_size, {"args": saved_args}) == expected


@pytest.mark.parametrize("resize_size, crop_size", [(0, None), (None, 0), (-5, 32)])
def test_zero_or_negative_sizes_are_refused_not_replaced_by_defaults(resize_size, crop_size):
    with pytest.raises(UsageError, match="must be positive"):
        evaluation_sizes(resize_size, crop_size, {"args": {}})


def test_missing_image_is_one_line_and_exit_2_as_a_user_runs_it(launch, tmp_path, dog_checkpoint):
    missing = tmp_path / "no_such.jpg"
    result = launch("scripts/predict.py", "--resume", dog_checkpoint, missing, "--device", "cpu")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"predict.py: error: image or folder {str(missing)!r} does not exist"]


@pytest.mark.parametrize("problem", ["unreadable image", "bad checkpoint", "missing checkpoint"])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, dog_checkpoint, val_images, problem):
    checkpoint, image, named = dog_checkpoint, val_images[0], None
    if problem == "unreadable image":
        image = named = str(tmp_path / "empty.png")
        open(image, "wb").close()
    elif problem == "bad checkpoint":
        checkpoint = named = str(tmp_path / "garbage.pth.tar")
        with open(checkpoint, "wb") as handle:
            handle.write(b"\x00garbage" * 10)
    else:
        checkpoint = named = str(tmp_path / "no_such.pth.tar")
    status, out, err = run_main(predict.main, capsys, "--resume", checkpoint, image, "--device", "cpu")
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0]


# --- export.py -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """Random weights and BatchNorm statistics, so the logits differ by image and export errors would show."""
    torch.manual_seed(0)
    model = models.eca_resnet18(num_classes=len(CLASS_NAMES))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return _engine_checkpoint(model, str(tmp_path_factory.mktemp("ckpt") / "checkpoint.pth.tar"))


def _printed_differences(stdout: str):
    return [float(value) for value in re.findall(r"max abs diff vs eager logits (\S+)", stdout)]


def _assert_exported_matches_eager(checkpoint, run_exported, shapes, tolerance):
    model, _ = load_model(checkpoint)
    model.eval()
    for shape in shapes:
        images = torch.randn(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(run_exported(images), model(images), rtol=0, atol=tolerance)


def test_torch_export_with_dynamic_size_runs_at_the_checkpoints_size_and_others(capsys, tmp_path, random_checkpoint):
    output = tmp_path / "model.pt2"
    status, out, err = run_main(
        export.main, capsys, "--resume", random_checkpoint, "--format", "export", "--output", output, "--dynamic-size",
    )
    assert status == 0, err
    assert f"input [N, 3, {CROP_SIZE}, {CROP_SIZE}] (the checkpoint's validation crop); " \
           "dynamic: batch, height and width" in out
    assert re.findall(r"batch (\d+) at (\d+x\d+)", out) == [
        ("2", f"{CROP_SIZE}x{CROP_SIZE}"), ("3", f"{CROP_SIZE}x{CROP_SIZE}"), ("3", f"{CROP_SIZE + 32}x{CROP_SIZE + 64}")
    ]
    assert max(_printed_differences(out)) < 1e-4

    exported = torch.export.load(str(output)).module()
    _assert_exported_matches_eager(random_checkpoint, exported, [(1, 3, 96, 80), (2, 3, 72, 72)], 1e-4)


@pytest.mark.slow
def test_torch_export_without_dynamic_size_keeps_a_dynamic_batch(capsys, tmp_path, random_checkpoint):
    output = tmp_path / "model.pt2"
    status, out, err = run_main(
        export.main, capsys, "--resume", random_checkpoint, "--format", "export", "--output", output,
        "--input-size", 96,
    )
    assert status == 0, err
    assert "input [N, 3, 96, 96] (--input-size); dynamic: batch" in out
    assert len(_printed_differences(out)) == 2 and max(_printed_differences(out)) < 1e-4
    exported = torch.export.load(str(output)).module()
    _assert_exported_matches_eager(random_checkpoint, exported, [(5, 3, 96, 96)], 1e-4)
    with pytest.raises(Exception, match="96"):  # the static height and width are enforced
        exported(torch.randn(1, 3, 64, 64))


@pytest.mark.slow
def test_onnx_with_dynamic_size_matches_eager_as_a_user_runs_it(tmp_path, random_checkpoint):
    onnxruntime = pytest.importorskip("onnxruntime")
    output = tmp_path / "model.onnx"
    result = run_script(
        "scripts/export.py", "--resume", random_checkpoint, "--format", "onnx", "--output", output, "--dynamic-size",
    )
    assert result.returncode == 0, result.stderr
    differences = _printed_differences(result.stdout)
    assert len(differences) == 3 and max(differences) < 1e-3
    assert int(re.search(r"ONNX opset (\d+)", result.stdout).group(1)) >= 17 and output.is_file()
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])

    def run(images):
        return torch.from_numpy(session.run(["logits"], {"input": images.numpy()})[0])

    _assert_exported_matches_eager(random_checkpoint, run, [(1, 3, 96, 80)], 1e-3)


def test_onnx_without_its_packages_says_what_to_install(capsys, monkeypatch, tmp_path, random_checkpoint):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what importing a package that is not installed raises
    status, out, err = run_main(
        export.main, capsys, "--resume", random_checkpoint, "--format", "onnx", "--output", tmp_path / "m.onnx",
    )
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1
    assert "error: ONNX export needs onnx" in lines[0] and "pip install -r requirements-export.txt" in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_export_that_disagrees_with_eager_fails_with_status_1(capsys):
    model = models.eca_resnet18(num_classes=3).eval()
    inputs = export.InputSpec(CROP_SIZE, dynamic_size=False)
    with pytest.raises(SystemExit) as stop:
        export.verify("torch.export", lambda images: model(images) + 1.0, model, inputs,
                      tolerance=export.EXPORT_TOLERANCE)
    assert stop.value.code == 1
    assert "differs from the eager model by 1.000e+00 at batch 2" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--opset", "13"], "--opset must be at least 17"),
    (["--input-size", "16"], "--input-size must be at least 32"),
])
def test_bad_export_flags_are_refused(tmp_path, random_checkpoint, flags, says):
    with pytest.raises(UsageError, match=says):
        export.main(["--resume", random_checkpoint, "--format", "onnx", "--output", str(tmp_path / "m.onnx"), *flags])
    assert not (tmp_path / "m.onnx").exists()
