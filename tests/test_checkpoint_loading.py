"""Checkpoint loading: the released files' format, every wrapper, and a clear refusal of everything else."""
import logging
import os
import pathlib
import pickle
import shlex
import stat

import pytest
import torch

import models
from engine.checkpoint import (
    atomic_copy,
    atomic_save,
    identify_architecture,
    kernel_sizes_from_state_dict,
    load_model,
    model_from_checkpoint,
    read_checkpoint,
    strip_wrapper_prefixes,
)
from engine.errors import UsageError


def assert_same_weights(model, state_dict):
    ours = model.state_dict()
    for name, tensor in state_dict.items():
        assert torch.equal(ours[name], tensor), name


# --- a file exactly as the original release wrote it ------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_original():
    torch.manual_seed(0)
    return models.eca_resnet50(k_size="3557")


@pytest.fixture(scope="module")
def released_file(tmp_path_factory, resnet50_original):
    """``eca_resnet50_k3557.pth.tar`` as the original wrote it: legacy pickle, DataParallel names, wrong arch tag."""
    model = resnet50_original
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # a real SGD state, momentum buffers included
    for p in model.parameters():
        p.grad = None
    path = tmp_path_factory.mktemp("released") / "eca_resnet50_k3557.pth.tar"
    torch.save(
        {
            "epoch": 100,
            "arch": "se_resnet50",
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
            "best_prec1": torch.tensor(77.42),
            "optimizer": optimizer.state_dict(),
        },
        path,
        _use_new_zipfile_serialization=False,
    )
    return str(path)


def test_released_file_loads_without_being_told_its_kernel_sizes(released_file, resnet50_original, caplog):
    with caplog.at_level(logging.WARNING):
        model, ckpt = load_model(released_file)
    assert isinstance(model, models.ResNet)
    assert model.kernel_sizes == (3, 5, 5, 7)
    assert model.fc.out_features == 1000
    assert_same_weights(model, resnet50_original.state_dict())
    assert ckpt.epoch == 100
    assert type(ckpt.best_prec1) is float and ckpt.best_prec1 == pytest.approx(77.42, abs=1e-5)
    assert ckpt.arch_tag == "se_resnet50"
    assert "momentum_buffer" in str(ckpt.contents["optimizer"]["state"][0].keys())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("se_resnet50" in w and "eca_resnet50" in w for w in warnings)


@pytest.fixture(scope="module")
def released_checkpoint(released_file):
    return read_checkpoint(released_file)


@pytest.mark.parametrize("k_size", ["3557", ("3", "5", "5", "7")])
def test_released_file_loads_with_its_own_kernel_sizes_in_any_form(released_checkpoint, k_size):
    model = model_from_checkpoint("eca_resnet50", released_checkpoint, k_size=k_size)
    assert model.kernel_sizes == (3, 5, 5, 7)


@pytest.mark.parametrize(
    "k_size, first_disagreement",
    [
        ("3357", "layer2.0.eca.conv.weight"),  # the stage-2 kernel is 5 in the file
        ("3337", "layer2.0.eca.conv.weight"),
        ("3537", "layer3.0.eca.conv.weight"),
        ("3555", "layer4.0.eca.conv.weight"),
        ("adaptive", "layer1.0.eca.conv.weight"),  # Eq. 12 gives 5557 for ResNet-50
        (3, "layer2.0.eca.conv.weight"),
    ],
)
def test_kernel_sizes_that_disagree_with_the_file_name_the_layer(released_checkpoint, k_size, first_disagreement):
    with pytest.raises(UsageError) as caught:
        model_from_checkpoint("eca_resnet50", released_checkpoint, k_size=k_size)
    assert first_disagreement in str(caught.value)
    assert "3557" in str(caught.value)  # the file's own sizes, to copy from


def test_invalid_kernel_sizes_are_a_usage_error(released_checkpoint):
    with pytest.raises(UsageError, match="35a7"):
        model_from_checkpoint(None, released_checkpoint, k_size="35a7")


# --- wrappers and layouts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_weights():
    torch.manual_seed(1)
    return models.eca_resnet18(k_size="3577", num_classes=10).state_dict()


LAYOUTS = {
    "bare state_dict": lambda sd: sd,
    "DataParallel": lambda sd: {"module." + k: v for k, v in sd.items()},
    "torch.compile": lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
    "DDP of torch.compile": lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},
    "state_dict entry": lambda sd: {"epoch": 3, "state_dict": sd},
    "torchvision reference": lambda sd: {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
}


@pytest.fixture(scope="module")
def mobilenet_weights():
    torch.manual_seed(3)
    return models.eca_mobilenet_v2(num_classes=10).state_dict()


@pytest.mark.parametrize(
    "layout, zipfile",
    [(layout, True) for layout in sorted(LAYOUTS)] + [("DataParallel", False), ("bare state_dict", False)],
    ids=[f"{layout}-zip" for layout in sorted(LAYOUTS)] + ["DataParallel-legacy", "bare state_dict-legacy"],
)
def test_every_layout_loads_with_equal_weights(tmp_path, mobilenet_weights, layout, zipfile):
    path = tmp_path / "weights.pth"
    torch.save(LAYOUTS[layout](mobilenet_weights), path, _use_new_zipfile_serialization=zipfile)
    model, ckpt = load_model(str(path), arch="eca_mobilenet_v2")
    assert isinstance(model, models.MobileNetV2)
    assert model.classifier[1].out_features == 10
    assert_same_weights(model, mobilenet_weights)
    assert set(ckpt.state_dict) == set(mobilenet_weights)


@pytest.mark.parametrize(
    "key, stripped",
    [
        ("module.conv1.weight", "conv1.weight"),
        ("_orig_mod.conv1.weight", "conv1.weight"),
        ("module._orig_mod.layer1.0.eca.conv.weight", "layer1.0.eca.conv.weight"),
        ("_orig_mod.module.fc.bias", "fc.bias"),
        ("fc.bias", "fc.bias"),
        ("layer1.0.module.weight", "layer1.0.module.weight"),  # only leading wrappers go
    ],
)
def test_strip_wrapper_prefixes(key, stripped):
    value = torch.zeros(1)
    assert strip_wrapper_prefixes({key: value}) == {stripped: value}


def test_num_batches_tracked_may_be_absent(tmp_path, resnet18_weights):
    # Files written before PyTorch 0.4.1 have no BatchNorm step counters.
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in resnet18_weights.items() if not k.endswith("num_batches_tracked")}, path)
    model, _ = load_model(str(path), arch="eca_resnet18")
    assert model.fc.out_features == 10


# --- reading architecture, kernel sizes and classes from the tensors --------------------------------

CUSTOM_KERNELS = {
    "eca_resnet18": (5, 3, 9, 11),
    "eca_resnet34": (1, 3, 5, 7),
    "eca_resnet50": (7, 5, 3, 1),
    "eca_resnet101": (3, 3, 3, 3),
    "eca_resnet152": (11, 13, 13, 15),
    "eca_mobilenet_v2": (1, 3) * 8 + (5,),
    "eca_ns_resnet50": (5, 3, 7, 1),
}


@pytest.mark.parametrize("arch", sorted(models.ECA_ARCHITECTURES))
def test_architecture_and_kernel_sizes_are_read_from_the_tensors(arch):
    with torch.device("meta"):
        model = models.ARCHITECTURES[arch](k_size=",".join(map(str, CUSTOM_KERNELS[arch])))
    state_dict = model.state_dict()
    assert identify_architecture(state_dict) == arch
    assert kernel_sizes_from_state_dict(arch, state_dict) == CUSTOM_KERNELS[arch]


def test_unknown_tensors_identify_as_no_architecture():
    assert identify_architecture({"conv1.weight": torch.zeros(64, 3, 7, 7)}) is None


def test_a_resnet_stage_with_two_kernel_sizes_is_refused_naming_the_layer(resnet18_weights):
    state_dict = dict(resnet18_weights)
    state_dict["layer3.1.eca.conv.weight"] = torch.zeros(1, 1, 5)
    with pytest.raises(UsageError, match=r"layer3\.1\.eca\.conv\.weight"):
        kernel_sizes_from_state_dict("eca_resnet18", state_dict)


def test_mobilenet_file_with_its_own_kernel_rule_loads_with_those_sizes(tmp_path):
    # The released MobileNetV2 file reportedly loads only with the k=1/k=3 threshold at 64, not 96.
    channels = [c for _, c, n, _ in models.eca_mobilenetv2.INVERTED_RESIDUAL_SETTING for _ in range(n)]
    threshold_64 = tuple(1 if c < 64 else 3 for c in channels)
    assert threshold_64 != models.eca_mobilenet_v2().kernel_sizes
    torch.manual_seed(2)
    source = models.eca_mobilenet_v2(k_size=",".join(map(str, threshold_64)))
    path = tmp_path / "eca_mobilenetv2_k13.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)

    model, _ = load_model(str(path), arch="eca_mobilenet_v2")
    assert model.kernel_sizes == threshold_64
    assert_same_weights(model, source.state_dict())
    with pytest.raises(UsageError, match=r"features\.7\.conv\.4\.conv\.weight"):
        load_model(str(path), k_size=",".join(map(str, models.eca_mobilenet_v2().kernel_sizes)))


@pytest.mark.parametrize("arch, head", [("eca_resnet18", "fc"), ("eca_mobilenet_v2", "classifier.1")])
def test_class_count_is_read_from_the_head(tmp_path, arch, head):
    path = tmp_path / "ten_classes.pth"
    torch.save(models.ARCHITECTURES[arch](num_classes=10).state_dict(), path)
    model, _ = load_model(str(path))
    assert model.get_submodule(head).out_features == 10
    with pytest.raises(UsageError, match="10 classes"):
        model_from_checkpoint(arch, read_checkpoint(str(path)), num_classes=1000)


def test_weights_of_another_architecture_name_the_right_one(tmp_path, resnet18_weights):
    path = tmp_path / "eca_resnet18.pth"
    torch.save(resnet18_weights, path)
    with pytest.raises(UsageError, match="eca_resnet18") as caught:
        load_model(str(path), arch="eca_resnet50")
    assert "-a eca_resnet18" in str(caught.value)


@pytest.mark.parametrize("arch", [None, "eca_resnet18"])
def test_weights_of_no_known_architecture_are_refused(tmp_path, arch):
    path = tmp_path / "plain_resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, path)
    with pytest.raises(UsageError):
        load_model(str(path), arch=arch)


def test_right_names_with_wrong_shapes_are_a_usage_error(tmp_path, resnet18_weights):
    state_dict = dict(resnet18_weights)
    state_dict["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "stem3x3.pth"
    torch.save(state_dict, path)
    with pytest.raises(UsageError, match=r"conv1\.weight"):
        load_model(str(path))


# --- devices ----------------------------------------------------------------------------------------


@pytest.fixture
def cuda_tagged_file(tmp_path, resnet18_weights, monkeypatch):
    """A file whose tensors say they were saved from ``cuda:0``, as the released files were."""
    path = tmp_path / "from_gpu.pth.tar"
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"state_dict": resnet18_weights, "best_prec1": torch.tensor(70.92)}, path, _use_new_zipfile_serialization=False)
    monkeypatch.undo()
    return str(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_saved_file_needs_a_map_location_on_a_cpu_machine(cuda_tagged_file):
    with pytest.raises(UsageError):
        read_checkpoint(cuda_tagged_file, map_location=None)


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), {"cuda:0": "cpu"}])
def test_cuda_saved_file_loads_on_the_cpu(cuda_tagged_file, resnet18_weights, map_location):
    ckpt = read_checkpoint(cuda_tagged_file, map_location=map_location)
    assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())
    assert ckpt.best_prec1 == pytest.approx(70.92, abs=1e-5)
    model = model_from_checkpoint(None, ckpt)
    assert_same_weights(model, resnet18_weights)


def test_load_model_maps_to_the_cpu_by_default(cuda_tagged_file):
    model, _ = load_model(cuda_tagged_file)
    assert next(model.parameters()).device.type == "cpu"


def test_file_saved_from_a_meta_model_is_refused_as_data_less(tmp_path):
    with torch.device("meta"):
        model = models.eca_resnet18()
    path = tmp_path / "meta.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UsageError, match="meta"):
        load_model(str(path))
    # Reading onto the meta device on purpose still works, to inspect shapes without memory.
    assert identify_architecture(read_checkpoint(str(path), map_location="meta").state_dict) == "eca_resnet18"


# --- files that are not checkpoints -----------------------------------------------------------------

NOT_CHECKPOINTS = {
    "empty file": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(bytes(range(256)) * 8),
    "text file": lambda p: p.write_text("hello, this is not a checkpoint\n"),
    "text starting with c": lambda p: p.write_text("checkpoint notes\nepoch 3\n"),
    "tar archive": lambda p: p.write_bytes(b"ustar\x00" + b"\x00" * 506),
    "pickled list": lambda p: torch.save([1, 2, 3], p),
    "lone tensor": lambda p: torch.save(torch.zeros(3), p),
    "dict without weights": lambda p: torch.save({"epoch": 1, "arch": "eca_resnet50"}, p),
}


@pytest.mark.parametrize("kind", sorted(NOT_CHECKPOINTS))
def test_files_that_are_not_checkpoints_are_usage_errors(tmp_path, kind):
    path = tmp_path / "file.pth.tar"
    NOT_CHECKPOINTS[kind](path)
    with pytest.raises(UsageError) as caught:
        load_model(str(path))
    assert str(path) in str(caught.value)
    assert "could run code" not in str(caught.value)


def test_missing_file_is_a_usage_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "no_such.pth.tar"
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(path))


def test_directory_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a file"):
        load_model(str(tmp_path))


def test_empty_path_is_a_usage_error():
    with pytest.raises(UsageError):
        read_checkpoint("")


# --- a checkpoint is data, never code ----------------------------------------------------------------


def _touch_through_os_system(marker):
    class Evil:
        def __reduce__(self):
            return os.system, ("touch " + shlex.quote(str(marker)),)

    return Evil()


def _touch_through_pathlib(marker):
    class Evil:
        def __reduce__(self):
            return pathlib.Path.touch, (pathlib.Path(marker),)

    return Evil()


def _save_zip(obj, path):
    torch.save({"state_dict": obj}, path)


def _save_legacy(obj, path):
    torch.save({"state_dict": obj, "epoch": 1}, path, _use_new_zipfile_serialization=False)


def _pickle_dump(protocol):
    def save(obj, path):
        with open(path, "wb") as handle:
            pickle.dump(obj, handle, protocol=protocol)

    return save


PAYLOADS = {"os.system": _touch_through_os_system, "Path.touch": _touch_through_pathlib}
WRITERS = {
    "torch.save": _save_zip,
    "torch.save legacy": _save_legacy,
    "pickle protocol 0": _pickle_dump(0),
    "pickle protocol 2": _pickle_dump(2),
    "pickle protocol 5": _pickle_dump(5),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol 5, expected here
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_malicious_pickle_is_refused_without_running(tmp_path, payload, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    WRITERS[writer](PAYLOADS[payload](marker), path)
    with pytest.raises(UsageError) as caught:
        load_model(str(path))
    assert not marker.exists()
    assert str(path) in str(caught.value)
    if writer.startswith("torch.save") or writer == "pickle protocol 2":
        assert "refused" in str(caught.value) and "could run code" in str(caught.value)


def test_the_malicious_payload_is_real(tmp_path):
    # Unpickling without weights_only does run it: the refusal above is what keeps the marker away.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    _pickle_dump(2)(_touch_through_pathlib(marker), path)
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


# --- saving ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_checkpoints_get_the_permissions_of_any_other_output_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with open(tmp_path / "metrics.csv", "w") as handle:  # how every other output file is written
            handle.write("epoch\n")
        atomic_save({"epoch": 1}, str(tmp_path / "checkpoint.pth.tar"))
        atomic_copy(str(tmp_path / "checkpoint.pth.tar"), str(tmp_path / "model_best.pth.tar"))
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "metrics.csv").st_mode) == expected
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar", "metrics.csv", "model_best.pth.tar"]
    assert torch.load(tmp_path / "model_best.pth.tar", weights_only=True) == {"epoch": 1}
