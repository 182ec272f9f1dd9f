"""ECA kernel sizes: every form a user can write, the adaptive rule, and clear errors for the rest."""
import pytest
import torch

import models
from models.eca_mobilenetv2 import INVERTED_RESIDUAL_SETTING, NUM_BLOCKS

ACCEPTED_FORMS = "accepted forms"

# (what the user wrote, the per-stage kernel sizes it means)
VALID_RESNET_SPECS = [
    ("3557", (3, 5, 5, 7)),
    (" 3557 ", (3, 5, 5, 7)),
    ([3, 5, 5, 7], (3, 5, 5, 7)),
    ((3, 5, 5, 7), (3, 5, 5, 7)),
    (["3", "5", "5", "7"], (3, 5, 5, 7)),  # what the original's ``--ksize`` with ``type=list`` produced
    ("3,3,7,7", (3, 3, 7, 7)),
    (" 3, 5 ,5,7", (3, 5, 5, 7)),
    ("11,11,13,13", (11, 11, 13, 13)),  # kernels of 10 or more, impossible in the original
    (5, (5, 5, 5, 5)),
    ("5", (5, 5, 5, 5)),
    ([9], (9, 9, 9, 9)),
    (1, (1, 1, 1, 1)),
]


@pytest.mark.parametrize("spec, expected", VALID_RESNET_SPECS, ids=[repr(s) for s, _ in VALID_RESNET_SPECS])
def test_parse_accepts_every_documented_form(spec, expected):
    assert models.parse_kernel_sizes(spec) == expected


@pytest.mark.parametrize("spec", ["adaptive", "ADAPTIVE", " Adaptive "])
def test_parse_recognises_adaptive_in_any_case(spec):
    assert models.parse_kernel_sizes(spec) == models.ADAPTIVE


@pytest.mark.parametrize("spec, expected", VALID_RESNET_SPECS, ids=[repr(s) for s, _ in VALID_RESNET_SPECS])
def test_resnet_constructors_build_the_parsed_kernel_sizes(spec, expected):
    with torch.device("meta"):
        model = models.eca_resnet18(k_size=spec)
    assert model.kernel_sizes == expected
    built = [model.get_submodule(f"layer{i}")[0].eca.conv.kernel_size[0] for i in range(1, 5)]
    assert tuple(built) == expected


# (bad value, a fragment that the message must contain besides the value itself)
INVALID_SPECS = [
    ("35a7", "'a' is not an integer"),
    ("3x7", "'x' is not an integer"),  # the letter is named, not the count it throws off
    ("355", "3 values for 4 stages"),
    ("3456", "4 is not a positive odd integer"),
    ("0", "0 is not a positive odd integer"),
    ("-3", "-3 is not a positive odd integer"),
    ("3,5,5", "3 values for 4 stages"),
    ("3,5,5,7,", "5 values for 4 stages"),
    ("3,5,x,7", "'x' is not an integer"),
    ([3, 5, 5], "3 values for 4 stages"),
    ([3, 5, 5, 7, 9], "5 values for 4 stages"),
    ("", "0 values for 4 stages"),
    (4, "4 is not a positive odd integer"),
    (-5, "-5 is not a positive odd integer"),
    ([3, 4, 5, 7], "4 is not a positive odd integer"),
    (True, "True"),
    ([3, True, 5, 7], "True is not an integer"),
    (3.0, "3.0"),
    ("3.5", "3.5"),
    ("²557", "'²' is not an integer"),
    (b"3557", "b'3557'"),
    (["adaptive"], "'adaptive' is not an integer"),
]


@pytest.mark.parametrize("spec, reason", INVALID_SPECS, ids=[repr(s) for s, _ in INVALID_SPECS])
def test_parse_rejects_bad_values_naming_them_and_the_accepted_forms(spec, reason):
    with pytest.raises(ValueError) as caught:
        models.parse_kernel_sizes(spec)
    message = str(caught.value)
    assert repr(spec) in message
    assert reason in message
    assert ACCEPTED_FORMS in message and "'3557'" in message and "'3,5,5,7'" in message and "'adaptive'" in message


@pytest.mark.parametrize("arch", sorted(models.ECA_ARCHITECTURES))
@pytest.mark.parametrize("spec", ["35a7", "3456", 4, "0"])
def test_every_constructor_rejects_bad_kernel_sizes_with_value_error(arch, spec):
    with pytest.raises(ValueError, match=ACCEPTED_FORMS):
        models.ARCHITECTURES[arch](k_size=spec)


def test_parse_without_a_value_is_an_error_not_a_silent_default():
    # ``None`` means "the released default" only to the constructors, which know what that is.
    with pytest.raises(ValueError, match=ACCEPTED_FORMS):
        models.parse_kernel_sizes(None)


RELEASED_DEFAULTS = {
    "eca_resnet18": (3, 5, 7, 7),
    "eca_resnet34": (3, 3, 5, 7),
    "eca_resnet50": (3, 5, 5, 7),
    "eca_resnet101": (3, 3, 5, 7),
    "eca_resnet152": (3, 3, 5, 7),
}


@pytest.mark.parametrize("arch, expected", sorted(RELEASED_DEFAULTS.items()))
def test_resnet_defaults_are_the_released_kernel_sizes(arch, expected):
    # The original defaulted to 3333, which fits none of the released files.
    with torch.device("meta"):
        assert models.ARCHITECTURES[arch]().kernel_sizes == expected
        assert models.ARCHITECTURES[arch](k_size=None).kernel_sizes == expected


def _mobilenet_block_channels():
    return [c for _, c, n, _ in INVERTED_RESIDUAL_SETTING for _ in range(n)]


def _mobilenet_built_kernels(model):
    return tuple(block.conv[-1].conv.kernel_size[0] for block in list(model.features)[1:-1])


def test_mobilenet_default_is_the_released_k13_rule():
    model = models.eca_mobilenet_v2()
    expected = tuple(1 if c < 96 else 3 for c in _mobilenet_block_channels())
    assert expected == (1,) * 10 + (3,) * 7
    assert model.kernel_sizes == expected
    assert _mobilenet_built_kernels(model) == expected


@pytest.mark.parametrize(
    "channels, k",
    [(16, 3), (24, 3), (32, 3), (64, 3), (96, 3), (128, 5), (160, 5), (256, 5), (320, 5), (512, 5), (1024, 5), (2048, 7)],
)
def test_adaptive_kernel_size_follows_eq_12(channels, k):
    assert models.adaptive_kernel_size(channels) == k


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("eca_resnet18", (3, 5, 5, 5)),  # ECA over 64, 128, 256, 512 channels
        ("eca_resnet34", (3, 5, 5, 5)),
        ("eca_resnet50", (5, 5, 5, 7)),  # ECA over 256, 512, 1024, 2048 channels
        ("eca_resnet152", (5, 5, 5, 7)),
    ],
)
def test_adaptive_resnet_kernels_come_from_each_stages_channels(arch, expected):
    with torch.device("meta"):
        model = models.ARCHITECTURES[arch](k_size="adaptive")
    assert model.kernel_sizes == expected
    assert model.layer4[-1].eca.conv.weight.shape == (1, 1, expected[3])


def test_adaptive_mobilenet_kernels_come_from_each_blocks_channels():
    model = models.eca_mobilenet_v2(k_size="ADAPTIVE")
    expected = tuple(models.adaptive_kernel_size(c) for c in _mobilenet_block_channels())
    assert expected == (3,) * 13 + (5,) * 4  # c <= 96 -> 3; 160 and 320 -> 5
    assert model.kernel_sizes == expected
    assert _mobilenet_built_kernels(model) == expected


def test_mobilenet_takes_one_kernel_per_block_in_comma_form():
    sizes = (1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 11)
    assert len(sizes) == NUM_BLOCKS == 17
    model = models.eca_mobilenet_v2(k_size=",".join(map(str, sizes)))
    assert model.kernel_sizes == sizes
    assert _mobilenet_built_kernels(model) == sizes


@pytest.mark.parametrize("spec, expected", [(5, (5,) * 17), ("3", (3,) * 17), ([1] * 17, (1,) * 17)])
def test_mobilenet_takes_one_kernel_for_all_blocks(spec, expected):
    assert models.eca_mobilenet_v2(k_size=spec).kernel_sizes == expected


@pytest.mark.parametrize("spec, reason", [("3557", "4 values for 17"), ("1," * 16 + "2", "2 is not a positive odd")])
def test_mobilenet_rejects_per_stage_resnet_forms(spec, reason):
    with pytest.raises(ValueError, match=reason):
        models.eca_mobilenet_v2(k_size=spec)


@pytest.mark.parametrize("sizes, text", [
    ((3, 5, 5, 7), "3557"), ((11, 11, 13, 13), "11,11,13,13"),
    ((1,) * 10 + (3,) * 7, "1,1,1,1,1,1,1,1,1,1,3,3,3,3,3,3,3"),  # MobileNetV2's 17 blocks: commas, readable
])
def test_formatted_kernel_sizes_read_back_as_the_same_sizes(sizes, text):
    assert models.kernel_sizes.format_kernel_sizes(sizes) == text
    assert models.parse_kernel_sizes(text, count=len(sizes)) == sizes
