"""Weights in safetensors: conversion both ways, every entry point that takes one, model_best.safetensors, torch.hub.

A file converted from the release's format must give the same results as the
file it came from, wherever a checkpoint goes; its metadata must describe it
and agree with its tensors.
"""
import hashlib
import json
import os
import re
import sys
import types
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import convert
import export
import models
import predict
from conftest import ROOT, run_main
from engine.checkpoint import load_model, read_checkpoint
from engine.errors import UsageError

TINY = ["--val-resize-size", "36", "--val-crop-size", "32"]
TRAIN = ["--train-crop-size", "32", *TINY]
CLASSES = 3


def _randomised(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics too, so that logits depend on every tensor and a loading error shows."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _release_dict(state_dict, best_prec1=torch.tensor(70.92)):
    """The released files' layout: DataParallel names, a tensor best_prec1, a wrong arch tag, SGD state."""
    return {
        "epoch": 100,
        "arch": "se_resnet50",
        "state_dict": {"module." + key: value for key, value in state_dict.items()},
        "best_prec1": best_prec1,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": []}]},
    }


@pytest.fixture(scope="module")
def release_weights():
    torch.manual_seed(0)
    model = _randomised(models.eca_resnet18(num_classes=CLASSES))
    with torch.no_grad():
        # Class 0 always first: a training run from these weights validates above 0% and so writes model_best.
        model.fc.bias[0] += 4.0
    return model.state_dict()


@pytest.fixture(scope="module")
def release_file(tmp_path_factory, release_weights):
    path = tmp_path_factory.mktemp("release") / "eca_resnet18_k3577.pth.tar"
    torch.save(_release_dict(release_weights), path, _use_new_zipfile_serialization=False)
    return str(path)


@pytest.fixture(scope="module")
def converted(release_file):
    output = os.path.join(os.path.dirname(release_file), "eca_resnet18_k3577.safetensors")
    convert.main([release_file, output])
    return output


def _metadata(path):
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


# --- conversion ----------------------------------------------------------------------------------


def _engine_file(path):
    torch.manual_seed(1)
    model = _randomised(models.eca_resnet18(k_size="3333", num_classes=CLASSES))
    torch.save({
        "epoch": 7, "batches_done": 0, "arch": "eca_resnet18", "state_dict": model.state_dict(), "best_prec1": 61.5,
        "optimizer": {"state": {}, "param_groups": []}, "kernel_sizes": [3, 3, 3, 3], "num_classes": CLASSES,
        "class_names": ["disc", "square", "triangle"], "rng": {"torch": torch.get_rng_state()},
        "args": {"arch": "eca_resnet18", "lr": 0.1, "train_crop_size": 96, "val_resize_size": 110, "val_crop_size": 96},
    }, path)
    return model.state_dict()


def _torchvision_reference_file(path):
    torch.manual_seed(2)
    state_dict = models.eca_mobilenet_v2(num_classes=CLASSES).state_dict()
    torch.save({"model": state_dict, "epoch": 3, "args": None}, path)
    return state_dict


def _wrapped_state_dict_file(path):
    torch.manual_seed(3)
    state_dict = models.eca_resnet18(num_classes=CLASSES).state_dict()
    torch.save({"module._orig_mod." + key: value for key, value in state_dict.items()}, path)
    return state_dict


def _release_file(path):
    torch.manual_seed(4)
    state_dict = models.eca_resnet18(num_classes=CLASSES).state_dict()
    torch.save(_release_dict(state_dict), path, _use_new_zipfile_serialization=False)
    return state_dict


SOURCES = {
    "release": _release_file,
    "engine": _engine_file,
    "torchvision_reference": _torchvision_reference_file,
    "ddp_and_compile_prefixes": _wrapped_state_dict_file,
}


@pytest.mark.parametrize("source", SOURCES)
def test_pth_to_safetensors_to_pth_keeps_every_tensor_bit_for_bit(tmp_path, source):
    original = SOURCES[source](str(tmp_path / "in.pth.tar"))
    convert.main([str(tmp_path / "in.pth.tar"), str(tmp_path / "weights.safetensors")])
    convert.main(["--to", "pth", str(tmp_path / "weights.safetensors"), str(tmp_path / "back.pth.tar")])

    _assert_same_tensors(load_file(tmp_path / "weights.safetensors"), original)
    back = torch.load(tmp_path / "back.pth.tar", weights_only=True)
    assert not zipfile.is_zipfile(tmp_path / "back.pth.tar")  # the release's legacy serialization
    # In the model's order again, though the safetensors file keeps its own.
    assert list(back["state_dict"]) == ["module." + key for key in original]
    _assert_same_tensors(back["state_dict"], {"module." + key: value for key, value in original.items()})
    _assert_same_tensors(read_checkpoint(str(tmp_path / "back.pth.tar")).state_dict, original)


def test_metadata_describes_a_run_of_this_project(tmp_path):
    _engine_file(str(tmp_path / "model_best.pth.tar"))
    convert.main([str(tmp_path / "model_best.pth.tar"), str(tmp_path / "w.safetensors")])
    assert _metadata(tmp_path / "w.safetensors") == {
        "format": "pt", "arch": "eca_resnet18", "kernel_sizes": "[3, 3, 3, 3]", "num_classes": "3",
        "class_names": '["disc", "square", "triangle"]', "train_crop_size": "96", "val_resize_size": "110",
        "val_crop_size": "96", "best_prec1": "61.5", "epoch": "7",
        "source_sha256": _sha256(tmp_path / "model_best.pth.tar"), "source_file": "model_best.pth.tar",
    }
    contents = read_checkpoint(str(tmp_path / "w.safetensors")).contents
    assert contents["args"] == {"train_crop_size": 96, "val_resize_size": 110, "val_crop_size": 96}
    assert contents["class_names"] == ["disc", "square", "triangle"] and contents["best_prec1"] == 61.5


def test_release_file_converts_with_the_architecture_of_its_tensors(release_file, converted):
    metadata = _metadata(converted)
    assert metadata["arch"] == "eca_resnet18"  # not the file's own "se_resnet50"
    assert json.loads(metadata["kernel_sizes"]) == [3, 5, 7, 7]
    assert float(metadata["best_prec1"]) == pytest.approx(70.92, abs=1e-5) and metadata["epoch"] == "100"
    assert metadata["source_sha256"] == _sha256(release_file)
    assert not {"class_names", "train_crop_size", "val_crop_size"} & set(metadata)  # the release has none


def test_back_conversion_has_the_release_keys(tmp_path, converted):
    convert.main(["--to", "pth", converted, str(tmp_path / "back.pth.tar")])
    back = torch.load(tmp_path / "back.pth.tar", weights_only=True)
    assert (back["epoch"], back["arch"], back["kernel_sizes"], back["num_classes"]) == (100, "eca_resnet18", [3, 5, 7, 7], 3)
    assert type(back["best_prec1"]) is float and back["best_prec1"] == pytest.approx(70.92, abs=1e-5)
    assert all(key.startswith("module.") for key in back["state_dict"]) and "optimizer" not in back


def test_file_without_metadata_is_described_by_its_tensors(tmp_path):
    model = models.eca_mobilenet_v2(num_classes=CLASSES, k_size=",".join(["3"] * 17))
    save_file(model.state_dict(), tmp_path / "bare.safetensors")
    loaded, ckpt = load_model(str(tmp_path / "bare.safetensors"))
    assert (ckpt.contents["arch"], ckpt.contents["num_classes"]) == ("eca_mobilenet_v2", CLASSES)
    assert loaded.kernel_sizes == model.kernel_sizes == tuple(ckpt.contents["kernel_sizes"])
    _assert_same_tensors(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("key, value, says", [
    ("arch", "eca_resnet34", "says arch 'eca_resnet34' in its metadata but holds eca_resnet18's tensors"),
    ("kernel_sizes", "[3, 3, 3, 3]", "says kernel_sizes [3, 3, 3, 3] in its metadata but its tensors have [3, 5, 7, 7]"),
    ("num_classes", "1000", "says num_classes 1000 in its metadata but its tensors have 3"),
    ("class_names", '["a", "b"]', "names 2 classes but its classifier has 3"),
    ("best_prec1", "high", "its metadata best_prec1='high' is not a number"),
    ("kernel_sizes", "3577", "is not a JSON list of kernel sizes"),
])
def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path, converted, key, value, says):
    metadata = dict(_metadata(converted), **{key: value})
    save_file(load_file(converted), tmp_path / "altered.safetensors", metadata=metadata)
    with pytest.raises(UsageError, match=re.escape(says)):
        read_checkpoint(str(tmp_path / "altered.safetensors"))


@pytest.fixture
def existing_output(tmp_path):
    path = tmp_path / "taken.safetensors"
    path.write_bytes(b"someone's file")
    return path


@pytest.mark.parametrize("case, says", [
    ("missing input", "does not exist"),
    ("output exists", "exists: pass --overwrite"),
    ("wrong suffix", "does not match --to safetensors: name it OUT.safetensors"),
    ("pth named safetensors", "does not match --to pth"),
    ("same file", "IN and OUT are the same file"),
    ("truncated safetensors", "is not a readable safetensors file"),
    ("pickle named safetensors", "is named .safetensors but is not a safetensors file"),
    ("empty safetensors", "is named .safetensors but is not a safetensors file (the file is empty)"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, release_file, converted, existing_output, case, says):
    given = {
        "missing input": [tmp_path / "nowhere.pth.tar", tmp_path / "w.safetensors"],
        "output exists": [release_file, existing_output],
        "wrong suffix": [release_file, tmp_path / "w.pth"],
        "pth named safetensors": ["--to", "pth", converted, tmp_path / "w.safetensors"],
        "same file": ["--overwrite", converted, converted],
        "truncated safetensors": [tmp_path / "cut.safetensors", tmp_path / "w.pth.tar", "--to", "pth"],
        "pickle named safetensors": [tmp_path / "pickle.safetensors", tmp_path / "w.pth.tar", "--to", "pth"],
        "empty safetensors": [tmp_path / "empty.safetensors", tmp_path / "w.pth.tar", "--to", "pth"],
    }[case]
    with open(converted, "rb") as handle:
        (tmp_path / "cut.safetensors").write_bytes(handle.read()[: 1 << 16])
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "pickle.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")

    status, out, err = run_main(convert.main, capsys, *given)
    assert status == 2 and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert existing_output.read_bytes() == b"someone's file"
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "w.pth.tar").exists()


def test_overwrite_replaces_the_output(capsys, release_file, existing_output):
    status, out, _ = run_main(convert.main, capsys, "--overwrite", release_file, existing_output)
    assert status == 0 and "eca_resnet18, kernel sizes 3577, 3 classes" in out
    assert _metadata(existing_output)["arch"] == "eca_resnet18"


# --- the same results wherever a checkpoint goes -------------------------------------------------


def _evaluation_lines(output):
    """The per-batch and summary lines of a validation, without their timings."""
    return [re.sub(r"Time \S+ \(\S+\)\s*", "", line) for line in output.splitlines()
            if line.startswith("Test: [") or line.startswith(" * Prec@1")]


@pytest.fixture(scope="module")
def release_evaluation(launch, release_file, tiny_data):
    result = launch("main.py", "-e", "--resume", release_file, "-j", "0", "-p", "1", *TINY, tiny_data)
    assert result.returncode == 0, result.stderr
    lines = _evaluation_lines(result.stdout)
    assert lines[-1].startswith(" * Prec@1 ") and re.search(r"Loss \d", lines[0])
    return lines


@pytest.mark.parametrize("script", ["main.py", "light_main.py"])
def test_evaluating_the_converted_file_prints_the_same_lines(launch, converted, tiny_data, release_evaluation, script):
    result = launch(script, "-e", "--resume", converted, "-j", "0", "-p", "1", *TINY, tiny_data)
    assert result.returncode == 0, result.stderr
    assert _evaluation_lines(result.stdout) == release_evaluation


def test_damaged_safetensors_file_is_refused_in_one_line_before_anything_starts(launch, converted, tiny_data, tmp_path):
    damaged = tmp_path / "cut.safetensors"
    with open(converted, "rb") as handle:
        damaged.write_bytes(handle.read()[: 1 << 16])
    result = launch("main.py", "--resume", damaged, "--output-dir", tmp_path / "out", tiny_data)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    # The reason in brackets is the safetensors library's own words.
    assert re.fullmatch(re.escape(f"main.py: error: {str(damaged)!r} is not a readable safetensors file (") + r".+"
                        + re.escape("): it is truncated or damaged; convert it again with scripts/convert.py"), line)
    assert not (tmp_path / "out").exists()


def test_init_from_the_converted_file_loads_every_tensor(launch, converted, tiny_data, release_evaluation):
    result = launch("main.py", "-a", "eca_resnet18", "-e", "--init-from", converted, "-j", "0", "-p", "1", *TINY, tiny_data)
    assert result.returncode == 0, result.stderr
    assert f"=> initialised from '{converted}': 130 tensors loaded" in result.stdout
    assert "new (not in the file" not in result.stdout and "skipped" not in result.stdout
    assert _evaluation_lines(result.stdout) == release_evaluation


def test_predict_gives_the_same_probabilities(capsys, release_file, converted, tiny_data):
    def predictions(checkpoint):
        status, out, err = run_main(predict.main, capsys, "--resume", checkpoint, "--json", "--device", "cpu",
                                    "--crop-size", "32", os.path.join(tiny_data, "val"))
        assert status == 0, err
        return json.loads(out)

    from_release = predictions(release_file)
    assert len(from_release) == 4 * CLASSES
    assert predictions(converted) == from_release


@pytest.mark.slow  # torch.export takes tens of seconds on two cores
def test_export_of_the_converted_file_computes_the_release_model(capsys, tmp_path, release_file, converted):
    status, _, err = run_main(export.main, capsys, "--resume", converted, "--format", "export",
                              "--output", tmp_path / "model.pt2", "--input-size", 32)
    assert status == 0, err
    model, _ = load_model(release_file)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(torch.export.load(str(tmp_path / "model.pt2")).module()(images), model.eval()(images))


def test_detection_backbone_takes_the_converted_file(release_file, converted):
    torch.manual_seed(6)  # the same random FPN layers on both
    from_path = models.eca_resnet_fpn_backbone("eca_resnet18", weights=converted)
    torch.manual_seed(6)
    from_release = models.eca_resnet_fpn_backbone("eca_resnet18", weights=read_checkpoint(release_file).state_dict)
    _assert_same_tensors(from_path.state_dict(), from_release.state_dict())
    assert from_path.body.layer4[0].eca.conv.weight.shape[-1] == 7


# --- training: --resume from weights, and model_best.safetensors ---------------------------------


@pytest.fixture(scope="module")
def resumed_run(launch, converted, tiny_data, tmp_path_factory):
    """One epoch resumed from the converted file, at a rate too small to move the weights measurably."""
    out = tmp_path_factory.mktemp("resumed")
    # What a save killed midway leaves behind; the run must clear it.
    (out / "model_best.safetensors.k1lled00.tmp").write_bytes(b"half a file")
    result = launch("main.py", "--resume", converted, "--epochs", "1", "-b", "8", "--lr", "1e-9", "-j", "0",
                    "--seed", "1", "--no-tensorboard", *TRAIN, "--output-dir", out, tiny_data)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, out


def test_resume_from_weights_says_in_one_line_what_the_file_lacks(resumed_run, converted):
    result, _ = resumed_run
    notices = [line for line in (result.stdout + result.stderr).splitlines() if "holds weights only" in line]
    assert notices == [
        f"warning: {converted} holds weights only: optimizer and schedule state are not in the file, so training "
        "starts from its weights with a fresh optimizer, at epoch 0 unless --start-epoch"
    ]
    assert f"=> resumed '{converted}' at epoch 0, batch 0 (best Prec@1 0.000)" in result.stdout


def test_resume_from_weights_starts_from_them(resumed_run, converted):
    _, out = resumed_run
    trained = read_checkpoint(str(out / "checkpoint.pth.tar"))
    assert trained.epoch == 1 and trained.contents["kernel_sizes"] == [3, 5, 7, 7]
    for key, tensor in load_file(converted).items():
        if tensor.is_floating_point() and "running" not in key:  # BatchNorm statistics do move in training
            torch.testing.assert_close(trained.state_dict[key], tensor, rtol=0, atol=1e-6)


def test_training_writes_model_best_safetensors_beside_model_best_pth(resumed_run, tiny_data):
    _, out = resumed_run
    best = read_checkpoint(str(out / "model_best.pth.tar"))
    _assert_same_tensors(load_file(out / "model_best.safetensors"), best.state_dict)
    metadata = _metadata(out / "model_best.safetensors")
    assert metadata["source_sha256"] == _sha256(out / "model_best.pth.tar")
    assert json.loads(metadata["class_names"]) == sorted(os.listdir(os.path.join(tiny_data, "train")))
    assert (metadata["arch"], metadata["train_crop_size"], metadata["val_resize_size"]) == ("eca_resnet18", "32", "36")
    assert float(metadata["best_prec1"]) == best.best_prec1 > 0
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]  # the fixture's dead write is gone


# --- torch.hub -----------------------------------------------------------------------------------


def test_hub_loads_eca_resnet50_with_the_logits_of_the_model_loaded_from_the_file(tmp_path):
    torch.manual_seed(5)
    save_file(_randomised(models.eca_resnet50(num_classes=CLASSES)).state_dict(), tmp_path / "r50.safetensors")
    reference = models.eca_resnet50(num_classes=CLASSES)
    reference.load_state_dict(load_file(tmp_path / "r50.safetensors"))

    hub_model = torch.hub.load(ROOT, "eca_resnet50", source="local", weights=str(tmp_path / "r50.safetensors"))
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(hub_model.eval()(images), reference.eval()(images))


@pytest.mark.parametrize("weights", ["release", "converted"])
def test_hub_takes_either_format_with_the_same_result(release_file, converted, weights):
    path = {"release": release_file, "converted": converted}[weights]
    hub_model = torch.hub.load(ROOT, "eca_resnet18", source="local", weights=path, num_classes=CLASSES)
    model, _ = load_model(release_file)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(hub_model.eval()(images), model.eval()(images))


def test_hub_without_weights_builds_the_constructors_model():
    model = torch.hub.load(ROOT, "eca_mobilenet_v2", source="local", num_classes=CLASSES)
    assert isinstance(model, models.MobileNetV2) and model.num_classes == CLASSES


def test_hub_refuses_what_disagrees_with_the_file(converted):
    with pytest.raises(UsageError, match="has 3 classes but this run has 1000"):
        torch.hub.load(ROOT, "eca_resnet18", source="local", weights=converted, num_classes=1000)
    with pytest.raises(UsageError, match="holds eca_resnet18 weights, not eca_resnet34"):
        torch.hub.load(ROOT, "eca_resnet34", source="local", weights=converted)
    with pytest.raises(TypeError, match="width_mult cannot be given"):
        torch.hub.load(ROOT, "eca_resnet18", source="local", weights=converted, width_mult=0.5)


def test_hub_names_another_models_package_that_stands_in_for_ours(tmp_path, monkeypatch):
    foreign = types.ModuleType("models")
    foreign.__file__ = str(tmp_path / "their_project" / "models" / "__init__.py")
    monkeypatch.setitem(sys.modules, "models", foreign)
    with pytest.raises(ImportError, match=re.escape(f"'models' was imported from {tmp_path / 'their_project'}, not from")):
        torch.hub.load(ROOT, "eca_resnet18", source="local")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding this repository as torch.hub keeps a downloaded GitHub repository, so nothing is fetched."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    os.symlink(ROOT, tmp_path / "eca_ecanet_main")
    return "eca/ecanet:main"


def test_hub_list_offers_every_architecture_and_nothing_else(hub_cache):
    assert sorted(torch.hub.list(hub_cache, trust_repo=True, verbose=False)) == sorted(models.ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_hub_help_shows_the_constructors_docstring(hub_cache, arch):
    text = torch.hub.help(hub_cache, arch, trust_repo=True)
    first_line = models.ARCHITECTURES[arch].__doc__.strip().splitlines()[0]
    assert text.startswith(first_line) and "weights" in text and ".safetensors" in text
