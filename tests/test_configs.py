"""Every recipe in configs/ is a valid --config for the script its header names."""
import glob
import os

import pytest

from conftest import ROOT
from engine.config import parse_args
from models.kernel_sizes import parse_kernel_sizes

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_is_one_config_per_released_model():
    names = {os.path.basename(path) for path in CONFIGS}
    assert {"eca_resnet18_k3577.yaml", "eca_resnet34_k3357.yaml", "eca_resnet50_k3557.yaml",
            "eca_resnet101_k3357.yaml", "eca_resnet152_k3357.yaml", "eca_mobilenetv2_k13.yaml",
            "finetune.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_names_its_kernel_sizes(path):
    recipe = "mobilenet" if "mobilenet" in os.path.basename(path) else "resnet"
    args = parse_args(recipe, ["--config", path, "DATA"])
    name = os.path.basename(path)
    if "_k" in name and "mobilenet" not in name:
        digits = name.split("_k")[1].split(".")[0]
        assert args.arch == name.split("_k")[0]
        assert parse_kernel_sizes(args.ksize) == tuple(int(d) for d in digits)
