"""The comparison networks in every script: recognised from their tensors, --ksize refused, trained, resumed, evaluated.

Checkpoints of any architecture load as an ECA one does; where two
architectures have the same tensors (a plain ResNet-50 and SE-Var1) the file's
``arch`` decides, and without one the error names both.
"""
import logging
import os

import pytest
import torch
import torchvision

import models
from conftest import run_main
from engine.checkpoint import describe, load_model, read_checkpoint
from engine.errors import UsageError
from engine.identify import architecture_candidates, identify_architecture, kernel_sizes_from_state_dict
from engine.transfer import initialize_from, read_init_checkpoint

TINY = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32", "-j", "0", "-b", "8"]
SAME_TENSORS = {"resnet50", "se_var1_resnet50"}


def meta_state_dict(arch, **kwargs):
    with torch.device("meta"):
        return models.ARCHITECTURES[arch](**kwargs).state_dict()


def save(path, arch, tag=None, **kwargs):
    torch.manual_seed(0)
    state_dict = models.ARCHITECTURES[arch](**kwargs).state_dict()
    torch.save({"state_dict": state_dict, **({"arch": tag} if tag else {})}, path)
    return str(path)


@pytest.mark.parametrize("arch", sorted(set(models.ARCHITECTURES) - SAME_TENSORS))
def test_every_architecture_is_recognised_from_its_tensors(arch):
    state_dict = meta_state_dict(arch, num_classes=10)
    assert architecture_candidates(state_dict) == [arch]
    assert identify_architecture(state_dict) == arch
    # A wrong tag, as on a released file, changes nothing when the tensors decide.
    assert identify_architecture(state_dict, arch_tag="se_resnet50" if arch != "se_resnet50" else "resnet50") == arch


def test_a_plain_resnet50_and_se_var1_are_told_apart_by_the_arch_field_only(tmp_path):
    state_dict = meta_state_dict("resnet50")
    assert architecture_candidates(state_dict) == ["resnet50", "se_var1_resnet50"]
    assert identify_architecture(state_dict) is None
    assert identify_architecture(state_dict, arch_tag="se_var1_resnet50") == "se_var1_resnet50"

    untagged = save(tmp_path / "untagged.pth", "resnet50", num_classes=3)
    with pytest.raises(UsageError, match="fit resnet50 and se_var1_resnet50 alike") as caught:
        load_model(untagged)
    assert "-a resnet50 or -a se_var1_resnet50" in str(caught.value)
    model, _ = load_model(save(tmp_path / "var1.pth", "se_var1_resnet50", tag="se_var1_resnet50", num_classes=3))
    assert isinstance(model.layer1[0].se, models.SEVar1)


def test_eca_and_eca_ns_share_names_but_not_shapes(tmp_path):
    path = save(tmp_path / "ns.pth", "eca_ns_resnet50", num_classes=3, k_size=5)
    with pytest.raises(UsageError, match="holds eca_ns_resnet50 weights, not eca_resnet50: run with -a eca_ns_resnet50"):
        load_model(path, arch="eca_resnet50")
    model, _ = load_model(path)
    assert isinstance(model.layer1[0].eca, models.eca_ns_layer) and model.kernel_sizes == (5, 5, 5, 5)


def test_a_tag_naming_the_same_tensors_is_only_a_warning(tmp_path, caplog):
    path = save(tmp_path / "var1.pth", "se_var1_resnet50", tag="se_var1_resnet50", num_classes=3)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(path, arch="resnet50")
    assert model.layer1[0].attention is None
    assert any("whose tensors are the same as resnet50's" in record.getMessage() for record in caplog.records)


def test_torchvision_resnet50_weights_evaluate_as_resnet50_with_torchvisions_logits(tmp_path):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(num_classes=3).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(theirs.state_dict(), path)
    ours, _ = load_model(str(path), arch="resnet50")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(ours.double().eval()(x), theirs.double()(x))


def test_models_without_eca_layers_have_no_kernel_sizes_and_refuse_ksize(tmp_path):
    assert kernel_sizes_from_state_dict("se_resnet18", meta_state_dict("se_resnet18")) == ()
    path = save(tmp_path / "se.pth", "se_resnet18", tag="se_resnet18", num_classes=3)
    with pytest.raises(UsageError, match="se_resnet18 has no ECA layers: drop --ksize"):
        load_model(path, k_size="3")
    assert describe(read_checkpoint(path)).get("kernel_sizes") is None


@pytest.mark.parametrize("script", ["main.py", "paras_flops.py", "scripts/benchmark.py"])
def test_ksize_for_an_architecture_without_eca_is_one_line_and_exit_2(launch, tiny_data, script):
    arguments = {"main.py": [tiny_data], "paras_flops.py": [], "scripts/benchmark.py": []}[script]
    prefix = ["model"] if script.endswith("benchmark.py") else []
    result = launch(script, *prefix, "-a", "cbam_resnet50", "--ksize", "3", *arguments)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cbam_resnet50 has no ECA layers: drop --ksize" in lines[0]


def test_init_from_torchvision_resnet18_leaves_only_the_attention_new(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    for arch, attention in (("se_resnet18", ".se."), ("resnet18", None)):
        ckpt, k_size = read_init_checkpoint(str(path), arch, None)
        assert k_size is None
        model = models.ARCHITECTURES[arch]()
        report = initialize_from(model, arch, str(path), ckpt)
        assert all(attention in name for name in report.new) and bool(report.new) == bool(attention)
        assert not report.mismatched and not report.unused


def test_init_from_another_attention_or_depth_names_what_the_file_holds(tmp_path):
    path = save(tmp_path / "se.pth", "se_resnet18", tag="se_resnet18")
    with pytest.raises(UsageError, match="holds se_resnet18 weights, not eca_resnet18: run with -a se_resnet18"):
        read_init_checkpoint(path, "eca_resnet18", None)
    plain = save(tmp_path / "resnet18.pth", "resnet18")
    with pytest.raises(UsageError, match="holds resnet18 weights, not se_resnet34"):
        read_init_checkpoint(plain, "se_resnet34", None)


def test_safetensors_keep_the_arch_that_tells_same_tensors_apart(tmp_path, capsys):
    import convert

    source = save(tmp_path / "var1.pth.tar", "se_var1_resnet50", tag="se_var1_resnet50", num_classes=3)
    target = tmp_path / "var1.safetensors"
    status, out, err = run_main(convert.main, capsys, source, target)
    assert status == 0, err
    assert "se_var1_resnet50, kernel sizes none, 3 classes" in out
    model, ckpt = load_model(str(target))
    assert isinstance(model.layer4[2].se, models.SEVar1) and ckpt.arch_tag == "se_var1_resnet50"


# ---------------------------------------------------------------- one non-ECA kind, end to end


@pytest.fixture(scope="module")
def se_run(launch, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("se_run") / "run"
    result = launch("main.py", "-a", "se_resnet18", "--epochs", "1", "--seed", "0", *TINY, "--output-dir", out,
                    tiny_data, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.slow
def test_se_resnet18_trains_evaluates_and_resumes(launch, tiny_data, se_run):
    out, trained = se_run
    assert "=> se_resnet18, ECA kernel sizes none" in trained.stdout
    checkpoint = out / "checkpoint.pth.tar"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["arch"] == "se_resnet18" and saved["epoch"] == 1
    assert any(".se.fc.0.weight" in key for key in saved["state_dict"])

    evaluated = launch("main.py", "-e", "--resume", checkpoint, *TINY, tiny_data, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert " * Prec@1 " in evaluated.stdout

    resumed = launch("main.py", "--resume", checkpoint, "--epochs", "2", *TINY, "--output-dir", out, tiny_data,
                     timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_se_resnet18_predicts_and_exports(launch, tiny_data, se_run, tmp_path):
    out, _ = se_run
    image = next(os.path.join(root, name) for root, _, names in os.walk(os.path.join(tiny_data, "val")) for name in names)
    predicted = launch("scripts/predict.py", "--resume", out / "model_best.safetensors", image, "--device", "cpu")
    assert predicted.returncode == 0, predicted.stderr
    exported = launch("scripts/export.py", "--resume", out / "model_best.pth.tar", "--format", "export",
                      "--input-size", "64", "--output", tmp_path / "se.pt2", timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "se.pt2").exists()


@pytest.mark.slow
def test_torchvision_resnet50_state_dict_evaluates_with_a_resnet50(launch, tiny_data, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), path)
    result = launch("main.py", "-a", "resnet50", "-e", "--resume", path, *TINY, tiny_data, timeout=300)
    assert result.returncode == 0, result.stderr
    assert " * Prec@1 " in result.stdout
    untold = launch("main.py", "-e", "--resume", path, *TINY, tiny_data, timeout=300)
    assert untold.returncode == 2 and "-a resnet50 or -a se_var1_resnet50" in untold.stderr
