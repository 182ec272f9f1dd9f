"""The paper's comparison networks: plain ResNet and MobileNetV2 as torchvision's, SE and its variants, ECA-NS and CBAM.

Every network is the one ResNet (or MobileNetV2) with another attention module
after the block's last BatchNorm; each attention module is checked against a
direct statement of its formula.
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import models
from conftest import RELEASED_ARCHS

ARCHS = sorted(models.ARCHITECTURES)
COMPARISONS = [arch for arch in ARCHS if arch not in RELEASED_ARCHS]
PLAIN = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2"]

# Channels each ResNet-50 block's attention sees, block by block: 3, 4, 6 and 3 blocks of 256, 512, 1024, 2048.
RESNET50_BLOCKS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
RESNET101_BLOCKS = [256] * 3 + [512] * 4 + [1024] * 23 + [2048] * 3
TORCHVISION_PARAMETERS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "mobilenet_v2": 3_504_872,
}


def se_parameters(blocks):
    return sum(2 * c * (c // 16) for c in blocks)  # two bias-free FC layers, C -> C/16 -> C


EXPECTED_PARAMETERS = {
    **TORCHVISION_PARAMETERS,
    "se_resnet50": TORCHVISION_PARAMETERS["resnet50"] + se_parameters(RESNET50_BLOCKS),
    "se_resnet101": TORCHVISION_PARAMETERS["resnet101"] + se_parameters(RESNET101_BLOCKS),
    "se_var1_resnet50": TORCHVISION_PARAMETERS["resnet50"],
    "se_var2_resnet50": TORCHVISION_PARAMETERS["resnet50"] + sum(RESNET50_BLOCKS),
    "se_var3_resnet50": TORCHVISION_PARAMETERS["resnet50"] + sum(c * c for c in RESNET50_BLOCKS),
    "eca_ns_resnet50": TORCHVISION_PARAMETERS["resnet50"] + sum(3 * c for c in RESNET50_BLOCKS),
    # SE's MLP, plus a 7x7 convolution over 2 maps and a 1-channel BatchNorm per block
    "cbam_resnet50": TORCHVISION_PARAMETERS["resnet50"] + se_parameters(RESNET50_BLOCKS) + 16 * (2 * 49 + 2),
    "cbam_resnet101": TORCHVISION_PARAMETERS["resnet101"] + se_parameters(RESNET101_BLOCKS) + 33 * (2 * 49 + 2),
    "se_resnet18": 11_776_552,
    "se_resnet34": 21_954_856,
    "se_resnet152": 66_770_984,
}


def parameter_count(arch):
    with torch.device("meta"):
        return sum(p.numel() for p in models.ARCHITECTURES[arch]().parameters())


@pytest.mark.parametrize("arch", sorted(EXPECTED_PARAMETERS))
def test_parameter_counts(arch):
    assert parameter_count(arch) == EXPECTED_PARAMETERS[arch]


def test_se_and_cbam_on_resnet50_count_the_papers_26_77m_and_resnet_its_24_37m():
    # Table 3, binary units: bias-free FC layers are what give these figures (biases would make 26.79M).
    assert round(parameter_count("se_resnet50") / 2**20, 2) == 26.77
    assert round(parameter_count("cbam_resnet50") / 2**20, 2) == 26.77
    assert round(parameter_count("resnet50") / 2**20, 2) == 24.37


def train_step_reaches_every_parameter(model):
    loss = F.cross_entropy(model.train()(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    return [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]


# Building a ResNet-50 or deeper takes seconds on a loaded CPU: the whole networks run with the slow
# tests, and each attention module also in a bottleneck ResNet of one block per stage, with the fast ones.
FAST_ARCHS = {"resnet18", "resnet34", "se_resnet18", "se_resnet34", "eca_resnet18", "mobilenet_v2", "eca_mobilenet_v2"}


@pytest.mark.parametrize("arch", [arch if arch in FAST_ARCHS else pytest.param(arch, marks=pytest.mark.slow)
                                  for arch in ARCHS])
def test_every_architecture_trains_a_step_and_every_parameter_gets_a_gradient(arch):
    torch.manual_seed(0)
    assert not train_step_reaches_every_parameter(models.ARCHITECTURES[arch](num_classes=3))


@pytest.mark.parametrize("attention", [models.SELayer, models.SEVar1, models.SEVar2, models.SEVar3,
                                       models.eca_ns_layer, models.CBAM, models.eca_layer], ids=lambda kind: kind.__name__)
def test_every_attention_trains_in_a_bottleneck_resnet(attention):
    torch.manual_seed(0)
    model = models.ResNet(models.Bottleneck, [1, 1, 1, 1], num_classes=3, attn_layer=attention)
    assert all(block.attention is not None for stage in (model.layer1, model.layer4) for block in stage)
    assert not train_step_reaches_every_parameter(model)


@pytest.mark.parametrize(
    "arch, name, shape",
    [
        ("se_resnet50", "layer1.0.se.fc.0.weight", (16, 256)),
        ("se_resnet50", "layer4.2.se.fc.2.weight", (2048, 128)),
        ("se_var2_resnet50", "layer3.0.se.conv.weight", (1024, 1, 1)),
        ("se_var3_resnet50", "layer2.1.se.fc.weight", (512, 512)),
        ("eca_ns_resnet50", "layer1.0.eca.conv.weight", (256, 1, 3)),
        ("cbam_resnet50", "layer1.0.cbam.channel_gate.mlp.0.weight", (16, 256)),
        ("cbam_resnet50", "layer1.0.cbam.spatial_gate.conv.weight", (1, 2, 7, 7)),
        ("cbam_resnet50", "layer1.0.cbam.spatial_gate.bn.running_var", (1,)),
    ],
)
def test_attention_parameter_names(arch, name, shape):
    with torch.device("meta"):
        model = models.ARCHITECTURES[arch]()
    assert tuple(model.state_dict()[name].shape) == shape


def test_se_var1_has_no_parameters_and_a_plain_resnet50s_state_dict():
    with torch.device("meta"):
        var1, plain = models.se_var1_resnet50(), models.resnet50()
    assert [(k, v.shape) for k, v in var1.state_dict().items()] == [(k, v.shape) for k, v in plain.state_dict().items()]


# ---------------------------------------------------------------- the plain networks are torchvision's


@pytest.mark.parametrize("arch", PLAIN)
def test_plain_names_and_shapes_are_torchvisions(arch):
    with torch.device("meta"):
        ours = models.ARCHITECTURES[arch]()
        theirs = getattr(torchvision.models, arch)()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_torchvision_weights_give_torchvisions_logits_in_float64(arch):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(num_classes=10).double().eval()
    ours = models.ARCHITECTURES[arch](num_classes=10).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_torchvision_mobilenet_v2_weights_load_strictly_and_agree():
    torch.manual_seed(0)
    theirs = torchvision.models.mobilenet_v2(num_classes=10).eval()
    ours = models.mobilenet_v2(num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # Pooling as two means (the original ECA release's) instead of one: the same up to rounding.
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- each attention module is its formula


def randomised(module):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def feature_map(channels, seed=2):
    return torch.randn(2, channels, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_eca_ns_is_one_k_tap_kernel_per_channel(k):
    channels = 8
    layer = randomised(models.eca_ns_layer(channels, k).double())
    x = feature_map(channels)
    y = x.mean((2, 3))  # [B, C]
    weight = layer.conv.weight[:, 0, :]  # [C, k]: channel i's own kernel
    pad = (k - 1) // 2
    logits = torch.zeros_like(y)
    for i in range(channels):
        for j in range(k):
            neighbour = i + j - pad
            if 0 <= neighbour < channels:  # zero padding at both ends
                logits[:, i] += weight[i, j] * y[:, neighbour]
    expected = x * torch.sigmoid(logits)[..., None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_eca_ns_with_one_kernel_for_all_channels_is_eca():
    channels, k = 16, 5
    ns = models.eca_ns_layer(channels, k).double()
    eca = models.eca_layer(channels, k).double()
    randomised(eca)
    with torch.no_grad():
        ns.conv.weight.copy_(eca.conv.weight.expand(channels, 1, k))
    x = feature_map(channels)
    torch.testing.assert_close(ns(x), eca(x), rtol=1e-12, atol=1e-12)


def test_se_layers_are_their_formulas():
    channels = 32
    x = feature_map(channels)
    y = x.mean((2, 3))
    se = randomised(models.SELayer(channels).double())
    w1, w2 = se.fc[0].weight, se.fc[2].weight
    gates = {
        models.SELayer: (se, torch.sigmoid(F.relu(y @ w1.T) @ w2.T)),
        models.SEVar1: (models.SEVar1(channels).double(), torch.sigmoid(y)),
    }
    var2 = randomised(models.SEVar2(channels).double())
    gates[models.SEVar2] = (var2, torch.sigmoid(var2.conv.weight.flatten() * y))
    var3 = randomised(models.SEVar3(channels).double())
    gates[models.SEVar3] = (var3, torch.sigmoid(y @ var3.fc.weight.T))
    for kind, (layer, gate) in gates.items():
        torch.testing.assert_close(layer(x), x * gate[..., None, None], rtol=1e-12, atol=1e-12, msg=kind.__name__)


def test_cbam_is_channel_then_spatial_attention():
    channels = 32
    cbam = randomised(models.CBAM(channels).double()).eval()
    x = feature_map(channels)
    mlp = cbam.channel_gate.mlp

    def shared_mlp(v):
        return F.relu(v @ mlp[0].weight.T) @ mlp[2].weight.T

    after_channels = x * torch.sigmoid(shared_mlp(x.mean((2, 3))) + shared_mlp(x.amax((2, 3))))[..., None, None]
    gate = cbam.spatial_gate
    pooled = torch.cat([after_channels.mean(1, keepdim=True), after_channels.amax(1, keepdim=True)], 1)
    spatial = F.batch_norm(F.conv2d(pooled, gate.conv.weight, padding=3), gate.bn.running_mean, gate.bn.running_var,
                           gate.bn.weight, gate.bn.bias, False, 0.0, gate.bn.eps)
    torch.testing.assert_close(cbam(x), after_channels * torch.sigmoid(spatial), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch, attention", [("se_resnet50", "se"), ("cbam_resnet50", "cbam"),
                                             ("eca_ns_resnet50", "eca"), ("se_resnet18", "se")])
def test_the_attention_sees_the_last_batch_norm_and_the_shortcut_is_added_after(arch, attention):
    torch.manual_seed(0)
    model = models.ARCHITECTURES[arch](num_classes=3).eval()
    block = model.layer2[0]
    seen = {}
    last_norm = block.bn3 if hasattr(block, "bn3") else block.bn2
    last_norm.register_forward_hook(lambda module, inputs, output: seen.update(norm=output.clone()))
    getattr(block, attention).register_forward_hook(
        lambda module, inputs, output: seen.update(attention_in=inputs[0].clone(), attention_out=output.clone())
    )
    x = torch.randn(1, block.conv1.in_channels, 16, 16)
    with torch.no_grad():
        out = block(x)
        identity = block.downsample(x)
    assert torch.equal(seen["attention_in"], seen["norm"])
    assert torch.equal(out, torch.relu(seen["attention_out"] + identity))


def test_kernel_sizes_are_those_of_the_eca_layers_and_none_without():
    with torch.device("meta"):
        assert models.eca_ns_resnet50().kernel_sizes == (3, 3, 3, 3)
        assert models.eca_ns_resnet50(k_size="5").kernel_sizes == (5, 5, 5, 5)
        for arch in PLAIN + ["se_resnet50", "cbam_resnet50", "se_var2_resnet50"]:
            assert models.ARCHITECTURES[arch]().kernel_sizes == (), arch


def test_each_architecture_adds_to_its_plain_counterpart():
    shapes = {}
    for arch in models.ARCHITECTURES:
        with torch.device("meta"):
            shapes[arch] = {key: value.shape for key, value in models.ARCHITECTURES[arch]().state_dict().items()}
    for arch, plain in models.PLAIN_COUNTERPARTS.items():
        assert shapes[plain].items() <= shapes[arch].items(), arch
        assert hasattr(torchvision.models, plain)


def test_attention_per_stage_must_name_four_stages():
    with pytest.raises(ValueError, match="one entry per stage"):
        models.ResNet(models.Bottleneck, [1, 1, 1, 1], attn_layer=[models.SELayer] * 3)
