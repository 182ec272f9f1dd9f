"""The paper's experiments as commands: its Table 3 counted and measured, and one config per experiment."""
import glob
import os
import re

import pytest
import torch

import models
from conftest import ROOT
from engine.complexity import PAPER_TABLE3, count_complexity, format_report, format_table
from engine.config import dump_yaml, parse_args
from engine.reporting import MetricsWriter

PAPER_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "paper", "*.yaml")))
TABLE3_ROWS = {"ResNet": "resnet50", "SE": "se_resnet50", "CBAM": "cbam_resnet50", "ECA": "eca_resnet50"}
TINY_TABLE = ["--batch-size", "2", "--image-size", "32", "--repeats", "1", "--warmup", "0"]


# ---------------------------------------------------------------- paras_flops.py beside Table 3


def test_table_3_counts_beside_the_papers():
    rows = [(row, count_complexity(row.arch, row.k_size)) for row in PAPER_TABLE3]
    lines = {line.split()[0]: line for line in format_table(rows, source="paper").splitlines()[3:]}
    assert [arch for arch in lines] == list(TABLE3_ROWS.values())
    assert all(lines[arch].endswith("yes") for arch in ("resnet50", "se_resnet50", "eca_resnet50"))
    assert lines["cbam_resnet50"].endswith("NO")  # 3.89G against the paper's 3.87G: see engine/complexity.py


@pytest.mark.slow
def test_paras_flops_puts_table_3_beside_the_four_resnet50s(launch):
    result = launch("paras_flops.py", "--all", timeout=300)
    assert result.returncode == 0, result.stderr
    readme_table, paper_table = result.stdout.split("\n\n")
    rows = {line.split()[0]: line for line in paper_table.splitlines()[3:]}
    assert set(rows) == set(models.ARCHITECTURES) - {"eca_resnet18", "eca_resnet34", "eca_resnet101",
                                                     "eca_resnet152", "eca_mobilenet_v2"}
    for arch, params, flops in [("resnet50", "24.37M", "3.86G"), ("se_resnet50", "26.77M", "3.87G"),
                                ("eca_resnet50", "24.37M", "3.86G")]:
        assert rows[arch].count(params) == 2 and rows[arch].count(flops) == 2 and rows[arch].endswith("yes"), rows[arch]
    # CBAM's poolings are counted, which the paper's 3.87G leaves out (engine/complexity.py).
    assert "26.77M   26.77M" in rows["cbam_resnet50"] and "3.89G    3.87G" in rows["cbam_resnet50"]
    assert rows["se_var3_resnet50"].split()[1:3] == ["-", "45,676,584"]


def test_the_count_of_one_comparison_says_what_its_attention_adds():
    report = format_report(count_complexity("se_resnet50"))
    assert "se_resnet50: no ECA layers" in report
    assert "parameters: 28,071,976" in report
    assert "the paper's Table 3 (binary): 26.77M parameters, 3.87G FLOPs" in report
    assert "added to resnet50 by the attention: 2,514,944 parameters" in report
    assert "ECA layers alone" not in report


# ---------------------------------------------------------------- scripts/paper_table.py


def fake_run(folder, arch, scores):
    """A run folder as training leaves it: args.yaml and metrics.csv, written by the engine's own writers."""
    os.makedirs(folder)
    with open(os.path.join(folder, "args.yaml"), "w") as handle:
        handle.write(dump_yaml({"arch": arch, "epochs": len(scores)}))
    writer = MetricsWriter(str(folder), tensorboard=False, first_epoch=0)
    for epoch, score in enumerate(scores):
        writer.add_epoch({"epoch": epoch, "val_prec1": score})  # None: an epoch stopped before validation
    return str(folder)


@pytest.mark.slow
def test_paper_table_measures_the_four_rows_beside_the_papers_figures(launch, tmp_path):
    runs = [fake_run(tmp_path / "se", "se_resnet50", [40.0, 61.5, 55.0]), fake_run(tmp_path / "eca", "eca_resnet50", [70.25])]
    plot = tmp_path / "plots" / "table3.png"
    result = launch("scripts/paper_table.py", *TINY_TABLE, "--runs", *runs, "--output", plot, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert header.split(" | ")[-2:] == ["Top-1", "paper Top-1 |"]
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "(" in line.split(" | ")[0]}
    assert list(rows) == [f"{label} ({arch})" for label, arch in TABLE3_ROWS.items()]
    assert re.search(r"\| ResNet \(resnet50\) \| 24\.37M \| 3\.86 \| [\d.]+ \(1x\) \| [\d.]+ \(1x\) \| 24\.37M \| 3\.86 \| "
                     r"1024 \(1\.00x\) \| 1855 \(1\.00x\) \| - \| 75\.20 \|", rows["ResNet (resnet50)"])
    assert re.search(r"\| [\d.]+ \(\d\.\d\dx\) \| [\d.]+ \(\d\.\d\dx\) \| 26\.77M \| 3\.87 \| 472 \(0\.46x\) \| "
                     r"1213 \(0\.65x\) \| - \| 77\.34 \|$", rows["CBAM (cbam_resnet50)"])
    assert "| 61.50 (3 epochs) | 76.71 |" in rows["SE (se_resnet50)"]
    assert "| 70.25 (1 epochs) | 77.48 |" in rows["ECA (eca_resnet50)"]
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_paper_table_for_resnet101_says_the_paper_has_no_figures_there(launch):
    result = launch("scripts/paper_table.py", "--depth", "101", *TINY_TABLE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| CBAM (cbam_resnet101) | 47.01M |" in result.stdout
    assert "none are shown for ResNet-101" in result.stdout


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: [str(tmp / "missing")], "has no args.yaml"),
        (lambda tmp: [fake_run(tmp / "r18", "se_resnet18", [50.0])], "trained se_resnet18, which is no row"),
        (lambda tmp: [fake_run(tmp / "a", "resnet50", [1.0]), fake_run(tmp / "b", "resnet50", [2.0])], "both trained"),
        (lambda tmp: [fake_run(tmp / "empty", "resnet50", [None])], "has no validated epoch"),
    ],
    ids=["missing", "other-depth", "twice", "no-epoch"],
)
def test_paper_table_refuses_bad_runs_before_measuring(launch, tmp_path, make, message):
    result = launch("scripts/paper_table.py", "--runs", *make(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert result.stdout == ""


def test_paper_table_refuses_an_output_it_cannot_draw(launch, tmp_path):
    result = launch("scripts/paper_table.py", "--output", tmp_path / "table3.xyz")
    assert result.returncode == 2 and "name a file ending in one of" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton can run here")
def test_paper_table_refuses_triton_where_it_cannot_run_in_one_line(launch):
    result = launch("scripts/paper_table.py", "--eca-impl", "triton")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--eca-impl triton cannot run here" in result.stderr


# ---------------------------------------------------------------- configs/paper: one YAML per experiment

EXPERIMENTS = {
    # Table 2 (ResNet-50)
    "resnet50": ("resnet50", None), "se_resnet50": ("se_resnet50", None), "se_var1_resnet50": ("se_var1_resnet50", None),
    "se_var2_resnet50": ("se_var2_resnet50", None), "se_var3_resnet50": ("se_var3_resnet50", None),
    "eca_ns_resnet50": ("eca_ns_resnet50", (3, 3, 3, 3)), "eca_resnet50_k3": ("eca_resnet50", (3, 3, 3, 3)),
    # Table 3
    "cbam_resnet50": ("cbam_resnet50", None), "resnet101": ("resnet101", None), "se_resnet101": ("se_resnet101", None),
    "cbam_resnet101": ("cbam_resnet101", None),
    "eca_resnet50_adaptive": ("eca_resnet50", (5, 5, 5, 7)), "eca_resnet101_adaptive": ("eca_resnet101", (5, 5, 5, 7)),
    # MobileNetV2
    "mobilenet_v2": ("mobilenet_v2", None), "eca_mobilenet_v2": ("eca_mobilenet_v2", (1,) * 10 + (3,) * 7),
}
# Figure 4: k = 3, 5, 7, 9 in every stage (and adaptive, above), on ResNet-50 and ResNet-101
EXPERIMENTS.update({f"eca_resnet{depth}_k{k}": (f"eca_resnet{depth}", (k,) * 4) for depth in (50, 101) for k in (3, 5, 7, 9)})


def test_there_is_one_config_per_experiment_of_the_paper():
    assert sorted(os.path.basename(path)[:-5] for path in PAPER_CONFIGS) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_paper_config_is_a_complete_imagenet_recipe_for_its_script(path):
    name = os.path.basename(path)[:-5]
    arch, kernel_sizes = EXPERIMENTS[name]
    mobilenet = "mobilenet" in arch
    args = parse_args("mobilenet" if mobilenet else "resnet", ["--config", path, "/data/imagenet"])
    assert args.arch == arch and arch in models.ARCHITECTURES
    with open(path) as handle:
        text = handle.read()
    assert f"python {'light_main.py' if mobilenet else 'main.py'} --config configs/paper/{name}.yaml" in text
    expected = (400, 96, 0.045, 4e-5, "exponential") if mobilenet else (100, 256, 0.1, 1e-4, "step")
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay, args.lr_scheduler) == expected
    assert (args.train_crop_size, args.val_resize_size, args.val_crop_size) == (224, 256, 224)
    if kernel_sizes is None:
        assert args.ksize is None
    else:
        with_ksize = models.ARCHITECTURES[arch](k_size=args.ksize, num_classes=1)
        assert with_ksize.kernel_sizes == kernel_sizes
    # Two experiments of one architecture must not write into one output folder.
    assert args.action == ("" if arch == name else name[len(arch) + 1:])


def test_readme_lists_every_paper_experiment_with_its_command():
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    section = readme.split("## Reproduce the paper", 1)[1].split("\n## ", 1)[0]
    for name, (arch, _) in EXPERIMENTS.items():
        script = "light_main.py" if "mobilenet" in arch else "main.py"
        assert f"python {script} --config configs/paper/{name}.yaml" in section, name
    for top1 in ("75.20", "76.71", "76.00", "77.07", "77.42", "77.35", "77.43", "77.34", "77.48"):
        assert top1 in section
