"""Starting from other weights: --init-from, fine-tuning on other classes, a frozen backbone."""
import pytest
import torch
import torchvision

import models
from engine.transfer import initialize_from

TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32", "-j", "0", "-b", "8"]


@pytest.fixture(scope="module")
def torchvision_resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_torchvision_resnet18_initialises_everything_but_the_eca_kernels(torchvision_resnet18_file):
    model = models.eca_resnet18()
    report = initialize_from(model, "eca_resnet18", str(torchvision_resnet18_file))
    source = torch.load(torchvision_resnet18_file, weights_only=True)
    ours = model.state_dict()
    assert report.new == [k for k in ours if k.endswith("eca.conv.weight")]
    assert len(report.new) == 8 and not report.mismatched and not report.unused
    assert len(report.loaded) == len(source)
    for name, tensor in source.items():
        assert torch.equal(ours[name], tensor), name


def test_other_class_count_reinitialises_the_classifier(torchvision_resnet18_file):
    model = models.eca_resnet18(num_classes=4)
    fresh_fc = model.fc.weight.detach().clone()
    report = initialize_from(model, "eca_resnet18", str(torchvision_resnet18_file))
    assert report.classifier_reset
    assert {name for name, _, _ in report.mismatched} == {"fc.weight", "fc.bias"}
    assert torch.equal(model.fc.weight, fresh_fc)
    assert any("re-initialised" in line for line in report.lines())


@pytest.mark.slow
def test_init_from_torchvision_resnet_starts_a_new_run(torchvision_resnet18_file, tiny_data, tmp_path, launch):
    result = launch("main.py", "-a", "eca_resnet18", "--init-from", torchvision_resnet18_file, "--epochs", "1",
                    *TINY, "--output-dir", tmp_path / "out", tiny_data)
    assert result.returncode == 0, result.stderr
    assert "tensors loaded" in result.stdout
    assert "new (not in the file, left as initialised): 8: layer1.0.eca.conv.weight" in result.stdout
    assert "skipped fc.weight: shape [1000, 512] in the file, [3, 512] in the model" in result.stdout
    assert torch.load(tmp_path / "out" / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_release_format_1000_class_checkpoint_fine_tunes_on_four_classes(demo_data, tmp_path, launch):
    torch.manual_seed(0)
    source = models.eca_resnet18(num_classes=1000).state_dict()
    release = tmp_path / "eca_resnet18_k3577.pth.tar"
    torch.save({"epoch": 100, "arch": "eca_resnet18", "state_dict": {"module." + k: v for k, v in source.items()},
                "best_prec1": torch.tensor(70.92), "optimizer": {"state": {}, "param_groups": []}},
               release, _use_new_zipfile_serialization=False)
    out = tmp_path / "ft"
    result = launch("main.py", "-a", "eca_resnet18", "--init-from", release, "--epochs", "1", "--lr", "0.01",
                    "--backbone-lr-scale", "0.1", *TINY, "--output-dir", out, demo_data)
    assert result.returncode == 0, result.stderr
    assert "the classifier was re-initialised" in result.stdout
    assert "new (not in the file" not in result.stdout  # every ECA kernel came from the file
    tuned = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert tuned["state_dict"]["fc.weight"].shape == (4, 512)
    assert tuned["class_names"] and len(tuned["class_names"]) == 4


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_classifier(tiny_data, tmp_path, launch):
    torch.manual_seed(0)
    start = models.eca_resnet18(num_classes=3).state_dict()
    path = tmp_path / "start.pth"
    torch.save(start, path)
    out = tmp_path / "probe"
    result = launch("main.py", "-a", "eca_resnet18", "--init-from", path, "--freeze-backbone", "--epochs", "1", *TINY,
                    "--output-dir", out, tiny_data)
    assert result.returncode == 0, result.stderr
    after = torch.load(out / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BN statistics too stay as they were
