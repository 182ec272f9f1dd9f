"""paras_flops.py: the README's figures come out, kernel sizes are honoured, bad input is one line."""
import re
from typing import Dict

import pytest
from torch import nn

from engine.complexity import (
    EcaLayerCost,
    build_model,
    count_complexity,
    count_macs,
    format_binary,
    format_decimal,
)
from engine.errors import UsageError


@pytest.fixture(scope="module")
def run_paras_flops(launch):
    def run(*args: str) -> str:
        result = launch("paras_flops.py", *args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result.stdout

    return run


def parse_report(text: str) -> Dict[str, int]:
    """The exact counts a single-model report states."""
    return {
        "params": int(re.search(r"^parameters: ([\d,]+)$", text, re.M).group(1).replace(",", "")),
        "macs": int(re.search(r"^FLOPs: ([\d,]+) multiply", text, re.M).group(1).replace(",", "")),
        "eca_params": int(re.search(r"^  parameters: ([\d,]+) \(the sum", text, re.M).group(1).replace(",", "")),
    }


@pytest.fixture(scope="module")
def resnet18_report(run_paras_flops) -> str:
    return run_paras_flops("-a", "eca_resnet18", "--ksize", "3577")


# ---------------------------------------------------------------- the script, as a user runs it


def test_resnet50_k3557_matches_the_readme_in_both_conventions(run_paras_flops):
    text = run_paras_flops("-a", "eca_resnet50", "--ksize", "3557")
    assert "ECA kernel sizes 3,5,5,7" in text
    assert re.search(r"24\.37M\s+binary", text)
    assert re.search(r"25\.56M\s+decimal", text)
    assert re.search(r"3\.86G\s+binary", text)
    counts = parse_report(text)
    assert counts["params"] == 25_557_112
    assert counts["eca_params"] == 80  # the paper's abstract
    assert "ECA layers alone (16 layers)" in text


def test_resnet18_k3577_matches_the_readme(resnet18_report):
    assert re.search(r"11\.15M\s+binary", resnet18_report)
    assert re.search(r"1\.70G\s+binary", resnet18_report)
    counts = parse_report(resnet18_report)
    assert counts["params"] == 11_689_556
    assert counts["eca_params"] == 2 * 3 + 2 * 5 + 2 * 7 + 2 * 7


def test_mobilenet_v2_matches_the_readme(run_paras_flops):
    text = run_paras_flops("-a", "eca_mobilenet_v2")
    assert re.search(r"3\.34M\s+binary", text)
    assert re.search(r"3\.50M\s+decimal", text)
    assert re.search(r"319\.9\d?M\s+binary", text)
    assert parse_report(text)["params"] == 3_504_903


def test_adaptive_kernel_sizes_follow_eq_12(run_paras_flops):
    text = run_paras_flops("-a", "eca_resnet18", "--ksize", "adaptive")
    # 64, 128, 256, 512 channels -> 3, 5, 5, 5
    assert "ECA kernel sizes 3,5,5,5" in text
    assert parse_report(text)["eca_params"] == 2 * (3 + 5 + 5 + 5)


def fc_params(classes: int) -> int:
    return 512 * classes + classes


def test_input_size_and_num_classes_change_the_counts(run_paras_flops, resnet18_report):
    full = parse_report(resnet18_report)
    small = parse_report(
        run_paras_flops("-a", "eca_resnet18", "--ksize", "3577", "--input-size", "112", "--num-classes", "10")
    )
    assert small["params"] == full["params"] - fc_params(1000) + fc_params(10)
    assert small["eca_params"] == full["eca_params"]
    # Convolutions scale with the pixel count: about a quarter of the work at half the side
    # (a little more: the last map is 4x4 at 112 px, not half of 7x7).
    assert 0.25 < small["macs"] / full["macs"] < 0.28


@pytest.mark.parametrize("bad", ["35577", "3,5,x,7"])
def test_bad_ksize_is_one_line_and_exit_2(launch, bad):
    result = launch("paras_flops.py", "-a", "eca_resnet50", "--ksize", bad)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ksize" in lines[0] and "accepted forms" in lines[0]
    assert result.stdout == ""


def test_all_prints_every_model_next_to_the_readme(run_paras_flops):
    text = run_paras_flops("--all")
    readme_table = text.split("\n\n")[0]  # the paper's Table 3 and the comparison networks follow
    rows = {line.split()[0]: line for line in readme_table.splitlines() if line.startswith("eca_")}
    assert set(rows) == {f"eca_resnet{depth}" for depth in (18, 34, 50, 101, 152)} | {"eca_mobilenet_v2"}
    for arch, params, flops in [
        ("eca_resnet18", "11.15M", "1.70G"),
        ("eca_resnet34", "20.79M", "3.43G"),
        ("eca_resnet50", "24.37M", "3.86G"),
        ("eca_resnet101", "42.49M", "7.35G"),
        ("eca_mobilenet_v2", "3.34M", "319.9M"),
    ]:
        assert rows[arch].count(params) == 2 and rows[arch].count(flops) == 2, rows[arch]
        assert rows[arch].endswith("yes")
    # ECA-ResNet-152 is the one row the README's own figures do not reproduce: see engine/complexity.py.
    assert "60,193,042" in rows["eca_resnet152"] and "10.84G" in rows["eca_resnet152"]


# ---------------------------------------------------------------- the counting, directly


def test_every_ksize_form_gives_the_same_model():
    reference = count_complexity("eca_resnet18", "3577", input_size=64)
    for form in ("3,5,7,7", [3, 5, 7, 7], None):
        assert count_complexity("eca_resnet18", form, input_size=64) == reference
    assert count_complexity("eca_resnet18", 3, input_size=64).kernel_sizes == (3, 3, 3, 3)


def test_num_classes_changes_only_the_classifier():
    thousand = count_complexity("eca_resnet18", input_size=64, num_classes=1000)
    ten = count_complexity("eca_resnet18", input_size=64, num_classes=10)
    assert thousand.params - ten.params == fc_params(1000) - fc_params(10)
    assert thousand.macs - ten.macs == (2 * 512 - 1) * (1000 - 10)
    assert thousand.eca_layers == ten.eca_layers


def test_eca_layers_are_counted_layer_by_layer():
    result = count_complexity("eca_resnet18", "3577")
    assert len(result.eca_layers) == 8
    # k x C per layer, two blocks per stage
    assert result.eca_conv_macs == 2 * (3 * 64 + 5 * 128 + 7 * 256 + 7 * 512)
    # (H x W + 1) x C per layer on the 56, 28, 14, 7 pixel maps
    assert result.eca_pool_ops == 2 * (3137 * 64 + 785 * 128 + 197 * 256 + 50 * 512)
    assert result.eca_params == 44


def test_ecalayercost_arithmetic():
    cost = EcaLayerCost(channels=2048, k_size=7, height=7, width=7)
    assert (cost.params, cost.conv_macs, cost.pool_ops) == (7, 7 * 2048, 50 * 2048)


def test_rules_on_a_hand_made_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10)
    )
    macs, eca_costs = count_macs(model, input_size=4)
    conv = 8 * 4 * 4 * (3 * 9)
    batch_norm = 4 * 8 * 16
    relu = 8 * 16
    linear = (2 * 128 - 1) * 10  # multiplies plus adds, as the README's thop counted it
    assert macs == conv + batch_norm + relu + linear
    assert eca_costs == ()


def test_a_users_model_counts_as_the_named_architecture():
    model = build_model("eca_resnet18", "3577", num_classes=10)
    macs, eca_costs = count_macs(model, input_size=64)
    expected = count_complexity("eca_resnet18", "3577", input_size=64, num_classes=10)
    assert (macs, eca_costs) == (expected.macs, expected.eca_layers)


def test_counting_leaves_the_model_untouched():
    model = build_model("eca_mobilenet_v2", num_classes=10)
    keys = list(model.state_dict())
    model.train()
    count_macs(model, input_size=32)
    assert list(model.state_dict()) == keys  # no total_ops / total_params buffers left behind
    assert model.training
    assert all(not module._forward_hooks for module in model.modules())


def test_build_model_turns_bad_input_into_usage_errors():
    for bad in ("3,5", "2", "3.5", "", "big"):
        with pytest.raises(UsageError, match="--ksize"):
            build_model("eca_resnet50", bad)
    with pytest.raises(UsageError, match="unknown architecture"):
        build_model("eca_resnet51")
    with pytest.raises(UsageError, match="--input-size"):
        count_complexity("eca_resnet18", input_size=0)


def test_units():
    assert format_binary(25_557_112) == "24.37M"
    assert format_decimal(25_557_112) == "25.56M"
    assert format_binary(4_149_538_840) == "3.86G"
    assert format_binary(335_449_016, digits=1) == "319.9M"
    assert format_decimal(80) == "80"
