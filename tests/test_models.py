"""The models package: names, shapes and sizes of the original release, and use at any input size.

The paper's comparison networks (plain, SE, CBAM, ...) are specified in test_baselines.py.
"""
import functools
import json
import os

import pytest
import torch

import models
from conftest import RELEASED_ARCHS

ARCHS = sorted(RELEASED_ARCHS)

# The released files' kernel sizes (their names end in _k3577, _k3357, ...).
RELEASED_K = {
    "eca_resnet18": "3577",
    "eca_resnet34": "3357",
    "eca_resnet50": "3557",
    "eca_resnet101": "3357",
    "eca_resnet152": "3357",
    "eca_mobilenet_v2": None,  # the k13 rule, the constructor's default
}

PARAMETER_COUNTS = {
    "eca_resnet18": 11_689_556,
    "eca_resnet34": 21_797_744,
    "eca_resnet50": 25_557_112,
    "eca_resnet101": 44_549_317,
    "eca_resnet152": 60_193_042,
    "eca_mobilenet_v2": 3_504_903,
}


def build(arch, **kwargs):
    return models.ARCHITECTURES[arch](k_size=RELEASED_K[arch], **kwargs)


# Every state_dict key and shape of the original release's models, in order, written from its code.
with open(os.path.join(os.path.dirname(__file__), "data", "original_state_dicts.json")) as handle:
    ORIGINAL_STATE_DICTS = {arch: [(name, tuple(shape)) for name, shape in keys] for arch, keys in json.load(handle).items()}


def shapes(module):
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def test_architectures_are_the_six_released_models_and_the_papers_comparisons():
    assert list(models.ARCHITECTURES)[:6] == list(RELEASED_ARCHS)
    assert set(models.ARCHITECTURES) == set(RELEASED_ARCHS) | {
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2",
        "se_resnet18", "se_resnet34", "se_resnet50", "se_resnet101", "se_resnet152",
        "se_var1_resnet50", "se_var2_resnet50", "se_var3_resnet50", "eca_ns_resnet50",
        "cbam_resnet50", "cbam_resnet101",
    }
    assert all(models.ARCHITECTURES[name] is getattr(models, name) for name in models.ARCHITECTURES)
    assert models.ECA_ARCHITECTURES == set(RELEASED_ARCHS) | {"eca_ns_resnet50"}


def test_original_style_enumeration_offers_exactly_the_architectures():
    # How the original's main.py built its ``-a`` choices.
    names = sorted(
        name
        for name in models.__dict__
        if name.islower() and not name.startswith("__") and callable(models.__dict__[name])
    )
    assert names == sorted(models.ARCHITECTURES)


def test_building_blocks_are_importable_from_the_package():
    from models import ADAPTIVE, eca_layer, eca_resnet_fpn_backbone, parse_kernel_sizes  # noqa: F401

    assert models.eca_layer is eca_layer
    assert "eca_layer" in dir(models)
    with pytest.raises(AttributeError):
        models.no_such_thing


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_names_and_shapes_equal_the_originals(arch):
    with torch.device("meta"):
        ours = build(arch)
    assert list(shapes(ours).items()) == ORIGINAL_STATE_DICTS[arch]


@pytest.mark.parametrize("arch", ["eca_resnet18", "eca_resnet50", "eca_mobilenet_v2"])
def test_fusing_keeps_the_original_state_dict(arch):
    with torch.device("meta"):
        model = models.fuse_eca(build(arch), impl="cpu")
    assert sum(type(m).__name__.startswith("Fused") for m in model.modules()) == (8 if arch == "eca_resnet18" else
                                                                                  16 if arch == "eca_resnet50" else 17)
    assert list(shapes(model).items()) == ORIGINAL_STATE_DICTS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_with_released_kernel_sizes(arch):
    with torch.device("meta"):
        model = build(arch)
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[arch]


def test_eca_adds_80_parameters_to_resnet50():
    # The paper's abstract; a plain ResNet-50 has 25,557,032 parameters.
    with torch.device("meta"):
        model = models.eca_resnet50(k_size="3557")
    eca = sum(p.numel() for name, p in model.named_parameters() if ".eca." in name)
    assert eca == 80
    assert PARAMETER_COUNTS["eca_resnet50"] - eca == 25_557_032


@pytest.mark.parametrize(
    "arch, name, shape",
    [
        ("eca_resnet50", "layer3.4.eca.conv.weight", (1, 1, 5)),
        ("eca_resnet50", "layer4.2.eca.conv.weight", (1, 1, 7)),
        ("eca_resnet50", "layer2.0.downsample.0.weight", (512, 256, 1, 1)),
        ("eca_resnet50", "layer2.0.downsample.1.running_mean", (512,)),
        ("eca_resnet50", "conv1.weight", (64, 3, 7, 7)),
        ("eca_resnet50", "bn1.running_mean", (64,)),
        ("eca_resnet50", "fc.weight", (1000, 2048)),
        ("eca_resnet50", "fc.bias", (1000,)),
        ("eca_resnet18", "layer1.1.eca.conv.weight", (1, 1, 3)),
        ("eca_resnet18", "layer2.0.downsample.0.weight", (128, 64, 1, 1)),
        ("eca_resnet18", "fc.bias", (1000,)),
        ("eca_resnet152", "layer3.35.eca.conv.weight", (1, 1, 5)),
        ("eca_mobilenet_v2", "features.0.0.weight", (32, 3, 3, 3)),
        ("eca_mobilenet_v2", "features.0.1.running_var", (32,)),
        ("eca_mobilenet_v2", "features.1.conv.3.conv.weight", (1, 1, 1)),  # t=1: no expansion conv
        ("eca_mobilenet_v2", "features.3.conv.4.conv.weight", (1, 1, 1)),
        ("eca_mobilenet_v2", "features.14.conv.4.conv.weight", (1, 1, 3)),
        ("eca_mobilenet_v2", "features.18.0.weight", (1280, 320, 1, 1)),
        ("eca_mobilenet_v2", "classifier.1.weight", (1000, 1280)),
    ],
)
def test_parameter_names_of_the_release(arch, name, shape):
    with torch.device("meta"):
        model = build(arch)
    assert shapes(model)[name] == shape


def test_eca_layer_has_the_original_submodules_and_one_kernel():
    layer = models.eca_layer(64, 5)
    assert [name for name, _ in layer.named_children()] == ["avg_pool", "conv", "sigmoid"]
    assert [(name, tuple(p.shape)) for name, p in layer.named_parameters()] == [("conv.weight", (1, 1, 5))]


@pytest.mark.parametrize("k", [0, 2, -1])
def test_eca_layer_refuses_kernels_that_cannot_be_centred(k):
    with pytest.raises(ValueError, match=str(k)):
        models.eca_layer(64, k)


FEATURE_CHANNELS = {arch: 512 for arch in ("eca_resnet18", "eca_resnet34")}
FEATURE_CHANNELS.update({arch: 2048 for arch in ("eca_resnet50", "eca_resnet101", "eca_resnet152")})
FEATURE_CHANNELS["eca_mobilenet_v2"] = 1280


@functools.lru_cache(maxsize=None)
def evaluation_model(arch):
    """One 10-class model per architecture in eval mode, shared by the read-only tests below."""
    torch.manual_seed(0)
    return build(arch, num_classes=10).eval()


INPUT_SIZES = [
    (arch, (97, 75), (4, 3)) for arch in ARCHS  # odd sizes: every stride-2 step rounds up
] + [(arch, (64, 64), (2, 2)) for arch in ("eca_resnet18", "eca_resnet50", "eca_mobilenet_v2")]
DEEP = ("eca_resnet101", "eca_resnet152")  # ResNet-50's blocks, more of them: with the slow tests
INPUT_CASES = [pytest.param(*case, marks=pytest.mark.slow if case[0] in DEEP else [], id=f"{case[0]}-{case[1][0]}x{case[1][1]}")
               for case in INPUT_SIZES]


@pytest.mark.parametrize("arch, size, grid", INPUT_CASES)
def test_models_run_at_any_input_size(arch, size, grid):
    model = evaluation_model(arch)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        head = model.forward_head(features)
    assert features.shape == (1, FEATURE_CHANNELS[arch], *grid)
    assert model.num_features == FEATURE_CHANNELS[arch]
    assert logits.shape == (1, 10)
    assert model.num_classes == 10
    assert torch.isfinite(logits).all()
    assert torch.equal(head, logits)


@pytest.mark.parametrize("arch", ["eca_resnet18", "eca_mobilenet_v2"])
def test_training_step_reaches_every_eca_kernel(arch):
    torch.manual_seed(0)
    model = build(arch, num_classes=3).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    eca_grads = {name: p.grad for name, p in model.named_parameters() if p.dim() == 3}
    assert len(eca_grads) == (8 if arch == "eca_resnet18" else 17)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in eca_grads.values())


def test_resnet_initialisation_follows_the_original():
    # He (fan-out) normal for every Conv2d, BN at 1 / 0; the ECA Conv1d keeps PyTorch's default.
    torch.manual_seed(0)
    model = models.eca_resnet34()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        expected_std = (2.0 / fan_out) ** 0.5
        if conv.weight.numel() >= 16_384:
            assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
            assert abs(conv.weight.mean().item()) < 0.05 * expected_std
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    for name, p in model.named_parameters():
        if name.endswith("eca.conv.weight"):
            bound = 1 / p.shape[-1] ** 0.5  # Conv1d default: uniform(-1/sqrt(k), 1/sqrt(k))
            assert p.abs().max().item() <= bound


def test_mobilenet_initialisation_follows_the_original():
    torch.manual_seed(0)
    model = models.eca_mobilenet_v2()
    head = model.classifier[1]
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(head.bias == 0)
    assert isinstance(model.classifier[0], torch.nn.Dropout) and model.classifier[0].p == 0.25
