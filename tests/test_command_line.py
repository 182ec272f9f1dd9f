"""The entry scripts' command lines: every option explained, the defaults --help shows true, the config frozen."""
import argparse
import pickle

import pytest
import torch

import benchmark
import convert
import export
import loader_benchmark
import make_demo_data
import models
import paper_table
import paras_flops
import predict
from engine.checkpoint import Checkpoint
from engine.config import Config, build_parser, parse_args, resolve_config
from models.fused import IMPLS

PARSERS = {
    "main.py": lambda: build_parser("resnet"),
    "light_main.py": lambda: build_parser("mobilenet"),
    "paras_flops.py": paras_flops.build_parser,
    "scripts/predict.py": predict.build_parser,
    "scripts/export.py": export.build_parser,
    "scripts/convert.py": convert.build_parser,
    "scripts/make_demo_data.py": make_demo_data.build_parser,
    "scripts/loader_benchmark.py": loader_benchmark.build_parser,
    "scripts/benchmark.py": benchmark.build_parser,
    "scripts/paper_table.py": paper_table.build_parser,
}


def options(parser: argparse.ArgumentParser):
    """(name, action, help as --help prints it) of every option and positional, subcommands included."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from options(subparser)
            continue
        name = "/".join(action.option_strings) or action.dest
        yield name, action, formatter._expand_help(action) if action.help else ""


@pytest.mark.parametrize("script", PARSERS)
def test_every_option_has_a_help_line(script):
    missing = [name for name, action, text in options(PARSERS[script]()) if not text.strip()]
    assert missing == [], f"{script}: options without help: {missing}"


@pytest.mark.parametrize("recipe", ["resnet", "mobilenet"])
def test_switches_show_no_default_and_values_show_their_own(recipe):
    parser = build_parser(recipe)
    for name, action, text in options(parser):
        if action.nargs == 0:  # switches: --no-tensorboard, --compile, -e, ...
            assert "default" not in text, f"{name}: {text!r}"
        elif action.default is not None and "default" not in action.help:  # the formatter adds it
            assert text.endswith(f"(default: {parser.get_default(action.dest)})"), f"{name}: {text!r}"
    texts = {name: text for name, _, text in options(parser)}
    assert texts["--no-tensorboard"] == "write no TensorBoard events"
    lr, epochs, arch = ("0.1", "100", "eca_resnet50") if recipe == "resnet" else ("0.045", "400", "eca_mobilenet_v2")
    assert texts["--lr/--learning-rate"].endswith(f"(default: {lr})")
    assert texts["--epochs"].endswith(f"(default: {epochs})")
    assert f"(default: {arch}, or what --resume holds)" in texts["-a/--arch"]


@pytest.mark.parametrize("script", ["main.py", "light_main.py", "scripts/predict.py", "scripts/export.py"])
def test_every_script_that_builds_a_model_chooses_its_eca_implementation(script):
    (action,) = [action for name, action, _ in options(PARSERS[script]()) if name == "--eca-impl"]
    assert action.default == "auto" and tuple(action.choices) == IMPLS


def test_the_resolved_config_is_frozen():
    args = parse_args("resnet", ["-a", "eca_resnet18", "DATA"])
    config = resolve_config(args, None)
    assert isinstance(config, Config)
    assert (config.arch, config.output_dir, config.val_resize_size, config.val_crop_size) == \
        ("eca_resnet18", "runs/eca_resnet18", 256, 224)
    with pytest.raises(AttributeError, match="frozen"):
        config.arch = "eca_resnet50"
    with pytest.raises(AttributeError, match="frozen"):
        del config.lr
    assert args.val_crop_size is None  # resolving leaves the parsed arguments as they were


def test_the_config_reaches_spawned_processes_intact_and_still_frozen():
    config = resolve_config(parse_args("resnet", ["DATA"]), None, dist_url="tcp://127.0.0.1:29511")
    copy = pickle.loads(pickle.dumps(config))  # how mp.spawn hands it to each GPU's process
    assert copy == config and copy.dist_url == "tcp://127.0.0.1:29511"
    with pytest.raises(AttributeError, match="frozen"):
        copy.dist_url = None


def test_a_resumed_checkpoint_supplies_the_architecture_and_sizes_the_flags_leave_open():
    with torch.device("meta"):
        weights = models.eca_resnet18(num_classes=3).state_dict()
    saved = {"args": {"train_crop_size": 48, "val_resize_size": 56, "val_crop_size": 48}}
    ckpt = Checkpoint(path="run/checkpoint.pth.tar", state_dict=weights, contents=saved)
    config = resolve_config(parse_args("resnet", ["--resume", ckpt.path, "DATA"]), ckpt)
    assert (config.arch, config.output_dir) == ("eca_resnet18", "runs/eca_resnet18")
    assert (config.train_crop_size, config.val_resize_size, config.val_crop_size) == (48, 56, 48)
    flagged = resolve_config(parse_args("resnet", ["--resume", ckpt.path, "--val-crop-size", "64", "DATA"]), ckpt)
    assert (flagged.train_crop_size, flagged.val_resize_size, flagged.val_crop_size) == (48, 73, 64)
