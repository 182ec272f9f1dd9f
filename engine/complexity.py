"""Parameters and FLOPs of every model, counted the way the original README counted the ECA models.

The README's figures come from ``thop.profile`` on a 1x3x224x224 input, shown
with 1024-based units (params / 2^20, multiply-accumulates / 2^30). Today's
thop counts a few layers differently from its early (2019) releases, and
prints 7.33G for ECA-ResNet-101 (README 7.35G) and 312.9M for ECA-MobileNetV2
(README 319.9M). The rules below, those of the early releases as far as they
can be reconstructed, are passed to today's thop as custom rules:

* convolution: one multiply-accumulate per kernel tap and output element;
* batch norm: 4 operations per element (subtract, divide, scale, shift);
* ReLU / ReLU6: 1 per element;
* max pooling: the window size per output element; average pooling: the window
  size plus one division per output element;
* linear: multiplies plus adds, ``2 * in_features - 1`` per output;
* a module object applied several times in one forward pass (the ReLU each
  residual block reuses) counts for its last application only, because those
  releases assigned a module's count instead of adding to it.

They reproduce every figure of the README table but ECA-ResNet-152's: 10.84G
and 57.40M here, 10.83G and 57.41M there (its exact parameter count,
60,193,042, is 57.40 x 2^20, so the README's params figure is off as well).

The comparison networks count by the same rules, plus two for what only CBAM
has: adaptive max pooling costs its window per output element (as max pooling
does), and CBAM's pooling across channels costs ``(C + 1)`` per position for the
mean (as average pooling) and ``C`` for the maximum. CBAM's shared MLP runs once
on both descriptors stacked, so it is counted for both. That makes CBAM-ResNet-50
3.89G where the paper's Table 3 says 3.87G, its SE-ResNet-50's figure: a count
that skips CBAM's poolings (functional calls, which thop never sees) and counts
its MLP once.

The ECA layers are counted explicitly, layer by layer, rather than through
hooks on their ``avg_pool`` / ``conv`` submodules, so that a fused model
(``models.fuse_eca``), which never calls those submodules, counts the same. Each layer over C channels of an H x W map costs
``(H * W + 1) * C`` for the pooling (as thop counts adaptive average pooling)
and ``k * C`` multiply-accumulates for the convolution across channels.
The sigmoid and the ``x * gate`` rescale are not counted, as thop never did.
For ECA-ResNet-50 (k3557) that is 86,272 + 5,534,464 = 5.2e-3 G (binary); the
paper's 4.7e-4 GFLOPs matches neither part, and its counting is not stated.
"""
import copy
import functools
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

import models
from models.cbam import ChannelPool
from models.eca_mobilenetv2 import default_block_kernel_sizes
from models.eca_module import eca_layer
from models.kernel_sizes import KernelSpec, format_kernel_sizes

from .checkpoint import build_model
from .errors import UsageError

__all__ = [
    "EcaLayerCost",
    "Complexity",
    "PublishedRow",
    "README_TABLE",
    "PAPER_TABLE3",
    "build_model",
    "count_complexity",
    "count_macs",
    "format_binary",
    "format_decimal",
    "format_report",
    "format_table",
]

BINARY_GIGA = 2**30
BINARY_UNITS = "1024-based: M = 2^20, G = 2^30"
DECIMAL_UNITS = "1000-based: M = 10^6, G = 10^9"


@dataclass(frozen=True)
class PublishedRow:
    """One row of a published table, binary units: the original README's released models, or the paper's Table 3."""

    arch: str
    k_size: Optional[str]
    params: str
    flops: str


README_TABLE: Tuple[PublishedRow, ...] = (
    PublishedRow("eca_resnet18", "3577", "11.15M", "1.70G"),
    PublishedRow("eca_resnet34", "3357", "20.79M", "3.43G"),
    PublishedRow("eca_resnet50", "3557", "24.37M", "3.86G"),
    PublishedRow("eca_resnet101", "3357", "42.49M", "7.35G"),
    PublishedRow("eca_resnet152", "3357", "57.41M", "10.83G"),
    PublishedRow("eca_mobilenet_v2", None, "3.34M", "319.9M"),
)
# The paper's Table 3 on ResNet-50: ResNet, SENet, CBAM and ECA-Net.
PAPER_TABLE3: Tuple[PublishedRow, ...] = (
    PublishedRow("resnet50", None, "24.37M", "3.86G"),
    PublishedRow("se_resnet50", None, "26.77M", "3.87G"),
    PublishedRow("cbam_resnet50", None, "26.77M", "3.87G"),
    PublishedRow("eca_resnet50", "3557", "24.37M", "3.86G"),
)


@dataclass(frozen=True)
class EcaLayerCost:
    """What one ECA layer costs on the map it attends over."""

    channels: int
    k_size: int
    height: int
    width: int

    @property
    def params(self) -> int:
        return self.k_size

    @property
    def conv_macs(self) -> int:
        return self.k_size * self.channels

    @property
    def pool_ops(self) -> int:
        return (self.height * self.width + 1) * self.channels


@dataclass(frozen=True)
class Complexity:
    arch: str
    kernel_sizes: Tuple[int, ...]  # () without ECA layers
    input_size: int
    num_classes: int
    params: int
    macs: int
    eca_layers: Tuple[EcaLayerCost, ...]
    # What the architecture adds to its network without attention (``models.PLAIN_COUNTERPARTS``).
    added_params: int = 0
    added_macs: int = 0

    @property
    def eca_params(self) -> int:
        return sum(layer.params for layer in self.eca_layers)

    @property
    def eca_conv_macs(self) -> int:
        return sum(layer.conv_macs for layer in self.eca_layers)

    @property
    def eca_pool_ops(self) -> int:
        return sum(layer.pool_ops for layer in self.eca_layers)


# ---------------------------------------------------------------- counting rules
# Each rule sets (never adds to) the module's count: see the module docstring.


def _set_ops(module: nn.Module, ops: int) -> None:
    module.total_ops.fill_(float(ops))


def _count_conv(module: nn.modules.conv._ConvNd, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    taps = module.weight[0, 0].numel()
    per_output = module.in_channels // module.groups * taps + (1 if module.bias is not None else 0)
    _set_ops(module, output.numel() * per_output)


def _count_batch_norm(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    _set_ops(module, 4 * inputs[0].numel())


def _count_activation(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    _set_ops(module, inputs[0].numel())


def _window(kernel_size) -> int:
    sizes = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
    return sizes[0] * sizes[1]


def _count_max_pool(module: nn.MaxPool2d, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    _set_ops(module, _window(module.kernel_size) * output.numel())


def _count_avg_pool(module: nn.AvgPool2d, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    _set_ops(module, (_window(module.kernel_size) + 1) * output.numel())


def _count_adaptive_avg_pool(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    window = inputs[0].shape[2:].numel() // output.shape[2:].numel()
    _set_ops(module, (window + 1) * output.numel())


def _count_adaptive_max_pool(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    window = inputs[0].shape[2:].numel() // output.shape[2:].numel()
    _set_ops(module, window * output.numel())


def _count_channel_pool(module: ChannelPool, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    # The mean over C channels at each position ((C + 1) ops, as average pooling), then the maximum (C).
    batch, channels, height, width = inputs[0].shape
    _set_ops(module, (2 * channels + 1) * batch * height * width)


def _count_linear(module: nn.Linear, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    _set_ops(module, (2 * module.in_features - 1) * output.numel())


def _counted_separately(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    """ECA layers: registering a rule stops thop from descending into their submodules."""


CountRule = Callable[[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor], None]

README_RULES: Mapping[type, CountRule] = MappingProxyType({
    nn.Conv1d: _count_conv,
    nn.Conv2d: _count_conv,
    nn.BatchNorm2d: _count_batch_norm,
    nn.ReLU: _count_activation,
    nn.ReLU6: _count_activation,
    nn.MaxPool2d: _count_max_pool,
    nn.AvgPool2d: _count_avg_pool,
    nn.AdaptiveAvgPool2d: _count_adaptive_avg_pool,
    nn.AdaptiveMaxPool2d: _count_adaptive_max_pool,
    ChannelPool: _count_channel_pool,
    nn.Linear: _count_linear,
    eca_layer: _counted_separately,
})


# ---------------------------------------------------------------- ECA layers


def _eca_hosts(model: nn.Module) -> List[Tuple[eca_layer, nn.Module]]:
    """Each ECA layer with the block it closes: the nearest ancestor that is not a plain container.

    The ECA layer is the last operation of its block (the shortcut add and a
    ReLU keep the shape), so the block's output has the shape of the ECA input.
    """
    modules = dict(model.named_modules())
    pairs = []
    for name, module in modules.items():
        if not isinstance(module, eca_layer):
            continue
        host_name = name.rpartition(".")[0]
        while host_name and isinstance(modules[host_name], (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            host_name = host_name.rpartition(".")[0]
        pairs.append((module, modules[host_name]))
    return pairs


def _record_eca_costs(model: nn.Module, costs: List[EcaLayerCost]) -> List[torch.utils.hooks.RemovableHandle]:
    def recorder(layer: eca_layer) -> Callable:
        def record(host: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            _, channels, height, width = output.shape
            if channels != layer.channels:
                raise RuntimeError(f"an ECA layer over {layer.channels} channels closes a block with {channels}")
            costs.append(EcaLayerCost(channels, layer.k_size, height, width))
            closing_relu = getattr(host, "relu", None)
            if isinstance(closing_relu, nn.ReLU):
                # A fused block applies its last ReLU inside the block end, where no hook sees it;
                # the original applied the block's ReLU module last to the block's output, and
                # that application is the one its count kept.
                _set_ops(closing_relu, output.numel())

        return record

    return [host.register_forward_hook(recorder(layer)) for layer, host in _eca_hosts(model)]


# ---------------------------------------------------------------- public entry points


def _count_in_place(model: nn.Module, input_size: int) -> Tuple[int, Tuple[EcaLayerCost, ...]]:
    # Imported here so that importing this module (for its tables and formatting) does not need thop.
    with warnings.catch_warnings():
        # thop's version check uses distutils, which warns on every import.
        warnings.simplefilter("ignore", DeprecationWarning)
        import thop

    eca_costs: List[EcaLayerCost] = []
    handles = _record_eca_costs(model, eca_costs)
    try:
        image = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
        macs, _ = thop.profile(model, inputs=(image,), custom_ops=README_RULES, verbose=False)
    finally:
        for handle in handles:
            handle.remove()
    eca_ops = sum(cost.conv_macs + cost.pool_ops for cost in eca_costs)
    return int(macs) + eca_ops, tuple(eca_costs)


def count_macs(model: nn.Module, input_size: int = 224) -> Tuple[int, Tuple[EcaLayerCost, ...]]:
    """README-convention FLOPs of ``model`` on one square image, and what each ECA layer costs.

    Counts on a copy: thop leaves ``total_ops`` / ``total_params`` buffers on
    the modules it has no rule for, which would then turn up in a state_dict.
    The copy lives on the meta device: every rule needs shapes only, so the
    forward pass costs no arithmetic.
    """
    return _count_in_place(copy.deepcopy(model).to("meta"), input_size)


@functools.lru_cache(maxsize=None)
def _plain_counts(arch: str, input_size: int, num_classes: int) -> Tuple[int, int]:
    """Parameters and FLOPs of a network without attention: the baseline of every count of its variants."""
    _, params, macs, _ = _count_architecture(arch, None, input_size, num_classes)
    return params, macs


def _count_architecture(
    arch: str, k_size: KernelSpec, input_size: int, num_classes: int
) -> Tuple[Tuple[int, ...], int, int, Tuple[EcaLayerCost, ...]]:
    with torch.device("meta"):
        model = build_model(arch, k_size, num_classes)
    params = sum(p.numel() for p in model.parameters())
    macs, eca_costs = _count_in_place(model, input_size)
    return tuple(model.kernel_sizes), params, macs, eca_costs


def count_complexity(
    arch: str, k_size: KernelSpec = None, input_size: int = 224, num_classes: int = 1000
) -> Complexity:
    """Parameters and README-convention FLOPs of ``arch`` on one ``input_size`` square image, and what its attention adds.

    The model is built for the count and thrown away, so thop's leftovers do not
    matter, and it is built on the meta device: shapes without data, so that even
    ECA-ResNet-152 counts in well under a second. What the attention adds is the
    difference to the same network without it, counted the same way.
    """
    if input_size < 1:
        raise UsageError(f"--input-size must be at least 1, got {input_size}")
    kernel_sizes, params, macs, eca_costs = _count_architecture(arch, k_size, input_size, num_classes)
    plain = models.PLAIN_COUNTERPARTS[arch]
    plain_params, plain_macs = _plain_counts(plain, input_size, num_classes) if plain != arch else (params, macs)
    return Complexity(
        arch=arch,
        kernel_sizes=kernel_sizes,
        input_size=input_size,
        num_classes=num_classes,
        params=params,
        macs=macs,
        eca_layers=eca_costs,
        added_params=params - plain_params,
        added_macs=macs - plain_macs,
    )


# ---------------------------------------------------------------- formatting


def format_binary(count: float, digits: int = 2) -> str:
    """1024-based, as the original's ``clever_format``: ``24.37M`` for 25,557,112."""
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if count >= scale:
            return f"{count / scale:.{digits}f}{unit}"
    return f"{count:.0f}"


def format_decimal(count: float, digits: int = 2) -> str:
    """1000-based: ``25.56M`` for 25,557,112."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.{digits}f}{unit}"
    return f"{count:.0f}"


def _kernel_text(kernel_sizes: Sequence[int]) -> str:
    return ",".join(map(str, kernel_sizes))


def _published(arch: str, table: Sequence[PublishedRow]) -> Optional[PublishedRow]:
    return next((row for row in table if row.arch == arch), None)


def format_report(result: Complexity) -> str:
    eca_ops = result.eca_conv_macs + result.eca_pool_ops
    kernels = f"ECA kernel sizes {_kernel_text(result.kernel_sizes)}" if result.kernel_sizes else "no ECA layers"
    lines = [
        f"{result.arch}: {kernels}, input 1x3x{result.input_size}x{result.input_size}, {result.num_classes} classes",
        f"parameters: {result.params:,}",
        f"  {format_binary(result.params):>9}  binary  ({BINARY_UNITS}; the original README's units)",
        f"  {format_decimal(result.params):>9}  decimal ({DECIMAL_UNITS})",
        f"FLOPs: {result.macs:,} multiply-accumulates (thop, with the rules behind the README's figures)",
        f"  {format_binary(result.macs):>9}  binary  ({BINARY_UNITS}; the original README's units)",
        f"  {format_decimal(result.macs):>9}  decimal ({DECIMAL_UNITS})",
    ]
    paper = _published(result.arch, PAPER_TABLE3)
    if paper is not None and (result.input_size, result.num_classes) == (224, 1000):
        lines.append(f"the paper's Table 3 (binary): {paper.params} parameters, {paper.flops} FLOPs")
    plain = models.PLAIN_COUNTERPARTS[result.arch]
    if plain != result.arch:
        lines.append(
            f"added to {plain} by the attention: {result.added_params:,} parameters, {result.added_macs:,} FLOPs "
            f"= {result.added_macs / BINARY_GIGA:.2e}G binary = {result.added_macs / 1e9:.2e}G decimal"
        )
    if result.eca_layers:
        lines += [
            f"ECA layers alone ({len(result.eca_layers)} layers), included in the totals above:",
            f"  parameters: {result.eca_params:,} (the sum of their kernel sizes)",
            f"  FLOPs: {eca_ops:,} = {eca_ops / BINARY_GIGA:.2e}G binary = {eca_ops / 1e9:.2e}G decimal, of which",
            f"    channel convolution: {result.eca_conv_macs:,} MACs (k x C per layer)",
            f"    average pooling: {result.eca_pool_ops:,} ops ((H x W + 1) x C per layer)",
            "    not counted: the sigmoid and the x * gate rescale (thop never counted them)",
        ]
    return "\n".join(lines)


def _agrees(ours: str, readme: str) -> bool:
    """Whether our figure, rounded to the README's precision and unit, is the README's."""
    digits = len(readme[:-1].partition(".")[2])
    return ours[-1] == readme[-1] and f"{float(ours[:-1]):.{digits}f}" == readme[:-1]


def _ksize_label(result: Complexity) -> str:
    if not result.kernel_sizes:
        return "-"
    if result.arch == "eca_mobilenet_v2" and result.kernel_sizes == default_block_kernel_sizes():
        return "k13"
    return format_kernel_sizes(result.kernel_sizes)


def format_table(rows: Sequence[Tuple[Optional[PublishedRow], Complexity]], source: str = "README") -> str:
    """Our counts beside a published table's (``source``: "README" or "paper"); rows without published figures show '-'."""
    header = (
        f"{'model':<17} {'ksize':<6} {'parameters':>11} {'binary':>8} {source:>8} {'decimal':>8}   "
        f"{'MACs':>14} {'binary':>8} {source:>8} {'decimal':>8}  agree"
    )
    lines = [
        f"binary: {BINARY_UNITS} (the original README's units); decimal: {DECIMAL_UNITS}",
        header,
        "-" * len(header),
    ]
    for published, result in rows:
        binary_params = format_binary(result.params)
        # The README gives MobileNetV2's FLOPs to one decimal, the ResNets' to two.
        one_decimal = published is not None and published.flops.endswith("M")
        binary_macs = format_binary(result.macs, digits=1 if one_decimal else 2)
        if published is None:
            their_params = their_flops = "-"
            agree = ""
        else:
            their_params, their_flops = published.params, published.flops
            agree = "yes" if _agrees(binary_params, their_params) and _agrees(binary_macs, their_flops) else "NO"
        lines.append(
            f"{result.arch:<17} {_ksize_label(result):<6} {result.params:>11,} {binary_params:>8} "
            f"{their_params:>8} {format_decimal(result.params):>8}   {result.macs:>14,} {binary_macs:>8} "
            f"{their_flops:>8} {format_decimal(result.macs):>8}  {agree}".rstrip()
        )
    return "\n".join(lines)
